"""Student checkpoints as files (no Ray): resuming only from whole ones, no code run from storage, and a version
published only once Ray Train holds its checkpoint."""

import os
import pickle
import types

import pytest
import torch

from backpack.data.storage import RunFiles
from backpack.student import checkpoints
from backpack.student.trainer import WorkerSession


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def _checkpoint(files: RunFiles, name: str, step: int):
    model = _model()
    checkpoints.save(files.path(f"train/run-a/{name}"), model, {"step": step})
    return files.path(f"train/run-a/{name}")


def test_resume_skips_a_checkpoint_a_crash_cut_short(tmp_path):
    files = RunFiles(tmp_path / "run")
    _checkpoint(files, "checkpoint_000001", 5)
    cut = _checkpoint(files, "checkpoint_000002", 10)
    weights = os.path.join(cut, checkpoints.WEIGHTS)
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    no_state = _checkpoint(files, "checkpoint_000003", 15)
    with open(os.path.join(no_state, checkpoints.STATE), "w") as f:
        f.write('{"step": 1')  # half a JSON file
    with pytest.warns(UserWarning, match="skipping the incomplete checkpoint .*checkpoint_00000[23]"):
        location, step = checkpoints.latest_checkpoint(files)
    assert step == 5 and location.endswith("checkpoint_000001")
    assert checkpoints.complete(files, "train/run-a/checkpoint_000001") == 5
    assert checkpoints.complete(files, "train/run-a/checkpoint_000002") is None


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # what a crafted optimizer.pt could run


def test_optimizer_state_is_loaded_without_running_code(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    sched.step()
    checkpoints.save(tmp_path / "ok", model, {"step": 1}, opt, sched)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh, lambda s: 1.0)
    assert checkpoints.load(tmp_path / "ok", model, fresh, fresh_sched) == {"step": 1}
    assert fresh.state_dict()["state"][0]["step"] == 1 and fresh_sched.last_epoch == 1  # the real state loads

    marker = tmp_path / "owned"
    checkpoints.save(tmp_path / "bad", model, {"step": 1})
    with open(tmp_path / "bad" / checkpoints.OPTIMIZER, "wb") as f:
        pickle.dump({"optimizer": _Payload(str(marker))}, f)
    with pytest.raises(pickle.UnpicklingError):
        checkpoints.load(tmp_path / "bad", model, fresh)
    assert not marker.exists()


def test_a_version_is_published_only_after_ray_train_holds_the_checkpoint(monkeypatch):
    import ray.train

    calls = []

    class Registry:
        def publish(self, d, state, *fingerprints):
            calls.append(("publish", state["step"], sorted(os.listdir(d))))

    def report(metrics, checkpoint=None):
        calls.append(("report", metrics["step"], checkpoint is not None))
        if metrics["step"] == 2:
            raise RuntimeError("the worker died here")
    monkeypatch.setattr(ray.train, "report", report)
    model = _model()
    session = types.SimpleNamespace(
        rank=0, model=model, opt=torch.optim.SGD(model.parameters(), lr=0.1), sched=None, last_metrics=None,
        config={"student": {}, "registry": Registry()},
        student=types.SimpleNamespace(base=types.SimpleNamespace(fingerprint="b"), tokenizer_fingerprint="t"))
    WorkerSession.report(session, {"step": 1}, checkpoint_state={"dataset_version": 1})
    with pytest.raises(RuntimeError):
        WorkerSession.report(session, {"step": 2}, checkpoint_state={"dataset_version": 1})
    assert calls == [("report", 1, True),
                     ("publish", 1, [checkpoints.OPTIMIZER, checkpoints.STATE, checkpoints.WEIGHTS]),
                     ("report", 2, True)]  # step 2 never became a version: its resume will publish it once
