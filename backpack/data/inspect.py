"""Looking at a dataset from the command line: `backpack data show` (the manifest and a few rows, or a synthesized
prompt set's funnel) and `backpack data export` (every row as JSON lines)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional

import pyarrow.compute as pc
import pyarrow.parquet as pq

from backpack.data.curation import funnel_lines
from backpack.data.storage import RunFiles
from backpack.data.store import DatasetStore


def dataset_path(path: str) -> str:
    """Accept a run folder (runs/quickstart) as well as its dataset folder (runs/quickstart/dataset)."""
    p = Path(path)
    return str(p / "dataset") if not (p / "manifest.json").exists() and (p / "dataset" / "manifest.json").exists() \
        else path


def _short(text: str, n: int = 160) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def show(path: str, rows: int = 3, version: Optional[int] = None, failed_only: bool = False) -> str:
    """The manifest's summary (versions, shards, rows per teacher, the last shards) and the first `rows` rows."""
    path = dataset_path(path)
    store = DatasetStore(path, create=False)
    m = store.manifest()
    s = m.summary()
    lines = [f"dataset {path}",
             f"  version {s['version']}, {s['shards']} shard(s), {s['rows']} row(s): {s['ok']} ok, {s['failed']} failed"]
    lines += [f"  teacher {teacher}: {n} row(s)" for teacher, n in sorted(s["teachers"].items())]
    lines += [f"  v{e.version}: {e.path} ({e.rows} rows, {e.failed} failed, {e.created_at})" for e in m.shards[-5:]]
    table = store.read(version=version)
    if failed_only:
        table = table.filter(pc.not_equal(table.column("status"), "ok"))
    for row in table.slice(0, rows).to_pylist():
        prompt = row["messages"][-1]["content"] if row["messages"] else ""
        lines += [f"\n[{row['query_id']}] task={row['task']} teacher={row['teacher']} status={row['status']}"
                  f" finish={row['finish_reason']} tokens={row['completion_tokens']}",
                  f"  prompt: {_short(prompt)}",
                  f"  {'error' if row['error'] else 'answer'}: {_short(row['error'] or row['text'])}"]
    return "\n".join(lines)


def jsonl_lines(path: str, version: Optional[int] = None) -> list[str]:
    """Every row of the dataset (at `version`) as a JSON line (read whole first: a bad path fails before anything
    is written)."""
    table = DatasetStore(dataset_path(path), create=False).read(version=version)
    lines = []
    for row in table.to_pylist():
        row["created_at"] = row["created_at"].isoformat() if row["created_at"] else None
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    return lines


def is_synthesis(path: str) -> bool:
    """Whether `path` is a run's synthesis folder or one of its versions (backpack/run/synthesize.py)."""
    p = Path(path)
    return (p / "funnel.json").is_file() or any(p.glob("v*/funnel.json"))


def show_synthesis(path: str) -> str:
    """A synthesized prompt set (a version folder, or the synthesis folder: its latest version): the funnel from
    generated to kept, then two examples of what each filter removed."""
    p = Path(path)
    if not (p / "funnel.json").is_file():
        p = max(p.glob("v*/funnel.json"), key=lambda f: int(f.parent.name[1:]) if f.parent.name[1:].isdigit() else 0
                ).parent
    files = RunFiles.of(str(p))
    data = json.loads(files.read_text("funnel.json"))
    lines = [f"synthesized prompts at {files.uri()}: {data['requests']} request(s) "
             f"({data['failed_requests']} failed), {data['teacher_tokens']} teacher tokens, {data['rounds']} round(s)"]
    lines += funnel_lines([tuple(s) for s in data["funnel"]])
    rejected = pq.read_table(io.BytesIO(files.read_bytes("rejected.parquet"))).to_pylist()
    for reason in dict.fromkeys(r["reason"] for r in rejected):
        some = [r for r in rejected if r["reason"] == reason][:2]
        for r in some:
            dup = f"  (duplicates: {r['duplicate_of'][:60]!r})" if r["duplicate_of"] else ""
            lines.append(f"  {reason:>8}: {r['text'][:70]!r}{dup}")
    return "\n".join(lines)
