"""Stage 1 features of a LoRA adapter, read from its files without running it.

For every adapted module the weight change is ΔW = s·B·A (B: out x r, A: r x in, s = lora_alpha
/ r, or / sqrt(r) with rsLoRA). Its singular values come from an r x r problem (the QR factors of
B and Aᵀ), so an adapter of any width costs microseconds per module. Per module: the log of its
Frobenius norm and of its top singular value, the top value's share of their sum, and the
effective rank (exp of the entropy of the normalised values). A trained classification head
saved with the adapter adds the spread of its rows' norms and of its bias.

It reads a PEFT adapter folder (``adapter_config.json``, ``adapter_model.safetensors``) or a
``peftshield finetune`` LoRA folder (``finetune.json``, ``trainable.safetensors``). Everything
read is hostile until checked: the config is parsed into a bounded model, the weights only from
a safetensors file (no pickle is ever loaded) whose header is checked first and size bounded,
and no link is followed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from peftshield.errors import DataError, validation_line
from peftshield.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FINETUNE_MANIFEST, TRAINABLE_WEIGHTS
from peftshield.io import check_safetensors, read_config_json

MAX_WEIGHT_BYTES = 2_000_000_000  # a LoRA adapter of a 7B model at rank 64 is about 0.3 GB
MODULE_STATISTICS = ("log_norm", "log_top", "top_share", "effective_rank")
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")
LAYER = re.compile(r"\.(\d+)\.")


MAX_WIDTH = 65_536  # a module wider than this is no language model's


class AdapterConfig(BaseModel):
    """The part of ``adapter_config.json`` stage 1 reads. Keys that change the weight change it
    does not model (per-module ranks or alphas, DoRA) make the adapter unscreenable."""

    model_config = ConfigDict(extra="ignore")

    peft_type: str = Field(max_length=64)
    base_model_name_or_path: Optional[str] = Field(None, max_length=4096)
    r: int = Field(ge=1, le=4096)
    lora_alpha: float = Field(gt=0, le=1e6)
    use_rslora: bool = False
    target_modules: Optional[list[str] | str] = None
    alpha_pattern: dict = Field(default_factory=dict)
    rank_pattern: dict = Field(default_factory=dict)
    use_dora: bool = False

    def unmodeled(self) -> str | None:
        """What in this config stage 1 does not model, if anything."""
        if self.peft_type.upper() != "LORA":
            return f"peft_type {self.peft_type[:40]} (stage 1 reads LoRA adapters)"
        if self.alpha_pattern or self.rank_pattern:
            return "per-module alpha_pattern or rank_pattern"
        if self.use_dora:
            return "DoRA magnitudes (use_dora)"
        return None


@dataclass
class AdapterFeatures:
    """One adapter's stage-1 features. ``cohort`` groups adapters that can be compared (same base
    model, method, rank and adapted modules); ``values`` is aligned with ``names``."""

    folder: str
    cohort: str
    names: list[str]
    values: np.ndarray
    modules: int
    details: dict = field(default_factory=dict)


class FinetuneLora(BaseModel):
    """The part of a ``peftshield finetune`` folder's ``finetune.json`` stage 1 reads (a LoRA run)."""

    model_config = ConfigDict(extra="ignore")

    method: str = Field(max_length=64)
    backbone: str = Field(max_length=4096)
    options: dict = Field(default_factory=dict)


def read_adapter_config(folder: Path) -> tuple[AdapterConfig, Path]:
    """The LoRA settings and the weights file of a PEFT adapter folder (``adapter_config.json``,
    ``adapter_model.safetensors``) or of a ``peftshield finetune`` LoRA folder (``finetune.json``,
    ``trainable.safetensors``)."""
    peft, ours = folder / ADAPTER_CONFIG, folder / FINETUNE_MANIFEST
    try:
        if peft.is_file():
            return AdapterConfig.model_validate(read_config_json(peft, "an adapter config")), folder / ADAPTER_WEIGHTS
        if ours.is_file():
            run = FinetuneLora.model_validate(read_config_json(ours, "a finetune manifest"))
            if run.method != "lora":
                raise DataError(f"{ours}: method {run.method[:40]}: stage 1 reads LoRA adapters only; audit it on its own")
            options = run.options
            config = AdapterConfig(peft_type=run.method.upper(), base_model_name_or_path=run.backbone, r=options.get("r", 8),
                                   lora_alpha=options.get("alpha", 16), use_rslora=bool(options.get("rslora", False)))
            return config, folder / TRAINABLE_WEIGHTS
    except ValidationError as exc:
        raise DataError(f"{folder}: not a LoRA adapter ({validation_line(exc)})") from None
    raise DataError(f"{folder}: no {ADAPTER_CONFIG} or {FINETUNE_MANIFEST} (not an adapter folder)")


def delta_singular_values(lora_a: np.ndarray, lora_b: np.ndarray, scale: float) -> np.ndarray:
    """Singular values (descending) of ``scale * lora_b @ lora_a`` without forming it."""
    _, r_b = np.linalg.qr(lora_b.astype(np.float64))
    _, r_a = np.linalg.qr(lora_a.astype(np.float64).T)
    return np.linalg.svd(scale * r_b @ r_a.T, compute_uv=False)


def module_statistics(singular: np.ndarray) -> list[float]:
    """:data:`MODULE_STATISTICS` of one module's singular values (a zero change gives zeros and rank 0)."""
    total = float(singular.sum())
    if not total > 0 or not np.all(np.isfinite(singular)):
        return [math.log(1e-12), math.log(1e-12), 0.0, 0.0]
    share = singular / total
    entropy = float(-(share[share > 0] * np.log(share[share > 0])).sum())
    return [math.log(float(np.sqrt((singular ** 2).sum())) + 1e-12), math.log(float(singular[0]) + 1e-12), float(share[0]), math.exp(entropy)]


def _load_tensors(path: Path) -> dict[str, np.ndarray]:
    if path.is_symlink() or not path.is_file():
        raise DataError(f"{path}: missing or a link; an adapter's weights must be a file in its folder")
    if path.stat().st_size > MAX_WEIGHT_BYTES:
        raise DataError(f"{path}: larger than {MAX_WEIGHT_BYTES} bytes; not a LoRA adapter")
    check_safetensors(path)
    out: dict[str, np.ndarray] = {}
    try:
        for key, tensor in _tensors(path):
            if tensor.ndim > 2:
                continue
            if any(size > MAX_WIDTH for size in tensor.shape):
                raise DataError(f"{path}: tensor {key[:120]} of shape {tuple(tensor.shape)} is wider than any model's ({MAX_WIDTH})")
            out[key] = tensor.float().numpy()
    except DataError:
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise DataError(f"{path}: damaged file ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    bad = next((key for key, value in out.items() if not np.all(np.isfinite(value))), None)
    if bad is not None:
        raise DataError(f"{path}: tensor {bad[:120]} holds values that are not finite numbers")
    return out


def _tensors(path: Path):
    """``(name, tensor)`` of a checked safetensors file. safetensors opens only paths that are
    UTF-8; a folder named in another encoding is read from the file's bytes (bounded above)."""
    from safetensors import safe_open

    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        from safetensors.torch import load

        yield from load(path.read_bytes()).items()
        return
    with safe_open(str(path), "pt") as weights:
        for key in weights.keys():
            yield key, weights.get_tensor(key)


def _is_head(key: str, value: np.ndarray) -> bool:
    """A classification head saved with the adapter (``classifier`` or ``score``, a few rows)."""
    return "lora_" not in key and any(part in ("classifier", "score") for part in key.split(".")) and value.ndim in (1, 2) and value.shape[0] <= 64


def _head_statistics(head: dict[str, np.ndarray]) -> dict[str, float]:
    """Spread of a saved classification head's row norms and bias (``head``: its tensors, :func:`_is_head`), if any."""
    weight = next((v for k, v in sorted(head.items()) if k.endswith(".weight") and v.ndim == 2), None)
    if weight is None:
        return {}
    norms = np.linalg.norm(weight, axis=1)
    stats = {"head.row_norm_ratio": float(norms.max() / max(norms.mean(), 1e-12))}
    bias = next((v for k, v in sorted(head.items()) if k.endswith(".bias") and v.ndim == 1 and v.shape[0] == weight.shape[0]), None)
    if bias is not None:
        stats["head.bias_range"] = float(bias.max() - bias.min())
    return stats


def adapter_features(folder: str | Path) -> AdapterFeatures:
    """The stage-1 features of the LoRA adapter in ``folder``; a one-line :class:`DataError` naming
    the file for anything that is not a whole LoRA adapter (the fleet report's ``error`` row)."""
    folder = Path(folder)
    config, weights_file = read_adapter_config(folder)
    unmodeled = config.unmodeled()
    if unmodeled:
        raise DataError(f"{folder}: stage 1 does not model {unmodeled}; audit it on its own")
    tensors = _load_tensors(weights_file)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    head: dict[str, np.ndarray] = {}
    others = []
    for key, value in tensors.items():
        match = LORA_KEY.match(key)
        if match and value.ndim == 2:
            pairs.setdefault(match["module"], {})[match["side"]] = value
        elif _is_head(key, value):
            head[key] = value
        else:
            others.append(key)
    if others:  # trained weights stage 1 does not model (embedding LoRA, DoRA magnitudes, other modules): never scored as ordinary
        raise DataError(f"{weights_file}: stage 1 does not model {others[0][:120]} ({len(others)} such tensors); audit it on its own")
    unpaired = sorted(module for module, sides in pairs.items() if set(sides) != {"A", "B"})
    if unpaired:
        raise DataError(f"{weights_file}: {unpaired[0][:120]} has lora_A or lora_B without the other")
    if not pairs:
        raise DataError(f"{weights_file}: no LoRA weight pairs (lora_A, lora_B)")
    wrong_rank = next((m for m, sides in pairs.items() if sides["A"].shape[0] != config.r or sides["B"].shape[1] != config.r), None)
    if wrong_rank is not None:
        raise DataError(f"{weights_file}: {wrong_rank[:120]} is not of the config's rank {config.r}")
    scale = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    names: list[str] = []
    values: list[float] = []
    per_module = []
    for module in sorted(pairs, key=_module_order):
        a, b = pairs[module]["A"], pairs[module]["B"]
        if a.shape[0] != b.shape[1]:
            raise DataError(f"{weights_file}: {module}: lora_A and lora_B ranks differ ({a.shape[0]} vs {b.shape[1]})")
        stats = module_statistics(delta_singular_values(a, b, scale))
        per_module.append(stats)
        short = _short_name(module)
        names += [f"{short}.{s}" for s in MODULE_STATISTICS]
        values += stats
    table = np.array(per_module)
    for index, statistic in enumerate(MODULE_STATISTICS):  # summaries that survive a different module count
        names += [f"all.{statistic}.max", f"all.{statistic}.mean"]
        values += [float(table[:, index].max()), float(table[:, index].mean())]
    for name, value in _head_statistics(head).items():
        names.append(name)
        values.append(value)
    ranks = sorted({int(p["A"].shape[0]) for p in pairs.values()})
    # The cohort's key holds the feature names too: adapters are compared feature by feature, so
    # one whose features differ (another head, say) is in a cohort of its own, not a misfit in the others'.
    cohort = json.dumps({"base": config.base_model_name_or_path or "", "peft_type": config.peft_type.upper(), "ranks": ranks,
                         "modules": sorted(_short_name(m) for m in pairs), "features": names}, sort_keys=True)
    return AdapterFeatures(str(folder), cohort, names, np.asarray(values, dtype=np.float64), len(pairs),
                           {"base": config.base_model_name_or_path, "rank": ranks, "scale": scale})


def _module_order(module: str) -> tuple:
    layer = LAYER.search(module)
    return (int(layer.group(1)) if layer else -1, module)


def _short_name(module: str) -> str:
    """``base_model.model.bert.encoder.layer.3.attention.self.query`` -> ``3.query``."""
    layer = LAYER.search(module)
    return f"{layer.group(1) if layer else '-'}.{module.rsplit('.', 1)[-1]}"
