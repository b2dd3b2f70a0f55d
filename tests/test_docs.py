"""The documentation site builds with ``mkdocs build --strict``, its API reference is rendered from the
docstrings, every page of its navigation exists, the README's links into docs/ lead somewhere, and the
layer diagram of the README and of docs/project-layout.md is the one tests/test_layers.py enforces."""

from __future__ import annotations

import ast
import html
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _nav_pages(nav) -> list[str]:
    """Every page file named in mkdocs.yml's ``nav`` (nested sections flattened)."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in _nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    return []


def _text(page: Path) -> str:
    """A built page's visible text: tags dropped, entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page.read_text())).split())


def _summary(module: Path, function: str) -> str:
    """The first paragraph of a function's docstring, read from the source without importing it."""
    tree = ast.parse(module.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    first = ast.get_docstring(node).split("\n\n")[0]
    return " ".join(first.replace("``", "").replace("`", "").split())


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_the_site_builds_strictly_and_renders_the_api_docstrings(site):
    page = site / "reference" / "api" / "index.html"
    assert 'id="pyimagesearch_tl.api.build_dataset"' in page.read_text()
    text = _text(page)
    summary = _summary(ROOT / "pyimagesearch_tl" / "api.py", "build_dataset")
    assert summary in text, f"{summary!r} not rendered in {page}"
    assert "input_dir" in text and "Parameters" in text  # the numpydoc sections became a table


def test_the_benchmark_tables_reach_the_site(site):
    text = _text(site / "accuracy" / "index.html")
    assert "cats_and_dogs_filtered" in text and "Measured on" in text


def test_every_page_of_the_navigation_exists_and_every_page_is_in_it():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = _nav_pages(config["nav"])
    assert [p for p in pages if not (DOCS / p).is_file()] == []
    on_disk = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert on_disk - set(pages) == set(), "pages under docs/ missing from mkdocs.yml's nav"


def test_every_link_of_the_readme_into_docs_exists():
    links = re.findall(r"\]\((docs/[^)#\s]*)", (ROOT / "README.md").read_text())
    assert links, "the README links to no page of docs/"
    assert [link for link in links if not (ROOT / link).is_file()] == []


def _layers_enforced() -> list[list[str]]:
    """tests/test_layers.py's LAYERS, bottom row first, read without importing the package."""
    tree = ast.parse((ROOT / "tests" / "test_layers.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "LAYERS")
    return ast.literal_eval(node.value)


def _layers_drawn(path: Path) -> list[list[str]]:
    """The rows of the layer diagram in ``path``, top row first: the code block starting with ``cli``."""
    lines = path.read_text().splitlines()
    start = next(n for n, line in enumerate(lines) if line.startswith("  cli, __init__"))
    rows: list[list[str]] = []
    for line in lines[start:]:
        if line.startswith("```"):
            break
        names = [name for name in line[:36].strip().split(",") if name.strip()]
        if line.startswith("    "):  # a row continued on the next line
            rows[-1] += [name.strip() for name in names]
        else:
            rows.append([name.strip() for name in names])
    return rows


@pytest.mark.parametrize("page", ["README.md", "docs/project-layout.md"])
def test_the_layer_diagram_is_the_one_enforced(page):
    assert _layers_drawn(ROOT / page)[::-1] == _layers_enforced()
