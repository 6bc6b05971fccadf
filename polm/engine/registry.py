"""Named registries of components contributed by plugins."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from polm.engine.errors import PolmError, did_you_mean

T = TypeVar("T")

COMPONENT_KINDS: tuple[str, ...] = (
    "stages",
    "objectives",
    "rewards",
    "tuning_methods",
    "encoders",
    "connectors",
    "datasets",
    "models",
    "inference_methods",
    "commands",
    "merge_methods",
    "retrievers",
    "domains",
)


@dataclass
class Entry(Generic[T]):
    """One registered component and where it came from."""

    name: str
    obj: T
    plugin: str
    metadata: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Components of one kind by name.

    A duplicate name is rejected (naming both plugins), and looking up an
    unknown name lists the names that exist and the closest one.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def add(self, name: str, obj: T, plugin: str, **metadata: Any) -> None:
        if not isinstance(name, str) or not name:
            raise PolmError(f"plugin '{plugin}' registered a {self.kind[:-1]} with an invalid name {name!r}")
        if name in self._entries:
            previous = self._entries[name].plugin
            raise PolmError(
                f"{self.kind[:-1]} '{name}' from plugin '{plugin}' is already registered by plugin "
                f"'{previous}'; rename one of them"
            )
        self._entries[name] = Entry(name, obj, plugin, metadata)

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            available = ", ".join(sorted(self._entries)) or "none"
            raise PolmError(
                f"unknown {self.kind[:-1].replace('_', ' ')} '{name}'.{did_you_mean(name, self._entries)} "
                f"Available: {available}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[Entry[T]]:
        return list(self._entries.values())

    def as_dict(self) -> dict[str, T]:
        return {name: entry.obj for name, entry in self._entries.items()}
