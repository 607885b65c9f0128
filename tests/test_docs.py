"""The docs: the site builds with `mkdocs build --strict` (a broken link or anchor fails), its config reference is
written from the models and so holds every field, every field says what it is, and the README stays a user's
page: the two set-up commands first, under 25 KB, a map that names every module of backpack/."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO

README = (REPO / "README.md").read_text()


def sections():
    sys.path.insert(0, str(REPO / "docs" / "hooks"))
    import reference

    import backpack.config as c

    return [getattr(c, name) for _, name in reference.SECTIONS]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_the_site_builds_strict_and_its_config_reference_has_every_field(site):
    page = (site / "reference" / "config" / "index.html").read_text()
    missing = [f"{m.__name__}.{f}" for m in sections() for f, info in m.model_fields.items()
               if f"<code>{info.alias or f}</code>" not in page]  # a field under its YAML name (on_policy.lambda)
    assert missing == []
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert "backpack mental import" in cli and "--continual" in cli
    api = (site / "reference" / "api" / "index.html").read_text()
    assert "backpack.run.generate.generate" in api and "class <code>backpack.data.store.DatasetStore</code>" in api


def test_every_config_field_says_what_it_is():
    assert [f"{m.__name__}.{f}" for m in sections() for f, info in m.model_fields.items()
            if not (info.description or "").strip()] == []


def test_readme_starts_with_the_two_commands_and_stays_short():
    first_block = README.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block
    assert len(README.encode()) < 25_000


def test_readme_map_names_every_module():
    named = set(re.findall(r"backpack/[\w/]+\.py", README))
    modules = {str(p.relative_to(REPO)) for p in (REPO / "backpack").rglob("*.py") if p.name != "__init__.py"}
    assert sorted(modules - named) == []
