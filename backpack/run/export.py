"""`backpack export CONFIG [--version N] --format hf|gguf [--quant Q] --out PATH`: a student version as files
other tools load.

`hf` writes a model directory (backpack/student/export.py), `gguf` one GGUF file (backpack/student/gguf_export.py).
Both are written beside `--out` first and checked before they are moved into place: a fresh Python process that
imports only transformers loads them (backpack/student/roundtrip.py), answers probe prompts greedily and scores
the version's own answers to them. The directory and full-precision f32 GGUF must give the same answers token for
token; f16 and quantised files must score within TOLERANCE of the version (mean NLL per token). A file that fails
is deleted and the export fails, naming the numbers: nothing broken is left at `--out`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from backpack.config import RunConfig
from backpack.data.storage import run_files
from backpack.errors import BackpackError, InputError
from backpack.runtime.progress import Reporter
from backpack.runtime.session import attach_redis

# Mean NLL per token the exported file may add to the version's on the probes (its own greedy answers).
TOLERANCE = {"f16": 0.02, "q8_0": 0.05, "q4_0": 0.5, "q4_1": 0.5}
PROBES = ["What is the capital of France?", "Give me three tips for sleeping better.",
          "Explain what a neural network is in one sentence.", "Write a haiku about the sea."]
PROBE_TOKENS = 16


class ExportError(BackpackError):
    """The exported files did not load back as the version they were written from."""


@dataclass
class ExportResult:
    path: str
    version: int
    format: str
    quant: Optional[str]
    bytes: int
    load_seconds: float
    check: str
    layers: int = 0
    files: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        size = f"{self.bytes / 2**20:.1f} MiB"
        return [f"exported version {self.version} as {self.format}" + (f" ({self.quant})" if self.quant else "")
                + f" to {self.path}: {size}", f"round trip in a fresh process (transformers only): {self.check}; "
                f"loaded in {self.load_seconds:.1f} s as a {self.layers}-layer model"]


def _version(cfg: RunConfig, asked: Optional[int]) -> tuple[int, Optional[dict], dict]:
    """(version, its metadata or None for the base, lineage for the model card)."""
    from backpack.student.registry import Registry

    with attach_redis(cfg) as url:
        reg = Registry(url, cfg.name, run_files(cfg))
        known = {m["version"]: m for m in reg.versions()}
    version = asked if asked is not None else max(known, default=0)
    if version and version not in known:
        raise InputError(f"--version {version}: run {cfg.name!r} has no student version {version} (it has "
                         f"{', '.join(map(str, sorted(known))) or 'none'})")
    files = run_files(cfg)
    figures = {}
    for rel in sorted(files.glob("eval", ".json")):
        if rel.rsplit("/", 1)[-1].startswith(f"v{version}-"):
            e = json.loads(files.read_text(rel))
            figures = {k: e[k] for k in ("nll", "perplexity", "chrf", "kl_to_teacher") if e.get(k) is not None}
    tc = cfg.training
    lineage = {"teachers": [f"{t.name} ({t.model})" for t in cfg.teachers], "student": cfg.student.model_dump(),
               "training": {"objective": tc.objective, "lr": tc.lr, "steps": tc.max_steps,
                            "batch_size": tc.batch_size, "kd_weight": tc.kd_weight} if tc else {},
               "eval": figures}
    return version, known.get(version), lineage


def export(cfg: RunConfig, version: Optional[int], fmt: str, out: str, quant: Optional[str] = None,
           reporter: Optional[Reporter] = None) -> ExportResult:
    """Export `version` (default: the newest) of the run's student; see the module docstring."""
    import torch

    from backpack.core.chat import encode_chat
    from backpack.student.export import model_card, save_hf
    from backpack.student.gguf_export import QUANTS, check_exportable, write_gguf
    from backpack.student.registry import load_version

    cfg.require("student")
    rep = reporter or Reporter()
    if fmt == "gguf":
        quant = quant or "q8_0"
        if quant not in QUANTS:
            raise InputError(f"--quant {quant!r}: one of {', '.join(QUANTS)}")
    elif quant is not None:
        raise InputError("--quant applies to --format gguf only (hf writes the weights as trained, float32)")
    target = Path(out).expanduser()
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise InputError(f"--out {out!r} exists: give a new path (an export never overwrites)")
    number, meta, lineage = _version(cfg, version)
    rep.stage(f"loading version {number} of run {cfg.name!r} (LoRA merged into its base)")
    ap = load_version(meta, cfg.student, merge=True)
    if fmt == "gguf":
        check_exportable(ap.model, ap.tokenizer)
    texts, prompts, refs = [], [], []
    with torch.inference_mode():
        for q in PROBES:
            ids = encode_chat(ap.tokenizer, [{"role": "user", "content": q}])
            got = ap.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=PROBE_TOKENS, do_sample=False,
                                    pad_token_id=ap.tokenizer.pad_token_id)
            prompts.append(ids)
            refs.append(got[0, len(ids):].tolist())
            texts.append(ap.tokenizer.decode(ids))
    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        card = model_card(cfg.name, number, meta, lineage)
        if fmt == "hf":
            rep.stage(f"writing the model directory ({sum(p.numel() for p in ap.model.parameters()) / 1e6:.0f}M "
                      "parameters)")
            save_hf(ap.model, ap.tokenizer, partial, card)
            gguf_name = None
        else:
            partial.mkdir(parents=True)
            gguf_name = target.name if target.suffix == ".gguf" else f"{cfg.name}-v{number}-{quant}.gguf"
            rep.stage(f"writing {gguf_name} ({quant})")
            write_gguf(ap.model, ap.tokenizer, partial / gguf_name, quant, f"{cfg.name} v{number}")
        rep.stage("loading it back in a fresh process (transformers only) to check it")
        ref_nll = _nll(ap.model, prompts, refs)
        back = _round_trip(partial, gguf_name, {"prompts": prompts, "references": refs, "texts": texts,
                                                "max_new_tokens": PROBE_TOKENS})
        check = _judge(fmt, quant, back, prompts, refs, ref_nll)
        if fmt == "hf":
            if target.exists():
                target.rmdir()
            partial.rename(target)
            files = sorted(p.name for p in target.iterdir())
            size = sum(p.stat().st_size for p in target.iterdir())
        else:
            final = target if target.suffix == ".gguf" else target / gguf_name
            final.parent.mkdir(parents=True, exist_ok=True)
            (partial / gguf_name).rename(final)
            target, files, size = final, [final.name], final.stat().st_size
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return ExportResult(str(target), number, fmt, quant, size, back["load_seconds"], check, back["layers"], files)


def _nll(model, prompts: list[list[int]], refs: list[list[int]]) -> float:
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for ids, ref in zip(prompts, refs):
            if not ref:
                continue
            logp = torch.log_softmax(model(torch.tensor([ids + ref])).logits[0, len(ids) - 1:-1].float(), -1)
            total -= logp.gather(1, torch.tensor(ref)[:, None]).sum().item()
            count += len(ref)
    return total / max(1, count)


def _round_trip(directory: Path, gguf_name: Optional[str], probes: dict) -> dict:
    from backpack.student import roundtrip

    t0 = time.perf_counter()
    args = [sys.executable, roundtrip.__file__, str(directory)] + ([gguf_name] if gguf_name else [])
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    proc = subprocess.run(args, input=json.dumps(probes), capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ExportError(f"the exported files do not load with plain transformers: {last}")
    out = json.loads(proc.stdout)
    out["wall_seconds"] = time.perf_counter() - t0
    return out


def _judge(fmt: str, quant: Optional[str], back: dict, prompts, refs, ref_nll: float) -> str:
    if back["prompt_ids"] != prompts:
        raise ExportError("the exported tokenizer encodes the probe prompts differently from the student's")
    if fmt == "hf" or quant == "f32":
        if back["answers"] != refs:
            bad = sum(a != r for a, r in zip(back["answers"], refs))
            raise ExportError(f"the exported model answers {bad} of {len(refs)} probe prompts differently (greedy)")
        return f"the same greedy answers to {len(refs)} probe prompts, NLL {back['nll']:.4f} (version {ref_nll:.4f})"
    delta = back["nll"] - ref_nll
    if delta > TOLERANCE[quant]:
        raise ExportError(f"the {quant} file scores NLL {back['nll']:.4f} on the probes against the version's "
                          f"{ref_nll:.4f}: {delta:+.4f} is over the tolerance of {TOLERANCE[quant]}")
    same = sum(a == r for a, r in zip(back["answers"], refs))
    return (f"NLL {back['nll']:.4f} against the version's {ref_nll:.4f} ({delta:+.4f}, tolerance "
            f"{TOLERANCE[quant]}); {same} of {len(refs)} greedy answers the same")
