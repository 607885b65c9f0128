"""The `backpack mental` subcommands on the CLI: the parser (no heavy import, so that every `backpack` call starts
fast) and the dispatch to backpack/mental/commands.py."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    """`backpack mental import|show|add|export` on the CLI's subparsers."""
    m = sub.add_parser("mental", help="a run's task knowledge: import, show, add, export")
    msub = m.add_subparsers(dest="mental_command", required=True)
    mi = msub.add_parser("import", help="import a knowledge pack (YAML, JSON or JSONL): a new version per changed task")
    mi.add_argument("config", help="run config (YAML)")
    mi.add_argument("file", help="knowledge pack file")
    ms = msub.add_parser("show", help="the tasks and their versions; with TASK, its knowledge and history")
    ms.add_argument("config", help="run config (YAML)")
    ms.add_argument("task", nargs="?", default=None)
    ms.add_argument("--version", type=int, default=None, help="an older version of the task")
    ms.add_argument("--json", action="store_true", help="print one JSON object")
    ma = msub.add_parser("add", help="add a passage or an experience to a task, or set its persona")
    ma.add_argument("config", help="run config (YAML)")
    ma.add_argument("task")
    ma.add_argument("--id", default=None, help="id of the new passage or experience")
    ma.add_argument("--passage", default=None, metavar="TEXT")
    ma.add_argument("--question", default=None, help="an experience's question (with --answer)")
    ma.add_argument("--answer", default=None)
    ma.add_argument("--persona", default=None, metavar="TEXT", help="replace the task's persona")
    me = msub.add_parser("export", help="write the current knowledge as a pack (.jsonl, .json, else YAML)")
    me.add_argument("config", help="run config (YAML)")
    me.add_argument("file", metavar="FILE|-")
    me.add_argument("--task", action="append", default=None, help="only this task (repeatable)")
    for c in (mi, ms, ma, me):
        c.set_defaults(func=run_command)


def run_command(args) -> int:
    """`backpack mental ...` (the parser of `add_parser`)."""
    from backpack.config import load_config
    from backpack.mental.commands import add, export, format_show, import_file, show

    cfg = load_config(args.config)
    if args.mental_command == "import":
        for task, (version, changed) in import_file(cfg, args.file).items():
            print(f"task {task}: version {version}" + ("" if changed else " (unchanged: same content)"))
    elif args.mental_command == "show":
        out = show(cfg, args.task, args.version)
        print(json.dumps(out, indent=1, ensure_ascii=False) if args.json else format_show(out))
    elif args.mental_command == "add":
        v = add(cfg, args.task, args.id, args.passage, args.question, args.answer, args.persona)
        print(f"task {args.task}: version {v}")
    else:
        n = export(cfg, args.file, args.task)
        if args.file != "-":
            print(f"{n} task(s) written to {args.file}")
    return 0
