"""Save and reload a fine-tuned classifier: the trainable tensors (safetensors) plus a manifest.

Only what the method trained is stored (for PEFT, a few hundred KB); the frozen weights
come from the backbone named in the manifest. Full fine-tuning stores every tensor.

A local backbone is recorded three ways (``backbone_location`` in ``finetune.json``): its
absolute path, its path relative to the saved folder (so the two can move together) and
a short content hash (a warning, not an error, when the backbone found differs). With
``self_contained=True`` the backbone's files are copied into ``<folder>/backbone/`` so the
folder can go to another machine; loading prefers that copy. Aliases (``tiny``,
``minilm``) and hub names are recorded as given.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from pathlib import Path

from safetensors.torch import load_file, save_file

from peftshield.errors import ConfigError, DataError, HubUnavailableError, PeftshieldWarning
from peftshield.files import FINETUNE_MANIFEST, TRAINABLE_WEIGHTS
from peftshield.fingerprint import short_content_sha256
from peftshield.finetune.base import METHODS
from peftshield.io import atomic_directory, atomic_write_json, check_safetensors, read_json
from peftshield.models.backbone import BACKBONE_ALIASES, PACKAGED_BACKBONES, RANDOM_BACKBONES, Backbone, load_backbone, resolve_backbone

BACKBONE_COPY = "backbone"
LOCATION_KEY = "backbone_location"
REQUIRED_KEYS = ("method", "backbone", "num_labels")


def backbone_files(folder: str | Path) -> list[Path]:
    """The files that make a backbone folder's weights: ``config.json`` and its weight files."""
    folder = Path(folder)
    files = [folder / "config.json", *sorted(folder.glob("*.safetensors")), *sorted(folder.glob("pytorch_model*.bin"))]
    return [f for f in files if f.is_file()]


def backbone_fingerprint(folder: str | Path) -> str | None:
    """:func:`~peftshield.fingerprint.short_content_sha256` of a backbone folder's :func:`backbone_files`
    (the checksum each ``finetune.json`` records), or None when it has none."""
    files = backbone_files(folder)
    return short_content_sha256(files) if files else None


def model_fingerprint(directory: str | Path) -> str:
    """Identity of a saved classifier (16 hex digits): its own weight files and manifest and, for a
    PEFT folder, its backbone's weights (a changed backbone changes the model), or the backbone's
    name when it is not a local folder. Keys derived artefacts: detectors, guard calibrations,
    the ONNX export."""
    directory = Path(directory)
    parts = [backbone_fingerprint(directory) or ""]
    manifest = directory / FINETUNE_MANIFEST
    if manifest.is_file():
        parts.append(hashlib.sha256(manifest.read_bytes()).hexdigest()[:16])
        try:
            source, _ = resolve_recorded_backbone(directory)
        except Exception:  # an unresolvable backbone fails at load time with its own message
            source = ""
        if source and Path(source).is_dir():
            parts.append(backbone_fingerprint(source) or "")
        else:
            parts.append(str(source))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def is_local_backbone(name_or_path: str) -> bool:
    return name_or_path not in BACKBONE_ALIASES and Path(name_or_path).exists()


def _copy_backbone(source: Path, target: Path) -> None:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".*"), symlinks=False)


def save_finetuned(model, tokenizer, out_dir: str | Path, manifest: dict, self_contained: bool = False) -> Path:
    """``manifest`` needs ``method``, ``options``, ``backbone``, ``num_labels``; more keys are kept.

    A local backbone is recorded by absolute path, path relative to ``out_dir`` and content
    hash. ``self_contained`` also copies the backbone's files into ``out_dir/backbone/``.
    """
    out_dir = Path(out_dir)
    manifest = dict(manifest)
    given = str(manifest["backbone"])
    copy_from: Path | None = None
    if is_local_backbone(given):
        absolute = Path(given).resolve()
        manifest["backbone"] = str(absolute)
        manifest[LOCATION_KEY] = {
            "given": given,
            "path": str(absolute),
            "relative": os.path.relpath(absolute, out_dir.resolve()),
            "sha256": backbone_fingerprint(absolute),
            "copy": BACKBONE_COPY if self_contained else None,
        }
        copy_from = absolute if self_contained else None
    elif self_contained and given in PACKAGED_BACKBONES:
        copy_from = Path(resolve_backbone(given))
        manifest[LOCATION_KEY] = {"given": given, "path": None, "relative": None, "sha256": backbone_fingerprint(copy_from), "copy": BACKBONE_COPY}
    elif self_contained and given not in RANDOM_BACKBONES:
        warnings.warn(f"{out_dir}: backbone '{given}' is a hub name; it is recorded by name, not copied into the folder", PeftshieldWarning, stacklevel=2)
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / TRAINABLE_WEIGHTS))
        tokenizer.save_pretrained(tmp)
        if copy_from is not None:
            _copy_backbone(copy_from, tmp / BACKBONE_COPY)
        atomic_write_json(tmp / FINETUNE_MANIFEST, manifest)
    return out_dir


def read_manifest(directory: str | Path) -> dict:
    """The ``finetune.json`` of a saved folder; a missing, damaged or incomplete one is a one-line error."""
    directory = Path(directory)
    manifest_path = directory / FINETUNE_MANIFEST
    if not manifest_path.is_file():
        raise ConfigError(f"{directory}: not a peftshield model directory (no {FINETUNE_MANIFEST})")
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict):
        raise DataError(f"{manifest_path}: damaged file (not a JSON object); re-create it")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise DataError(f"{manifest_path}: damaged file (no '{missing[0]}'); re-create it")
    return manifest


def _check_fingerprint(manifest_path: Path, folder: Path, expected: str | None) -> list[str]:
    if not expected:
        return []
    actual = backbone_fingerprint(folder)
    if actual is None or actual == expected:
        return []
    note = (f"{manifest_path}: backbone {folder} is not the one this model was trained on "
            f"(content hash {actual}, recorded {expected}); results may not be what was measured")
    warnings.warn(note, PeftshieldWarning, stacklevel=3)
    return [note]


def resolve_recorded_backbone(directory: str | Path, manifest: dict | None = None, backbone: str | None = None) -> tuple[str, list[str]]:
    """Where the backbone of a saved folder is now, and any warnings about it.

    ``backbone`` (the user's ``--backbone``) wins. Otherwise: the self-contained copy
    ``<folder>/backbone/``, the recorded absolute path, the recorded path relative to the
    folder. An alias or hub name is returned as recorded. Raises a one-line
    :class:`ConfigError` naming the ``finetune.json`` when a recorded local backbone is gone.
    """
    directory = Path(directory)
    manifest = read_manifest(directory) if manifest is None else manifest
    manifest_path = directory / FINETUNE_MANIFEST
    recorded = str(manifest["backbone"])
    location = manifest.get(LOCATION_KEY) if isinstance(manifest.get(LOCATION_KEY), dict) else {}
    expected = location.get("sha256")
    if backbone is not None:
        if is_local_backbone(backbone) and Path(backbone).is_dir():
            return backbone, _check_fingerprint(manifest_path, Path(backbone), expected)
        return backbone, []
    copy = directory / BACKBONE_COPY
    if (copy / "config.json").is_file():
        return str(copy), _check_fingerprint(manifest_path, copy, expected)
    if recorded in BACKBONE_ALIASES:
        return recorded, []
    candidates: list[Path] = []
    if location.get("path"):
        candidates.append(Path(location["path"]))
    if location.get("relative"):
        candidates.append(directory / location["relative"])
    if not location:
        candidates.append(Path(recorded))  # an older manifest: the path as it was typed
    for candidate in candidates:
        if candidate.is_dir():
            return str(candidate), _check_fingerprint(manifest_path, candidate, expected)
    if not location and Path(recorded).is_absolute():
        raise ConfigError(f"{manifest_path}: its backbone is gone: not at {recorded}; pass the backbone folder with --backbone PATH")
    if location.get("path"):
        relative = f" nor at {os.path.abspath(directory / location['relative'])}" if location.get("relative") else ""
        raise ConfigError(
            f"{manifest_path}: its backbone is gone: not at {location['path']}{relative}; "
            f"pass the backbone folder with --backbone PATH (or save the model self-contained)"
        )
    return recorded, []


def load_finetuned(directory: str | Path, backbone: str | None = None) -> tuple[Backbone, dict]:
    """Rebuild backbone + method and load the trained tensors; every stored tensor must match.

    ``backbone`` overrides the backbone recorded in ``finetune.json`` (a folder, alias or hub name).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    manifest_path = directory / FINETUNE_MANIFEST
    source, _ = resolve_recorded_backbone(directory, manifest, backbone)
    weights = check_safetensors(directory / TRAINABLE_WEIGHTS)
    try:
        num_labels = int(manifest["num_labels"])
    except (TypeError, ValueError):
        raise DataError(f"{manifest_path}: damaged file (num_labels {manifest['num_labels']!r}); re-create it") from None
    try:
        base = load_backbone(source, num_labels=num_labels)
    except HubUnavailableError as exc:
        if backbone is not None:
            raise
        raise HubUnavailableError(
            f"{manifest_path}: records backbone '{source}', which is no folder here ({Path.cwd()}) and the hub is not reachable; "
            f"pass the backbone folder with --backbone PATH"
        ) from exc
    options = manifest.get("options") or {}
    if not isinstance(options, dict):
        raise DataError(f"{manifest_path}: damaged file (options is not a mapping); re-create it")
    method = METHODS.create(manifest["method"], **options)
    model = method.wrap(base.model, int(manifest.get("num_training_steps", 2)))
    from peftshield.finetune.trainer import pad_for

    pad_for(method.feeds_embeddings, model, base.tokenizer)  # the backbone's tokenizer: padded as in training
    try:
        tensors = load_file(str(weights))
    except Exception as exc:  # safetensors raises SafetensorError for a damaged file
        if type(exc).__name__ != "SafetensorError":
            raise
        raise DataError(f"{weights}: damaged or truncated file ({str(exc).splitlines()[0][:160]}); re-create it") from None
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ConfigError(f"{directory}: {len(unknown)} stored tensors do not fit method '{method.name}' (e.g. {unknown[0]})")
    import torch

    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise ConfigError(f"{directory}: tensor {name} has shape {tuple(value.shape)}, expected {tuple(params[name].shape)}")
            params[name].copy_(value)
    model.eval()
    return Backbone(model=model, tokenizer=base.tokenizer, source=str(directory), num_labels=base.num_labels), manifest


def load_classifier(model_dir: str | Path, num_labels: int | None = None, backbone: str | None = None) -> Backbone:
    """A saved classifier: a ``peftshield finetune`` folder (``finetune.json``), or a plain
    transformers sequence-classification folder (``num_labels`` from its config when not given)."""
    model_dir = Path(model_dir)
    if (model_dir / FINETUNE_MANIFEST).is_file():
        return load_finetuned(model_dir, backbone=backbone)[0]
    if not model_dir.is_dir():
        raise ConfigError(f"{model_dir}: no such model directory")
    if num_labels is None:
        config = model_dir / "config.json"
        labels = read_json(config).get("id2label") if config.is_file() else None
        num_labels = len(labels) if isinstance(labels, dict) and labels else 2
    return load_backbone(str(model_dir), num_labels)
