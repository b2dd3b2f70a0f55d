"""The single place for every setting the stages use.

Defaults live in :data:`DEFAULTS`. A TOML file (``ptl --config FILE``) overrides them, and
command-line options override both. Every key is validated declaratively by :data:`RULES`; an
unknown key or a value of the wrong type or range is a :class:`~pyimagesearch_tl.errors.ConfigError`
naming the key, the value given and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .audit import SEARCHES
from .backbones import list_backbones
from .classifiers import list_classifiers
from .engines import list_engines
from .errors import ConfigError
from .features import VIEWS
from .images import MAX_PIXELS
from .layouts import LAYOUTS, SPLIT_NAME, SPLIT_ROLES
from .novelty import list_detectors
from .runtimes import list_runtimes
from .store import FORMATS, SHARD_SIZE

DEFAULTS: dict[str, Any] = {
    # where things are
    "input_dir": None,  # the raw photos; build-dataset needs it
    "dataset_dir": "output/dataset",
    "features_dir": "output/features",  # train/evaluate: a list of folders combines their features
    "models_dir": "output/models",
    "evaluation_dir": "output/evaluation",
    "audit_dir": "output/audit",
    "neighbour_search": "auto",  # audit: exact, approximate, or auto (approximate above 20,000 rows)
    "finetune_dir": "output/finetune",
    # build-dataset
    "layout": "auto",
    "labels_file": None,
    "exclude": None,  # an audit.csv trimmed to the rows to drop: those images are left out of the build
    "split_files": {},  # split-lists layout: {split name: list file}; empty: found in meta/ or annotations/
    "classes": [],  # empty: taken from the data
    "splits": ["training", "validation", "evaluation"],
    "split_fractions": [0.75, 0.15, 0.10],
    "link": "copy",
    "seed": 42,
    # images
    "max_image_pixels": MAX_PIXELS,  # Pillow's own decompression-bomb threshold
    # extract
    "backbone": "efficientnet_lite0",
    "weights": "imagenet",
    "pooling": "avg",
    "feature_format": "hdf5",
    "dtype": "float32",
    "precision": "float32",
    "batch_size": 32,
    "views": 1,  # 2: average each image's features with its left-right mirror's (one more forward pass)
    "runtime": "auto",  # where the backbone runs: auto, the first of OpenVINO, ONNX Runtime, TensorFlow
    # that is installed and matches TensorFlow; or one by name
    "engine": "local",  # where shard work (build-dataset's checks, extract, predict) runs: this process, or Ray
    "ray_address": None,  # ray engine: unset starts a local Ray instance; "auto" joins this machine's cluster
    "ray_cpus_per_worker": 1,  # ray engine: CPUs per worker (each builds the backbone once)
    "shard_size": SHARD_SIZE,  # images per shard file: the unit of work and of resume
    # train
    "classifier": "logreg",
    "cv": "5",
    "class_weight": "none",
    "streaming": False,  # train from the feature file block by block (classifiers with partial_fit)
    "unknown_keep": 0.95,  # share of in-distribution validation images kept; the rest is "unknown"
    "unknown": "mahalanobis+energy",  # the "unknown" detector (novelty.DETECTORS; see benchmarks/bench_unknown.py)
    "grids": {},  # per classifier, e.g. {"logreg": {"C": [0.01, 0.1, 1]}}; empty: the registry's
    # finetune (batch_size, class_weight and seed above apply too)
    "input_size": None,  # square input side; unset: the backbone's own
    "head_epochs": 10,  # stage 1: the new head on the frozen backbone
    "finetune_epochs": 10,  # stage 2: the last blocks unfrozen too
    "unfreeze_blocks": 2,
    "head_lr": 1e-3,
    "finetune_lr": 1e-4,
    "augment": "light",
    "monitor": "val_loss",
    "patience": 3,  # epochs without improvement before a stage stops early
    "head_dropout": 0.2,
    "head_batchnorm": True,
}


def _choice(*allowed: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in allowed else f"one of {', '.join(map(repr, allowed))}"

    return check


def _choice_of(allowed: tuple) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        ok = value in allowed and not isinstance(value, bool)
        return None if ok else f"one of {', '.join(map(str, allowed))}"

    return check


def _typed(kind: type | tuple[type, ...], description: str, extra: Callable[[Any], bool] = lambda v: True):
    def check(value: Any) -> str | None:
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
        return None if ok and extra(value) else description

    return check


def _optional_str(value: Any) -> str | None:
    return None if value is None or isinstance(value, str) else "a string (or unset)"


def _str_list(value: Any) -> str | None:
    ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    return None if ok else "a list of non-empty strings"


def _splits(value: Any) -> str | None:
    if (
        _str_list(value) is None
        and 2 <= len(value) <= 3
        and len(set(value)) == len(value)
        and all(SPLIT_NAME.fullmatch(v) for v in value)
    ):
        return None
    return "a list of 2 or 3 distinct split names (training, validation[, evaluation]) of letters, digits, '_' and '-'"


def _fractions(value: Any) -> str | None:
    ok = (
        isinstance(value, list)
        and 2 <= len(value) <= 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in value)
        and abs(sum(value) - 1.0) < 1e-6
        and value[0] > 0
    )
    return None if ok else "2 or 3 fractions in [0, 1] that sum to 1, the first above 0"


def _cv(value: Any) -> str | None:
    if value == "validation" or (isinstance(value, str) and value.isdigit() and int(value) >= 2):
        return None
    return "an integer of at least 2 (stratified folds) or 'validation'"


def _registered(names: Callable[[], list[str]], *extra: str) -> Callable[[Any], str | None]:
    """A name from a registry (read when checked, so later registrations count)."""

    def check(value: Any) -> str | None:
        allowed = names() + list(extra)
        return None if value in allowed else f"one of: {', '.join(allowed)}"

    return check


def _grids(value: Any) -> str | None:
    ok = isinstance(value, dict) and all(
        isinstance(grid, dict) and all(isinstance(v, list) and v for v in grid.values()) for grid in value.values()
    )
    return None if ok else "a table of classifier name -> {parameter: [values]}"


#: key -> check(value) returning None when valid, else a description of what is allowed.
RULES: dict[str, Callable[[Any], str | None]] = {
    "input_dir": _optional_str,
    "dataset_dir": _typed(str, "a path"),
    "features_dir": lambda v: (
        None
        if (isinstance(v, str) and v) or (isinstance(v, list) and v and all(isinstance(p, str) and p for p in v))
        else "a path, or a list of paths (train and evaluate: features of several folders combined)"
    ),
    "models_dir": _typed(str, "a path"),
    "evaluation_dir": _typed(str, "a path"),
    "audit_dir": _typed(str, "a path"),
    "neighbour_search": _choice_of(SEARCHES),
    "finetune_dir": _typed(str, "a path"),
    "layout": _choice("auto", *LAYOUTS),
    "labels_file": _optional_str,
    "exclude": _optional_str,
    "split_files": lambda v: (
        None
        if isinstance(v, dict) and all(isinstance(k, str) and isinstance(p, str) and p for k, p in v.items())
        else "a table of split name -> list file path"
    ),
    "classes": _str_list,
    "splits": _splits,
    "split_fractions": _fractions,
    "link": _choice("copy", "hardlink", "symlink"),
    "seed": _typed(int, "an integer >= 0", lambda v: v >= 0),
    "max_image_pixels": _typed(int, "an integer > 0", lambda v: v > 0),
    "backbone": _registered(list_backbones),
    "weights": _typed(str, "'imagenet', 'none' or a path to a weights file", bool),
    "pooling": _choice("avg", "max", "flatten"),
    "feature_format": _registered(FORMATS.names),
    "dtype": _choice("float32", "float16"),
    "precision": _choice("float32", "bfloat16", "int8"),
    "batch_size": _typed(int, "an integer between 1 and 4096", lambda v: 1 <= v <= 4096),
    "views": _choice_of(VIEWS),
    "runtime": _registered(list_runtimes),
    "engine": _registered(list_engines),
    "ray_address": _optional_str,
    "ray_cpus_per_worker": _typed(int, "an integer >= 1", lambda v: v >= 1),
    "shard_size": _typed(int, "an integer between 1 and 1000000", lambda v: 1 <= v <= 1_000_000),
    "classifier": _registered(list_classifiers, "all"),
    "cv": _cv,
    "class_weight": _choice("none", "balanced"),
    "streaming": _typed(bool, "true or false"),
    "unknown": _registered(list_detectors),
    "unknown_keep": _typed((int, float), "a share in (0, 1]", lambda v: 0 < v <= 1),
    "grids": _grids,
    "input_size": lambda v: (
        None
        if v is None or (isinstance(v, int) and not isinstance(v, bool) and 32 <= v <= 1024)
        else "an integer between 32 and 1024 (or unset)"
    ),
    "head_epochs": _typed(int, "an integer >= 1", lambda v: v >= 1),
    "finetune_epochs": _typed(int, "an integer >= 0 (0: no second stage)", lambda v: v >= 0),
    "unfreeze_blocks": _typed(int, "an integer >= 1", lambda v: v >= 1),
    "head_lr": _typed((int, float), "a learning rate > 0", lambda v: v > 0),
    "finetune_lr": _typed((int, float), "a learning rate > 0", lambda v: v > 0),
    "augment": _choice("none", "light", "strong"),
    "monitor": _choice("val_loss", "val_auc"),
    "patience": _typed(int, "an integer >= 1", lambda v: v >= 1),
    "head_dropout": _typed((int, float), "a rate in [0, 1)", lambda v: 0 <= v < 1),
    "head_batchnorm": _typed(bool, "true or false"),
}
assert RULES.keys() == DEFAULTS.keys()


@dataclasses.dataclass
class Config:
    """Effective configuration: a validated mapping of every key in :data:`DEFAULTS`."""

    values: dict[str, Any]

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["values"][key]
        except KeyError:
            raise AttributeError(key) from None

    def replace(self, **overrides: Any) -> "Config":
        """Return a copy with ``overrides`` applied (``None`` means "not given") and validated."""
        values = copy.deepcopy(self.values)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return Config(validate(values))

    def split_for(self, role: str) -> str | None:
        """The configured split name playing ``role`` (training/validation/evaluation), if any."""
        index = SPLIT_ROLES.index(role)
        return self.splits[index] if index < len(self.splits) else None

    def to_toml(self) -> str:
        """The configuration as TOML text (what ``ptl config`` prints)."""
        lines, tables = [], []
        for key, value in self.values.items():
            if isinstance(value, dict):
                flat = {name: v for name, v in value.items() if not isinstance(v, dict)}
                if flat:
                    tables.append(f"\n[{key}]")
                    tables += [f"{json.dumps(name)} = {json.dumps(v)}" for name, v in flat.items()]
                for name, grid in value.items():
                    if isinstance(grid, dict):
                        tables.append(f"\n[{key}.{name}]")
                        tables += [f"{param} = {json.dumps(vals)}" for param, vals in grid.items()]
            elif value is None:
                lines.append(f"# {key} = (unset)")
            else:
                lines.append(f"{key} = {json.dumps(value)}")
        return "\n".join(lines + tables) + "\n"


def validate(values: dict[str, Any]) -> dict[str, Any]:
    """Check every key of ``values``; raise :class:`ConfigError` naming the first bad one."""
    unknown = sorted(set(values) - set(RULES))
    if unknown:
        raise ConfigError(f"unknown configuration key {unknown[0]!r}; valid keys are: {', '.join(RULES)}")
    for key, check in RULES.items():
        problem = check(values.get(key))
        if problem is not None:
            raise ConfigError(f"configuration key {key!r}: got {values.get(key)!r}, expected {problem}")
    if len(values["split_fractions"]) != len(values["splits"]):
        raise ConfigError(
            f"configuration key 'split_fractions': {values['split_fractions']} has "
            f"{len(values['split_fractions'])} entries but 'splits' names {len(values['splits'])}"
        )
    return values


def load_config(path: str | Path | None = None) -> Config:
    """Defaults, overridden by the TOML file at ``path`` when given."""
    values = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        try:
            with path.open("rb") as handle:
                values.update(tomllib.load(handle))
        except FileNotFoundError:
            raise ConfigError(f"configuration file {str(path)!r} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {str(path)!r} is not valid TOML: {exc}") from None
        # TOML has integers; the cv key also takes the word 'validation'.
        if isinstance(values.get("cv"), int) and not isinstance(values.get("cv"), bool):
            values["cv"] = str(values["cv"])
    return Config(validate(values))
