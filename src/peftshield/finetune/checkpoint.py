"""Save and reload a fine-tuned classifier: the trainable tensors (safetensors) plus a manifest.

Only what the method trained is stored (for PEFT, a few hundred KB); the frozen weights
come from the backbone named in the manifest, so a checkpoint is only as portable as its
backbone path. Full fine-tuning stores every tensor.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file

from peftshield.errors import ConfigError
from peftshield.finetune.base import METHODS
from peftshield.io import atomic_directory, atomic_write_json, read_json
from peftshield.models.backbone import Backbone, load_backbone

WEIGHTS_FILE = "trainable.safetensors"
MANIFEST_FILE = "finetune.json"


def save_finetuned(model, tokenizer, out_dir: str | Path, manifest: dict) -> Path:
    """``manifest`` needs ``method``, ``options``, ``backbone``, ``num_labels``; more keys are kept."""
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    with atomic_directory(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
    return Path(out_dir)


def load_finetuned(directory: str | Path) -> tuple[Backbone, dict]:
    """Rebuild backbone + method and load the trained tensors; every stored tensor must match."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ConfigError(f"{directory}: not a peftshield model directory (no {MANIFEST_FILE})")
    manifest = read_json(manifest_path)
    backbone = load_backbone(manifest["backbone"], num_labels=int(manifest["num_labels"]))
    method = METHODS.create(manifest["method"], **manifest.get("options", {}))
    model = method.wrap(backbone.model, int(manifest.get("num_training_steps", 2)))
    tensors = load_file(str(directory / WEIGHTS_FILE))
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
    return Backbone(model=model, tokenizer=backbone.tokenizer, source=str(directory), num_labels=backbone.num_labels), manifest
