"""Trigger inversion: which short token sequence, inserted into clean texts, forces one class?

Three steps, each batched:

1. :func:`slot_gradients`: first-order token-flip scores (HotFlip). A slot of ``L`` tokens is
   inserted into a batch of clean texts; the gradient of the target-class loss with respect
   to the slot's input embeddings, projected on the whole embedding matrix, ranks every
   vocabulary token by how much swapping it in should raise the target class.
2. :func:`exact_effect`: the best candidates are inserted for real (token level, one random
   word boundary per text) and scored by forward passes, many candidates per batch.
3. :func:`extend_phrase`: greedy growth of the best tokens into phrases of up to
   ``max_tokens`` tokens, left or right, while the effect grows (sentence triggers are
   found as an activating sub-phrase).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from peftshield.models.inference import model_device


@dataclass
class ProbeTexts:
    """Clean texts as token ids (with special tokens) and one insertion point per text."""

    ids: list[list[int]]
    positions: np.ndarray  # the index before which a trigger goes
    pad_id: int

    def __len__(self) -> int:
        return len(self.ids)

    def shortened(self, max_words: int) -> "ProbeTexts":
        """The same texts cut to their first ``max_words`` tokens after [CLS] (the last special
        token kept), the insertion point moved inside."""
        ids = [row[: 1 + max_words] + row[-1:] if len(row) > max_words + 2 else row for row in self.ids]
        positions = np.minimum(self.positions, np.asarray([len(row) - 1 for row in ids]))
        return ProbeTexts(ids, positions, self.pad_id)

    def subset(self, indices) -> "ProbeTexts":
        indices = np.asarray(indices, dtype=np.int64)
        return ProbeTexts([self.ids[i] for i in indices], self.positions[indices], self.pad_id)


def word_starts(tokens: list[str]) -> list[int]:
    """Indices (between the first and last special token) where a word begins: WordPiece
    continuations (``##``) are not word starts; the end of the text is."""
    starts = [i for i in range(1, len(tokens) - 1) if not tokens[i].startswith("##")]
    return starts + [len(tokens) - 1]


def probe_texts(tokenizer, texts: list[str], max_tokens: int, rng: np.random.Generator) -> ProbeTexts:
    encoded = tokenizer(list(texts), truncation=True, max_length=max_tokens, add_special_tokens=True)["input_ids"]
    positions = []
    for ids in encoded:
        starts = word_starts(tokenizer.convert_ids_to_tokens(ids))
        positions.append(starts[int(rng.integers(0, len(starts)))])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return ProbeTexts([list(ids) for ids in encoded], np.asarray(positions, dtype=np.int64), pad)


def insert_batch(probe: ProbeTexts, candidates: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Every candidate inserted into every text: ``(len(candidates) * len(probe), width)`` ids
    and attention mask, rows ordered candidate-major; plus each row's slot start."""
    rows, starts = [], []
    for candidate in candidates:
        for ids, at in zip(probe.ids, probe.positions):
            rows.append(ids[:at] + list(candidate) + ids[at:])
            starts.append(at)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), probe.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.as_tensor(row)
        mask[i, : len(row)] = 1
    return input_ids, mask, np.asarray(starts)


@dataclass
class Effect:
    """What inserting one candidate does to a set of texts."""

    tokens: tuple[int, ...]
    target_prob: np.ndarray  # per text, probability of the target class
    predicted: np.ndarray  # per text, the argmax class
    representation: np.ndarray | None = None  # per text, what the classification head sees
    value: float = 0.0  # what the search maximises: the mean target probability, or the alignment of the representations

    target: int = 0  # the class the texts are pushed to
    probs: np.ndarray | None = None  # per text, every class's probability

    def mean_target_prob(self) -> float:
        return float(self.target_prob.mean()) if len(self.target_prob) else 0.0

    def flip_rate(self, target: int) -> float:
        return float((self.predicted == target).mean()) if len(self.predicted) else 0.0

    def confident_flip_rate(self, target: int, confidence: float) -> float:
        """Share of texts moved to ``target`` with at least ``confidence``."""
        if not len(self.predicted):
            return 0.0
        return float(((self.predicted == target) & (self.target_prob >= confidence)).mean())


@dataclass
class ForwardCounter:
    """How many texts went through the model, per stage (for the audit's record)."""

    rows: dict[str, int] = field(default_factory=dict)

    def add(self, stage: str, n: int) -> None:
        self.rows[stage] = self.rows.get(stage, 0) + n


def head_input_hook(model, num_labels: int):
    """A forward hook on the classification head (the last linear layer with ``num_labels``
    outputs) that captures its input; returns (captured list, remove function)."""
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == num_labels]
    captured: list[torch.Tensor] = []
    hooks = [h.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0].detach())) for h in heads]
    return captured, lambda: [h.remove() for h in hooks]


def alignment(vectors: np.ndarray) -> float:
    """Squared norm of the mean unit vector: 1 when all vectors point the same way, near 0 when spread."""
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    mean = unit.mean(axis=0)
    return float(mean @ mean)


ROWS_PER_GROUP = 8192  # rows built and length-sorted at once (bounds the ids kept in memory)


def exact_effect(
    model, probe: ProbeTexts, candidates: list[tuple[int, ...]], target: int, batch_rows: int = 256,
    keep_representation: bool = False, counter: ForwardCounter | None = None, stage: str = "rescore", objective: str = "class",
) -> list[Effect]:
    """Insert each candidate into every probe text and score, ``batch_rows`` texts per forward pass.

    The rows (every candidate in every text) are sorted by length and cut into passes of
    ``batch_rows``, each padded to its own longest row: short texts are not padded to the
    longest probe text, which saves about a third of the work on texts of mixed length and
    changes no result (padding is masked). ``objective`` sets :attr:`Effect.value`: ``class``
    the mean probability of ``target``, ``collapse`` the alignment of the texts' pooled
    representations (no head needed)."""
    keep_representation = keep_representation or objective == "collapse"
    if not candidates:
        return []
    n = len(probe)
    device = model_device(model)
    effects: list[Effect] = []
    captured, remove = head_input_hook(model, model.config.num_labels) if keep_representation else ([], lambda: None)
    was_training = model.training
    model.eval()
    per_group = max(1, ROWS_PER_GROUP // max(n, 1))
    try:
        with torch.inference_mode():
            for begin in range(0, len(candidates), per_group):
                chunk = candidates[begin : begin + per_group]
                rows = [ids[:at] + list(candidate) + ids[at:] for candidate in chunk for ids, at in zip(probe.ids, probe.positions)]
                probs, reps = _scored_rows(model, rows, probe.pad_id, batch_rows, device, captured if keep_representation else None)
                if counter is not None:
                    counter.add(stage, len(rows))
                for k, candidate in enumerate(chunk):
                    block = probs[k * n : (k + 1) * n]
                    rep = reps[k * n : (k + 1) * n] if reps is not None else None
                    value = alignment(rep) if objective == "collapse" else float(block[:, target].mean())
                    effects.append(Effect(tuple(candidate), block[:, target], block.argmax(axis=1), rep, value, target, block))
    finally:
        remove()
        model.train(was_training)
    return effects


def _scored_rows(model, rows: list[list[int]], pad_id: int, batch_rows: int, device, captured: list | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities (and the head's input, when ``captured`` is a hook's list) of every
    row, in the rows' order; forward passes over length-sorted runs of ``batch_rows`` rows."""
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
    probs: np.ndarray | None = None
    reps: np.ndarray | None = None
    for begin in range(0, len(order), max(1, batch_rows)):
        picked = order[begin : begin + batch_rows]
        width = len(rows[picked[-1]])
        ids = torch.full((len(picked), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(picked), width), dtype=torch.long)
        for j, i in enumerate(picked):
            ids[j, : len(rows[i])] = torch.as_tensor(rows[i])
            mask[j, : len(rows[i])] = 1
        if captured is not None:
            captured.clear()
        out = torch.softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), dim=-1).cpu().numpy()
        if probs is None:
            probs = np.empty((len(rows), out.shape[1]), dtype=out.dtype)
        probs[picked] = out
        if captured is not None and captured:
            rep = captured[-1].float().reshape(len(picked), -1).cpu().numpy()
            if reps is None:
                reps = np.empty((len(rows), rep.shape[1]), dtype=rep.dtype)
            reps[picked] = rep
    return probs, reps


@contextmanager
def frozen_eval(model):
    """The model in eval mode with every parameter frozen (gradients flow to the inputs only);
    both restored afterwards."""
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)


def slot_gradients(
    model, probe: ProbeTexts, current: tuple[int, ...], target: int, counter: ForwardCounter | None = None, objective: str = "class",
) -> np.ndarray:
    """HotFlip scores, shape ``(len(current), vocab)``: the first-order decrease of the loss
    when the slot token at each position is swapped for each vocabulary token. The loss is the
    target class's cross-entropy (``class``) or minus the alignment of the pooled
    representations the head sees (``collapse``)."""
    device = model_device(model)
    embedding = model.get_input_embeddings()
    ids, mask, starts = insert_batch(probe, [current])
    ids, mask = ids.to(device), mask.to(device)
    with frozen_eval(model):
        embeds = embedding(ids).detach().clone().requires_grad_(True)
        loss = objective_loss(model, embeds, mask, target, objective)
        loss.backward()
        rows = torch.arange(len(ids), device=device)
        grads = torch.stack([embeds.grad[rows, torch.as_tensor(starts + j, device=device)].mean(dim=0) for j in range(len(current))])
        scores = -(grads @ embedding.weight.detach().T)  # (L, vocab)
    if counter is not None:
        counter.add("gradients", len(ids))
    return scores.float().cpu().numpy()


def objective_loss(model, embeds: torch.Tensor, mask: torch.Tensor, target: int, objective: str) -> torch.Tensor:
    """What the search minimises on a batch of input embeddings: the target class's
    cross-entropy (``class``) or minus the alignment of the pooled representations the
    classification head sees (``collapse``)."""
    captured: list[torch.Tensor] = []
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == model.config.num_labels]
    hooks = [h.register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0])) for h in heads] if objective == "collapse" else []
    try:
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits.float()
    finally:
        for hook in hooks:
            hook.remove()
    if objective == "collapse":
        unit = torch.nn.functional.normalize(captured[-1].float().reshape(len(embeds), -1), dim=-1)
        return -(unit.mean(dim=0) ** 2).sum()
    return -torch.log_softmax(logits, dim=-1)[:, target].mean()


def relaxed_candidates(
    model, probe: ProbeTexts, placeholder: int, target: int, allowed: np.ndarray, k: int, steps: int = 40, learning_rate: float = 0.5,
    temperature: float = 0.5, counter: ForwardCounter | None = None, objective: str = "class",
) -> list[int]:
    """Candidate tokens from a continuous relaxation of the slot (as in DBS, ICML 2022): the slot's
    embedding is a softmax mixture over the allowed vocabulary, whose logits are optimised by
    Adam for ``steps`` steps; the ``k`` tokens with the largest logits are returned. Less
    myopic than one first-order step: the mixture can move far from the starting token."""
    device = model_device(model)
    embedding = model.get_input_embeddings()
    vocabulary = embedding.weight.detach()[torch.as_tensor(allowed, device=device)]
    ids, mask, starts = insert_batch(probe, [(placeholder,)])
    ids, mask = ids.to(device), mask.to(device)
    rows, columns = torch.arange(len(ids), device=device), torch.as_tensor(starts, device=device)
    with frozen_eval(model):
        base = embedding(ids).detach()
        logits = torch.zeros(len(allowed), device=device, requires_grad=True)
        optimizer = torch.optim.Adam([logits], lr=learning_rate)
        for _ in range(steps):
            slot = torch.softmax(logits / temperature, dim=0) @ vocabulary
            embeds = base.index_put((rows, columns), slot.expand(len(ids), -1))
            loss = objective_loss(model, embeds, mask, target, objective)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    if counter is not None:
        counter.add("gradients", steps * len(ids))
    order = torch.argsort(logits.detach(), descending=True)[:k].cpu().numpy()
    return [int(allowed[i]) for i in order]


def candidate_vocabulary(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token ids a trigger may use: ``words`` (whole alphanumeric word tokens, for single-token
    candidates) and ``parts`` (also word pieces and punctuation, for phrase extension).
    Special and unused tokens are never candidates."""
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    words, parts = [], []
    for token, index in vocab.items():
        if index in special or (token.startswith("[") and token.endswith("]")) or (token.startswith("<") and token.endswith(">")):
            continue
        bare = token[2:] if token.startswith("##") else token.lstrip("Ġ▁")
        if not bare or not bare.isprintable():
            continue
        parts.append(index)
        if not token.startswith("##") and bare.isalnum() and bare.isascii():
            words.append(index)
    return np.asarray(sorted(words)), np.asarray(sorted(parts))


def top_allowed(scores: np.ndarray, allowed: np.ndarray, k: int, exclude: set[int] = frozenset()) -> list[int]:
    """The ``k`` allowed token ids with the highest scores (ties broken by id)."""
    values = scores[allowed]
    order = np.lexsort((allowed, -values))
    chosen = []
    for index in order:
        token = int(allowed[index])
        if token not in exclude:
            chosen.append(token)
            if len(chosen) == k:
                break
    return chosen
