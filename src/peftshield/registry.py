"""A small named registry shared by attacks, fine-tuning methods and defenses."""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from peftshield.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a name to a class; components add themselves with ``@registry.register``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        name = getattr(cls, "name", None)
        if not name:
            raise TypeError(f"{cls.__name__} needs a class attribute 'name' to register as a {self.kind}")
        if name in self._entries and self._entries[name] is not cls:
            raise TypeError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = cls
        return cls

    def get(self, name: str) -> type[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} '{name}' (choose from: {', '.join(self.names())})") from None

    def create(self, name: str, **params) -> T:
        cls = self.get(name)
        try:
            return cls(**params)
        except TypeError as exc:
            raise ConfigError(f"{self.kind} '{name}': bad options {sorted(params)} ({exc})") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def factory(self, name: str) -> Callable[..., T]:
        return self.get(name)
