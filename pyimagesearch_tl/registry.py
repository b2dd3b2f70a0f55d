"""One idiom for every set of named, pluggable parts: backbones, classifiers, runtimes, engines, "unknown"
detectors and feature formats.

A :class:`Registry` holds the entries of one kind by name, as timm's model registry does:
:meth:`~Registry.register` refuses a name already taken, :meth:`~Registry.get` says which names exist
when one is unknown, :meth:`~Registry.names` lists them with a shell-style pattern, and every entry
carries a one-line description and a check of whether it can be used here (its extra installed), which
``ptl list KIND`` prints. :data:`REGISTRIES` holds them all by their plural name.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.util
from typing import Callable, Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def usable() -> str | None:
    """The check of an entry that can always be used."""
    return None


def installed(module: str) -> bool:
    """Whether ``module`` can be imported here, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module blocked in sys.modules, or a broken install
        return False


@dataclasses.dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered part.

    Attributes
    ----------
    name : str
        What the configuration and the command line call it.
    value : object
        The part itself (a record, a class, a factory).
    description : str
        One line for ``ptl list``.
    unusable : callable
        ``unusable()`` returns None when the part can be used here, else why not and how to fix it
        (typically the ``pip install`` of its extra).
    """

    name: str
    value: T
    description: str
    unusable: Callable[[], str | None] = usable


class Registry(Generic[T]):
    """The parts of one ``kind`` (singular, as messages say it), listed by ``ptl list <plural>``."""

    def __init__(self, kind: str, plural: str):
        if plural in REGISTRIES:
            raise ValueError(f"a registry of {plural} already exists")
        self.kind, self.plural = kind, plural
        self._entries: dict[str, Entry[T]] = {}
        REGISTRIES[plural] = self

    def register(self, name: str, value: T, *, description: str, unusable: Callable[[], str | None] = usable) -> T:
        """Add ``value`` as ``name`` and return it. A name already registered is refused (:class:`ValueError`):
        a plug-in cannot silently replace a part."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = Entry(name, value, description, unusable)
        return value

    def get(self, name: str) -> T:
        """The part registered as ``name``; an unknown name is a :class:`ConfigError` listing the valid ones."""
        try:
            return self._entries[name].value
        except (KeyError, TypeError):  # TypeError: not a name at all (a list, a dict from a config file)
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self._entries)}") from None

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching the shell-style ``pattern``, in registration order."""
        return [name for name in self._entries if fnmatch.fnmatch(name, pattern)]

    def entries(self, pattern: str = "*") -> list[Entry[T]]:
        """The entries whose names match ``pattern`` (see :meth:`names`)."""
        return [self._entries[name] for name in self.names(pattern)]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


#: Every registry, by its plural name (``ptl list backbones``, ...).
REGISTRIES: dict[str, Registry] = {}
