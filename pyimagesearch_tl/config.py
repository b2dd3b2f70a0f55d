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
from .images import MAX_PIXELS, RESIZE_MODES
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
    "resize": None,  # how images meet the square input: squash, crop (centre) or letterbox; unset: the backbone's
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


# --- constraints: what each key allows, as data ---------------------------------------------------
#
# As scikit-learn's parameter constraints (``Interval``, ``StrOptions``): each says what it allows (the
# error message), checks a value, and gives values it refuses, from which the tests are generated.


class Constraint:
    """What one configuration key allows."""

    def allows(self, value: Any) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        """What is allowed, as the error message says it."""
        raise NotImplementedError

    def refused(self) -> list:
        """Values this constraint refuses (a config file's typical mistakes): tests check each is an error."""
        raise NotImplementedError


def _show(bound: float) -> str:
    return f"{int(bound):,}" if float(bound).is_integer() else f"{bound:g}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Options(Constraint):
    """One of fixed values (strings, or numbers that are not booleans)."""

    values: tuple

    def allows(self, value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, (str, int, float)) and value in self.values

    def describe(self) -> str:
        return f"one of {', '.join(map(repr, self.values))}"

    def refused(self) -> list:
        return ["not-an-option", True, None, list(self.values[:1])]


@dataclasses.dataclass(frozen=True)
class Registered(Constraint):
    """A name of a registry (read when checked, so later registrations count), or one of ``extra``."""

    names: Callable[[], list[str]]
    extra: tuple = ()

    def allows(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.names() + list(self.extra)

    def describe(self) -> str:
        return f"one of: {', '.join(self.names() + list(self.extra))}"

    def refused(self) -> list:
        return ["not-registered", 3, None]


@dataclasses.dataclass(frozen=True)
class Interval(Constraint):
    """A number of ``kind`` (``int``, or ``float`` which takes integers too) between ``low`` and ``high``
    (None: unbounded), each end included unless ``open`` names it ("low", "high" or "both")."""

    kind: type
    low: float | None
    high: float | None
    open: str = ""
    what: str = ""

    def allows(self, value: Any) -> bool:
        if not _number(value) or (self.kind is int and not isinstance(value, int)):
            return False
        low_open, high_open = self.open in ("low", "both"), self.open in ("high", "both")
        if self.low is not None and (value < self.low or (low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (high_open and value == self.high))

    def describe(self) -> str:
        noun = {int: "an integer", float: "a number"}[self.kind] if not self.what else self.what
        if self.low is not None and self.high is not None:
            left, right = "(" if self.open in ("low", "both") else "[", ")" if self.open in ("high", "both") else "]"
            return f"{noun} in {left}{_show(self.low)}, {_show(self.high)}{right}"
        if self.low is not None:
            return f"{noun} {'>' if self.open else '>='} {_show(self.low)}"
        return f"{noun} {'<' if self.open else '<='} {_show(self.high)}"

    def refused(self) -> list:
        wrong = [str(self.low if self.low is not None else self.high), True, None]
        if self.kind is int:
            wrong.append(1.5)
        if self.low is not None:
            wrong.append(self.low if self.open in ("low", "both") else self.low - 1)
        if self.high is not None:
            wrong.append(self.high if self.open in ("high", "both") else self.high + 1)
        return wrong


@dataclasses.dataclass(frozen=True)
class Typed(Constraint):
    """A value of ``kind`` (a boolean is not an integer), non-empty when ``kind`` is ``str``."""

    kind: type
    what: str

    def allows(self, value: Any) -> bool:
        if isinstance(value, bool) and self.kind is not bool:
            return False
        return isinstance(value, self.kind) and (self.kind is not str or bool(value))

    def describe(self) -> str:
        return self.what

    def refused(self) -> list:
        return [3] if self.kind is str else ["yes", 1]


@dataclasses.dataclass(frozen=True)
class Optional(Constraint):
    """``constraint``, or unset (None)."""

    constraint: Constraint

    def allows(self, value: Any) -> bool:
        return value is None or self.constraint.allows(value)

    def describe(self) -> str:
        return f"{self.constraint.describe()} (or unset)"

    def refused(self) -> list:
        return [v for v in self.constraint.refused() if v is not None]


@dataclasses.dataclass(frozen=True)
class Rule(Constraint):
    """A check a simpler constraint cannot say, with the values it refuses written out."""

    check: Callable[[Any], bool]
    what: str
    examples: tuple

    def allows(self, value: Any) -> bool:
        return bool(self.check(value))

    def describe(self) -> str:
        return self.what

    def refused(self) -> list:
        return list(self.examples)


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def _splits(value: Any) -> bool:
    return (
        _str_list(value)
        and 2 <= len(value) <= 3
        and len(set(value)) == len(value)
        and all(SPLIT_NAME.fullmatch(v) for v in value)
    )


def _fractions(value: Any) -> bool:
    return (
        isinstance(value, list)
        and 2 <= len(value) <= 3
        and all(_number(v) and 0 <= v <= 1 for v in value)
        and abs(sum(value) - 1.0) < 1e-6
        and value[0] > 0
    )


def _grids(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(grid, dict) and all(isinstance(v, list) and v for v in grid.values()) for grid in value.values()
    )


PATH = Typed(str, "a path")

#: key -> what it allows (:class:`Constraint`); :func:`validate` checks every key, the tests refuse every
#: constraint's :meth:`~Constraint.refused` values.
RULES: dict[str, Constraint] = {
    "input_dir": Optional(PATH),
    "dataset_dir": PATH,
    "features_dir": Rule(
        lambda v: (isinstance(v, str) and bool(v)) or (isinstance(v, list) and bool(v) and _str_list(v)),
        "a path, or a list of paths (train and evaluate: features of several folders combined)",
        ("", [], [""], 3),
    ),
    "models_dir": PATH,
    "evaluation_dir": PATH,
    "audit_dir": PATH,
    "neighbour_search": Options(SEARCHES),
    "finetune_dir": PATH,
    "layout": Options(("auto", *LAYOUTS)),
    "labels_file": Optional(PATH),
    "exclude": Optional(PATH),
    "split_files": Rule(
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(p, str) and p for k, p in v.items()),
        "a table of split name -> list file path",
        ({"train": ""}, {"train": 3}, ["train.txt"]),
    ),
    "classes": Rule(_str_list, "a list of non-empty strings", ("cats", [""], [3])),
    "splits": Rule(
        _splits,
        "a list of 2 or 3 distinct split names (training, validation[, evaluation]) of letters, digits, '_' and '-'",
        (["training"], ["a", "a"], ["a", "b", "c", "d"], ["a/b", "c"], "training"),
    ),
    "split_fractions": Rule(
        _fractions,
        "2 or 3 fractions in [0, 1] that sum to 1, the first above 0",
        ([0.5, 0.2, 0.1], [1.0], [0.0, 1.0], [1.5, -0.5], [True, 0.0]),
    ),
    "link": Options(("copy", "hardlink", "symlink")),
    "seed": Interval(int, 0, None),
    "max_image_pixels": Interval(int, 0, None, open="low"),
    "backbone": Registered(list_backbones),
    "weights": Typed(str, "'imagenet', 'none' or a path to a weights file"),
    "pooling": Options(("avg", "max", "flatten")),
    "feature_format": Registered(FORMATS.names),
    "dtype": Options(("float32", "float16")),
    "precision": Options(("float32", "bfloat16", "int8")),
    "batch_size": Interval(int, 1, 4096),
    "views": Options(VIEWS),
    "resize": Optional(Options(RESIZE_MODES)),
    "runtime": Registered(list_runtimes),
    "engine": Registered(list_engines),
    "ray_address": Optional(Typed(str, "a Ray cluster's address ('auto', or host:port)")),
    "ray_cpus_per_worker": Interval(int, 1, None),
    "shard_size": Interval(int, 1, 1_000_000),
    "classifier": Registered(list_classifiers, ("all",)),
    "cv": Rule(
        lambda v: v == "validation" or (isinstance(v, str) and v.isdigit() and int(v) >= 2),
        "an integer of at least 2 (stratified folds) or 'validation'",
        ("1", "0", "valid", "-3"),
    ),
    "class_weight": Options(("none", "balanced")),
    "streaming": Typed(bool, "true or false"),
    "unknown": Registered(list_detectors),
    "unknown_keep": Interval(float, 0, 1, open="low", what="a share"),
    "grids": Rule(
        _grids, "a table of classifier name -> {parameter: [values]}", ({"logreg": {"C": []}}, {"logreg": 1})
    ),
    "input_size": Optional(Interval(int, 32, 1024)),
    "head_epochs": Interval(int, 1, None),
    "finetune_epochs": Interval(int, 0, None),
    "unfreeze_blocks": Interval(int, 1, None),
    "head_lr": Interval(float, 0, None, open="low", what="a learning rate"),
    "finetune_lr": Interval(float, 0, None, open="low", what="a learning rate"),
    "augment": Options(("none", "light", "strong")),
    "monitor": Options(("val_loss", "val_auc")),
    "patience": Interval(int, 1, None),
    "head_dropout": Interval(float, 0, 1, open="high", what="a rate"),
    "head_batchnorm": Typed(bool, "true or false"),
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
    for key, constraint in RULES.items():
        if not constraint.allows(values.get(key)):
            raise ConfigError(f"configuration key {key!r}: got {values.get(key)!r}, expected {constraint.describe()}")
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
