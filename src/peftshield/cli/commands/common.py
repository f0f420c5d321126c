"""Helpers shared by the command modules: typed options from flags, and where models came from."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pydantic

from peftshield.errors import ConfigError
from peftshield.finetune import TrainingConfig, merge_training


def defaults_of(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    """A model's field defaults, for help texts that show them without writing them again."""
    return {name: field.default for name, field in model.model_fields.items()}


def training_from_options(base: TrainingConfig | None = None, **overrides) -> TrainingConfig:
    return merge_training(base or TrainingConfig(), overrides)


def typed_from_flags(model: type[pydantic.BaseModel], flags: dict[str, tuple[str, Any]], **fixed: Any) -> pydantic.BaseModel:
    """Build ``model`` from command-line flags, ``{field: (flag, value)}``; a value of None means
    "not given" (the model's default applies). A bad value is one line naming the flag."""
    values = {name: value for name, (_, value) in flags.items() if value is not None}
    try:
        return model(**fixed, **values)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first.get("loc") else ""
        flag = flags[field][0] if field in flags else field or "option"
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{flag}: {message} (got {first.get('input')!r})") from None


def given_options(model: type[pydantic.BaseModel], flags: dict[str, tuple[str, Any]], **fixed: Any) -> dict[str, Any]:
    """The flags that were given, checked against ``model`` (a section or a component's options)."""
    typed_from_flags(model, flags, **fixed)
    return {name: value for name, (_, value) in flags.items() if value is not None}


def typed_component(registry, name: str, flags: dict[str, tuple[str, Any]], **fixed: Any):
    """A component from flags (``{option: (flag, value)}``, None = not given): a bad value is one
    line naming the flag, not the option."""
    options = given_options(registry.get(name).options_model(), flags, **fixed)
    return registry.create(name, **fixed, **options)


def first_message(exc: Exception) -> str:
    """The message of a pydantic error's first entry (or of any exception), without pydantic's prefix."""
    if isinstance(exc, pydantic.ValidationError):
        return exc.errors()[0]["msg"].removeprefix("Value error, ")
    return str(exc)


def split_list(value: str, flag: str, allow_empty: bool = False) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items and not allow_empty:
        raise ConfigError(f"{flag}: give at least one name")
    return items


def find_attack_manifest(model_dir: Path) -> dict | None:
    """The ``attack.json`` of a backbone, or of the backbone a fine-tuned model was built on."""
    from peftshield.experiments.stages import ATTACK_MANIFEST
    from peftshield.finetune.checkpoint import MANIFEST_FILE
    from peftshield.io import read_json

    from peftshield.errors import PeftshieldError
    from peftshield.finetune.checkpoint import resolve_recorded_backbone

    candidates = [model_dir / ATTACK_MANIFEST]
    if (model_dir / MANIFEST_FILE).is_file():
        try:
            candidates.append(Path(resolve_recorded_backbone(model_dir)[0]) / ATTACK_MANIFEST)
        except PeftshieldError:
            pass
    for path in candidates:
        if path.is_file():
            return read_json(path)
    return None


def gate_command(function):
    """For commands whose exit code gates a CI job (``audit``, ``scan``): 0 clean, 1 findings,
    2 could not complete. Whatever stops them early (Ctrl-C, out of memory, a bug) becomes a
    one-line error with exit 2, never 1, so a crash can't pass for a finding (or, as 130,
    for anything a CI script checks). ``PEFTSHIELD_DEBUG=1`` shows a bug's traceback."""
    import functools
    import os

    from peftshield.errors import PeftshieldError, Terminated

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            with _sigterm_raises():
                return function(*args, **kwargs)
        except PeftshieldError:
            raise
        except Terminated:
            raise PeftshieldError("terminated; nothing was written") from None
        except KeyboardInterrupt:
            raise PeftshieldError("interrupted; nothing was written") from None
        except MemoryError:
            raise PeftshieldError("out of memory; try a smaller --batch-size or fewer texts") from None
        except Exception as exc:  # noqa: BLE001 - the gate's contract: never exit 1 on an error
            if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (a RuntimeError)
                raise PeftshieldError("out of memory; try a smaller --batch-size or fewer texts") from None
            if type(exc).__module__.startswith(("typer", "click")):
                raise  # usage errors and typer.Exit have their own handling
            if os.environ.get("PEFTSHIELD_DEBUG"):
                import traceback

                traceback.print_exc()  # the traceback, and still exit 2
            if isinstance(exc, OSError):
                from peftshield.io import OUTPUT_ERRNOS

                if exc.errno in OUTPUT_ERRNOS:
                    raise  # an output place: one line, exit 2, from main
                raise PeftshieldError(f"{exc.filename or 'input'}: {exc.strerror or exc}") from None
            raise PeftshieldError(f"internal error, please report it: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
                                  "(PEFTSHIELD_DEBUG=1 shows the traceback)") from None

    return wrapper


@contextlib.contextmanager
def _sigterm_raises():
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (elsewhere: nothing changes)."""
    import signal
    import threading

    from peftshield.errors import Terminated

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def warn_untrusted_settings(section: str, settings_file, flags: dict[str, tuple[str, Any]]) -> None:
    """In CI (``CI`` set), warn when a settings file found in the checkout, not named with
    ``--config``, sets what decides the verdict: on a pull request its author wrote it."""
    import os
    import warnings

    from peftshield.errors import PeftshieldWarning
    from peftshield.gate.settings import untrusted_verdict_keys

    keys = untrusted_verdict_keys(section, settings_file, flags)
    if keys and os.environ.get("CI", "").lower() not in ("", "0", "false"):
        warnings.warn(f"{settings_file.where} (found in the checkout) sets {', '.join(keys)}, which decide the verdict; on pull requests "
                      "read settings from the base branch (--config FILE) or pin them with flags and --no-config", PeftshieldWarning, stacklevel=2)
