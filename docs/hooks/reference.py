"""MkDocs hook: the reference pages written from the code itself, at build time, so they are never written twice.

    reference/config.md   every field of every config section, from the pydantic models (type, default, bounds,
                          description), and the knowledge-pack format
    reference/cli.md      every `backpack` command's help, from the CLI's argparse parser
    reference/api.md      the public Python API: signatures and docstrings, read from the source (nothing is run)
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import typing
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# --------------------------------------------------------------------------------------------- config reference

# The sections in the order a run config reads, with the path a YAML file writes them under.
SECTIONS = [("", "RunConfig"), ("ray", "RayConfig"), ("redis", "RedisConfig"), ("storage", "StorageConfig"),
            ("teachers[]", "TeacherConfig"), ("teachers[].endpoint", "EndpointConfig"),
            ("teachers[].vllm", "VLLMConfig"), ("ledger", "LedgerConfig"), ("prompts", "PromptsConfig"),
            ("decoding", "DecodingConfig"), ("scheduler", "SchedulerConfig"), ("scheduler.ensemble", "EnsembleConfig"),
            ("student", "StudentConfig"), ("training", "TrainingConfig"), ("training.on_policy", "OnPolicyConfig"),
            ("eval", "EvalConfig"),
            ("continual", "ContinualConfig"), ("serve", "ServeConfig"), ("mental", "MentalConfig"),
            ("synthesis", "SynthesisConfig"), ("synthesis.filters", "SynthesisFilters")]
BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<", "min_length": "at least {} items"}


def type_text(t) -> str:
    """A field's type as a reader of YAML sees it."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        parts = [type_text(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin in (list, tuple):
        return f"list of {type_text(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}" if args else "mapping"
    if isinstance(t, type) and t.__name__.endswith("Config"):
        return f"[{t.__name__}](#{anchor(t.__name__)})"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(t, getattr(t, "__name__", str(t)))


def anchor(name: str) -> str:
    return name.lower()


def default_text(field) -> str:
    if field.is_required():
        return "**required**"
    value = field.default_factory() if field.default_factory is not None else field.default
    if hasattr(value, "model_dump"):
        return "its section's defaults"
    return f"`{json.dumps(value)}`"


def bounds_text(field) -> str:
    out = []
    for m in field.metadata:
        for name, fmt in BOUNDS.items():
            v = getattr(m, name, None)
            if v is not None:
                out.append(fmt.format(v) if "{}" in fmt else f"{fmt} {v}")
        if getattr(m, "pattern", None):
            out.append(f"matches `{m.pattern}`")
    return ", ".join(out)


def config_page() -> str:
    import backpack.config as c
    from backpack.config import knowledge

    lines = ["# Config reference", "",
             "Every field of a run config, written from the config models in `backpack/config/` when the docs are "
             "built. A run config is one YAML file; `backpack validate CONFIG` prints it with every default filled "
             "in, and any field can be overridden on the command line (`teachers.0.replicas=2`). A section left "
             "out has its defaults (`student` and `training` must be written for the commands that train); "
             "`mental` left out means no recall. Unknown fields are errors.", ""]
    for path, name in SECTIONS:
        model = getattr(c, name)
        where = f"Under `{path}`." if path else "The top level of the file."
        doc = " ".join((model.__doc__ or "").strip().split("\n\n")[0].split())
        lines += [f"## {name}", "", f"{where} {doc}", "", "| field | type | default | allowed | what it is |",
                  "|---|---|---|---|---|"]
        for fname, field in model.model_fields.items():
            what = (field.description or "").replace("|", r"\|")
            lines.append(f"| `{field.alias or fname}` | {type_text(field.annotation)} | {default_text(field)} | {bounds_text(field)} "
                         f"| {what} |")
        lines.append("")
    lines += ["## Knowledge packs", "", (knowledge.__doc__ or "").split("\n\n", 1)[1].strip(), ""]
    for model in (knowledge.TaskKnowledge, knowledge.Passage, knowledge.Experience):
        lines += [f"### {model.__name__}", "", "| field | type | default |", "|---|---|---|"]
        lines += [f"| `{n}` | {type_text(f.annotation).replace('[', '').replace(']', '').split('(')[0]} | "
                  f"{default_text(f)} |" for n, f in model.model_fields.items()]
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI reference

def cli_page() -> str:
    from backpack.cli import build_parser

    lines = ["# CLI reference", "", "Every `backpack` command, as `backpack COMMAND --help` prints it. Bad input "
             "exits with status 2 and one message naming the bad value; `BACKPACK_DEBUG=1` shows a traceback.", ""]

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            lines.extend([f"## `{prefix}`", "", "```", parser.format_help().rstrip(), "```", ""])
            return
        for name, sub in subs[0].choices.items():
            walk(sub, f"{prefix} {name}")

    parser = build_parser()
    parser.prog = "backpack"
    walk(parser, "backpack")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- API reference

# Module: the public names documented from it (classes with their public methods, functions).
API = {
    "backpack.config": None,  # its docstring: the map of the config package
    "backpack.config.loader": ["load_config", "validate_config", "apply_overrides"],
    "backpack.config.run": ["RunConfig"],
    "backpack.config.knowledge": ["load_pack", "parse_pack", "pack_jsonl"],
    "backpack.run.synthesize": ["synthesize", "SynthesisResult"],
    "backpack.run.generate": ["generate", "GenerateResult"],
    "backpack.run.train": ["train"],
    "backpack.run.evaluate": ["evaluate"],
    "backpack.run.judge": ["judge"],
    "backpack.run.continual": ["ContinualRun", "ContinualResult"],
    "backpack.run.supervisor": ["Supervisor", "Observation"],
    "backpack.run.ops": ["ingest", "status", "versions", "promote", "rollback"],
    "backpack.data.store": ["DatasetStore"],
    "backpack.data.prompts": ["read_prompts", "parse_record"],
    "backpack.data.splits": ["is_heldout", "split", "training_rows"],
    "backpack.data.storage": ["RunFiles", "run_files", "local_folder"],
    "backpack.data.inspect": ["show", "show_synthesis", "jsonl_lines"],
    "backpack.data.curation": ["curate", "Filters", "Curated"],
    "backpack.synthesis.self_instruct": ["build_requests", "parse_reply"],
    "backpack.scheduling.intake": ["Intake", "backlog", "IntakeSource"],
    "backpack.scheduling.scheduler": ["Scheduler", "settings"],
    "backpack.teachers.base": ["Teacher", "answer_table"],
    "backpack.teachers.host": ["build_teacher", "TeacherHost"],
    "backpack.teachers.hf": ["HFTeacher"],
    "backpack.teachers.ledger": ["QueryLedger", "LedgerTeacher"],
    "backpack.teachers.loader": ["resolve_model"],
    "backpack.mental.store": ["MentalStore"],
    "backpack.mental.recall": ["Recaller", "TokenCounter"],
    "backpack.student.autopilot": ["load_student"],
    "backpack.student.registry": ["Registry", "load_version"],
    "backpack.serve.server": ["StudentServer"],
    "backpack.eval.evaluate": ["evaluate_model"],
    "backpack.eval.gate": ["decide", "Gate"],
    "backpack.eval.knowledge": ["evaluate_facts"],
    "backpack.eval.judge": ["aggregate_pairwise", "parse_verdict", "parse_rubric"],
    "backpack.runtime.session": ["RunSession", "attach_redis"],
    "backpack.runtime.redis_server": ["EmbeddedRedis", "connect"],
    "backpack.runtime.local_cluster": ["LocalCluster"],
    "backpack.errors": ["BackpackError", "ConfigError", "InputError", "TeacherError", "cause_of"],
}


def _signature(node) -> str:
    args = ast.unparse(node.args)
    returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
    return f"{node.name}({args}){returns}"


def _doc(node) -> list[str]:
    doc = ast.get_docstring(node)
    return ["", "```text", doc, "```", ""] if doc else [""]


def api_page() -> str:
    lines = ["# Python API", "", "The public API, read from the source when the docs are built: each entry's "
             "signature and docstring. Everything a command does is a function or class here; the CLI "
             "(`backpack/cli.py`) only parses arguments and prints.", ""]
    for module, names in API.items():
        path = ROOT / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = ROOT / module.replace(".", "/") / "__init__.py"
        tree = ast.parse(path.read_text())
        lines += [f"## `{module}`", ""]
        mod_doc = ast.get_docstring(tree)
        if mod_doc and names is None:
            lines += ["```text", mod_doc, "```", ""]
            continue
        if mod_doc:
            lines += [_escape(" ".join(mod_doc.split("\n\n")[0].split())), ""]
        found = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        for name in names:
            node = found.get(name)
            if node is None:
                raise KeyError(f"docs/hooks/reference.py: {module} has no {name} (update API)")
            if isinstance(node, ast.ClassDef):
                lines += [f"### class `{module}.{name}`"] + _doc(node)
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                            not item.name.startswith("_") or item.name == "__init__"):
                        prop = any(ast.unparse(d) == "property" for d in item.decorator_list)
                        shown = f"{item.name}` (property)" if prop else f"{_signature(item)}`"
                        lines += [f"- `{shown}" + (f": {_first(item)}" if _first(item) else "")]
                lines.append("")
            else:
                lines += [f"### `{module}.{_signature(node)}`"] + _doc(node)
    return "\n".join(lines)


def _first(node) -> str:
    doc = ast.get_docstring(node) or ""
    return _escape(" ".join(doc.split("\n\n")[0].split()))


def _escape(text: str) -> str:
    """Prose from a docstring as markdown: `<name>` placeholders are text, not HTML tags."""
    parts = text.split("`")  # odd parts are code spans: left as they are
    return "`".join(p if i % 2 else p.replace("<", "&lt;").replace(">", "&gt;") for i, p in enumerate(parts))


# --------------------------------------------------------------------------------------------- the hook

PAGES = {"reference/config.md": config_page, "reference/cli.md": cli_page, "reference/api.md": api_page}


def on_files(files, config):
    for uri, make in PAGES.items():
        files.append(File.generated(config, uri, content=make()))
    return files
