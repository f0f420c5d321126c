"""Helpers shared by the command modules: typed options from flags, and where models came from."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import pydantic
import typer

from peftshield.errors import ConfigError
from peftshield.finetune import TrainingConfig, merge_training
from peftshield.flags import GivenFlags, flag_of, typed_from_flags


ConfigOption = typer.Option(None, "--config", help="Settings file (default: peftshield.toml or pyproject.toml \\[tool.peftshield], searched upwards "
                                                   "from here). In CI on pull requests, point it at the base branch's copy: a found file belongs to "
                                                   "whoever wrote the checkout.")
NoConfigOption = typer.Option(False, "--no-config", help="Read no settings file: only flags and defaults.")


def defaults_of(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    """A model's field defaults, for help texts that show them without writing them again."""
    return {name: field.default for name, field in model.model_fields.items()}


def training_from_options(base: TrainingConfig | None = None, **overrides) -> TrainingConfig:
    return merge_training(base or TrainingConfig(), overrides)


def _cli_type(annotation: Any) -> Any:
    """The type typer parses a settings field as: constraints and choices stay with the model,
    which checks every value once (``Optional[Annotated[float, ...]]`` -> ``Optional[float]``,
    ``Literal[...]`` -> ``str``)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1
    inner = args[0] if optional else annotation
    while typing.get_origin(inner) is typing.Annotated:
        inner = typing.get_args(inner)[0]
    if typing.get_origin(inner) is typing.Literal:
        inner = str
    return typing.Optional[inner] if optional else inner


def settings_options(model: type[pydantic.BaseModel], envvar_prefix: str | None = None, flags: dict[str, str] | None = None,
                     only: tuple[str, ...] | None = None, layered: bool = False):
    """A decorator that gives a command one option per field of ``model`` (but those in its
    ``not_flags``, or outside ``only``) and hands it the validated settings as its first argument,
    ``settings``. The field owns everything: the flag (``--max-wait-ms`` for ``max_wait_ms``,
    ``--x/--no-x`` for a bool, or ``flags[name]``), the environment variable (``envvar_prefix``
    + the name in capitals), the default, the help (the field's description) and the bounds
    (checked once, by the model: a bad value is one line naming the flag). The command's own
    parameters after ``settings`` stay typer options as written.

    ``layered``: the command lays the flags over a settings file itself (``audit``, ``scan``), so
    it is handed the :class:`~peftshield.flags.GivenFlags` instead (every option defaults to "not
    given"; its help shows the model's default)."""
    import functools
    import inspect

    renamed = dict(flags or {})
    skipped = set(getattr(model, "not_flags", ()))
    fields = {name: field for name, field in model.model_fields.items()
              if name not in skipped and (only is None or name in only)}

    def decorate(command):
        own = list(inspect.signature(command).parameters.values())[1:]  # after `settings`
        hints = typing.get_type_hints(command)
        parameters, annotations = [], {}
        for name, field in fields.items():
            flag = renamed.get(name, flag_of(name))
            comma_separated = isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("comma_separated")
            kind = str if comma_separated else _cli_type(field.annotation)
            declared = f"{flag}/--no-{flag.removeprefix('--')}" if kind is bool else flag
            envvar = f"{envvar_prefix}{name.upper()}" if envvar_prefix else None
            if layered:
                kind = typing.Optional[kind]  # None: not given (Optional of an Optional is the same type)
                shown = field.get_default(call_default_factory=True)
                help_text = (field.description or "").rstrip(".") + (f" (default: {_shown(shown, flag)})." if shown not in (None, "") else ".")
                option = typer.Option(None, declared, envvar=envvar, help=help_text.strip(), show_default=False)
            else:
                default = ... if field.is_required() else field.default
                option = typer.Option(default, declared, envvar=envvar, help=field.description)
            parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))
            annotations[name] = kind
        for parameter in own:
            parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(parameter.name, parameter.annotation)))
            annotations[parameter.name] = hints.get(parameter.name, parameter.annotation)

        @functools.wraps(command)
        def run(**values):
            given = GivenFlags({name: values.pop(name) for name in fields}, renamed)
            return command(given if layered else typed_from_flags(model, given), **values)

        run.__signature__ = inspect.Signature(parameters)
        run.__annotations__ = annotations
        del run.__wrapped__  # typer reads the signature above, not the command's
        return run

    return decorate


def _shown(value: Any, flag: str) -> str:
    """A default as a help text shows it: a list comma-separated, a switch as its flag, a number short."""
    if isinstance(value, bool):
        return flag if value else "--no-" + flag.removeprefix("--")
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def split_list(value: str, flag: str, allow_empty: bool = False) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items and not allow_empty:
        raise ConfigError(f"{flag}: give at least one name")
    return items


def find_attack_manifest(model_dir: Path) -> dict | None:
    """The ``attack.json`` of a backbone, or of the backbone a fine-tuned model was built on."""
    from peftshield.files import ATTACK_MANIFEST
    from peftshield.files import FINETUNE_MANIFEST
    from peftshield.io import read_json

    from peftshield.errors import PeftshieldError
    from peftshield.finetune.checkpoint import resolve_recorded_backbone

    candidates = [model_dir / ATTACK_MANIFEST]
    if (model_dir / FINETUNE_MANIFEST).is_file():
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

    from peftshield.errors import GateInterrupted, PeftshieldError, Terminated
    from peftshield.signals import interrupt_received

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            with _sigterm_raises():
                return function(*args, **kwargs)
        except PeftshieldError:
            if interrupt_received():  # Ctrl-C that a library's C code turned into its own error (a model load's "cannot load")
                raise GateInterrupted("interrupted; nothing was written") from None
            raise
        except Terminated:
            raise GateInterrupted("terminated; nothing was written") from None
        except KeyboardInterrupt:
            raise GateInterrupted("interrupted; nothing was written") from None
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


def _sigterm_raises():
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (elsewhere: nothing changes)."""
    import signal

    from peftshield.errors import Terminated
    from peftshield.signals import raising_on

    return raising_on(signal.SIGTERM, Terminated)


def warn_untrusted_settings(section: str, settings_file, flags: GivenFlags) -> None:
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
