"""Parse ``KEY=VALUE`` options given on the command line or in configs."""

from __future__ import annotations

import yaml

from peftshield.yaml_config import safe_load_plain

from peftshield.errors import ConfigError


def parse_key_values(pairs: list[str] | None, option: str) -> dict:
    """``["r=4", "words=cf,mn"]`` -> ``{"r": 4, "words": "cf,mn"}`` (values typed as YAML scalars)."""
    parsed: dict = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} '{pair}': expected KEY=VALUE")
        try:
            parsed[key.strip().replace("-", "_")] = safe_load_plain(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed[key.strip().replace("-", "_")] = value
    return parsed
