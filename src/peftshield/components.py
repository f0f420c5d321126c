"""Components built from typed options: triggers, defenses and fine-tuning methods.

A component's constructor is the one place its options and their defaults are written.
Each keyword parameter carries a type (with pydantic constraints, e.g.
``Annotated[int, Field(ge=1)]``); :meth:`Component.options_model` turns the signature into
a pydantic model that forbids unknown keys. The registries validate options through it
when they create a component, and a grid config validates them when it loads, so a typo
fails before anything trains. A component is saved as ``{"name", "options"}``
(:meth:`Component.spec`) and rebuilt from that by its registry.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, ClassVar, Mapping

import pydantic
from pydantic import BaseModel, ConfigDict



class Component:
    """Scikit-learn-style: the constructor only stores its keyword parameters."""

    name: ClassVar[str]
    # Options added after stages keyed on this component's spec were cached: left out of the spec
    # while they hold their default, so those stage keys (and saved specs) stay what they were.
    options_added_later: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def options_model(cls) -> type[BaseModel]:
        """A pydantic model of the constructor's keyword parameters (types, constraints, defaults)."""
        cached = cls.__dict__.get("_options_model")
        if cached is not None:
            return cached
        hints = typing.get_type_hints(cls.__init__, include_extras=True)
        fields: dict[str, Any] = {}
        for parameter in inspect.signature(cls.__init__).parameters.values():
            if parameter.name == "self" or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            default = ... if parameter.default is parameter.empty else parameter.default
            fields[parameter.name] = (hints.get(parameter.name, Any), default)
        model = pydantic.create_model(
            f"{cls.__name__}Options", __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True), **fields
        )
        setattr(cls, "_options_model", model)
        return model

    @classmethod
    def validate_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options, typed and checked; raises ``pydantic.ValidationError``."""
        parsed = cls.options_model()(**dict(options))
        values = {name: getattr(parsed, name) for name in type(parsed).model_fields}
        cls.check_options(values)
        return values

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Checks across options that one type cannot express; raise ``ValueError``."""

    def params(self) -> dict[str, Any]:
        """The constructor's parameters as stored (scikit-learn's ``get_params``)."""
        return {name: getattr(self, name) for name in self.options_model().model_fields}

    def spec(self) -> dict[str, Any]:
        """``{"name", "options"}`` in JSON form: what is saved, and what the registry rebuilds it from."""
        model = self.options_model()
        options = model(**self.params()).model_dump(mode="json")
        for key in self.options_added_later:
            if options[key] == model.model_fields[key].default:
                del options[key]
        return {"name": self.name, "options": options}


