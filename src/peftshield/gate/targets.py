"""What ``peftshield audit`` can be pointed at, resolved to something the auditor loads.

A target is one of:

- a checkpoint folder (``config.json`` + safetensors), a bare encoder or a classifier;
- a single ``.safetensors`` file: with a ``config.json`` beside it, its folder; alone, the
  architecture and tokenizer come from ``--base`` and the file is staged in a temporary
  folder (symlinked, not copied);
- a PEFT adapter folder (``adapter_config.json``; its base from ``base_model_name_or_path``
  unless ``--base`` overrides it) or a ``peftshield finetune`` folder (``finetune.json``);
- ``hf://org/name[@revision]``, resolved from the local Hugging Face cache (downloaded only
  when the hub is reachable);
- ``config.json`` / ``adapter_config.json`` file names stand for their folder, so the
  file names pre-commit passes work as targets; a glob is expanded.

Each target records the files a finding points at and the sha256 of its weights (the
content-cache key).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from peftshield.errors import ConfigError, DataError
from peftshield.files import ADAPTER_CONFIG, FINETUNE_MANIFEST
from peftshield.fingerprint import file_sha256, files_sha256

HF_SCHEME = "hf://"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "merges.txt", "vocab.json",
                   "spiece.model", "sentencepiece.bpe.model", "added_tokens.json")


@dataclass
class AuditTarget:
    """One thing to audit, resolved."""

    spec: str  # as the user wrote it
    kind: str  # checkpoint | safetensors | adapter | finetuned | hf
    checkpoint: str  # what the auditor loads as the model (folder, alias or hub name)
    adapter: str | None  # an adapter folder on top of ``checkpoint``
    location: str  # the file findings point at (SARIF artifactLocation)
    weight_files: list[Path] = field(default_factory=list)
    staged: tempfile.TemporaryDirectory | None = None

    def model_files(self) -> list[Path]:
        """The non-weight files that shape the model: configs (an adapter's rank and targets, a
        fine-tuned folder's options) and tokenizer files, of the target and of its base. Part
        of the content-cache key beside the weights."""
        folders = {path.parent for path in self.weight_files}
        folders |= {folder for folder in (Path(self.staged.name) if self.staged else None, Path(self.adapter) if self.adapter else None,
                                          self.base_folder()) if folder is not None and folder.is_dir()}
        names = ("config.json", ADAPTER_CONFIG, FINETUNE_MANIFEST, *TOKENIZER_FILES)
        return sorted({folder / name for folder in folders for name in names if (folder / name).is_file()})

    def base_folder(self) -> Path | None:
        """The local folder of the model the auditor loads (an adapter's base), or None for an
        alias built from a config or a hub name."""
        from peftshield.models.backbone import resolve_backbone

        folder = Path(resolve_backbone(self.checkpoint))
        return folder if folder.is_dir() else None

    def weights_sha256(self, base_files: list[Path] | None = None) -> str:
        """The sha256 of the weights: of the file itself for one file (what ``sha256sum``
        prints), else of the sorted ``name sha256`` lines of every file (an adapter's base included)."""
        files = [*self.weight_files, *(base_files or [])]
        sums = [(path.name, file_sha256(path)) for path in files]
        if len(sums) == 1:
            return sums[0][1]
        return hashlib.sha256("".join(f"{name} {digest}\n" for name, digest in sorted(sums)).encode()).hexdigest()

    def close(self) -> None:
        if self.staged is not None:
            self.staged.cleanup()
            self.staged = None


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("."))


def safetensors_files(folder: Path, spec: str) -> list[Path]:
    """The folder's safetensors weights. A folder whose weights are only pickles (``.bin``) is a
    one-line error: a pickle can run code when loaded, so the audit never loads one."""
    files = weight_files(folder)
    chosen = [p for p in files if p.suffix == ".safetensors"]
    pickles = [p for p in files if p.suffix == ".bin"]
    if not chosen and pickles:
        raise ConfigError(f"target {spec}: {pickles[0]} is a pickle (it can run code when loaded): safetensors weights are required; "
                          "convert it where you trust it (e.g. safetensors' convert script) and audit the .safetensors file")
    return chosen


def _names_missing_local_folder(name: str) -> bool:
    """A base model name that can only be a local path (absolute, ``./``, ``~``, or deeper than
    ORG/NAME) and is not there."""
    looks_local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
    return looks_local and not Path(name).expanduser().exists()


def expand_specs(specs: list[str]) -> list[str]:
    """Targets with globs expanded (a pattern that matches nothing is an error); duplicates dropped."""
    out: list[str] = []
    for spec in specs:
        if spec.startswith(HF_SCHEME) or Path(spec).exists() or not glob.has_magic(spec):
            out.append(spec)
            continue
        matches = sorted(glob.glob(spec, recursive=True))
        if not matches:
            raise ConfigError(f"target {spec}: the pattern matches nothing")
        out.extend(matches)
    return list(dict.fromkeys(out))


def resolve_hf(spec: str) -> Path:
    """``hf://org/name[@revision]`` -> the cached snapshot folder (downloaded only when the hub is reachable)."""
    name = spec[len(HF_SCHEME):]
    repo, _, revision = name.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ConfigError(f"target {spec}: write hf://ORG/NAME[@REVISION]")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from peftshield.hub import hub_reachable

    try:
        return Path(snapshot_download(repo, revision=revision or None, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    except Exception as exc:  # a damaged cache entry
        raise ConfigError(f"target {spec}: the local Hugging Face cache entry is unusable ({str(exc).splitlines()[0][:160]})") from None
    if not hub_reachable():
        raise ConfigError(f"target {spec}: not in the local Hugging Face cache ({_hf_cache_dir()}) and the hub is not reachable; "
                          f"download it where there is a network ('hf download {repo}') or pass a folder")
    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as exc:
        raise ConfigError(f"target {spec}: download failed ({str(exc).splitlines()[0][:160]})") from None


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def resolve_base(base: str) -> str:
    """A base model name as an adapter records it: an alias or local folder as is; a hub name
    from the local cache when it is there (so an offline machine can still load it)."""
    from peftshield.models.backbone import BACKBONE_ALIASES

    if base in BACKBONE_ALIASES or Path(base).exists():
        return base
    if base.count("/") == 1 and not base.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(base, local_files_only=True)
        except Exception:
            return base  # loading it will say the hub is unreachable
    return base


def _folder_target(spec: str, folder: Path, base: str | None, location: Path | None = None, kind: str | None = None) -> AuditTarget:
    if (folder / ADAPTER_CONFIG).is_file():
        recorded = base
        if recorded is None:
            try:
                recorded = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
            except (OSError, ValueError, AttributeError) as exc:
                raise DataError(f"{folder / ADAPTER_CONFIG}: damaged file ({str(exc).splitlines()[0][:120]})") from None
            if not recorded:
                raise ConfigError(f"{folder / ADAPTER_CONFIG}: no base_model_name_or_path; pass --base")
            if _names_missing_local_folder(str(recorded)):
                raise ConfigError(f"{folder / ADAPTER_CONFIG}: base_model_name_or_path {recorded} is a local folder that does not exist here; "
                                  "pass --base MODEL (the folder or hub name of the base model)")
        files = [p for p in safetensors_files(folder, spec) if p.name.startswith("adapter_model")]
        if not files:
            raise ConfigError(f"target {spec}: adapter folder without adapter_model.safetensors")
        return AuditTarget(spec, kind or "adapter", resolve_base(recorded), str(folder), str(location or files[0]), files)
    if (folder / FINETUNE_MANIFEST).is_file() and not (folder / "config.json").is_file():
        from peftshield.finetune.checkpoint import resolve_recorded_backbone

        backbone, _ = resolve_recorded_backbone(folder, backbone=base)
        files = safetensors_files(folder, spec)
        return AuditTarget(spec, kind or "finetuned", backbone, str(folder), str(location or (files[0] if files else folder / FINETUNE_MANIFEST)), files)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"target {spec}: not a model folder (no config.json, {ADAPTER_CONFIG} or {FINETUNE_MANIFEST})")
    files = safetensors_files(folder, spec)
    if not files:
        raise ConfigError(f"target {spec}: no weights (.safetensors) in {folder}")
    return AuditTarget(spec, kind or "checkpoint", str(folder), None, str(location or files[0]), files)


def _staged_safetensors(spec: str, file: Path, base: str | None) -> AuditTarget:
    """A lone weights file: the base's config and tokenizer beside a symlink to it."""
    if base is None:
        raise ConfigError(f"target {spec}: a .safetensors file with no config.json beside it needs --base (the architecture and tokenizer)")
    from peftshield.models.backbone import resolve_backbone

    source = Path(resolve_backbone(resolve_base(base)))
    if not (source / "config.json").is_file():
        raise ConfigError(f"--base {base}: not a local model folder with config.json (needed to read {file.name})")
    try:
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{source / 'config.json'}: damaged file ({exc})") from None
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            head = [k for k in handle.keys() if k.endswith("classifier.weight") or k == "score.weight"]
            num_labels = int(handle.get_slice(head[0]).get_shape()[0]) if head else None
    except Exception as exc:  # safetensors raises its own error type
        raise DataError(f"{file}: damaged or truncated weights ({str(exc).splitlines()[0][:120]})") from None
    if num_labels is not None:  # the file carries a trained head: say so in the staged config
        arch = str((config.get("architectures") or [f"{str(config.get('model_type', 'bert')).capitalize()}Model"])[0])
        stem = arch.split("For")[0].removesuffix("Model")
        config["architectures"] = [f"{stem}ForSequenceClassification"]
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    staged = tempfile.TemporaryDirectory(prefix="peftshield-target-")
    folder = Path(staged.name)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            os.symlink((source / name).resolve(), folder / name)
    os.symlink(file.resolve(), folder / "model.safetensors")
    return AuditTarget(spec, "safetensors", str(folder), None, str(file), [file], staged)


def adapter_target(checkpoint: str, adapter: str) -> AuditTarget:
    """``--adapter ADAPTER`` on ``checkpoint``: the adapter folder as the target (its files are
    the weights and the findings' location), the checkpoint as its base."""
    folder = Path(adapter)
    if not folder.is_dir():
        raise ConfigError(f"--adapter {adapter}: no such folder")
    if not ((folder / ADAPTER_CONFIG).is_file() or (folder / FINETUNE_MANIFEST).is_file()):
        raise ConfigError(f"--adapter {adapter}: not an adapter folder (no {FINETUNE_MANIFEST} or {ADAPTER_CONFIG})")
    target = _folder_target(f"{checkpoint} + {adapter}", folder, checkpoint)
    return target


def resolve_target(spec: str, base: str | None = None) -> AuditTarget:
    """One target spec -> an :class:`AuditTarget`, or a one-line error naming it."""
    if spec.startswith(HF_SCHEME):
        target = _folder_target(spec, resolve_hf(spec), base)
        target.kind = "hf"
        return target
    path = Path(spec)
    from peftshield.models.backbone import BACKBONE_ALIASES, RANDOM_BACKBONES, resolve_backbone

    if spec in BACKBONE_ALIASES:
        if spec in RANDOM_BACKBONES:
            return AuditTarget(spec, "checkpoint", spec, None, spec)
        return _folder_target(spec, Path(resolve_backbone(spec)), base)
    if not path.exists():
        if not spec.startswith(("/", ".", "~")) and spec.count("/") == 1:
            raise ConfigError(f"target {spec}: no such folder; a hub model is written hf://{spec}")
        raise ConfigError(f"target {spec}: no such file or folder")
    if path.is_dir():
        return _folder_target(spec, path, base)
    if path.name in ("config.json", ADAPTER_CONFIG, FINETUNE_MANIFEST):
        return _folder_target(spec, path.parent, base)
    if path.suffix == ".safetensors":
        if path.name.startswith("adapter_model") and (path.parent / ADAPTER_CONFIG).is_file():
            return _folder_target(spec, path.parent, base, location=path)
        if (path.parent / "config.json").is_file():
            return _folder_target(spec, path.parent, None, location=path, kind="safetensors")
        return _staged_safetensors(spec, path, base)
    raise ConfigError(f"target {spec}: not a model folder, .safetensors file, adapter or hf://ORG/NAME")


def model_files_sha256(target: AuditTarget) -> str:
    """:func:`~peftshield.fingerprint.files_sha256` of the target's :meth:`AuditTarget.model_files`
    and, when its base is not a local folder (an alias or a hub name), that name."""
    return files_sha256(target.model_files(), target.checkpoint if not Path(target.checkpoint).exists() else "")


def kind_of_spec(spec: str) -> str:
    """The target kind a spec names, as far as its text tells (for rows of targets that failed to resolve)."""
    if spec.startswith(HF_SCHEME):
        return "hf"
    if spec.endswith(".safetensors"):
        return "safetensors"
    return "checkpoint"


def base_weight_files(target: AuditTarget) -> list[Path]:
    """The base model's weight files of an adapter target (part of its content key)."""
    folder = target.base_folder() if target.adapter is not None else None
    return weight_files(folder) if folder is not None else []
