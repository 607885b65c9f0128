"""The `backpack` command.

    backpack run CONFIG [key=value ...]          generate, train the student, evaluate (a whole distillation)
    backpack run CONFIG --continual              keep answering pushed prompts, training, serving (Ctrl-C stops)
    backpack synthesize CONFIG [key=value ...]   the teachers write new prompts from seed tasks, curated
    backpack generate CONFIG [key=value ...]     answer a prompt collection into a versioned dataset
    backpack train CONFIG [key=value ...]        train the run's student (resumes from its last checkpoint)
    backpack eval CONFIG [--version N]           score versions against the teacher, write the report
    backpack eval CONFIG --judge TEACHER         a teacher grades the versions: win rate against it, 1-10 score
    backpack validate CONFIG [key=value ...]     check a config and print it resolved
    backpack data show PATH [--rows N]           manifest summary and a few rows of a dataset (of a synthesized
                                                 prompt set: its funnel and what each filter removed)
    backpack data export PATH --format jsonl     write a dataset as JSON lines

Beside a run, live or not (they reach its Redis; they take [key=value ...] overrides too, see backpack/run/ops.py):
    backpack ingest CONFIG FILE|-                push prompts (JSONL records or plain text lines; - is stdin)
    backpack status CONFIG [--json]              backlog, dataset, trainer step, versions, live version, server
    backpack versions CONFIG [--json]            the student versions, their gate decisions, the live one
    backpack promote CONFIG N                    serve student version N (0: the base model)
    backpack rollback CONFIG                     serve the version that was live before the current one
    backpack serve CONFIG [--version N|live]     the student versions over OpenAI-compatible HTTP (Ctrl-C stops)
    backpack export CONFIG --format hf|gguf --out PATH [--version N] [--quant Q]
                                                 a version as a model directory or a GGUF file, loaded back to check
    backpack merge CONFIG [OTHER:]N [OTHER:]N ...  LoRA versions of different tasks merged into a new version

The Mental Process (a run's task knowledge, see backpack/mental/commands.py):
    backpack mental import CONFIG FILE           import a knowledge pack (a new version per changed task)
    backpack mental show CONFIG [TASK]           tasks and versions; a task's knowledge and history
    backpack mental add CONFIG TASK ...          add a passage (--id --passage) or experience, set --persona
    backpack mental export CONFIG FILE|-         write the current knowledge as a pack
    backpack eval CONFIG --questions FILE        fact accuracy: base student, teacher with context,
                                                 distilled student without and with recall

Bad input exits with status 2 and one message; nothing is printed as a traceback unless BACKPACK_DEBUG=1.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Optional

from backpack import __version__
from backpack.errors import BackpackError
from backpack.runtime.progress import TerminalReporter


def _print_err(msg: str) -> None:
    print(f"backpack: error: {msg}", file=sys.stderr)


def cmd_validate(args) -> int:
    from backpack.config import load_config
    from backpack.runtime.redis_server import redact

    cfg = load_config(args.config, args.overrides)
    shown = cfg.model_dump(by_alias=True)  # as the file spells its fields (on_policy.lambda)
    # URLs may carry credentials (a Redis password, S3 keys in a query string): never echoed
    if shown["redis"].get("url"):
        shown["redis"]["url"] = redact(shown["redis"]["url"])
    shown["storage"]["path"] = redact(shown["storage"]["path"])
    for t in shown["teachers"]:
        if t.get("endpoint"):
            t["endpoint"]["base_url"] = redact(t["endpoint"]["base_url"])
    print(json.dumps(shown, indent=2))
    print(f"{args.config}: valid", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    from backpack.config import load_config
    from backpack.run.generate import generate

    cfg = load_config(args.config, args.overrides)  # validated once, before anything starts
    rep = TerminalReporter(args.quiet)
    try:
        res = generate(cfg, rep)
    finally:
        rep.close()
    print(f"dataset {res.dataset} is at version {res.version}: {res.ok_rows} answer(s) stored, "
          f"{res.failed_rows} failed, {res.skipped} prompt(s) already answered earlier, "
          f"{res.tokens} tokens generated in {res.generate_seconds:.1f} s ({res.tokens_per_s:.1f} tok/s); "
          f"whole run {res.seconds:.1f} s")
    if res.dead_replicas:
        print(f"replicas lost during the run (their work was re-routed): {', '.join(res.dead_replicas)}")
    for name, why in res.not_started.items():
        print(f"replica {name} {why.splitlines()[0][:300]}; the others answered its prompts")
    if res.failed_rows:
        print(f"see the failures with: backpack data show {res.dataset} --failed")
    return 0


def _print_report(report: dict) -> None:
    from backpack.eval.report import COLUMNS, _cell

    print(" | ".join(c[1] for c in COLUMNS))
    for e in report["versions"]:
        print(" | ".join(_cell(e.get(k), f, k) for k, _, f in COLUMNS))


def _report_path(cfg) -> str:
    from backpack.data.storage import run_files

    return run_files(cfg).uri("report/report.md")


def _print_trained(res: dict) -> None:
    print(f"trained to step {res['step']} in {res['seconds']:.1f} s; new student version(s): "
          f"{res['versions'] or 'none'}")


def cmd_train(args) -> int:
    from backpack.config import load_config
    from backpack.run.train import train

    cfg = load_config(args.config, args.overrides)
    _print_trained(train(cfg, TerminalReporter(args.quiet)))
    return 0


def cmd_eval(args) -> int:
    from backpack.config import load_config
    from backpack.run.evaluate import evaluate

    cfg = load_config(args.config, args.overrides)
    if args.questions:
        from backpack.eval.knowledge import evaluate_facts, format_facts

        out = evaluate_facts(cfg, args.questions, args.version, TerminalReporter(args.quiet))
        print(format_facts(out))
        print(f"answers and scores: {out['path']}")
        return 0
    versions = [args.version] if args.version is not None else None
    if args.judge:
        from backpack.run.judge import format_judged, judge

        print(format_judged(args.judge, judge(cfg, args.judge, versions, TerminalReporter(args.quiet))))
    else:
        _print_report(evaluate(cfg, versions, TerminalReporter(args.quiet)))
    print(f"report: {_report_path(cfg)}")
    return 0


def cmd_run(args) -> int:
    """generate (answered prompts are reused) -> train -> evaluate, then the report table; with --continual,
    the continual loop until stopped."""
    from backpack.config import load_config
    from backpack.run.evaluate import evaluate
    from backpack.run.generate import generate
    from backpack.run.train import train

    cfg = load_config(args.config, args.overrides)
    if args.continual:
        return _run_continual(cfg, args)
    cfg.require("student", "training")  # before generating, not after
    rep = TerminalReporter(args.quiet)
    t0 = time.perf_counter()
    try:
        if cfg.synthesis is not None:  # synthesize -> generate -> train -> evaluate
            from backpack.run.synthesize import synthesize

            print("\n".join(synthesize(cfg, rep).lines(cfg.synthesis.target)))
        gen = generate(cfg, rep)
    finally:
        rep.close()
    print(f"dataset version {gen.version}: {gen.ok_rows} new answer(s), {gen.skipped} reused, "
          f"{gen.failed_rows} failed")
    _print_trained(train(cfg, rep))
    report = evaluate(cfg, None, rep)
    _print_report(report)
    print(f"report: {_report_path(cfg)} (whole run {time.perf_counter() - t0:.0f} s)")
    return 0


def _run_continual(cfg, args) -> int:
    from backpack.run.continual import ContinualRun

    res = ContinualRun(cfg, TerminalReporter(args.quiet)).run()
    restarts = ", ".join(f"{part} x{n}" for part, n in sorted(res.restarts.items())) or "none"
    print(f"continual run {cfg.name} stopped after {res.seconds:.0f} s: {res.answered} prompt(s) answered, "
          f"{res.failed} failed; trainer at step {res.step}; new student version(s) {res.versions or 'none'}; "
          f"live version {res.live if res.live is not None else '0 (base)'}; restarts: {restarts}")
    print("run the same command again to resume")
    return 0


def cmd_data_show(args) -> int:
    from backpack.data.inspect import is_synthesis, show, show_synthesis

    print(show_synthesis(args.path) if is_synthesis(args.path) else show(args.path, args.rows, args.version,
                                                                          args.failed))
    return 0


def cmd_synthesize(args) -> int:
    from backpack.config import load_config
    from backpack.run.synthesize import synthesize

    cfg = load_config(args.config, args.overrides)
    rep = TerminalReporter(args.quiet)
    try:
        print("\n".join(synthesize(cfg, rep).lines(cfg.synthesis.target)))
    finally:
        rep.close()
    return 0


def cmd_data_export(args) -> int:
    from backpack.data.inspect import jsonl_lines

    lines = jsonl_lines(args.path, args.version)
    if not args.out:
        sys.stdout.writelines(lines)
        return 0
    with open(args.out, "w", encoding="utf-8") as out:
        out.writelines(lines)
    print(f"wrote {len(lines)} row(s) to {args.out}", file=sys.stderr)
    return 0


def _side_config(args):
    """The config of a command beside a run: it loads no model and reads no prompt file, so their paths are
    not checked (a status must not fail on a teacher model missing on this machine)."""
    from backpack.config import load_config

    return load_config(args.config, args.overrides, check_files=False)


def cmd_ingest(args) -> int:
    from backpack.run import ops

    res = ops.ingest(_side_config(args), args.source)
    summary, rejected = ops.format_ingest(res)
    print(summary)
    for line in rejected:
        print(line, file=sys.stderr)
    return 2 if res.rejected else 0


def cmd_status(args) -> int:
    from backpack.run import ops

    s = ops.status(_side_config(args))
    print(json.dumps(s, indent=2) if args.json else ops.format_status(s))
    return 0


def cmd_versions(args) -> int:
    from backpack.run import ops

    v = ops.versions(_side_config(args))
    print(json.dumps(v, indent=2) if args.json else ops.format_versions(v))
    return 0


def cmd_promote(args) -> int:
    from backpack.run import ops

    version, was = ops.promote(_side_config(args), args.n)
    print(f"version {version} is already live" if was == version
          else f"version {version} is live (was {ops.was_text(was)})")
    return 0


def cmd_rollback(args) -> int:
    from backpack.run import ops

    version, was = ops.rollback(_side_config(args))
    print(f"version {version} is live again (was {ops.was_text(was)})")
    return 0


def cmd_export(args) -> int:
    from backpack.run.export import export

    print("\n".join(export(_side_config(args), args.version, args.format, args.out, args.quant,
                           TerminalReporter()).lines()))
    return 0


def cmd_merge(args) -> int:
    from backpack.run.merge import merge

    args.overrides = [a for a in args.sources if "=" in a]  # `sources` (nargs="+") took them too
    print(merge(_side_config(args), [a for a in args.sources if "=" not in a], args.method, args.weights,
                args.density, TerminalReporter()).line(args.config))
    return 0


def cmd_serve(args) -> int:
    from backpack.run.serve import serve

    serve(_side_config(args), args.version, TerminalReporter())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="backpack", description="Distil small student models from teacher models.")
    p.add_argument("--version", action="version", version=f"backpack {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def config_command(name: str, help: str, func) -> argparse.ArgumentParser:
        """A subcommand taking a run config, field overrides and --quiet."""
        c = sub.add_parser(name, help=help)
        c.add_argument("config", help="run config (YAML)")
        c.add_argument("overrides", nargs="*", default=[], help="field overrides, e.g. teachers.0.replicas=2")
        c.add_argument("-q", "--quiet", action="store_true", help="no progress output")
        c.set_defaults(func=func)
        return c

    config_command("synthesize", "the teachers write new prompts from the run's seed tasks; curation keeps the "
                   "good ones (a new prompt set version)", cmd_synthesize)
    config_command("generate", "answer a prompt collection with the run's teachers into a dataset", cmd_generate)
    config_command("run", "generate, train the student, evaluate: a whole distillation", cmd_run) \
        .add_argument("--continual", action="store_true",
                      help="run the continual loop until stopped (Ctrl-C): answer prompts pushed to the run's "
                           "intake, keep training, serve each promoted student version")
    config_command("train", "train the run's student on its dataset (resumes from its last checkpoint)", cmd_train)
    ev = config_command("eval", "evaluate student versions against the teacher and write the report", cmd_eval)
    ev.add_argument("--version", type=int, default=None, help="one version (default: all, and version 0; with "
                                                             "--questions: the latest)")
    ev.add_argument("--questions", default=None, metavar="FILE",
                    help="score fact accuracy on these questions instead (JSONL with reference facts): base "
                         "student, teacher with context, distilled student without and with recall")
    ev.add_argument("--judge", default=None, metavar="TEACHER",
                    help="a teacher of the run grades the versions' answers: pairwise against the teacher's "
                         "answer (both orders, win rate with a 95%% interval) and a 1-10 score")

    def side_command(name: str, help: str, func, *positional: tuple[str, dict],
                     json_flag: bool = False) -> argparse.ArgumentParser:
        """A command beside a run: the config, its own positionals, then field overrides."""
        c = sub.add_parser(name, help=help)
        c.add_argument("config", help="run config (YAML)")
        for arg, kw in positional:
            c.add_argument(arg, **kw)
        c.add_argument("overrides", nargs="*", default=[], help="field overrides, e.g. storage.path=/data/runs")
        if json_flag:
            c.add_argument("--json", action="store_true", help="print one JSON object")
        c.set_defaults(func=func)
        return c

    side_command("ingest", "push prompts to a run's intake stream (answered by the live run, or the next one)",
                 cmd_ingest, ("source", {"metavar": "FILE|-", "help": "JSONL records or plain text lines, one "
                                                                      "prompt a line; - reads standard input"}))
    side_command("status", "a run's backlog, dataset, trainer, versions and server", cmd_status, json_flag=True)
    side_command("versions", "a run's student versions, their gate decisions, the live one", cmd_versions,
                 json_flag=True)
    side_command("promote", "serve a student version (0: the base model)", cmd_promote,
                 ("n", {"type": int, "metavar": "N", "help": "the student version"}))
    side_command("rollback", "serve the version that was live before the current one", cmd_rollback)
    ex = side_command("export", "write a student version as a model directory (hf) or a GGUF file, checked by "
                      "loading it back", cmd_export)
    ex.add_argument("--version", type=int, default=None, help="the student version (default: the newest; 0: the base)")
    ex.add_argument("--format", choices=["hf", "gguf"], required=True)
    ex.add_argument("--quant", default=None, help="gguf: f32, f16, q8_0 (default), q4_0 or q4_1")
    ex.add_argument("--out", required=True, help="a new directory (hf), or a .gguf file or a directory (gguf)")
    mg = side_command("merge", "combine LoRA versions of different tasks into a new version (peft merges)",
                      cmd_merge, ("sources", {"nargs": "+", "metavar": "[CONFIG:]N", "help": "versions to merge"}))
    mg.add_argument("--method", default="cat", help="cat (default), svd, linear, ties, dare_linear or dare_ties")
    mg.add_argument("--weights", default=None, help="comma-separated, one per source (default: equal)")
    mg.add_argument("--density", type=float, default=None, help="ties and dare: share of weights kept (0.5)")
    side_command("serve", "serve the run's student versions over OpenAI-compatible HTTP until Ctrl-C", cmd_serve) \
        .add_argument("--version", default=None, metavar="N|live", help="a version number (0: the base) or live "
                      "(default: the live version when one is promoted, else the newest)")

    from backpack.mental.cli import add_parser as add_mental

    add_mental(sub)

    v = sub.add_parser("validate", help="validate a run config and print it with defaults filled in")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*", default=[])
    v.set_defaults(func=cmd_validate)

    d = sub.add_parser("data", help="inspect and export datasets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    show = dsub.add_parser("show", help="manifest summary and a few rows")
    show.add_argument("path", help="dataset folder, e.g. runs/quickstart/dataset")
    show.add_argument("--rows", type=int, default=3)
    show.add_argument("--version", type=int, default=None)
    show.add_argument("--failed", action="store_true", help="show only failed rows")
    show.set_defaults(func=cmd_data_show)
    exp = dsub.add_parser("export", help="write the dataset as JSON lines")
    exp.add_argument("path")
    exp.add_argument("--format", choices=["jsonl"], default="jsonl")
    exp.add_argument("--out", default=None, help="output file (default: stdout)")
    exp.add_argument("--version", type=int, default=None)
    exp.set_defaults(func=cmd_data_export)
    return p


def _sigterm(signum, frame):  # make `kill` behave like Ctrl-C so cleanup (Redis, actors) runs
    raise KeyboardInterrupt


_SWITCHES = {"--continual", "-q", "--quiet", "--json", "--failed"}  # flags that take no value
_VALUED = {"--version", "--questions", "--id", "--passage", "--question", "--answer", "--persona", "--task",
           "--rows", "--format", "--out", "--quant", "--method", "--weights", "--density"}  # followed by a value


def _flags_last(argv: list[str]) -> list[str]:
    """The subcommand's flags (with their values) moved after its positionals: argparse cannot fill
    `overrides` (nargs="*") once a flag has come between them and the config (`run CONFIG --continual
    key=value` or `eval CONFIG --questions FILE key=value` would fail)."""
    if not argv or argv[0].startswith("-"):
        return argv
    positionals, flags, rest = [argv[0]], [], argv[1:]
    i = 0
    while i < len(rest):
        a = rest[i]
        if a in _SWITCHES or ("=" in a and a.split("=", 1)[0] in _VALUED):
            flags.append(a)
        elif a in _VALUED:
            flags += rest[i:i + 2]
            i += 1
        else:
            positionals.append(a)
        i += 1
    return positionals + flags


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(_flags_last(list(sys.argv[1:] if argv is None else argv)))
    signal.signal(signal.SIGTERM, _sigterm)
    # Ctrl-C stops cleanly even when started from a shell that ignores SIGINT for background jobs (the
    # ignore is inherited, and Python then installs no KeyboardInterrupt handler of its own).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # transformers draws a bar for every model load (under a second once converted); the run's stages say what
    # happens. Set before transformers is imported, which reads it once.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return args.func(args)
    except BackpackError as e:
        if os.environ.get("BACKPACK_DEBUG"):
            raise
        _print_err(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        _print_err("interrupted; rerun the same command to resume")
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
