"""The run report: report.json (everything), report.md (a table a person reads), report.png (the curves)."""

from __future__ import annotations

import json
import math
from pathlib import Path

COLUMNS = [("version", "version", "{}"), ("step", "step", "{}"), ("nll", "NLL/token", "{:.3f}"),
           ("perplexity", "perplexity", "{:.2f}"), ("chrf", "chrF vs teacher", "{:.1f}"),
           ("kl_to_teacher", "KL to teacher", "{:.3f}"), ("params", "params (M)", "{:.1f}"),
           ("gen_tokens_per_s", "gen tok/s", "{:.1f}")]


def _cell(v, fmt: str, key: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return fmt.format(v / 1e6 if key == "params" else v)


def write_report(out_dir: str | Path, run: str, evals: list[dict], training: list[dict], extra: dict) -> dict:
    """Write the three report files; returns the report dict. `evals`: one metrics dict per version (with
    'version' and 'step'); `training`: the logged training metrics (step, loss, ...)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"run": run, "versions": evals, "training": training, **extra}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    lines = [f"# Backpack report: {run}", "", "| " + " | ".join(c[1] for c in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for e in evals:
        lines.append("| " + " | ".join(_cell(e.get(k), f, k) for k, _, f in COLUMNS) + " |")
    if len(evals) >= 2:
        first, last = evals[0], evals[-1]
        lines += ["", f"From version {first['version']} to {last['version']}: NLL {first['nll']:.3f} → "
                      f"{last['nll']:.3f}, chrF {first['chrf']:.1f} → {last['chrf']:.1f}."]
    for k, v in extra.items():
        if not isinstance(v, (dict, list)):
            lines.append(f"- {k}: {v}")
    if extra.get("teachers"):
        from backpack.teachers.accounting import format_usage

        lines += ["", "## Teachers", ""] + format_usage(extra["teachers"])
    if extra.get("replicas"):
        from backpack.teachers.accounting import format_replicas

        counted = format_replicas(extra["replicas"])
        if counted:
            lines += ["", "## Teacher replicas", ""] + [f"- {name} ({text})" for name, text in counted]
    if extra.get("incidents"):
        from backpack.teachers.accounting import format_incidents

        lines += ["", "## Teacher incidents", "",
                  "Replicas that could not start or died; their prompts went to other replicas."] + \
            [""] + format_incidents(extra["incidents"])
    if extra.get("on_policy"):
        op = extra["on_policy"]
        lines += ["", "## On-policy training", "",
                  f"- batches: {op['on_policy_batches']} on the student's own samples, {op['off_policy_batches']} "
                  "on the teachers' answers",
                  f"- samples scored by the teachers: {op['scored_samples']} ({op['scored_tokens']} teacher tokens "
                  f"scored; {op['reused_scores']} stored scores reused, {op['failed_scores']} failed)"]
        for s in op.get("samples", []):
            lines += ["", f"**Prompt:** {s['prompt']}", "",
                      f"- student (step {s['step']}): {s['student']}",
                      f"- teacher's mean logprob per token of it: {s['teacher_logprob_per_token']:.3f}"]
    for judge, by_version in (extra.get("judge") or {}).items():
        lines += ["", f"## Judged by {judge}", "",
                  "Pairwise against the teacher's answer, both orders (win 1, tie 0.5); single-answer score 1-10 "
                  "with the teacher's answer as reference.", "",
                  "| version | win rate | ± 95% | wins / ties / losses | position-inconsistent | score 1-10 | "
                  "unparsed |", "|---|---|---|---|---|---|---|"]
        for v, j in sorted(by_version.items(), key=lambda kv: int(kv[0])):
            p, r = j["pairwise"], j["rubric"]
            lines.append(f"| {v} | {p['win_rate']:.3f} | {p['ci95']:.3f} | {p['wins']} / {p['ties']} / "
                         f"{p['losses']} | {p['inconsistent']} | {r['mean']:.2f} | "
                         f"{p['unparsed'] + r['unparsed']} |")
    if evals and evals[-1].get("samples"):
        lines += ["", "## Samples (last version)", ""]
        for s in evals[-1]["samples"]:
            lines += [f"**Prompt:** {s['prompt']}", "", f"- teacher: {s['teacher']}", f"- student: {s['student']}", ""]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _plot(out / "report.png", evals, training, extra.get("judge") or {})
    return report


def _plot(path: Path, evals: list[dict], training: list[dict], judged: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if judged else 2, figsize=(16.5 if judged else 11, 4))
    a, b = axes[0], axes[1]
    if training:
        a.plot([t["step"] for t in training], [t["loss"] for t in training], label="loss")
        if any(t.get("kd") for t in training):
            a.plot([t["step"] for t in training], [t["kd"] for t in training], label="KD")
        a.plot([t["step"] for t in training], [t["ce"] for t in training], label="CE", alpha=0.7)
        a.legend()
    a.set_xlabel("optimizer step")
    a.set_title("training")
    steps = [e.get("step") or 0 for e in evals]
    b.plot(steps, [e["nll"] for e in evals], "o-", label="held-out NLL/token")
    b.set_xlabel("step of version")
    b.set_title("evaluation per version")
    b2 = b.twinx()
    b2.plot(steps, [e["chrf"] for e in evals], "s--", color="tab:green", label="chrF vs teacher")
    b.legend(loc="upper left")
    b2.legend(loc="upper right")
    if judged:
        _plot_judged(axes[2], judged)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_judged(ax, judged: dict) -> None:
    """Win rate against the teacher per version, with its 95% interval, for each judge."""
    for judge, by_version in judged.items():
        rows = sorted((int(v), j["pairwise"]) for v, j in by_version.items())
        ax.errorbar([v for v, _ in rows], [p["win_rate"] for _, p in rows], yerr=[p["ci95"] for _, p in rows],
                    fmt="o-", capsize=4, label=f"judged by {judge}")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")  # as good as the teacher
    ax.set_ylim(0, 1)
    ax.set_xlabel("version")
    ax.set_title("win rate against the teacher")
    ax.legend()
