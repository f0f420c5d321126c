"""The registries: options typed and checked at creation, saved as {name, options}, errors in one line."""

from __future__ import annotations

from typing import Annotated

import pytest
from pydantic import Field

from peftshield.attacks import POISONERS
from peftshield.components import Component
from peftshield.defenses import DEFENSES, ThresholdPolicy
from peftshield.errors import ConfigError
from peftshield.registry import Registry


class Broken(Component):
    name = "broken"

    def __init__(self, size: Annotated[int, Field(ge=1)] = 2) -> None:
        self.size = size
        len(size)  # a bug inside the constructor: a TypeError that is not about the options


def test_a_type_error_inside_a_constructor_is_not_reported_as_bad_options() -> None:
    registry: Registry[Broken] = Registry("widget")
    registry.register(Broken)
    with pytest.raises(ConfigError, match=r"widget 'broken': option 'size': Input should be greater than or equal to 1 \(got 0\)"):
        registry.create("broken", size=0)
    with pytest.raises(TypeError, match="has no len"):
        registry.create("broken", size=3)


def test_options_are_typed_when_created_and_round_trip_through_spec() -> None:
    poisoner = POISONERS.create("badnet", words="cf, mn", num_triggers="2")
    assert poisoner.words == ("cf", "mn") and poisoner.num_triggers == 2
    assert POISONERS.from_spec(poisoner.spec()).params() == poisoner.params()
    psim = DEFENSES.create("psim", threshold={"kind": "frr", "target_frr": 0.05}, method="lora")
    assert psim.threshold == ThresholdPolicy(kind="frr", target_frr=0.05)
    assert DEFENSES.from_spec(psim.spec()).spec() == psim.spec()
    with pytest.raises(ConfigError, match="defense 'psim': unknown fine-tuning method 'qlora'"):
        DEFENSES.create("psim", method="qlora")
    with pytest.raises(ConfigError, match="defense 'psim': fine-tuning method 'lora': option 'r'"):
        DEFENSES.create("psim", method="lora", method_options={"r": 0})


def test_a_threshold_value_means_a_fixed_threshold() -> None:
    assert ThresholdPolicy(value=0.9).kind == "fixed"
    with pytest.raises(ValueError, match="cannot be combined with calibration"):
        ThresholdPolicy(kind="frr", value=0.9)
    with pytest.raises(ConfigError, match=r"a PSIM threshold is a confidence in \(0, 1\]"):
        DEFENSES.create("psim", threshold={"value": 1.5})
