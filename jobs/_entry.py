"""The shared body of the job entry points: `--config FILE [key=value ...]` -> the backpack command."""

from __future__ import annotations

import argparse
import sys


def run(command: str, argv: list[str] | None = None) -> int:
    from backpack.cli import main

    ap = argparse.ArgumentParser(prog=f"jobs.{command}", description=f"Ray Job entry point for `backpack {command}`")
    ap.add_argument("--config", required=True, help="run config (YAML), relative to the job's working dir")
    ap.add_argument("overrides", nargs="*", help="field overrides, e.g. training.num_workers=2")
    args = ap.parse_args(argv)
    # Inside a Ray Job, RAY_ADDRESS points at the cluster; the run joins it instead of starting one.
    # Not --quiet: off a terminal progress is a plain line every 10 s, which `ray job logs --follow` shows.
    code = main([command, args.config, *args.overrides])
    if code == 0 and command == "run":
        print_report(args.config, args.overrides)
    return code


def print_report(config: str, overrides: list[str]) -> None:
    """The run's report.md into the job's log, so `ray job logs JOB_ID` gives the report back even to a user
    who cannot reach the cluster's storage."""
    from backpack.config import load_config
    from backpack.data.storage import run_files

    files = run_files(load_config(config, overrides, check_files=False))  # a shared folder or an object store
    text = files.read_text("report/report.md")
    if text is not None:
        print(f"\n----- {files.uri('report/report.md')} -----\n{text}", flush=True)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2:]))
