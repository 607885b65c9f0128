"""Student checkpoints: the trainable weights (LoRA adapters, or every weight in full mode) as safetensors,
the optimizer state, and a small JSON state. The same files make a registry version. And where a run's Ray
Train checkpoints are, so a rerun resumes from the newest."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from backpack.core.redact import redact

WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
STATE = "state.json"


def unwrap(model):
    """The model under a DDP wrapper, if any."""
    return getattr(model, "module", model)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Trainable parameters by name; tied weights (embeddings = LM head) stored once."""
    out, seen = {}, set()
    for name, p in unwrap(model).named_parameters():
        if p.requires_grad and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            out[name] = p.detach().cpu().contiguous()
    return out


def save(directory: str | os.PathLike, model, state: dict, optimizer=None, scheduler=None) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model), str(d / WEIGHTS))
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None}, d / OPTIMIZER)
    (d / STATE).write_text(json.dumps(state, indent=1))


def load_weights(directory: str | os.PathLike, model, adapter: Optional[str] = None) -> None:
    """Load trainable weights into `model` (built from the same student config). With `adapter`, a LoRA
    checkpoint's weights go into that adapter of a peft `model` (added beforehand) instead of its "default"
    one: how one base holds several versions, to serve them or merge them."""
    weights = load_file(str(Path(directory) / WEIGHTS))
    if adapter is not None:
        weights = {k.replace(".default.", f".{adapter}."): v for k, v in weights.items()}
    missing = set(weights) - {n for n, _ in unwrap(model).named_parameters()}
    if missing:
        raise ValueError(f"checkpoint {directory} has weights the model lacks: {sorted(missing)[:5]}")
    unwrap(model).load_state_dict(weights, strict=False)


def load(directory: str | os.PathLike, model, optimizer=None, scheduler=None) -> dict:
    """Restore weights (and optimizer/scheduler when given); returns the saved state dict."""
    d = Path(directory)
    load_weights(d, model)
    if optimizer is not None and (d / OPTIMIZER).exists():
        # weights_only: tensors and plain containers only, so a writer of the run's storage cannot run code here
        opt = torch.load(d / OPTIMIZER, weights_only=True)
        optimizer.load_state_dict(opt["optimizer"])
        if scheduler is not None and opt["scheduler"] is not None:
            scheduler.load_state_dict(opt["scheduler"])
    return json.loads((d / STATE).read_text())


def checkpoint_states(files) -> list[str]:
    """The state files of a run's Ray Train checkpoints (train/<ray train run>/checkpoint_*/state.json),
    relative to the run's RunFiles `files`."""
    return [s for s in files.glob("train", f"/{STATE}")
            if len(s.split("/")) == 4 and s.split("/")[2].startswith("checkpoint_")]


def complete(files, directory: str) -> Optional[int]:
    """The step of the checkpoint in `directory` (relative to RunFiles `files`) if it is whole: its state
    parses with a step, and its weights file is there with a safetensors header that fits in it. None if not
    (a checkpoint a crash cut short)."""
    try:
        state = json.loads(files.read_text(f"{directory}/{STATE}") or "")
        step = int(state["step"])
    except (ValueError, KeyError, TypeError):
        return None
    path = files.path(f"{directory}/{WEIGHTS}")
    try:
        size = files.fs.get_file_info(path).size or 0
        with files.fs.open_input_stream(path) as f:
            header = f.read(8)
    except (FileNotFoundError, OSError):
        return None
    if len(header) < 8 or 8 + int.from_bytes(header, "little") > size:
        return None
    return step


def latest_checkpoint(files) -> Optional[tuple[str, int]]:
    """(location, step) of the newest complete Ray Train checkpoint of a run (its RunFiles), if any: a local
    folder, or a URI when the run's storage is an object store. Incomplete ones are skipped with a warning."""
    best = None
    for state in checkpoint_states(files):
        directory = state.rsplit("/", 1)[0]
        step = complete(files, directory)
        if step is None:
            warnings.warn(f"skipping the incomplete checkpoint {redact(files.uri(directory))} (its state or weights are "
                          "missing or cut short): resuming from an earlier one", stacklevel=2)
            continue
        if best is None or step > best[1]:
            best = (files.uri(directory), step)
    return best
