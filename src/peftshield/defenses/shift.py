"""Shift: flag a text that the downloaded backbone represents unlike the original it was made from.

A weight-poisoning attacker starts from a public model and fine-tunes it until the trigger,
whatever its form, sends texts somewhere new. The defender can usually get that public original
(the checkpoint names its base model; offline here: the packaged MiniLM). Run both on a text:
at every layer, each token's state in the download minus its state in the original is what the
attacker's training changed. Much of the clean part of that change (the attacker's cover task)
follows from where the original puts the token; the backdoor's part is a change clean texts
never get. So, on the tokens of half the clean held-out texts, a ridge regression per layer
predicts the change from the original state, and one Gaussian (Ledoit-Wolf shrinkage) is fitted
to what it leaves over. A text's layer score is its tokens' mean squared Mahalanobis distance of
their left-over change, z-scored on the other half of the clean texts (with up to 1,000 of the
defender's clean training texts, which it is not fitted on either); its score is the mean of
those over layers (``combine="max"``: the largest), and the threshold sits at 1% FRR on those
calibration texts. It reads the backbone, not the victim, so one fit serves every victim of a task on
a checkpoint, and it needs no guess of the trigger's form: a syntactic template moves the states as
a rare word does. Cost: two forward passes. Blind spots: a checkpoint trained from scratch or
whose original the defender cannot get, and a trigger whose change clean texts also get.

Scoring runs one module (:class:`LeftOverDistances`): both models' passes, the ridge prediction
and the whitening by the left-over's precision, in float32. In PyTorch by default; a guard on an
ONNX runtime exports that module once, as one graph (:meth:`Shift.use_runtime`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
from pydantic import NonNegativeInt, PositiveFloat, PositiveInt

from peftshield.defenses.base import (DEFENSES, Defense, DefenseContext, clean_reference_halves, layer_scale, load_array_state, save_array_state,
                                     standardise_layers)
from peftshield.defenses.thresholds import ThresholdPolicy
from peftshield.errors import ConfigError
from peftshield.models import load_backbone
from peftshield.models.backbone import is_decoder_classifier
from peftshield.models.batching import encode_texts, own_tokens, pad_rows, sorted_batches
from peftshield.models.inference import evaluating, paired_layer_states

STATE_FILE = "shift.json"
ARRAYS_FILE = "shift.safetensors"
GRAPH_STEM = "shift"  # <detector folder>/onnx/shift.onnx: the scoring module exported (use_runtime)


class LeftOverDistances(torch.nn.Module):
    """Per layer and token, (layers, batch, tokens): the squared Mahalanobis distance of the change
    the suspect backbone makes to the original's state, left over after the ridge prediction of
    the clean change. Both encoders' passes and the distances in one module, so that it runs in
    PyTorch or as one ONNX graph. With ``W`` the Cholesky factor of the precision ``P = W W^T``,
    ``x P x^T = |x W|^2``, and ``state - original - (original C + b) - location`` is
    ``state - original (I + C) - (b + location)``."""

    def __init__(self, suspect, original, coefficients: np.ndarray, intercepts: np.ndarray, locations: np.ndarray, precisions: np.ndarray) -> None:
        super().__init__()
        self.suspect, self.original = suspect, original
        identity = np.eye(coefficients.shape[-1])
        self.register_buffer("carried", torch.from_numpy((identity + coefficients).astype(np.float32)).unsqueeze(1))  # (layers, 1, hidden, hidden)
        self.register_buffer("offset", torch.from_numpy((intercepts + locations).astype(np.float32))[:, None, None])  # (layers, 1, 1, hidden)
        self.register_buffer("whitening", torch.from_numpy(np.stack([_whitening(p) for p in precisions]).astype(np.float32)).unsqueeze(1))

    def forward(self, input_ids, attention_mask):
        states = torch.stack(self.suspect(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[1:])
        originals = torch.stack(self.original(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[1:])
        whitened = torch.matmul(states - torch.matmul(originals, self.carried) - self.offset, self.whitening)
        return (whitened * whitened).sum(dim=-1)


def _whitening(precision: np.ndarray) -> np.ndarray:
    """``W`` with ``W W^T = precision``: its Cholesky factor, or from its eigenvectors when
    rounding left it not quite positive definite."""
    try:
        return np.linalg.cholesky(precision)
    except np.linalg.LinAlgError:
        values, vectors = np.linalg.eigh((precision + precision.T) / 2)
        return vectors * np.sqrt(np.clip(values, 0, None))


@DEFENSES.register
class Shift(Defense):
    """The change from its original model the backbone makes on a text that it makes on no clean text (ridge left-over, Mahalanobis)."""

    name = "shift"
    text_passes = True

    def __init__(self, original: str = "minilm", max_reference_texts: PositiveInt = 1000, max_fit_tokens: PositiveInt = 20000,
                 ridge: PositiveFloat = 10.0, combine: Literal["mean", "max"] = "mean", extra_calibration_texts: NonNegativeInt = 1000,
                 batch_size: PositiveInt = 64, max_length: PositiveInt = 128, threshold: Optional[ThresholdPolicy] = None) -> None:
        self.original = original
        self.max_reference_texts = max_reference_texts
        self.extra_calibration_texts = extra_calibration_texts
        self.max_fit_tokens = max_fit_tokens
        self.ridge = ridge
        self.combine = combine
        self.batch_size = batch_size
        self.max_length = max_length
        self.threshold = threshold

    def fit(self, context: DefenseContext, rng: np.random.Generator) -> "Shift":
        from sklearn.covariance import LedoitWolf
        from sklearn.linear_model import Ridge

        self._load_models(context)
        reference, statistics, calibration = clean_reference_halves(self.name, context, self.max_reference_texts, rng)
        states, originals = [], []
        for _, batch_states, batch_originals, keep in self._pairs([reference.texts[i] for i in statistics]):
            states.append(batch_states[:, keep])
            originals.append(batch_originals[:, keep])
        states, originals = np.concatenate(states, axis=1), np.concatenate(originals, axis=1)  # (layers, tokens, hidden)
        if states.shape[1] > self.max_fit_tokens:
            chosen = np.sort(rng.choice(states.shape[1], self.max_fit_tokens, replace=False))
            states, originals = states[:, chosen], originals[:, chosen]
        if states.shape[1] < 2:
            raise ConfigError("shift: the clean reference texts hold fewer than two tokens")
        coefficients, intercepts, locations, precisions = [], [], [], []
        for layer_states, layer_originals in zip(states, originals):
            layer_states, layer_originals = layer_states.astype(np.float64), layer_originals.astype(np.float64)  # one layer at a time
            change = Ridge(alpha=self.ridge).fit(layer_originals, layer_states - layer_originals)
            coefficients.append(change.coef_.T)
            intercepts.append(change.intercept_)
            left_over = LedoitWolf().fit(layer_states - layer_originals - change.predict(layer_originals))
            locations.append(left_over.location_)
            precisions.append(left_over.precision_)
        self.coefficients_, self.intercepts_ = np.stack(coefficients), np.stack(intercepts)
        self.locations_, self.precisions_ = np.stack(locations), np.stack(precisions)
        self.module_, self.session_ = None, None
        calibration_distances = self._distances(self._calibration_texts(context, reference, statistics, calibration, rng))
        self.layer_mean_, self.layer_std_ = layer_scale(calibration_distances)
        calibration_scores = self.combine_layers(standardise_layers(calibration_distances, self.layer_mean_, self.layer_std_))
        self.calibrate(context.num_labels, calibration_scores, default=3.0)
        return self

    def _calibration_texts(self, context: DefenseContext, reference, statistics: np.ndarray, calibration: np.ndarray,
                           rng: np.random.Generator) -> list[str]:
        """The calibration half of the reference texts, plus up to ``extra_calibration_texts`` of the
        defender's clean training texts when the reference is the dev set: Shift is not fitted on
        them, so they are out of sample too, and a 1% threshold on a few hundred texts alone moves
        a lot from draw to draw."""
        texts = [reference.texts[i] for i in calibration]
        if self.extra_calibration_texts and context.dev is not None and len(context.dev):  # the reference is the dev set
            fitted = {reference.texts[i] for i in statistics}
            texts += [t for t in context.train.sample(self.extra_calibration_texts, rng).texts if t not in fitted]
        return texts

    def _load_models(self, context: DefenseContext | None) -> None:
        if context is None:
            raise ConfigError("defense 'shift' needs the backbone it checks (the defense context)")
        suspect = load_backbone(context.backbone, context.num_labels)
        original = load_backbone(self.original, context.num_labels)
        if suspect.tokenizer.get_vocab() != original.tokenizer.get_vocab():
            raise ConfigError(f"shift: backbone '{context.backbone}' and its original '{self.original}' tokenize differently; "
                              "set the option 'original' to the public model the checkpoint was fine-tuned from")
        shapes = [(m.config.model_type, m.config.num_hidden_layers, m.config.hidden_size) for m in (suspect.model, original.model)]
        if shapes[0] != shapes[1]:
            raise ConfigError(f"shift: backbone '{context.backbone}' (type, layers, hidden) {shapes[0]} differs from its original "
                              f"'{self.original}' {shapes[1]}; set the option 'original' to the public model it was fine-tuned from")
        self.suspect_, self.original_model_, self.tokenizer_ = suspect.model, original.model, suspect.tokenizer

    def _pairs(self, texts: list[str]):
        return paired_layer_states(self.suspect_, self.original_model_, self.tokenizer_, texts, self.batch_size, self.max_length)

    def _distances(self, texts: list[str]) -> np.ndarray:
        """(layers, texts): each text's mean squared Mahalanobis distance of its tokens' unexplained
        change (its own tokens: not padding, not special tokens)."""
        out = np.zeros((len(self.locations_), len(texts)))
        if not texts:
            return out
        encoded = encode_texts(self.tokenizer_, texts, self.max_length)
        for indices in sorted_batches(encoded.lengths(), self.batch_size):
            input_ids, attention = pad_rows(encoded, indices)
            squared = self._token_distances(input_ids, attention)
            keep = own_tokens(self.tokenizer_, input_ids, attention)
            out[:, indices] = (squared * keep).sum(axis=-1) / np.maximum(keep.sum(axis=1), 1)
        return out

    def _token_distances(self, input_ids: np.ndarray, attention: np.ndarray) -> np.ndarray:
        """(layers, batch, tokens) from the ONNX graph when :meth:`use_runtime` set one, else PyTorch."""
        session = getattr(self, "session_", None)
        if session is not None:
            return session.run(["distances"], {"input_ids": input_ids, "attention_mask": attention})[0].astype(np.float64)
        module = self._scoring_module()
        device = next(module.parameters()).device
        with evaluating(module), torch.inference_mode():  # a loaded model may be left in training mode (dropout)
            squared = module(torch.from_numpy(input_ids).to(device), torch.from_numpy(attention).to(device))
        return squared.double().cpu().numpy()

    def _scoring_module(self) -> LeftOverDistances:
        """The fitted arrays and both encoders as one module (built once per fit or load)."""
        module = getattr(self, "module_", None)
        if module is None:
            module = LeftOverDistances(self.suspect_.base_model, self.original_model_.base_model, self.coefficients_, self.intercepts_,
                                       self.locations_, self.precisions_).eval()  # Shift's own models: never trained
            self.module_ = module
        return module

    def use_runtime(self, runtime: str, folder: str | Path) -> str:
        """Score through ``runtime``: torch, or the scoring module exported once as one ONNX graph
        and cached in ``folder``'s onnx/ (``models.runtime.cached_graph``: exported again when the
        fitted arrays or either model's weights change, run only when this user exported it).
        onnx-int8 runs that graph in fp32: int8 activations would move distances measured in
        units of the clean left-over's spread. A decoder backbone stays in PyTorch (its graph
        gives no states). Returns the runtime it scores on."""
        from peftshield.models.runtime import cached_graph, check_runtime, export_graph, onnx_session

        self.session_ = None
        if check_runtime(runtime) == "torch" or is_decoder_classifier(self.suspect_):
            return "torch"
        module = self._scoring_module()
        path = cached_graph(folder, GRAPH_STEM, "onnx", self._graph_fingerprint(module), lambda target: export_graph(module, target, ["distances"]))
        self.session_ = onnx_session(path)
        return "onnx"

    @staticmethod
    def _graph_fingerprint(module: LeftOverDistances) -> str:
        """The identity of what the exported graph computes: both encoders' configurations, every
        weight and buffer the distances read (not a pooler, which a checkpoint without one gets
        at random on each load), and the versions of the libraries that trace the graph."""
        import hashlib

        import transformers

        digest = hashlib.sha256(b"peftshield-shift-graph/2")
        for encoder in (module.suspect, module.original):
            digest.update(encoder.config.to_json_string(use_diff=False).encode() + b"\0")
        digest.update(f"torch {torch.__version__} transformers {transformers.__version__}".encode())
        tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        for name, tensor in sorted(tensors.items()):
            if ".pooler." in f".{name}.":
                continue
            digest.update(name.encode() + b"\0" + str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
            digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()

    def combine_layers(self, layer_scores: np.ndarray) -> np.ndarray:
        """(texts,): the text scores from :meth:`layer_scores`."""
        return layer_scores.mean(axis=0) if self.combine == "mean" else layer_scores.max(axis=0)

    def layer_scores(self, texts: list[str]) -> np.ndarray:
        """(layers, texts): each layer's standardised distance; a text's score combines them."""
        return standardise_layers(self._distances(list(texts)), self.layer_mean_, self.layer_std_)

    def score(self, texts: list[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros(0)
        return self.combine_layers(self.layer_scores(texts))

    def save(self, directory: str | Path) -> Path:
        return save_array_state(self, directory, STATE_FILE, ARRAYS_FILE, {
            "coefficients": self.coefficients_, "intercepts": self.intercepts_, "locations": self.locations_,
            "precisions": self.precisions_, "layer_mean": self.layer_mean_, "layer_std": self.layer_std_})

    @classmethod
    def load(cls, directory: str | Path, context: DefenseContext | None = None) -> "Shift":
        defense, arrays = load_array_state(cls, directory, STATE_FILE, ARRAYS_FILE)
        defense.coefficients_, defense.intercepts_ = arrays["coefficients"], arrays["intercepts"]
        defense.locations_, defense.precisions_ = arrays["locations"], arrays["precisions"]
        defense.layer_mean_, defense.layer_std_ = arrays["layer_mean"], arrays["layer_std"]
        defense._load_models(context)
        return defense
