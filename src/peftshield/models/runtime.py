"""Where a classifier's forward pass runs: PyTorch eager, or ONNX Runtime (fp32 or int8).

Every runtime takes the same padded numpy batch (``input_ids``, ``attention_mask``) and
returns logits, so tokenisation, batching and softmax are shared (models.inference) and a
guard that runs a victim and a PSIM on one backbone tokenises once for both.

The ONNX file is exported once per model folder with the dynamo exporter (shapes dynamic in
batch and length; it handles every method's wrapper, P-tuning's prompt encoder included) and
cached in ``<folder>/onnx/``, keyed by the weights' fingerprint, and run only when its content
is one this user's peftshield exported (a graph shipped in a model's onnx/ folder is not
trusted: it is exported again from the weights); int8 is ONNX Runtime's dynamic quantisation
of the fp32 file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Annotated, Callable, Literal, Protocol, get_args

import numpy as np
import torch
from pydantic import BeforeValidator

from peftshield.errors import ConfigError, PeftshieldError
from peftshield.io import atomic_write_json
from peftshield.local_secret import cache_secret, keyed_digest
from peftshield.models.backbone import is_decoder_classifier
from peftshield.models.inference import model_device

RuntimeName = Literal["torch", "onnx", "onnx-int8"]
RUNTIMES: tuple[str, ...] = get_args(RuntimeName)
DEFAULT_RUNTIME: RuntimeName = "torch"
RUNTIME_HELP = ("Where forward passes run: torch (eager), onnx (ONNX Runtime fp32) or onnx-int8 (dynamic int8); "
                "the ONNX export is made on first use and cached in the model folder's onnx/. onnx-int8 quantises activations with one scale per batch, "
                "so a text's score depends on the other texts of its batch (bench/serve.md measures how far). A detector with passes of its own "
                "(Shift) runs them as one fp32 ONNX graph under either ONNX runtime, cached in its folder's onnx/.")
ONNX_DIR = "onnx"


def _known_runtime(runtime: object) -> object:
    if runtime not in RUNTIMES:
        raise ValueError(f"choose one of {', '.join(RUNTIMES)}")
    return runtime


# The runtime as a settings field: one of RUNTIMES, and a one-line error naming them otherwise.
Runtime = Annotated[RuntimeName, BeforeValidator(_known_runtime)]


def check_runtime(runtime: str) -> str:
    """``runtime`` if it is one of :data:`RUNTIMES`, else a one-line :class:`ConfigError` (for
    library calls; settings check it as the :data:`Runtime` type)."""
    try:
        return _known_runtime(runtime)
    except ValueError as exc:
        raise ConfigError(f"--runtime {runtime!r}: {exc}") from None


class ClassifierRuntime(Protocol):
    name: str
    num_labels: int

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


class StatesRuntime(ClassifierRuntime, Protocol):
    """A runtime that also returns the summary token's state at every layer from the same pass
    (what DAN reads), so a detector of the victim's representations costs no pass of its own."""

    def logits_and_states(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class TorchRuntime:
    """PyTorch eager under ``inference_mode``. The caller puts the model in eval mode (the
    loaders do; :func:`~peftshield.models.inference.predict_proba` does it around its call):
    toggling it per batch cost a fifth of the batch-1 throughput."""

    name = "torch"

    def __init__(self, model) -> None:
        self.model = model
        self.num_labels = int(model.config.num_labels)
        self.device = model_device(model)

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(input_ids).to(self.device), attention_mask=torch.from_numpy(attention_mask).to(self.device))
            return out.logits.float().cpu().numpy()

    def logits_and_states(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits, and (layers, batch, hidden) summary states as :func:`~peftshield.models.inference.layer_token_states` reads them."""
        from peftshield.models.inference import token_state

        with torch.inference_mode():
            ids, mask = torch.from_numpy(input_ids).to(self.device), torch.from_numpy(attention_mask).to(self.device)
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            states = torch.stack([token_state(self.model, h[:, -ids.shape[1]:], mask) for h in out.hidden_states[1:]])
            return out.logits.float().cpu().numpy(), states.float().cpu().numpy()


class OnnxRuntime:
    """An exported ``.onnx`` file run by ONNX Runtime on the CPU."""

    def __init__(self, path: str | Path, num_labels: int, name: str = "onnx", threads: int | None = None) -> None:
        self.session = onnx_session(path, threads)
        self.path, self.num_labels, self.name = Path(path), num_labels, name

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], self._inputs(input_ids, attention_mask))[0]

    def logits_and_states(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Only for a file exported with ``states`` (:func:`export_onnx`)."""
        logits, states = self.session.run(["logits", "states"], self._inputs(input_ids, attention_mask))
        return logits, states

    @staticmethod
    def _inputs(input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        return {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}


def onnx_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime session on the CPU for the graph in ``path``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0) or 0)
    options.log_severity_level = 3
    # Idle intra-op threads sleep instead of spinning: in a service they share the cores with
    # the event loop and the other model, and spinning starved both.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class _LogitsOnly(torch.nn.Module):
    """``model(input_ids, attention_mask).logits`` as a plain module for the exporter."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits


class _LogitsAndStates(_LogitsOnly):
    """Logits and the first text position's state at the output of every layer, (layers, batch,
    hidden): an encoder's [CLS], after any virtual tokens a prompt method prepends."""

    def forward(self, input_ids, attention_mask):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        first = out.hidden_states[1].shape[1] - input_ids.shape[1]
        return out.logits, torch.stack([hidden[:, first] for hidden in out.hidden_states[1:]])


def export_onnx(model, path: str | Path, states: bool = False) -> Path:
    """Export ``model`` (any transformers / PEFT / adapters classifier) to an fp32 ONNX file,
    dynamic in batch size and sequence length. With ``states`` (encoders only), the graph also
    outputs ``states`` (:class:`_LogitsAndStates`)."""
    return export_graph((_LogitsAndStates if states else _LogitsOnly)(model), path, ["logits", "states"] if states else ["logits"])


def export_graph(module: torch.nn.Module, path: str | Path, output_names: list[str]) -> Path:
    """Export ``module`` (``forward(input_ids, attention_mask)``) to an fp32 ONNX file with the
    dynamo exporter, dynamic in batch size and sequence length: written to a temporary file, then renamed."""
    import logging
    import warnings

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = module.training
    module.eval()
    ids = torch.full((2, 8), 5, dtype=torch.long)
    mask = torch.ones_like(ids)
    batch, length = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("length", min=2, max=4096)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        target = Path(tmp) / path.name
        quiet = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript", "torch._dynamo")]
        levels = [q.level for q in quiet]
        for q in quiet:
            q.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module, (ids, mask), str(target), input_names=["input_ids", "attention_mask"], output_names=output_names,
                    dynamic_shapes={"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}}, dynamo=True,
                    external_data=False, verbose=False,
                )
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
            module.train(was_training)
        os.replace(target, path)
    return path


def without_traced_shapes(source: str | Path, path: str | Path) -> Path:
    """``source`` saved to ``path`` without the intermediate shapes the exporter traced at its
    example batch: a quantiser's shape inference rejects them against the dynamic ones."""
    import onnx

    model = onnx.load(str(source))
    del model.graph.value_info[:]
    onnx.save(model, str(path))
    return Path(path)


def quantize_int8(source: str | Path, path: str | Path) -> Path:
    """ONNX Runtime dynamic int8 quantisation of an fp32 file (weights ahead of time, activations per batch)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        bare = without_traced_shapes(source, Path(tmp) / "bare.onnx")
        target = Path(tmp) / path.name
        logging.disable(logging.WARNING)  # its advice to pre-process goes to the root logger
        try:
            quantize_dynamic(str(bare), str(target), weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)
        os.replace(target, path)
    return path


def onnx_file(folder: str | Path, model, runtime: str, fingerprint: str, states: bool = False) -> Path:
    """The cached ONNX file of ``model`` saved in ``folder`` (exported on first use, again when
    ``fingerprint``, the weights' identity, changed). Falls back to a per-user cache when the
    model folder is read-only. ``states``: the graph that also outputs every layer's summary state."""
    return cached_graph(folder, "model.states" if states else "model", runtime, fingerprint, lambda path: export_onnx(model, path, states))


def cached_graph(folder: str | Path, stem: str, runtime: str, fingerprint: str, export: Callable[[Path], Path]) -> Path:
    """``<folder>/onnx/<stem>.onnx`` (``runtime`` onnx) or its int8 quantisation (onnx-int8),
    made by ``export(path)`` on first use and again when ``fingerprint`` (the identity of what
    the graph computes) changed, and run only when this user's peftshield wrote that content
    (:func:`exported_here`). Falls back to a per-user cache when ``folder`` is read-only."""
    folder = Path(folder)
    cache = folder / ONNX_DIR
    try:
        if cache.is_symlink():  # never follow a link out of the model's folder
            raise OSError("a link")
        cache.mkdir(exist_ok=True)
        # A fresh name made with O_EXCL: a probe at a fixed name would follow a link the folder
        # ships (".write-test" -> a file anywhere) and create what it points to.
        handle, probe = tempfile.mkstemp(dir=cache, prefix=".write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError:
        import hashlib

        cache = user_cache_folder("onnx", hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16])
    _exports_record()  # where the markers go, and the key that names them, before any export: a broken one is
    cache_secret()  # one line now, not after an export that could not be recorded
    with _export_lock(cache, stem):  # `serve --workers N` starts N processes that would each export the same graph
        return _cached_graph_in(cache, folder, stem, runtime, fingerprint, export)


@contextlib.contextmanager
def _export_lock(cache: Path, stem: str):
    """An exclusive lock on ``<cache>/.<stem>.lock`` while one process checks and exports the
    graph: the others wait and then find it made. The lock file is opened without following a
    link (a folder may ship one); when it cannot be opened, the export goes on unlocked (a race
    costs a second export, never a wrong graph: each is written under a temporary name and renamed)."""
    import fcntl

    try:
        handle = os.open(cache / f".{stem}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0), 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


def _cached_graph_in(cache: Path, folder: Path, stem: str, runtime: str, fingerprint: str, export: Callable[[Path], Path]) -> Path:
    stamp = cache / f"{stem.replace('model', 'export', 1) if stem.startswith('model') else stem + '.export'}.json"
    try:  # a stamp that is not what this function wrote means a fresh export, never a traceback
        recorded = json.loads(stamp.read_text()) if stamp.is_file() and not stamp.is_symlink() and stamp.stat().st_size < 10_000 else {}
    except (OSError, ValueError):
        recorded = {}
    fp32, int8 = cache / f"{stem}.onnx", cache / f"{stem}.int8.onnx"
    if not isinstance(recorded, dict) or fp32.is_symlink() or int8.is_symlink():
        recorded = {}
    if recorded.get("fingerprint") != fingerprint or not fp32.is_file() or not exported_here(fp32, fingerprint):
        for stale in (fp32, int8):
            stale.unlink(missing_ok=True)
        export(fp32)
        record_export(fp32, fingerprint)
        atomic_write_json(stamp, {"fingerprint": fingerprint, "source": str(folder)})
    if runtime == "onnx":
        return fp32
    if not int8.is_file() or not exported_here(int8, fingerprint):
        int8.unlink(missing_ok=True)
        quantize_int8(fp32, int8)
        record_export(int8, fingerprint)
    return int8


def _exports_record() -> Path:
    """Where this user records the ONNX files peftshield wrote: in the user's cache, never in a model folder."""
    return user_cache_folder("onnx-exports")


def user_cache_folder(*parts: str) -> Path:
    """``<user cache>/peftshield/<parts>``, made when missing. A link at any of those levels is a
    one-line :class:`ConfigError`: a cache restored from elsewhere (a pull request's CI job) may
    hold one that points anywhere, and peftshield replaces and deletes graphs in this folder."""
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peftshield"
    for index in range(len(parts) + 1):
        level = folder.joinpath(*parts[:index])
        if level.is_symlink():
            raise ConfigError(f"{level}: a link in peftshield's cache folder; remove it (peftshield makes this folder itself)")
        level.mkdir(mode=0o700, parents=index == 0, exist_ok=True)
    return level


def _export_marker(path: Path, fingerprint: str) -> Path:
    """The marker of ``path``'s content as the ``path.name`` graph of the weights ``fingerprint``
    names: a graph of other weights, or of another role (the int8 graph put in the fp32 one's
    place), has another marker. Its name is keyed with this user's secret
    (:func:`peftshield.local_secret.cache_secret`, never in a cache), so whoever can write the
    cache (a CI cache restored from a pull request's job) cannot make the marker of a graph they planted."""
    from peftshield.fingerprint import file_sha256

    message = f"peftshield-onnx-export/2\0{fingerprint}\0{path.name}\0{file_sha256(path)}".encode()
    return _exports_record() / keyed_digest(cache_secret(), message)


def record_export(path: Path, fingerprint: str) -> None:
    """Record ``path`` as a graph this user's peftshield exported from the weights ``fingerprint`` names."""
    marker = _export_marker(path, fingerprint)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()


def exported_here(path: Path, fingerprint: str) -> bool:
    """Whether ``path`` holds the graph this user's peftshield exported from these weights. The
    onnx/ folder ships with a model and its stamp names the weights' fingerprint, which anyone who
    has the weights can write: a graph found there is run only when :func:`record_export`
    recorded its content for these weights and this role, else it is exported again."""
    try:
        return path.is_file() and not path.is_symlink() and _export_marker(path, fingerprint).is_file()
    except (OSError, PeftshieldError):  # unreadable (mode 000, say): exported again, never a load failure
        return False


def make_runtime(model, runtime: str = DEFAULT_RUNTIME, folder: str | Path | None = None, fingerprint: str = "",
                 states: bool = False) -> ClassifierRuntime:
    """The runtime named ``runtime`` (one of :data:`RUNTIMES`) for ``model``; the ONNX ones need the
    model's ``folder`` to cache the export in. With ``states`` it is a :class:`StatesRuntime`
    (an ONNX one for encoders only: a decoder's summary token moves with its padding)."""
    if check_runtime(runtime) == "torch":
        return TorchRuntime(model)
    if folder is None:
        raise ValueError("an ONNX runtime needs the model's folder to cache its export")
    if states and is_decoder_classifier(model):
        raise ValueError("an ONNX runtime gives layer states for encoders only")
    return OnnxRuntime(onnx_file(folder, model, runtime, fingerprint, states), int(model.config.num_labels), name=runtime)

