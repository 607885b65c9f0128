"""What a user does beside a (continual) run: push prompts, look at its state, choose the served version.

These are the `backpack ingest | status | versions | promote | rollback` commands as plain functions that
return data (and, for the CLI, render it as text). Each reaches the run's Redis with `attach_redis`: the
configured server, else the embedded server of the live run, else (no run live) the run's embedded server
started from its AOF for the command, so prompts pushed while no run is live wait for the next one.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from backpack.config import RunConfig
from backpack.core.types import Query
from backpack.data.prompts import read_prompt_lines
from backpack.data.storage import run_files
from backpack.errors import DatasetError, InputError
from backpack.runtime.session import attach_redis

MAX_SHOWN = 10  # rejected records listed one by one; the rest are counted


# ---------------------------------------------------------------- ingest


@dataclass
class IngestResult:
    run: str
    source: str                 # the file name, or "stdin"
    accepted: int               # queued for the teachers
    duplicates: int             # the same prompt was already queued or answered: not queued again
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)

    @property
    def records(self) -> int:
        return self.accepted + self.duplicates + len(self.rejected)


def read_input(source: str) -> tuple[bytes, str]:
    """The bytes of `source` (a path, or "-" for standard input) and how messages name it."""
    if source == "-":
        return sys.stdin.buffer.read(), "stdin"
    path = Path(source).expanduser()
    if not path.exists():
        raise InputError(f"prompt file not found: {source!r}")
    if not path.is_file():
        raise InputError(f"not a file: {source!r}")
    return path.read_bytes(), path.name


def parse_lines(data: bytes, name: str, cfg: RunConfig) -> tuple[list[tuple[int, Query]], list[tuple[int, str]]]:
    """Prompt records, one a line: a line starting with `{` is a JSONL record ({"prompt": ...} or
    {"messages": [...]}, as in a prompt file), any other non-blank line is a plain-text prompt. Returns
    ((line, Query) to push, (line, reason) rejected). Each line is read on its own, so a prompt repeated in
    the input is a duplicate for the intake (queued once), not a rejected record."""
    decoding = cfg.decoding.params()
    queries, rejected = [], []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        text = raw.strip()
        if not text:
            continue
        if not text.startswith(b"{"):
            try:
                text = json.dumps({"prompt": text.decode("utf-8")}, ensure_ascii=False).encode("utf-8")
            except UnicodeDecodeError:
                pass  # read_prompt_lines names the bad byte
        got, bad = read_prompt_lines(text, name, decoding, cfg.prompts.default_task, cfg.prompts.max_chars,
                                     cfg.prompts.override_caps(cfg.decoding))
        queries += [(lineno, q) for q in got]
        prefix = f"{name} line 1: "  # the record is line 1 of its own one-line input
        rejected += [(lineno, r.reason.removeprefix(prefix)) for r in bad]
    return queries, rejected


def ingest(cfg: RunConfig, source: str) -> IngestResult:
    """Push the prompt records of `source` ("-": standard input) to the run's intake stream. Bad records are
    reported, not pushed; the good ones are pushed all the same."""
    from backpack.scheduling.intake import Intake

    data, name = read_input(source)
    queries, rejected = parse_lines(data, name, cfg)
    if not queries and not rejected:
        raise InputError(f"{name if source == '-' else repr(source)} holds no prompt records (the input is empty)")
    result = IngestResult(cfg.name, name, 0, 0, rejected)
    if not queries:
        return result
    with attach_redis(cfg) as url:
        # (the URL attach_redis gives carries redis.password_env's password: nothing more to pass)
        intake = Intake(url, cfg.name, cfg.decoding.params(), cfg.prompts.default_task, cfg.prompts.max_chars,
                        caps=cfg.prompts.override_caps(cfg.decoding))
        for lineno, q in queries:
            try:
                pushed = intake.push_query(q)
            except InputError as e:  # an id already used for another prompt
                result.rejected.append((lineno, str(e)))
                continue
            if pushed.accepted:
                result.accepted += 1
            else:
                result.duplicates += 1
    result.rejected.sort()
    return result


def format_ingest(r: IngestResult) -> tuple[str, list[str]]:
    """The summary line, and the lines listing the rejected records."""
    summary = (f"pushed {r.records} prompt(s) to run {r.run}: {r.accepted} accepted, {r.duplicates} duplicate(s) "
               f"(already queued or answered), {len(r.rejected)} rejected")
    lines = [f"  {r.source} line {n}: {reason}" for n, reason in r.rejected[:MAX_SHOWN]]
    if len(r.rejected) > MAX_SHOWN:
        lines.append(f"  ... and {len(r.rejected) - MAX_SHOWN} more")
    return summary, lines


# ---------------------------------------------------------------- status


def _require_run(cfg: RunConfig) -> None:
    """A command that only reads a run with an embedded Redis needs the run's folder (else storage.path or the
    name is wrong, and an empty state would be shown for a run that is elsewhere)."""
    if cfg.redis.url is None and not cfg.run_dir.is_dir():
        raise InputError(f"run {cfg.name!r} has nothing at {cfg.run_dir} yet: no prompt was ingested and it was "
                         f"never run there (check storage.path and name)")


def _tail(cfg: RunConfig, rel: str, block: int = 65536) -> tuple[bytes, Optional[float]]:
    """The last `block` bytes of one of the run's (possibly large, still growing) files and its modification time
    (b"", None when there is none). An object store has no seek: there the whole (small) log is read."""
    files = run_files(cfg)
    if not files.local:
        info = files.fs.get_file_info(files.path(rel))
        data = files.read_bytes(rel) or b""
        return data[-block:], info.mtime.timestamp() if info.mtime else None
    path = Path(files.path(rel))
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - block))
            return f.read(), path.stat().st_mtime
    except OSError:
        return b"", None


def _last_json_line(tail: bytes) -> Optional[dict]:
    """The last complete JSON line of the tail of a JSONL file."""
    for line in reversed(tail.splitlines()):
        try:
            rec = json.loads(line)
        except ValueError:  # a line being written, or cut by the block's start
            continue
        if isinstance(rec, dict):
            return rec
    return None


def trainer_state(cfg: RunConfig) -> Optional[dict]:
    """The trainer's last logged step, from the run's train/metrics.jsonl (None before any)."""
    tail, mtime = _tail(cfg, "train/metrics.jsonl")
    last = _last_json_line(tail)
    if last is None:
        return None
    when = last.get("time")
    out = {"step": last.get("step"), "time": when if isinstance(when, (int, float)) else mtime}
    for k in ("loss", "dataset_version"):
        if k in last:
            out[k] = last[k]
    return out


def dataset_state(cfg: RunConfig) -> Optional[dict]:
    from backpack.data.store import DatasetStore

    try:
        s = DatasetStore(str(cfg.dataset_dir), create=False).manifest().summary()
    except DatasetError:
        return None
    return {"path": str(cfg.dataset_dir), "version": s["version"], "rows": s["rows"], "ok": s["ok"],
            "failed": s["failed"], "teachers": usage_of(cfg)}


def usage_of(cfg: RunConfig) -> list[dict]:
    """Per-teacher prompts, answers, failures, tokens, latency and spend of the run's dataset."""
    from backpack.data.store import DatasetStore
    from backpack.teachers.accounting import teacher_usage

    columns = ["teacher", "replica", "query_id", "status", "prompt_tokens", "completion_tokens", "latency_s"]
    rows = DatasetStore(str(cfg.dataset_dir), create=False).read(columns=columns).to_pylist()
    return teacher_usage(rows, {t.name: t.cost_per_1k_tokens for t in cfg.teachers})


def incidents_of(cfg: RunConfig) -> list[dict]:
    """The run's last teacher incidents: replicas that could not start or died (teachers/accounting.py)."""
    from backpack.teachers.accounting import INCIDENTS, parse_incidents

    return parse_incidents(run_files(cfg).read_text(INCIDENTS) or "")


def replicas_of(cfg: RunConfig) -> dict:
    """Each teacher replica's counters at the end of the run's last generation (teachers/accounting.py)."""
    from backpack.teachers.accounting import REPLICAS

    text = run_files(cfg).read_text(REPLICAS)
    try:
        return json.loads(text) if text else {}
    except ValueError:  # written whole in one go; unreadable only if damaged
        return {}


def _int_or_none(v) -> Optional[int]:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def status(cfg: RunConfig) -> dict:
    """The run at a glance: intake backlog, dataset, trainer, student versions, live version, server."""
    from backpack.mental.store import MentalStore
    from backpack.runtime.redis_server import RunKeys, connect
    from backpack.scheduling.intake import backlog
    from backpack.student.registry import Registry

    _require_run(cfg)
    with attach_redis(cfg) as url:
        b = backlog(url, cfg.name)
        reg = Registry(url, cfg.name, run_files(cfg))
        versions = [m["version"] for m in reg.versions()]
        live = reg.live()
        server = connect(url).hgetall(RunKeys(cfg.name).server)
        knowledge = MentalStore(url, cfg.name).tasks()
    return {
        "run": cfg.name,
        "run_dir": run_files(cfg).uri(),
        "backlog": asdict(b),
        "dataset": dataset_state(cfg),
        "trainer": trainer_state(cfg),
        "versions": len(versions),
        "latest_version": versions[-1] if versions else None,
        "live_version": live,
        "server": {"url": server.get("url"), "version": _int_or_none(server.get("version"))} if server else None,
        "knowledge": knowledge,  # task -> current knowledge version (the Mental Process)
        "incidents": incidents_of(cfg),  # teacher replicas that could not start or died (last 20)
        "replicas": replicas_of(cfg),    # each replica's retries, rate-limit waits, ledger hits (last run)
    }


def _when(t: Optional[float]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else "—"


def _ago(t: float) -> str:
    s = max(0, time.time() - t)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.1f} h ago"


def format_status(s: dict) -> str:
    b = s["backlog"]
    rows = [("run", f"{s['run']} ({s['run_dir']})"),
            ("backlog", f"{b['waiting']} waiting, {b['in_progress']} in progress (pushed {b['pushed']}, "
                        f"{b['duplicates']} duplicate(s), answered {b['answered']}, failed {b['failed']})")]
    d = s["dataset"]
    rows.append(("dataset", f"version {d['version']}: {d['rows']} row(s), {d['ok']} ok, {d['failed']} failed"
                 if d else "none yet"))
    for u in (d or {}).get("teachers", []):
        lat = f", p50 {u['latency_p50_s']:.2f} s" if u["latency_p50_s"] is not None else ""
        rows.append((f"  {u['teacher']}", f"{u['answers']} answered, {u['failed']} failed, {u['from_ledger']} from "
                     f"the ledger, {u['prompt_tokens'] + u['completion_tokens']} tokens{lat}, spend "
                     f"{u['spend']:.4f}"))
    t = s["trainer"]
    if t:
        extra = f", loss {t['loss']:.4f}" if isinstance(t.get("loss"), (int, float)) else ""
        rows.append(("trainer", f"step {t['step']} at {_when(t['time'])} ({_ago(t['time'])}{extra})"))
    else:
        rows.append(("trainer", "no step logged yet"))
    rows.append(("versions", f"{s['versions']} (latest {s['latest_version']})" if s["versions"] else "none yet"))
    live = s["live_version"]
    rows.append(("live", f"version {live}" if live is not None else "none promoted (the base model, version 0)"))
    srv = s["server"]
    rows.append(("server", f"{srv['url']} serving version {srv['version']}" if srv else "not running"))
    if s.get("knowledge"):
        rows.append(("knowledge", ", ".join(f"{t} v{v}" for t, v in s["knowledge"].items())))
    from backpack.teachers.accounting import format_replicas

    rows += [(f"  {name}", counted) for name, counted in format_replicas(s.get("replicas") or {})]
    if s.get("incidents"):
        rows.append(("incidents", f"{len(s['incidents'])} teacher replica(s) did not start or died; the latest:"))
        for i in s["incidents"][-5:]:
            rows.append((f"  {i['replica']}", f"{i['what'][:200]} ({_when(i['time'])})"))
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(f"{k:<{width}}{v}" for k, v in rows)


# ---------------------------------------------------------------- versions, promote, rollback


def versions(cfg: RunConfig) -> dict:
    """Every student version's metadata (with `live` marking the served one) and the live version."""
    from backpack.student.registry import Registry

    _require_run(cfg)
    with attach_redis(cfg) as url:
        reg = Registry(url, cfg.name, run_files(cfg))
        metas, live = reg.versions(), reg.live()
    return {"run": cfg.name, "live": live, "versions": [{**m, "live": m.get("version") == live} for m in metas]}


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def gate_text(gate) -> str:
    """A gate decision as one cell: 'promoted: nll 2.1 vs live 2.3' (missing parts left out)."""
    if not gate:
        return "—"
    if not isinstance(gate, dict):
        return str(gate)
    text = str(gate.get("decision") or "?")
    metric, cand, live = gate.get("metric"), gate.get("candidate"), gate.get("live")
    if metric and cand is not None:
        text += f": {metric} {_num(cand)}" + (f" vs live {_num(live)}" if live is not None else "")
    return text


def format_versions(v: dict) -> str:
    if not v["versions"]:
        return f"run {v['run']} has no student versions yet"
    head = ("", "version", "step", "dataset", "created", "gate")
    rows = [("*" if m["live"] else "", str(m.get("version")), _num(m.get("step")), _num(m.get("dataset_version")),
             _when(m.get("created_at")), gate_text(m.get("gate"))) for m in v["versions"]]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
    if v["live"] is None:
        lines.append("no version promoted yet: the base model (version 0) is served")
    elif v["live"] == 0:
        lines.append("* live: the base model (version 0)")
    else:
        lines.append(f"* live: version {v['live']}")
    return "\n".join(lines)


def promote(cfg: RunConfig, version: int) -> tuple[int, Optional[int]]:
    """Make `version` the live one (0: the untrained base); returns (version, the one live before)."""
    from backpack.student.registry import Registry

    _require_run(cfg)
    with attach_redis(cfg) as url:
        reg = Registry(url, cfg.name, run_files(cfg))
        known = [m["version"] for m in reg.versions()]
        if version != 0 and version not in known:
            there = ", ".join(map(str, known)) if known else "none yet"
            raise InputError(f"no student version {version} in run {cfg.name!r} (its versions: {there}; "
                             f"0 is the base model)")
        was = reg.live()
        if was != version:  # promoting the live one again would only add a step that rollback must undo
            reg.promote(version, by="user", reason="backpack promote")
    return version, was


def rollback(cfg: RunConfig) -> tuple[int, Optional[int]]:
    """Serve the version that was live before the current one; returns (that version, the one it replaces)."""
    from backpack.student.registry import Registry

    _require_run(cfg)
    with attach_redis(cfg) as url:
        reg = Registry(url, cfg.name, run_files(cfg))
        was = reg.live()
        try:
            return reg.rollback(by="user"), was
        except ValueError:
            why = ("no version has been promoted yet" if was is None
                   else f"no version was live before version {was}")
            raise InputError(f"nothing to roll back to in run {cfg.name!r}: {why}") from None


def was_text(v: Optional[int]) -> str:
    """How a previously live version reads in 'version N is live (was M)'."""
    return "none promoted: the base model" if v is None else str(v)
