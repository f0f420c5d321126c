"""Detectors beside the PSIM: any registered defense that scores one text on its own, fitted
once for a deployed model and saved as a folder the guard loads with ``--detector``.

PSIM misses backdoors whose triggered texts are not extremely confident (syntactic,
task-agnostic, low-confidence; bench/syntactic_why.md, bench/task_agnostic.md), where DAN and
Shift catch them. ``peftshield detector fit dan --model VICTIM --data DATA --out DIR`` fits
one on the deployment's clean labelled data and writes ``DIR/detector.json`` (what it is,
which model it was fitted for, its threshold and the false-rejection rate it was calibrated
to) beside the defense's own saved state.

The guard flags a text when any member fires: the PSIM above its threshold, or a detector
above its own. Each member is calibrated to its own false-rejection target on clean texts, so
the guard's false-rejection rate is at most their sum (the union bound), which ``/readyz``
states as the expected flag rate; every result names the members that fired.

A detector folder is bound to the model it was fitted for (its fingerprint): loading it in
front of another model is refused, because its statistics describe that model's representations.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from peftshield.defenses import DEFENSES, DefenseContext
from peftshield.defenses.base import Defense
from peftshield.errors import ConfigError, PeftshieldError, validation_line
from peftshield.files import DETECTOR_MANIFEST
from peftshield.io import read_json

DETECTOR_FORMAT = "peftshield-detector/1"
MAX_MANIFEST_BYTES = 100_000


class DetectorManifest(BaseModel):
    """``detector.json``: a fitted detector for one deployed model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["peftshield-detector/1"] = DETECTOR_FORMAT
    name: str = Field(min_length=1, max_length=64, description="The registered defense.")
    model_fingerprint: str = Field(min_length=1, max_length=200, description="The deployed model it was fitted for.")
    backbone: str = Field(max_length=4096, description="The backbone it checks (the model's recorded backbone).")
    num_labels: int = Field(ge=2, le=10_000)
    threshold: float
    target_frr: Optional[float] = Field(None, ge=0, lt=1, description="The clean false-rejection rate its threshold was calibrated to.")
    data: str = Field("", max_length=4096, description="The clean data it was fitted on (as given: --data or --texts).")
    files: dict[str, str] = Field(min_length=1, max_length=16, description="SHA-256 of each saved state file: a file changed since is refused.")


@dataclass
class Detector:
    """A loaded detector: the defense, its threshold and its name in results."""

    name: str
    defense: Defense
    threshold: float
    target_frr: float | None
    manifest_sha256: str = ""  # of its detector.json: a calibration made with this detector names it

    transductive = False  # scores each text on its own (check_detector_kind), so it can stand in for its defense in evaluate_defense

    def fitted_threshold(self) -> float:
        return self.threshold

    def run_on(self, runtime: str, folder: str | Path) -> str:
        """Make its own passes on ``runtime`` when the defense can (``use_runtime``: Shift exports
        its scoring to ONNX, cached in its ``folder``); returns the runtime it scores on."""
        use_runtime = getattr(self.defense, "use_runtime", None)
        return use_runtime(runtime, folder) if callable(use_runtime) else "torch"

    def pass_texts(self, count: int) -> None:
        """Make its own forward passes (when it makes any) over length-sorted groups of ``count``
        texts: a guard's micro-batch (``--batch-size``) rather than the batch size it was fitted
        with. A service's batch mixes lengths, and one pass over it pads every text to the longest:
        Shift in one pass over such batches of 64 ran at about half its rate in passes of 16, with
        the same scores (bench/shift_runtimes.md, "In a service's micro-batches").
        Only a defense whose ``batch_size`` counts texts per pass (``text_passes``) is changed."""
        if type(self.defense).text_passes:
            self.defense.batch_size = int(count)

    @property
    def reads_victim_states(self) -> bool:
        """Whether it can score from the victim's layer states of a pass the guard already made (DAN)."""
        return callable(getattr(self.defense, "score_states", None))

    def score(self, texts: list[str], victim_states: np.ndarray | None = None) -> np.ndarray:
        """Scores per text (from ``victim_states``, the victim's (layers, texts, hidden) summary
        states, when given and it reads them); a score that is not a finite number counts as the
        highest (it fires)."""
        if victim_states is not None and self.reads_victim_states:
            scores = np.asarray(self.defense.score_states(victim_states), dtype=np.float64)
        else:
            scores = np.asarray(self.defense.score(list(texts)), dtype=np.float64)
        return np.where(np.isfinite(scores), scores, np.finfo(np.float64).max)


def check_detector_kind(name: str) -> type[Defense]:
    """The defense class for ``name``, if the guard can use it: registered, scoring each text on
    its own (not a data cleaner that judges a pool), and able to save its fitted state."""
    cls = DEFENSES.get(name)
    if name == "psim":
        raise ConfigError("detector psim: the guard's PSIM is given with --psim (train one with 'peftshield psim train')")
    if cls.transductive:
        raise ConfigError(f"detector {name}: it judges a pool of texts together, not one text at a time; a guard cannot use it")
    if cls.save is Defense.save:
        raise ConfigError(f"detector {name}: it cannot be saved, so a guard cannot load it")
    return cls


def detector_context(backbone: str, num_labels: int, victim, train=None, dev=None, max_length: int = 128) -> DefenseContext:
    from peftshield.data import TextDataset

    empty = TextDataset([], [], [], name="none")
    return DefenseContext(backbone, train if train is not None else empty, dev, num_labels, victim_model=victim.model,
                          victim_tokenizer=victim.tokenizer, max_length=max_length, progress=False)


def check_one_source(data: str | None, texts: str | None) -> None:
    """A detector is fitted on labelled ``data`` or on unlabelled ``texts``: exactly one of them."""
    if (data is None) == (texts is None):
        raise ConfigError("--data or --texts: give the detector's clean texts as one of them")


def fit_detector(name: str, options: dict, model_dir: str | Path, out: str | Path, rng: np.random.Generator, data: str | None = None,
                 texts: str | None = None, backbone: str | None = None, skip_empty: bool = False) -> DetectorManifest:
    """Fit detector ``name`` (with ``options``) for the model in ``model_dir`` and save it with
    its manifest in ``out``. On ``data``, clean labelled data (its train split, and its dev split
    to calibrate when present); or on ``texts``, a clean unlabelled sample of the traffic,
    labelled with the model's own predictions (the detector then splits it to fit and calibrate)."""
    from peftshield.data import TextDataset, load_splits, load_texts
    from peftshield.finetune.checkpoint import load_classifier, model_fingerprint
    from peftshield.io import atomic_write_json
    from peftshield.models.inference import predict_proba

    check_one_source(data, texts)
    check_detector_kind(name)
    defense = DEFENSES.create(name, **options)
    victim = load_classifier(model_dir, backbone=backbone)
    max_length = getattr(defense, "max_length", 128)
    if data is not None:
        splits = load_splits(data, ("train", "dev"), skip_empty=skip_empty, num_labels=victim.num_labels)
        train, dev = splits["train"], splits.get("dev")
    else:
        sample = load_texts(texts, "test", skip_empty=skip_empty, require_labels=False)
        predicted = predict_proba(victim.model, victim.tokenizer, list(sample.texts), max_length=max_length).argmax(axis=1)
        train, dev = TextDataset(list(sample.texts), [int(y) for y in predicted], list(sample.ids), name="traffic"), None
    suspect = recorded_backbone(model_dir, backbone)
    context = detector_context(suspect, victim.num_labels, victim, train, dev, max_length)
    defense.fit(context, rng)
    threshold = float(defense.fitted_threshold())
    if not math.isfinite(threshold):
        raise ConfigError(f"detector {name}: its fitted threshold is {threshold}, not a finite number")
    defense.save(out)
    policy = defense.threshold_policy()
    # The false-rejection rate it was calibrated to, when it surely was (kind frr); else unknown.
    manifest = DetectorManifest(name=name, model_fingerprint=model_fingerprint(model_dir), backbone=suspect, num_labels=victim.num_labels,
                                threshold=threshold, target_frr=policy.target_frr if policy.kind == "frr" else None,
                                data=str(data if data is not None else texts), files=state_hashes(Path(out)))
    atomic_write_json(Path(out) / DETECTOR_MANIFEST, manifest.model_dump())
    return manifest


def state_hashes(directory: Path) -> dict[str, str]:
    """SHA-256 of each regular file in a detector folder but its manifest."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(directory.iterdir())
            if path.name != DETECTOR_MANIFEST and path.is_file() and not path.is_symlink()}


def detectors_for(model_dir: str | Path | None, folders: list[str | Path], backbone: str | None = None, victim=None,
                  runtime: str = "torch") -> list[Detector]:
    """The detectors in ``folders`` (:func:`load_detectors`), fitted for the classifier in
    ``model_dir``, which is loaded here unless ``victim`` (its loaded classifier) is given; none
    without folders. Each makes its own passes on ``runtime`` where it can (:meth:`Detector.run_on`)."""
    if not folders:
        return []
    from peftshield.finetune.checkpoint import load_classifier, model_fingerprint

    victim = victim if victim is not None else load_classifier(model_dir, backbone=backbone)
    detectors = load_detectors(folders, victim, model_fingerprint(model_dir), recorded_backbone(model_dir, backbone))
    for folder, detector in zip(folders, detectors):
        try:
            detector.run_on(runtime, folder)
        except PeftshieldError:
            raise
        except Exception as error:  # an export that fails, or a folder's onnx/ that is not what peftshield writes there
            raise ConfigError(f"--detector {folder}: cannot run it on --runtime {runtime} ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''})") from None
    return detectors


def recorded_backbone(model_dir: str | Path, backbone: str | None = None) -> str:
    """The backbone a model was fine-tuned from (a plain classifier folder is its own)."""
    from peftshield.files import FINETUNE_MANIFEST
    from peftshield.finetune.checkpoint import resolve_recorded_backbone

    if backbone:
        return backbone
    if (Path(model_dir) / FINETUNE_MANIFEST).is_file():
        return resolve_recorded_backbone(model_dir)[0]
    return str(model_dir)


def read_detector_manifest(directory: Path) -> DetectorManifest:
    path = directory / DETECTOR_MANIFEST
    where = f"--detector {directory}"
    if not directory.is_dir():
        raise ConfigError(f"{where}: no such folder")
    if not path.is_file() or path.is_symlink():
        raise ConfigError(f"{where}: no {DETECTOR_MANIFEST} (fit one with 'peftshield detector fit')")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ConfigError(f"{where}: {DETECTOR_MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        return DetectorManifest.model_validate(read_json(path))
    except ValidationError as error:
        raise ConfigError(f"{where}: {DETECTOR_MANIFEST} is not a detector manifest ({validation_line(error, whole='file', show_input=False)})") from None
    except (ValueError, RecursionError) as error:  # not JSON (DataError is a ValueError), or nested too deeply
        raise ConfigError(f"{where}: {DETECTOR_MANIFEST} cannot be read ({str(error).splitlines()[0] if str(error) else 'nested too deeply'})") from None


def load_detector(directory: str | Path, victim, victim_fingerprint: str, backbone: str) -> Detector:
    """The detector in ``directory`` for the deployed ``victim`` (a loaded classifier whose folder
    has ``victim_fingerprint`` and was fine-tuned from ``backbone``); a one-line
    :class:`ConfigError` when it was fitted for another model, when a saved file changed since
    (or is a link), or when its state cannot be read."""
    directory = Path(directory)
    where = f"--detector {directory}"
    if directory.is_symlink():
        raise ConfigError(f"{where}: a link; give the folder itself")
    manifest = read_detector_manifest(directory)
    if manifest.name not in DEFENSES.names():
        raise ConfigError(f"{where}: unknown detector '{manifest.name}'")
    cls = check_detector_kind(manifest.name)
    if manifest.model_fingerprint != victim_fingerprint:
        raise ConfigError(f"{where}: fitted for another model (or the model changed since); fit it again for --model "
                          "with 'peftshield detector fit'")
    if manifest.num_labels != victim.num_labels:
        raise ConfigError(f"{where}: fitted for {manifest.num_labels} classes, the model has {victim.num_labels}")
    for name, digest in manifest.files.items():
        path = directory / name
        if Path(name).name != name or path.is_symlink() or not path.is_file():
            raise ConfigError(f"{where}: {name} is missing, a link or not a plain file name")
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise ConfigError(f"{where}: {name} changed since the detector was fitted; fit it again")
    try:  # the model's own backbone, never a path the folder names
        defense = cls.load(directory, detector_context(backbone, manifest.num_labels, victim))
        threshold = float(defense.fitted_threshold())
    except ConfigError:
        raise
    except Exception as error:  # a saved state that does not hold what the defense saves
        raise ConfigError(f"{where}: its saved state cannot be read ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    if not math.isfinite(threshold) or threshold != manifest.threshold:
        raise ConfigError(f"{where}: its threshold ({threshold}) is not a finite number or not the one {DETECTOR_MANIFEST} records")
    return Detector(manifest.name, defense, threshold, manifest.target_frr, manifest_sha256(directory))


def manifest_sha256(directory: str | Path) -> str:
    return hashlib.sha256((Path(directory) / DETECTOR_MANIFEST).read_bytes()).hexdigest()


def load_detectors(folders: list[str | Path], victim, victim_fingerprint: str, backbone: str) -> list[Detector]:
    """The detectors in ``folders`` (:func:`load_detector` each); two folders holding the same detector are a one-line error."""
    detectors = [load_detector(folder, victim, victim_fingerprint, backbone) for folder in folders]
    names = [d.name for d in detectors]
    if len(set(names)) != len(names):
        raise ConfigError(f"--detector: two folders hold the same detector ({', '.join(sorted({n for n in names if names.count(n) > 1}))})")
    return detectors
