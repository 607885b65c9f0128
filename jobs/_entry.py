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
    return main([command, args.config, *args.overrides, "--quiet"])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2:]))
