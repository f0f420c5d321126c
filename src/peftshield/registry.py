"""A small named registry shared by attacks, fine-tuning methods, defenses and executors."""

from __future__ import annotations

from typing import Any, Generic, Iterator, Mapping, TypeVar

import pydantic

from peftshield.errors import ConfigError, validation_line

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

    def validate(self, name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The options of component ``name``, typed and checked against its options model.

        A bad option is a :class:`ConfigError` naming the component and the option."""
        cls = self.get(name)
        validator = getattr(cls, "validate_options", None)
        if validator is None:
            return dict(options or {})
        try:
            return validator(dict(options or {}))
        except pydantic.ValidationError as exc:
            raise ConfigError(f"{self.kind} '{name}': {validation_line(exc, whole='options', label='option')}") from None
        except ValueError as exc:  # a component's check across options
            raise ConfigError(f"{self.kind} '{name}': {exc}") from None

    def create(self, name: str, **options: Any) -> T:
        """A new component from validated options. Errors raised inside a constructor are not
        options errors and propagate unchanged."""
        return self.get(name)(**self.validate(name, options))

    def from_spec(self, spec: Mapping[str, Any]) -> T:
        """Rebuild a component saved as ``{"name", "options"}``."""
        if not isinstance(spec, Mapping) or "name" not in spec:
            raise ConfigError(f"a saved {self.kind} must be {{name, options}}, got {spec!r}")
        return self.create(spec["name"], **dict(spec.get("options") or {}))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._entries
