"""The manual builds, links, and says what the code says.

The site is built as `make docs` builds it, with ``--strict``: a link to a page
or an anchor that does not exist, or a page left out of the navigation, fails.
The generated reference sections (every setting from the Settings model, the
OpenAPI document) must be what scripts/docs_reference.py makes of the code now.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from .conftest import ROOT
from .test_readme import MANUAL, runnable_examples

DOCS = ROOT / "docs"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_generated_reference_sections_are_current(capsys: pytest.CaptureFixture[str]) -> None:
    docs_reference = load_script("docs_reference")
    status = docs_reference.main(["--check"])
    assert status == 0, capsys.readouterr().err


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "configuration" / "index.html").is_file()
    rendered = (tmp_path / "control-api" / "index.html").read_text()
    assert 'id="schema-publishresult"' in rendered


def test_the_site_shows_runnable_examples_as_code() -> None:
    """The hook takes every marker the example test finds, so that each marked
    block renders as code rather than as a paragraph of backticks."""
    hooks = load_script("mkdocs_hooks")
    for path in MANUAL:
        text = path.read_text(encoding="utf-8")
        assert runnable_examples(hooks.on_page_markdown(text)) == [], path


def test_every_page_is_in_the_navigation_and_linked_from_the_readme() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    in_nav = {page for entry in config["nav"] for page in entry.values()}
    pages = {path.relative_to(DOCS).as_posix() for path in DOCS.glob("**/*.md")}
    assert in_nav == pages
    readme = (ROOT / "README.md").read_text()
    linked = set(re.findall(r"\]\(docs/([\w/-]+\.md)\)", readme))
    assert linked == pages - {"index.md", "changelog.md"}
    assert "](CHANGELOG.md)" in readme
