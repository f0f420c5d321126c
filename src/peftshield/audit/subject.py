"""What is audited: a checkpoint (HF name or folder), optionally with a PEFT adapter on top.

A checkpoint whose weights hold a trained sequence-classification head is probed through
that head. A bare encoder (no head) is probed through a PSIM the audit fits: a PEFT module
trained on the clean texts with random labels, which learns no task, so a confident class
can only come from the frozen weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from peftshield.errors import ConfigError, DataError
from peftshield.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FINETUNE_MANIFEST
from peftshield.hub import require_hub
from peftshield.models.backbone import check_backbone_folder, load_backbone, resolve_backbone


@dataclass
class AuditSubject:
    """The model the search runs on and how it was obtained."""

    model: object
    tokenizer: object
    num_labels: int
    probe: str  # "head": the checkpoint's own classifier; "psim": a random-label PSIM fitted by the audit
    checkpoint: str
    adapter: str | None = None
    psim: object | None = None


def _weight_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    keys: list[str] = []
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                keys.extend(handle.keys())
        except Exception as exc:  # safetensors raises its own error type
            raise DataError(f"{file}: damaged or truncated weights ({str(exc).splitlines()[0][:120]})") from None
    return keys


def classifier_head(checkpoint: str) -> int | None:
    """The class count of the trained classification head ``checkpoint`` carries, or None
    for a bare encoder. Local folders are read without loading the model."""
    from peftshield.models.backbone import RANDOM_BACKBONES

    if checkpoint in RANDOM_BACKBONES:  # the random test backbones: their heads were never trained
        return None
    source = resolve_backbone(checkpoint)
    folder = Path(source)
    if folder.exists():
        check_backbone_folder(folder)
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{folder / 'config.json'}: damaged file ({exc})") from None
        if not isinstance(config, dict):
            raise DataError(f"{folder / 'config.json'}: damaged file (not a JSON object)")
        if not any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []):
            return None
        keys = _weight_keys(folder)
        if not keys:
            raise ConfigError(f"checkpoint {folder}: no safetensors weights")
        if not any(k.startswith(("classifier.", "score.")) or ".classifier." in k for k in keys):
            return None
        return len(config.get("id2label") or {}) or int(config.get("num_labels", 2))
    if checkpoint.startswith(("/", ".", "~")) or checkpoint.count("/") > 1:
        raise ConfigError(f"checkpoint {checkpoint}: no such folder")
    require_hub(f"checkpoint '{checkpoint}'", "pass a local model folder")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    if not any(str(a).endswith("ForSequenceClassification") for a in config.architectures or []):
        return None
    return config.num_labels


def adapter_num_labels(adapter: Path) -> int:
    """The class count of a raw PEFT adapter's saved classification head (2 when it saved none)."""
    from safetensors import safe_open

    for file in adapter.glob(ADAPTER_WEIGHTS):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if ("classifier" in key or key.endswith("score.weight")) and key.endswith("weight"):
                    return int(handle.get_slice(key).get_shape()[0])
    return 2


def adapter_task_type(adapter: Path) -> str | None:
    """The ``task_type`` an adapter's config names (None when it names none), read bounded."""
    from peftshield.io import read_config_json

    task_type = read_config_json(adapter / ADAPTER_CONFIG, "an adapter config").get("task_type")
    return " ".join(str(task_type).split()).upper()[:40] if task_type is not None else None  # one line, whatever the file says


def load_subject(checkpoint: str, adapter: str | Path | None = None, force_psim: bool = False) -> AuditSubject:
    """Load what is audited. Raises one-line errors for a folder that is not a checkpoint
    or an adapter."""
    if adapter is None:
        num_labels = None if force_psim else classifier_head(checkpoint)
        if num_labels is None:
            classifier_head(checkpoint) if force_psim else None  # still check the folder
            return AuditSubject(None, None, 2, "psim", checkpoint)
        base = load_backbone(checkpoint, num_labels)
        return AuditSubject(base.model, base.tokenizer, num_labels, "head", checkpoint)
    adapter = Path(adapter)
    if not adapter.is_dir():
        raise ConfigError(f"--adapter {adapter}: no such folder")
    if (adapter / FINETUNE_MANIFEST).is_file():
        from peftshield.finetune.checkpoint import load_finetuned

        loaded, manifest = load_finetuned(adapter, backbone=checkpoint)
        return AuditSubject(merged_for_inference(loaded.model), loaded.tokenizer, int(manifest["num_labels"]), "head", checkpoint, str(adapter))
    if (adapter / ADAPTER_CONFIG).is_file():
        from peft import PeftModel

        task_type = adapter_task_type(adapter)
        if task_type not in (None, "SEQ_CLS"):
            raise ConfigError(f"--adapter {adapter}: a {task_type!r} adapter; the audit judges classifiers (task_type SEQ_CLS)")
        num_labels = adapter_num_labels(adapter)
        base = load_backbone(checkpoint, num_labels)
        try:
            model = PeftModel.from_pretrained(base.model, str(adapter))
        except (ValueError, OSError, KeyError, RuntimeError, AttributeError, TypeError) as exc:
            raise ConfigError(f"--adapter {adapter}: cannot load on {checkpoint} ({str(exc).splitlines()[0][:160]})") from None
        from peftshield.finetune.trainer import pad_for

        config = model.peft_config.get("default")
        pad_for(bool(config.is_prompt_learning) and config.peft_type.value != "PREFIX_TUNING", model, base.tokenizer)  # soft prompts feed embeddings
        return AuditSubject(merged_for_inference(model), base.tokenizer, num_labels, "head", checkpoint, str(adapter))
    raise ConfigError(f"--adapter {adapter}: not an adapter folder (no {FINETUNE_MANIFEST} or {ADAPTER_CONFIG})")


def merged_for_inference(model):
    """An adapter whose weights fold into its backbone (LoRA, IA3, ...) folded in: the same
    function with plain layers, so every forward pass of the audit skips the adapter's extra
    matrix products (about a sixth of a LoRA audit's time). Prompt-learning adapters, which
    feed extra embeddings and cannot fold, are returned as they are."""
    inner = getattr(model, "peft_model", model)
    config = getattr(inner, "peft_config", {}).get("default") if hasattr(inner, "peft_config") else None
    if config is None or config.is_prompt_learning or not hasattr(inner, "merge_and_unload"):
        return model
    try:
        return inner.merge_and_unload()
    except (ValueError, NotImplementedError, AttributeError):  # a method peft cannot merge: audit it as it is
        return model


def merged_adapter_backbone(subject: AuditSubject, out_dir: Path) -> Path:
    """Fold an adapter into its backbone and save the result as a plain checkpoint folder (so
    a PSIM can be trained on the model that is actually deployed)."""
    model = subject.model
    inner = getattr(model, "peft_model", model)
    if hasattr(inner, "merge_and_unload"):
        inner = inner.merge_and_unload()
    inner.save_pretrained(out_dir, safe_serialization=True)
    subject.tokenizer.save_pretrained(out_dir)
    return out_dir
