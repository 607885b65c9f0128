"""The `hf` teacher: a transformers causal LM answering batches of chat Queries.

Queries that carry a completion to score (`score_ids`) are scored by `teachers/score.py`, the rest written.
Batches are left-padded; Queries with identical decoding parameters share one `generate` call, in chunks of
`batch_size` cut from the Queries sorted by prompt length (length bucketing: each chunk pads its prompts to
similar widths, so less compute goes to padding). A Query with a fixed seed is generated on its own so its
answer does not depend on what it was batched with. Rows come back in Query order whatever the chunks were.
"""

from __future__ import annotations

import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import torch

from backpack.config import TeacherConfig
from backpack.core.chat import encode_chat, with_context
from backpack.core.types import LENGTH, STOP, Completion, DecodingParams, Query
from backpack.errors import ModelNotFoundError, TeacherError
from backpack.teachers.base import TeacherBase, in_query_order, split_scoring
from backpack.teachers.decode import decode_batch, generate_batch, left_pad, supports
from backpack.teachers.kvcache import KVBuffers
from backpack.teachers.loader import ResolvedModel, resolve_model
from backpack.teachers.packed import pack_linears
from backpack.teachers.score import score_batch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFTeacher(TeacherBase):
    """A transformers model behind the teacher protocol. Construct in-process for tests, or via backpack/run/actors.py."""

    def __init__(self, cfg: TeacherConfig, replica: str = "", cache=None):
        # Each replica gets its own thread budget: two processes both using every core collapse each other.
        torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.name = cfg.name
        self.replica = replica or cfg.name
        # All of this teacher's torch work (conversion, loading, packing, decoding) runs on one thread of its own,
        # whichever thread calls it. GNU OpenMP keeps a worker pool per thread that starts parallel work; with a
        # second pool in the process (the model loaded on the actor's thread, batches decoded on the dynamic
        # batcher's) the pools' workers outnumber the cores, libgomp stops spinning between ops, and every op
        # waits for its workers to wake: 64 prompts decoded 8-15% slower (13.3-14.5 s against 11.7-13.8 s).
        self._torch_thread = ThreadPoolExecutor(1, thread_name_prefix=f"torch-{self.replica}")
        # The KV cache's storage, kept from batch to batch (decode.KVBuffers: fresh pages cost more than the data).
        self._kv = KVBuffers()
        self._on_torch_thread(self._load, cfg, cache)

    def _on_torch_thread(self, fn, *args):
        if self._torch_thread is None:  # `from_model`: the caller's model, on the caller's thread
            return fn(*args)
        return self._torch_thread.submit(fn, *args).result()

    def _load(self, cfg: TeacherConfig, cache) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.resolved = resolve_model(cfg.model, cache)
        if cfg.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self.device = cfg.device
        if self.device == "cuda" and not torch.cuda.is_available():
            raise TeacherError(self.replica, "device 'cuda' was asked for but torch sees no GPU here")
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.resolved.path)
            model = AutoModelForCausalLM.from_pretrained(self.resolved.path, dtype=_DTYPES[cfg.dtype])
        except (OSError, ValueError, KeyError) as e:
            raise ModelNotFoundError(f"cannot load model {cfg.model!r}: {str(e).splitlines()[0]}") from None
        self._attach(model, tokenizer)
        # Only a model this teacher loaded itself: `from_model`'s may be trained again after it answers.
        self.packed_layers = pack_linears(self.model) if cfg.prepack_weights else 0

    @classmethod
    def from_model(cls, name: str, model, tokenizer, fingerprint: str, batch_size: int = 8) -> "HFTeacher":
        """Answer with an already loaded model (a student under evaluation, say) through the same code."""
        self = cls.__new__(cls)
        self.cfg = TeacherConfig(name=name, batch_size=batch_size)
        self.name = self.replica = name
        self.resolved = ResolvedModel("", fingerprint, name)
        self.packed_layers, self._torch_thread, self._kv = 0, None, None  # nothing held between a student's calls
        self.device = str(next(model.parameters()).device)
        self._attach(model, tokenizer)
        return self

    def _attach(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.to(self.device).eval()
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.stop_ids = {int(i) for i in eos + [self.tokenizer.eos_token_id] if i is not None}
        self.row_dropping = supports(self.model)  # else transformers' generate (teachers/decode.py)

    def info(self) -> dict:
        return {"teacher": self.name, "replica": self.replica, "backend": "hf", "model": self.resolved.source,
                "fingerprint": self.resolved.fingerprint, "device": self.device, "context": self.context,
                "threads": torch.get_num_threads(), "packed_layers": self.packed_layers}

    # ------------------------------------------------------------------ protocol

    def answer(self, queries: list[Query]) -> list[Completion]:
        return self._on_torch_thread(self._answer, queries)

    def _answer(self, queries: list[Query]) -> list[Completion]:
        qs, scored = split_scoring(queries)
        completions: list[Completion] = self._score(scored) if scored else []
        encoded: dict[str, list[int]] = {}
        groups: dict[str, list[Query]] = defaultdict(list)
        for q in qs:
            ids = self._encode(q)
            limit = self.context - q.decoding.max_new_tokens
            if len(ids) > limit:
                completions.append(self._failed(q, f"prompt is {len(ids)} tokens; with max_new_tokens "
                                                   f"{q.decoding.max_new_tokens} it exceeds the model context "
                                                   f"of {self.context} tokens"))
                continue
            encoded[q.id] = ids
            groups[q.decoding.key()].append(q)
        try:
            for group in groups.values():
                params = group[0].decoding
                if params.seed is not None and not params.greedy:
                    for q in group:  # seeded sampling: reproducible per Query, whatever the batch
                        completions += self._generate([q], [encoded[q.id]], params)
                else:
                    # Length bucketing (stable: equal lengths keep their order). Greedy answers do not depend on
                    # batch mates (left padding is masked), and unseeded sampling is a fresh draw either way.
                    group = sorted(group, key=lambda q: len(encoded[q.id]))
                    for start in range(0, len(group), self.cfg.batch_size):
                        chunk = group[start:start + self.cfg.batch_size]
                        completions += self._generate(chunk, [encoded[q.id] for q in chunk], params)
        except torch.OutOfMemoryError as e:
            raise TeacherError(self.replica, f"out of memory on {self.device}: {e}") from None
        except RuntimeError as e:
            raise TeacherError(self.replica, f"{type(e).__name__}: {e}") from None
        return in_query_order(queries, completions)

    def _score(self, qs: list[Query]) -> list[Completion]:
        """Completions holding each Query's score_ids with this model's logprobs of them (teachers/score.py), in
        chunks of batch_size cut from the Queries sorted by length."""
        out, encoded = [], {}
        for q in qs:
            ids = self._encode(q)
            if len(ids) + len(q.score_ids) > self.context:
                out.append(self._failed(q, f"prompt ({len(ids)} tokens) and completion to score "
                                           f"({len(q.score_ids)} tokens) exceed the model context of "
                                           f"{self.context} tokens"))
            else:
                encoded[q.id] = ids
        todo = sorted((q for q in qs if q.id in encoded), key=lambda q: len(encoded[q.id]) + len(q.score_ids))
        try:
            for start in range(0, len(todo), self.cfg.batch_size):
                chunk = todo[start:start + self.cfg.batch_size]
                k = max(q.decoding.logprobs for q in chunk)
                t0 = time.perf_counter()
                s = score_batch(self.model, [encoded[q.id] for q in chunk], [list(q.score_ids) for q in chunk], k,
                                self.tokenizer.pad_token_id, buffers=self._kv)
                latency = time.perf_counter() - t0
                for i, q in enumerate(chunk):
                    kq = q.decoding.logprobs  # a chunk computes its largest k; each Query keeps its own
                    out.append(Completion(
                        query_id=q.id, teacher=self.name, text=self.tokenizer.decode(q.score_ids,
                                                                                     skip_special_tokens=True),
                        token_ids=list(q.score_ids), replica=self.replica, model_fingerprint=self.resolved.fingerprint,
                        prompt_tokens=len(encoded[q.id]), latency_s=latency, token_logprobs=s.chosen[i],
                        top_ids=[t[:kq] for t in s.top_ids[i]] if kq else [],
                        top_logprobs=[t[:kq] for t in s.top_logprobs[i]] if kq else []))
        except torch.OutOfMemoryError as e:
            raise TeacherError(self.replica, f"out of memory on {self.device} while scoring: {e}") from None
        except RuntimeError as e:
            raise TeacherError(self.replica, f"{type(e).__name__} while scoring: {e}") from None
        return out

    # ------------------------------------------------------------------ internals

    def _failed(self, q: Query, why: str) -> Completion:
        c = Completion.failed(q.id, self.name, why, self.replica)
        c.model_fingerprint = self.resolved.fingerprint
        return c

    def _encode(self, q: Query) -> list[int]:
        return encode_chat(self.tokenizer, with_context(q.messages, q.context))

    def _generate(self, group: list[Query], ids: list[list[int]], p: DecodingParams) -> list[Completion]:
        pad = self.tokenizer.pad_token_id
        input_ids, attention = left_pad(ids, pad, self.device)
        if p.seed is not None and not p.greedy:
            torch.manual_seed(p.seed)
        t0 = time.perf_counter()
        with torch.inference_mode():
            if self.row_dropping:  # our loop: a row that stopped costs nothing more (teachers/decode.py)
                d = decode_batch(self.model, input_ids, attention, p, self.stop_ids, buffers=self._kv)
            else:
                d = generate_batch(self.model, input_ids, attention, p, self.stop_ids, pad)
        latency = time.perf_counter() - t0
        completions = []
        for row, tokens in enumerate(d.tokens):
            q = group[row // p.n]
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            c = Completion(query_id=q.id, teacher=self.name, text=text, token_ids=tokens,
                           finish_reason=STOP if d.stopped[row] else LENGTH, sample_index=row % p.n,
                           replica=self.replica, model_fingerprint=self.resolved.fingerprint,
                           prompt_tokens=len(ids[row // p.n]), latency_s=latency)
            if d.chosen is not None:
                c.token_logprobs, c.top_ids, c.top_logprobs = d.chosen[row], d.top_ids[row], d.top_logprobs[row]
            completions.append(c)
        return completions
