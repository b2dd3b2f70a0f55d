"""Every import points down the data flow: the layers below are the README's diagram, bottom row first.

A module may import modules of earlier rows, and of its own row only when they come before it
(read each row left to right). A new module must be placed here, so its arrows get checked too.
Imports inside functions count: a lazy import is still an arrow.
"""

import ast
from pathlib import Path

import pyimagesearch_tl

LAYERS = [
    ["errors", "registry", "_version", "atomic", "cache", "quiet", "cpus"],  # foundations
    ["images", "locks", "metrics", "plots", "novelty"],  # one concern each
    ["backbones", "classifiers", "runtimes", "store", "engines"],  # registries, file formats, where shards run
    ["layouts"],  # build-dataset: photos -> dataset/ + manifest.csv
    ["features", "quantization", "extraction"],  # extract: manifest -> <split>.h5
    ["bundle", "training"],  # train: <split>.h5 -> bundle
    ["evaluation", "prediction", "serve", "export", "bulk_prediction", "finetune", "audit"],  # use a bundle; audit
    ["config", "demo"],  # settings of every stage
    ["estimators", "api"],  # the Python way in: scikit-learn transformer, stage functions
    ["cli", "__init__"],  # the ways in
]
RANK = {name: (row, column) for row, names in enumerate(LAYERS) for column, name in enumerate(names)}
PACKAGE = Path(pyimagesearch_tl.__file__).parent


def _unit(parts: tuple[str, ...]) -> str:
    """The layer unit of a module: a subpackage counts as one (``backbones.keras_apps`` -> ``backbones``)."""
    return parts[0] if parts else "__init__"


def _imports(path: Path, root: Path = PACKAGE) -> set[str]:
    relative = path.relative_to(root).with_suffix("").parts
    package = relative[:-1]  # the package the module is in, relative to pyimagesearch_tl
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            target = base + tuple(node.module.split(".")) if node.module else base
            found |= {_unit(target + (alias.name,)) for alias in node.names} if not node.module else {_unit(target)}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pyimagesearch_tl."):
            found.add(_unit(tuple(node.module.split(".")[1:])))
        elif isinstance(node, ast.Import):
            found |= {_unit(tuple(a.name.split(".")[1:])) for a in node.names if a.name.startswith("pyimagesearch_tl.")}
    return found - {_unit(relative)}


def test_every_module_is_placed_in_a_layer():
    units = {_unit(p.relative_to(PACKAGE).with_suffix("").parts) for p in PACKAGE.rglob("*.py")}
    assert units == set(RANK), f"not in LAYERS: {sorted(units - set(RANK))}; gone: {sorted(set(RANK) - units)}"


def test_no_module_imports_a_module_above_it():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = _unit(path.relative_to(PACKAGE).with_suffix("").parts)
        for target in _imports(path):
            if RANK[target] >= RANK[importer]:
                upward.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not upward, "imports pointing up the data flow:\n" + "\n".join(upward)


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself: an import inside a function, relative or absolute, is found."""
    module = PACKAGE / "novelty.py"
    assert "training" not in _imports(module)
    probe = tmp_path / "backbones" / "probe.py"
    probe.parent.mkdir()
    lazy = [
        "def later():",
        "    from ..training import train",
        "    import pyimagesearch_tl.cli",
        "    from . import keras_apps",
    ]
    probe.write_text(module.read_text() + "\n\n" + "\n".join(lazy) + "\n")
    assert _imports(probe, tmp_path) == {"training", "cli"}  # backbones.keras_apps is its own package
