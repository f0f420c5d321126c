"""Settings of ``audit`` and ``scan`` as a CI gate, from a settings file and the command line.

Where settings come from, highest first:

1. the command line;
2. ``peftshield.toml`` (tables ``[audit]`` and ``[scan]``);
3. ``pyproject.toml`` (tables ``[tool.peftshield.audit]`` and ``[tool.peftshield.scan]``);
4. the defaults below.

The file is ``--config FILE`` when given, none with ``--no-config``; otherwise the first folder from the working
directory upwards that holds ``peftshield.toml``, or a ``pyproject.toml`` with a
``[tool.peftshield]`` table, supplies the settings. When that folder has both, they are
merged key by key and ``peftshield.toml`` wins. Keys may be written with ``-`` or ``_``; an
unknown key is an error naming the file and key. A relative path in a file (``texts``,
``calibration``, ``cache-dir``, ``base``) is relative to the file's folder; a ``base`` that
is no path there (a hub name such as ``org/name``) is kept as written.

A settings file found in the working tree belongs to whoever wrote the checkout: on a pull
request, the submitter. It can set what decides a verdict (``calibration``, ``fail-on``,
``texts``, ``cache-dir``, the search budget), so a gate on untrusted changes reads its
settings from the trusted side (``--config`` pointing at the base branch's copy) or from the
command line with ``--no-config``; the report records where each setting came from
(:func:`setting_sources`), and with ``CI`` set a found file that sets any of these warns.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from peftshield.audit.auditor import AuditSettings
from peftshield.defenses.thresholds import ConfidenceThreshold
from peftshield.errors import ConfigError, printable, validation_line
from peftshield.flags import GivenFlags, typed_from_flags
from peftshield.models.runtime import DEFAULT_RUNTIME, RUNTIME_HELP, Runtime

FORMATS = ("text", "json", "sarif", "markdown", "html")
FailOn = Literal["backdoored", "inconclusive"]
PATH_KEYS = {"texts", "cache_dir", "calibration", "base"}
# Settings that can turn a verdict or where it is read from: a found (untrusted) file setting one warns in CI.
VERDICT_KEYS = ("calibration", "fail_on", "texts", "cache_dir", "cache", "probe", "seed", "base", "search", "fail_on_rate", "threshold", "runtime")


def parse_formats(value: str | list[str], where: str = "--format") -> list[str]:
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    chosen = [item.strip().lower() for item in items if item.strip()]
    chosen = ["markdown" if f == "md" else f for f in chosen]
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        shown = ", ".join(repr(f)[:40] for f in unknown[:5]) or "nothing given"
        raise ConfigError(printable(f"{where}: {shown}: use one or more of {', '.join(FORMATS)} (comma-separated)"))
    return list(dict.fromkeys(chosen))


COMMA_SEPARATED = {"comma_separated": True}  # a list field given on the command line as one comma-separated value


class _GateSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: list[str] = Field(default_factory=lambda: ["text"], json_schema_extra=COMMA_SEPARATED,
                              description=f"Report formats, comma-separated: {', '.join(FORMATS)} (text goes to standard output, the others "
                                          "to summary.<ext> files beside the output).")

    @field_validator("format", mode="before")
    @classmethod
    def _formats(cls, value: Any) -> list[str]:
        try:
            return parse_formats(value, "format")
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("format: ")) from None


class AuditGateSettings(_GateSettings):
    """``peftshield audit`` as a gate."""

    not_flags: ClassVar[tuple[str, ...]] = ("search",)  # a table of budgets: settings file only

    fail_on: FailOn = Field("inconclusive", description="Verdicts that exit 1: inconclusive (only a positive 'clean' passes) or backdoored.")
    texts: Optional[str] = Field(None, description="Clean texts in the model's language: any dataset source, or a .txt file (one text per line). "
                                                   "Default: a packaged offline corpus.")
    probe: Literal["auto", "psim"] = Field("auto", description="auto (the checkpoint's head if it has a trained one, else a random-label PSIM), "
                                                               "or psim to ignore the head.")
    seed: int = Field(0, description="Seed of every random choice.")
    base: Optional[str] = Field(None, description="Base model of adapter targets (overrides their base_model_name_or_path) and of lone .safetensors files.")
    calibration: Optional[str] = Field(None, description="A calibration JSON ({clean_mean, clean_std, n_clean, ...}) instead of the packaged one.")
    cache: bool = Field(True, description="Reuse audits of unchanged weights and settings from the content cache (--no-cache: neither read nor write it); "
                                          "entries are authenticated (HMAC) and one that does not check out is audited again.")
    cache_dir: Optional[str] = Field(None, description="The content cache's folder (default: $PEFTSHIELD_CACHE_DIR or ~/.cache/peftshield/audit, never the checkout).")
    max_seconds: float = Field(1800.0, gt=0, le=86400, description="Wall-clock limit of one target's audit; beyond it the target is an error (exit 2).")
    search: AuditSettings = Field(default_factory=AuditSettings, description="how hard the trigger search works")


class ScanGateSettings(_GateSettings):
    """``peftshield scan`` as a gate."""

    fail_on_rate: Optional[float] = Field(None, gt=0, le=1, description="Share of flagged texts (0-1] that exits 1; default: any flagged text.")
    threshold: Optional[ConfidenceThreshold] = Field(None, description="Override the PSIM's calibrated threshold.")
    runtime: Runtime = Field(DEFAULT_RUNTIME, description=RUNTIME_HELP)
    batch_size: Optional[int] = Field(None, ge=1, description="Texts scored at a time (default: the PSIM's own).")


SECTIONS: dict[str, type[_GateSettings]] = {"audit": AuditGateSettings, "scan": ScanGateSettings}


@dataclass
class SettingsFile:
    path: Path | None  # the file that wins (peftshield.toml when a folder has both)
    tables: dict[str, dict]  # section -> raw table (keys normalised), the files merged
    explicit: bool = False  # named with --config (trusted by whoever wrote the command) rather than found in the tree

    @property
    def where(self) -> str:
        return str(self.path) if self.path else "defaults"


def _normalise(table: dict, path: Path, prefix: str) -> dict:
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = str(key).replace("-", "_")
        if isinstance(value, dict):
            value = _normalise(value, path, f"{prefix}{key}.")
        elif name in PATH_KEYS and isinstance(value, str):
            value = _relative_to_file(name, value, path)
        out[name] = value
    return out


def _relative_to_file(name: str, value: str, path: Path) -> str:
    """A path written in the settings file, made relative to the file's folder. Sources
    (``pkg:``, ``hf:``), backbone aliases and, for ``base``, hub names (no such path beside
    the file) stay as written."""
    from peftshield.models.backbone import BACKBONE_ALIASES

    if value.startswith(("pkg:", "hf:", "hf://")) or value in BACKBONE_ALIASES:
        return value
    candidate = Path(value).expanduser()
    if candidate.is_absolute():
        return str(candidate)
    beside = path.parent / candidate
    if name == "base" and not beside.exists() and not value.startswith((".", "~")):
        return value  # org/name on the hub
    return str(beside)


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _tables_of(path: Path) -> dict | None:
    """The peftshield tables of ``path`` (None: a pyproject.toml without [tool.peftshield])."""
    data = _read_toml(path)
    if path.name == "pyproject.toml":
        tool = data.get("tool", {})
        if not isinstance(tool, dict) or "peftshield" not in tool:
            return None
        data = tool["peftshield"]
        prefix = "tool.peftshield."
    else:
        prefix = ""
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: [{prefix.rstrip('.')}] must be a table")
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"{path}: unknown table [{prefix}{unknown[0]}] (known: {', '.join(f'[{prefix}{s}]' for s in SECTIONS)})")
    out = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [{prefix}{section}] must be a table")
        out[section] = _normalise(table, path, f"{prefix}{section}.")
    return out


def _checked(path: Path, tables: dict) -> dict:
    """Each section of one file validated on its own, so an error names that file."""
    for section, table in tables.items():
        _validated(SECTIONS[section], table, str(path), section)
    return tables


def find_settings_file(start: Path | None = None, explicit: Path | None = None, disabled: bool = False) -> SettingsFile:
    """``explicit`` (``--config``), none (``disabled``: ``--no-config``), or the first found upwards from ``start``."""
    if disabled and explicit is not None:
        raise ConfigError("--no-config and --config: give one of them")
    if disabled:
        return SettingsFile(None, {})
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"--config {explicit}: no such file")
        return SettingsFile(explicit, _checked(explicit, _tables_of(explicit) or {}), explicit=True)
    folder = (start or Path.cwd()).resolve()
    for candidate in [folder, *folder.parents]:
        found = [(candidate / name, tables) for name in ("pyproject.toml", "peftshield.toml")
                 if (candidate / name).is_file() and (tables := _tables_of(candidate / name)) is not None]
        if not found:
            continue
        merged: dict[str, dict] = {}
        for path, tables in found:  # pyproject.toml first, then peftshield.toml on top
            for section, table in _checked(path, tables).items():
                target = merged.setdefault(section, {})
                for key, value in table.items():
                    both_tables = isinstance(value, dict) and isinstance(target.get(key), dict)
                    target[key] = {**target[key], **value} if both_tables else value
        return SettingsFile(found[-1][0], merged)
    return SettingsFile(None, {})


def _validated(model: type[_GateSettings], table: dict, where: str, section: str) -> _GateSettings:
    try:
        return model(**table)
    except pydantic.ValidationError as exc:
        raise ConfigError(f"{where}: [{section}] {validation_line(exc, lambda key: key.replace('_', '-'))}") from None


def gate_settings(section: str, flags: GivenFlags, settings_file: SettingsFile) -> _GateSettings:
    """The section's settings: the file's table, then the flags given on top. An error names the
    file and key, or the flag."""
    model = SECTIONS[section]
    from_file = _validated(model, dict(settings_file.tables.get(section, {})), settings_file.where, section)
    return typed_from_flags(model, flags, **{name: value for name, value in from_file.model_dump().items() if not flags.was_given(name)})


def setting_sources(section: str, flags: GivenFlags, settings_file: SettingsFile) -> dict[str, str]:
    """Where each setting of ``section`` came from: the flag as typed, the settings file, or ``default``."""
    table = settings_file.tables.get(section, {})
    return {name: flags.as_typed(name) if flags.was_given(name) else settings_file.where if name in table else "default"
            for name in SECTIONS[section].model_fields}


def untrusted_verdict_keys(section: str, settings_file: SettingsFile, flags: GivenFlags) -> list[str]:
    """The verdict-deciding keys a *found* settings file sets and no flag overrides (empty for --config)."""
    if settings_file.explicit or settings_file.path is None:
        return []
    table = settings_file.tables.get(section, {})
    return [k.replace("_", "-") for k in VERDICT_KEYS if k in table and not flags.was_given(k)]
