"""`backpack serve CONFIG [--version N|live]`: a run's student versions behind the StudentServer (OpenAI-compatible
HTTP, backpack/serve/server.py) until Ctrl-C.

The default is the run's live version when one is promoted (followed: a later promotion is served), else its
newest version (pinned); `--version N` pins version N (0: the untrained base), `--version live` follows the live
one. Any request may name another version with `model: <run>:v<N>`. The server runs in this process, beside the
run's Redis (its registry); it binds `serve.host:serve.port`, loopback unless configured, with an API key from
`serve.api_key_env` required for any other bind.
"""

from __future__ import annotations

import asyncio
from typing import Optional

from backpack.config import RunConfig
from backpack.data.storage import run_files
from backpack.errors import InputError
from backpack.runtime.progress import Reporter
from backpack.runtime.session import attach_redis


def pick_version(registry, asked: Optional[str]) -> tuple[Optional[int], str]:
    """(the version to pin, or None to follow the live one; what is served, in words)."""
    known = sorted(m["version"] for m in registry.versions())
    live = registry.live()
    if asked == "live" or (asked is None and live is not None):
        return None, f"the live version ({live if live is not None else 0}), following promotions"
    if asked is None:
        newest = known[-1] if known else 0
        return newest, f"version {newest}" + ("" if known else " (the untrained base: the run has no version yet)")
    if not asked.isdigit():
        raise InputError(f"--version {asked!r}: a version number (0: the untrained base) or 'live'")
    version = int(asked)
    if version and version not in known:
        raise InputError(f"--version {version}: run {registry.run!r} has no student version {version} (it has "
                         f"{', '.join(map(str, known)) or 'none'})")
    return version, f"version {version}"


def serve(cfg: RunConfig, version: Optional[str] = None, reporter: Optional[Reporter] = None) -> None:
    """Serve until interrupted (KeyboardInterrupt propagates after the server has stopped)."""
    from backpack.serve.server import StudentServer
    from backpack.student.registry import Registry

    cfg.require("student")
    rep = reporter or Reporter()
    with attach_redis(cfg) as url:
        registry = Registry(url, cfg.name, run_files(cfg))
        pinned, what = pick_version(registry, version)
        server = StudentServer(cfg.student, cfg.serve, registry, model_name=cfg.name,
                               default_task=cfg.prompts.default_task, version=pinned)
        asyncio.run(_until_stopped(server, rep, what, cfg.name))


async def _until_stopped(server, rep: Reporter, what: str, name: str) -> None:
    url = await server.start()
    rep.stage(f"serving {what} of run {name!r} at {url}/v1 (models {name}, {name}:live, {name}:v<N>; "
              f"{'API key from ' + server.serve_cfg.api_key_env if server.serve_cfg.api_key_env else 'no API key'}"
              "); Ctrl-C stops")
    try:
        while True:
            await asyncio.sleep(3600)
    finally:
        await server.stop()
