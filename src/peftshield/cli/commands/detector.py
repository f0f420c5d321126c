"""``peftshield detector fit``: a detector (DAN, Shift, ...) fitted for a deployed model, for ``guard`` and ``serve --detector``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer

from peftshield.cli.app import SeedOption, SkipEmptyOption, app, info
from peftshield.flags import GivenFlags, typed_component
from peftshield.errors import ConfigError
from peftshield.experiments.options import parse_key_values
from peftshield.files import DETECTOR_MANIFEST
from peftshield.io import check_output_place

detector_app = typer.Typer(help="Detectors beside the PSIM for 'guard' and 'serve' (--detector DIR).", no_args_is_help=True)
app.add_typer(detector_app, name="detector")


@detector_app.command("fit", help="Fit a detector for a deployed model on clean labelled data (its train split; its dev split calibrates the "
                                  "threshold, by default to flag 1% of clean texts), or on an unlabelled sample of the traffic it will guard "
                                  "(--texts; labelled with the model's predictions), and save it to --out. Fit it on texts like the traffic: "
                                  "a detector fitted on another task flags that task's texts as unusual. Any registered defense that scores one "
                                  "text on its own and can be saved: dan (the victim's layer representations against the clean classes), shift "
                                  "(the backbone's change from its public original, --option original=NAME). 'peftshield list' shows them.")
def detector_fit(
    name: str = typer.Argument(..., help="The defense, e.g. dan or shift."),
    model: Path = typer.Option(..., "--model", help="The deployed classifier the guard will serve (a 'peftshield finetune' folder or a transformers folder)."),
    data: Optional[str] = typer.Option(None, "--data", help="Clean labelled data of the deployment: a dataset folder or source with train (and dev) splits."),
    texts: Optional[str] = typer.Option(None, "--texts", help="Or a clean unlabelled sample of the traffic (.jsonl/.csv/.tsv/.txt, as 'scan' reads it), "
                                                              "labelled with the model's own predictions."),
    out: Path = typer.Option(..., "--out", help="The detector folder to write."),
    option: Optional[list[str]] = typer.Option(None, "--option", help="The detector's options as KEY=VALUE (repeatable), e.g. threshold.target_frr=0.02."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="The model's backbone, if no longer where finetune.json recorded it."),
    seed: int = SeedOption,
    skip_empty: bool = SkipEmptyOption,
) -> None:
    from peftshield.defenses import DEFENSES
    from peftshield.guard.detectors import check_detector_kind, check_one_source, fit_detector

    check_detector_kind(name)  # an unknown name is the registry's one-line error
    check_one_source(data, texts)
    if not model.is_dir():
        raise ConfigError(f"--model {model}: no such model directory")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / DETECTOR_MANIFEST).is_file())):
        raise ConfigError(f"--out {out}: exists and is not a detector folder; give a new or empty folder (it is replaced whole)")
    options = parse_key_values(option, "--option")
    nested = nest_dotted(options)
    typed_component(DEFENSES, name, GivenFlags(nested, {key: f"--option {key}" for key in nested}))
    check_output_place(out, "dir")
    manifest = fit_detector(name, nested, model, out, np.random.default_rng(seed), data=data, texts=texts, backbone=backbone,
                            skip_empty=skip_empty)
    rate = f", calibrated to flag {manifest.target_frr:.1%} of clean texts" if manifest.target_frr is not None else ""
    info(f"detector {name} -> {out}: threshold {manifest.threshold:.4g}{rate}; use it with --detector {out}")


def nest_dotted(options: dict) -> dict:
    """``{"threshold.target_frr": 0.02}`` -> ``{"threshold": {"target_frr": 0.02}}``."""
    nested: dict = {}
    for key, value in options.items():
        head, _, rest = key.partition(".")
        if rest:
            if not isinstance(nested.setdefault(head, {}), dict):
                raise ConfigError(f"--option {key}: '{head}' is also given as a value")
            nested[head][rest] = value
        else:
            if isinstance(nested.get(key), dict):
                raise ConfigError(f"--option {key}: also given as {key}.KEY=VALUE")
            nested[key] = value
    return nested
