"""What each teacher did for a run, from its dataset rows: prompts, answers, failures, tokens, latency and spend.
Pure, no Ray.

Spend is (prompt + completion tokens) / 1000 x the teacher's `cost_per_1k_tokens`, for the answers a teacher
was really asked for: rows the query ledger answered (replica "ledger") cost nothing and are counted apart.
"""

from __future__ import annotations

from collections import defaultdict

LEDGER_REPLICA = "ledger"   # the `replica` of a row the query ledger answered (backpack/teachers/ledger.py)


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def teacher_usage(rows: list[dict], costs: dict[str, float]) -> list[dict]:
    """One dict per teacher (sorted by name) from dataset rows with the columns teacher, replica, query_id,
    status, prompt_tokens, completion_tokens, latency_s. `costs`: cost per 1k tokens by teacher name."""
    by_teacher: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_teacher[r["teacher"]].append(r)
    out = []
    for name in sorted(by_teacher):
        rs = by_teacher[name]
        asked = [r for r in rs if r["replica"] != LEDGER_REPLICA]
        ok = [r for r in asked if r["status"] == "ok"]
        tokens = sum((r["prompt_tokens"] or 0) + (r["completion_tokens"] or 0) for r in asked)
        latencies = [r["latency_s"] for r in ok if r["latency_s"] is not None]
        out.append({
            "teacher": name, "prompts": len({r["query_id"] for r in rs}), "answers": len(ok),
            "failed": sum(r["status"] != "ok" for r in asked), "from_ledger": len(rs) - len(asked),
            "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in asked),
            "completion_tokens": sum(r["completion_tokens"] or 0 for r in asked),
            "latency_p50_s": _percentile(latencies, 0.5) if latencies else None,
            "latency_p95_s": _percentile(latencies, 0.95) if latencies else None,
            "spend": tokens / 1000 * costs.get(name, 0.0)})
    return out


def format_usage(usage: list[dict]) -> list[str]:
    """Markdown table lines of teacher_usage()."""
    lines = ["| teacher | prompts | answers | failed | from ledger | tokens in / out | latency p50 / p95 | spend |",
             "|---|---|---|---|---|---|---|---|"]
    for u in usage:
        lat = (f"{u['latency_p50_s']:.2f} / {u['latency_p95_s']:.2f} s" if u["latency_p50_s"] is not None else "—")
        lines.append(f"| {u['teacher']} | {u['prompts']} | {u['answers']} | {u['failed']} | {u['from_ledger']} | "
                     f"{u['prompt_tokens']} / {u['completion_tokens']} | {lat} | {u['spend']:.4f} |")
    return lines


# ---------------------------------------------------------------- incidents: replicas that did not start or died

INCIDENTS = "teachers/incidents.jsonl"  # in the run's files: one JSON line per incident, appended by each run


def incident_lines(not_started: dict[str, str], died: dict[str, str], when: float) -> str:
    """JSON lines for the run's files: each replica that could not start and each that died (whose work the
    scheduler re-routed), with the cause."""
    import json

    events = [{"time": when, "replica": r, "what": w} for r, w in not_started.items()]
    events += [{"time": when, "replica": r, "what": f"died: {w}"} for r, w in died.items()]
    return "".join(json.dumps(e) + "\n" for e in events)


def parse_incidents(text: str, last: int = 20) -> list[dict]:
    """The last `last` incidents of an incidents file (unreadable lines skipped: a partly written last line)."""
    import json

    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out[-last:]


def format_incidents(incidents: list[dict]) -> list[str]:
    """Markdown list lines, one per incident (time, replica, what happened)."""
    import time

    return [f"- {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(i['time']))} {i['replica']}: {i['what'][:400]}"
            for i in incidents]


# ---------------------------------------------------------------- replica counters: retries, rate limits, ledger

REPLICAS = "teachers/replicas.json"  # in the run's files: each replica's counters at the end of the last run
# Counters a replica's info() may carry (by backend and wrappers) worth showing: openai requests, retries,
# failures and seconds waited on its rate limits; ledger hits and waits; dynamic batching's calls and batches.
COUNTERS = ("requests", "retries", "failed", "rate_limited_s", "ledger_hits", "ledger_waits", "tokens_saved",
            "batched_calls", "model_batches")


def replica_counters(infos: dict[str, dict]) -> dict[str, dict]:
    """replica -> {backend, counters present and non-zero} from each replica's info() (pure)."""
    return {name: {"backend": info.get("backend"),
                   **{k: info[k] for k in COUNTERS if isinstance(info.get(k), (int, float)) and info[k]}}
            for name, info in infos.items()}


def format_replicas(counters: dict[str, dict]) -> list[tuple[str, str]]:
    """(replica, 'backend: retries 3, rate_limited_s 1.2, ...') for each replica that counted something."""
    out = []
    for name, c in sorted(counters.items()):
        shown = [f"{k} {c[k]:g}" for k in COUNTERS if k in c]
        if shown:
            out.append((name, f"{c.get('backend')}: {', '.join(shown)}"))
    return out
