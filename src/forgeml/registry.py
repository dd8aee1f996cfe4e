"""Name -> builder registries: a recipe names a model or a dataset, the registry builds it.

Adding one is one decorated function or class, e.g. ``@MODELS.register("mlp", MLPConfig)``. A
registry with an entry-point group also holds what installed packages declare in that group: each
entry point names an object whose module registers it on import, loaded at the first lookup.
"""

from collections.abc import Callable
from dataclasses import dataclass
from difflib import get_close_matches
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from forgeml.errors import ForgeError

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry(Generic[F]):
    name: str
    build: F
    config: type | None


class Registry(Generic[F]):
    def __init__(self, kind: str, group: str | None = None) -> None:
        self.kind = kind
        self.group = group  # entry-point group of plugins, e.g. forgeml.models
        self._entries: dict[str, Entry[F]] = {}
        self._discovered = group is None

    def register(self, name: str, config: type | None = None) -> Callable[[F], F]:
        def decorate(build: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, build, config)
            return build

        return decorate

    def discover(self) -> None:
        """Import the plugins of the entry-point group once; each must register the name it is
        declared under (a plugin that fails to import is named with its error)."""
        if self._discovered:
            return
        self._discovered = True  # first: a plugin's module imports forgeml and may look names up
        for point in entry_points(group=self.group):
            if point.name in self._entries:
                continue
            try:
                point.load()
            except Exception as exc:  # noqa: BLE001 - any failure of a third-party import is reported as it is
                raise ForgeError(
                    f"{self.kind} plugin {point.name!r} ({point.value}, entry point group {self.group}) "
                    f"failed to import: {type(exc).__name__}: {exc}"
                ) from exc
            if point.name not in self._entries:
                raise ForgeError(
                    f"{self.kind} plugin {point.name!r} ({point.value}) registered nothing under that name; "
                    f"decorate it with @register({point.name!r}, ...) on this registry"
                )

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def configs(self, discover: bool = True) -> list[type]:
        """The registered config classes; ``discover=False``: without importing plugins (yet)."""
        if discover:
            self.discover()
        return [e.config for e in self._entries.values() if e.config is not None]

    def __contains__(self, name: str) -> bool:
        self.discover()
        return name in self._entries

    def get(self, name: str) -> Entry[F]:
        self.discover()
        if name not in self._entries:
            hint = get_close_matches(name, self.names(), n=1)
            maybe = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ForgeError(f"unknown {self.kind} {name!r}{maybe} Known {self.kind}s: {', '.join(self.names())}")
        return self._entries[name]
