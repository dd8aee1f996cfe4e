"""Name -> builder registries: a recipe names a model or a dataset, the registry builds it.

Adding one is one decorated function, e.g. ``@MODELS.register("mlp", MLPConfig)``.
"""

from collections.abc import Callable
from dataclasses import dataclass
from difflib import get_close_matches
from typing import Any, Generic, TypeVar

from forgeml.errors import ForgeError

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Entry(Generic[F]):
    name: str
    build: F
    config: type | None


class Registry(Generic[F]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[F]] = {}

    def register(self, name: str, config: type | None = None) -> Callable[[F], F]:
        def decorate(build: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, build, config)
            return build

        return decorate

    def names(self) -> list[str]:
        return sorted(self._entries)

    def configs(self) -> list[type]:
        return [e.config for e in self._entries.values() if e.config is not None]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Entry[F]:
        if name not in self._entries:
            hint = get_close_matches(name, self.names(), n=1)
            maybe = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ForgeError(f"unknown {self.kind} {name!r}{maybe} Known {self.kind}s: {', '.join(self.names())}")
        return self._entries[name]
