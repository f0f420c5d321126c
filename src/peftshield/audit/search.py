"""Trigger inversion: which short token sequence, inserted into clean texts, forces one class?

Three steps, each batched:

1. :func:`slot_gradients`: first-order token-flip scores (HotFlip). A slot of ``L`` tokens is
   inserted into a batch of clean texts; the gradient of the target-class loss with respect
   to the slot's input embeddings, projected on the whole embedding matrix, ranks every
   vocabulary token by how much swapping it in should raise the target class.
2. :func:`exact_effect`: the best candidates are inserted for real (token level, one random
   word boundary per text) and scored by forward passes, many candidates per batch.
3. :meth:`TargetSearch.grow`: greedy growth of the best tokens into phrases of up to
   ``max_phrase_tokens`` tokens, left or right, while the effect grows (sentence triggers are
   found as an activating sub-phrase).

:class:`TargetSearch` runs these for one target class, and :func:`vocabulary_sweep` first
inserts every whole-word token for real, which finds a backdoor keyed on one token embedding
that gradients miss. :func:`search_targets` is the audit's search stage: the sweep, then a
:class:`TargetSearch` per target class (HotFlip, then phrase growth).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from peftshield.models.inference import model_device

if TYPE_CHECKING:  # the audit's settings; the audit imports this module, never the other way at run time
    from peftshield.audit.auditor import AuditSettings


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


def head_rows(captured: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One row per text of what the head read: an encoder's head gets one pooled vector per
    text; a decoder's head is applied at every position and its prediction read at the text's
    last real token (the last 1 of ``mask``), so that position's input is the text's row."""
    if captured.ndim == 3:
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask.to(positions.device) * positions).argmax(dim=1)
        return captured[torch.arange(len(captured), device=captured.device), last.to(captured.device)]
    return captured.reshape(len(captured), -1)


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
            rep = head_rows(captured[-1], mask).float().cpu().numpy()
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
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == model.config.num_labels]
    hooks = [h.register_forward_hook(lambda _m, inputs, output: captured.append((inputs[0], output))) for h in heads]
    try:
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits.float()
    finally:
        for hook in hooks:
            hook.remove()
    if objective == "collapse":
        unit = torch.nn.functional.normalize(head_rows(captured[-1][0], mask).float(), dim=-1)
        return -(unit.mean(dim=0) ** 2).sum()
    if captured and captured[-1][1].ndim == 3:
        # A decoder's head runs at every position; fed embeddings, transformers reads the last
        # position, a padding one for the shorter texts: read each text's last real token instead.
        logits = head_rows(captured[-1][1], mask).float()
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


class TargetSearch:
    """The candidate search for one target class on ``model``: :meth:`hotflip` (relaxed-slot
    candidates, then HotFlip rounds), :meth:`score` (exact re-scoring by successive halving) and
    :meth:`grow` (greedy phrase extension). ``settings`` are the audit's
    (:class:`~peftshield.audit.auditor.AuditSettings`); ``mask_id`` the token a slot starts from
    (the tokenizer's mask token, else the first candidate word)."""

    def __init__(self, model, mask_id: int | None, target: int, search: ProbeTexts, settings: "AuditSettings", words, parts,
                 counter: ForwardCounter, objective: str = "class") -> None:
        self.model, self.target, self.search, self.settings, self.objective = model, target, search, settings, objective
        self.words, self.parts, self.counter = words, parts, counter
        self.scored: dict[tuple[int, ...], Effect] = {}  # on every search text
        self.screened: dict[tuple[int, ...], Effect] = {}  # on the screening texts only
        n_screen = min(settings.screen_texts, len(search))
        self.screen_part = search.subset(np.arange(n_screen))
        self.rest_part = search.subset(np.arange(n_screen, len(search)))
        self.mask = mask_id if mask_id is not None else int(words[0])

    def score(self, candidates: list[tuple[int, ...]]) -> list[Effect]:
        """Exact effects of ``candidates`` on all search texts, by successive halving: every new
        candidate is screened on the first ``screen_texts`` texts; the best ``keep`` of them are
        scored on the rest too. Returns the fully scored ones, best first."""
        new = [c for c in dict.fromkeys(candidates) if c not in self.scored and c not in self.screened]
        model, target, rows = self.model, self.target, self.settings.batch_rows
        objective = self.objective
        for effect in exact_effect(model, self.screen_part, new, target, rows, counter=self.counter, stage="rescore", objective=objective):
            self.screened[effect.tokens] = effect
        ranked = sorted((self.screened[c] for c in dict.fromkeys(candidates) if c in self.screened), key=lambda e: (-e.value, e.tokens))
        promote = [e.tokens for e in ranked[: self.settings.keep_after_screen] if e.tokens not in self.scored]
        rest = exact_effect(model, self.rest_part, promote, target, rows, counter=self.counter, stage="rescore", objective=objective) if len(self.rest_part) else []
        for head, tail in zip((self.screened[c] for c in promote), rest):
            merged = Effect(head.tokens, np.concatenate([head.target_prob, tail.target_prob]), np.concatenate([head.predicted, tail.predicted]))
            n_head, n_tail = len(head.target_prob), len(tail.target_prob)
            merged.value = (head.value * n_head + tail.value * n_tail) / (n_head + n_tail)
            self.scored[head.tokens] = merged
        if not len(self.rest_part):
            self.scored.update({c: self.screened[c] for c in promote})
        return sorted((self.scored[c] for c in dict.fromkeys(candidates) if c in self.scored), key=lambda e: (-e.value, e.tokens))

    def best(self, length: int | None = None, n: int = 1) -> list[Effect]:
        pool = [e for e in self.scored.values() if length is None or len(e.tokens) == length]
        return sorted(pool, key=lambda e: (-e.value, e.tokens))[:n]

    def gradients(self, slot: tuple[int, ...]) -> np.ndarray:
        return slot_gradients(self.model, self.search, slot, self.target, self.counter, self.objective)

    def hotflip(self) -> None:
        """Relaxed-slot candidates first, then HotFlip rounds from the best token found so far."""
        if self.settings.relaxed_steps:
            self.score([(t,) for t in relaxed_candidates(
                self.model, self.search, self.mask, self.target, self.words, self.settings.candidates_per_round,
                steps=self.settings.relaxed_steps, counter=self.counter, objective=self.objective,
            )])
        current: tuple[int, ...] = self.best(1)[0].tokens if self.scored else (self.mask,)
        for _ in range(self.settings.hotflip_rounds):
            scores = self.gradients(current)[0]
            exclude = {c[0] for c in (*self.scored, *self.screened) if len(c) == 1}
            self.score([(t,) for t in top_allowed(scores, self.words, self.settings.candidates_per_round, exclude)])
            best = self.best(1)[0].tokens
            if best == current:
                break
            current = best

    def grow(self, start: tuple[int, ...]) -> None:
        """Extend the scored candidate ``start`` one token at a time, left or right (the
        gradient's best tokens at the new slot, re-scored exactly), while its effect grows by
        ``min_gain`` and stays below ``saturated``, up to ``max_phrase_tokens`` tokens."""
        current = self.scored[start]
        while len(current.tokens) < self.settings.max_phrase_tokens and current.value < self.settings.saturated:
            options: list[tuple[int, ...]] = []
            for side in ("left", "right"):
                slot = (self.mask, *current.tokens) if side == "left" else (*current.tokens, self.mask)
                scores = self.gradients(slot)
                row = scores[0] if side == "left" else scores[-1]
                for token in top_allowed(row, self.parts, self.settings.phrase_candidates):
                    options.append((token, *current.tokens) if side == "left" else (*current.tokens, token))
            effects = self.score(options)
            if not effects:
                break
            best = effects[0]
            if best.value - current.value < self.settings.min_gain:
                break
            current = best


def vocabulary_sweep(model, probe, predicted: np.ndarray, num_labels: int, words: np.ndarray, objective: str,
                     settings: "AuditSettings", counter: ForwardCounter) -> dict[int, list[tuple[int, ...]]] | None:
    """Every whole-word token of the vocabulary, inserted into ``sweep_texts`` short clean texts
    (cut to ``sweep_tokens`` tokens; one per predicted class for a head, so one pass serves
    every target class): the best ``candidates_per_round`` per target go to the search.
    Exact, not first-order: a backdoor keyed on one token embedding can hide from gradients
    taken anywhere else (a clean-label ``cf`` backdoor ranked below 3,000 by HotFlip and by
    the relaxed slot, first by this sweep)."""
    if not settings.sweep_texts:
        return None
    if objective == "class":
        # one text per predicted class, whatever sweep_texts (a class without one could not be searched as a target)
        chosen = [int(np.flatnonzero(predicted == c)[0]) for c in range(num_labels) if (predicted == c).any()]
    else:
        chosen = list(range(min(max(2, settings.sweep_texts), len(probe))))
    short = probe.subset(chosen).shortened(settings.sweep_tokens)
    effects = exact_effect(model, short, [(int(t),) for t in words], 0, batch_rows=2048, counter=counter, stage="sweep", objective=objective)
    out: dict[int, list[tuple[int, ...]]] = {}
    for target in range(num_labels if objective == "class" else 1):
        if objective == "class":
            others = predicted[chosen] != target
            if not others.any():
                continue
            values = [float(e.probs[others, target].mean()) for e in effects]
        else:
            values = [e.value for e in effects]
        order = np.lexsort((np.arange(len(effects)), -np.asarray(values)))[: settings.candidates_per_round]
        out[target] = [effects[i].tokens for i in order]
    return out


def phrase_text(tokenizer, tokens: tuple[int, ...]) -> str:
    """The text of the token ids ``tokens``, as the tokenizer writes them."""
    return tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(list(tokens))).strip()


def search_targets(model, tokenizer, probe: ProbeTexts, predicted: np.ndarray, num_labels: int, objective: str,
                   settings: "AuditSettings", counter: ForwardCounter, log=lambda message: None) -> list[tuple[TargetSearch, ProbeTexts]]:
    """The audit's search stage on ``model`` over the clean ``probe`` texts (``predicted``: the
    class the model gives each). :func:`vocabulary_sweep` over the whole-word tokens, then per
    target class (every class for ``objective`` ``class``; one search, target 0, for
    ``collapse``) a :class:`TargetSearch` on the texts predicted otherwise (every text for
    ``collapse``): up to ``search_texts`` of them (at most a third) to search on, the next
    ``holdout_texts`` kept for verification. Each search scores the sweep's candidates for its
    class, runs :meth:`TargetSearch.hotflip`, and unless its best single token is already
    ``saturated`` grows its ``phrase_starts`` best single tokens into phrases
    (:meth:`TargetSearch.grow`). A class with fewer than 8 such texts is not searched. ``log``
    gets one line per class.

    Returns, per class searched, the search (its scored candidates) and its held-out texts."""
    words, parts = candidate_vocabulary(tokenizer)
    swept = vocabulary_sweep(model, probe, predicted, num_labels, words, objective, settings, counter)
    searches: list[tuple[TargetSearch, ProbeTexts]] = []
    for target in (range(num_labels) if objective == "class" else [0]):
        others = [i for i in range(len(probe)) if predicted[i] != target or objective == "collapse"]
        if len(others) < 8:
            log(f"class {target}: fewer than 8 clean texts predicted otherwise; not searched")
            continue
        n_search = min(settings.search_texts, len(others) // 3)
        search_idx, holdout_idx = others[:n_search], others[n_search : n_search + settings.holdout_texts]
        search = TargetSearch(model, tokenizer.mask_token_id, target, probe.subset(search_idx), settings, words, parts, counter, objective)
        if swept is not None and target in swept:
            search.score(swept[target])
        search.hotflip()
        best_single = search.best(1)
        if best_single and best_single[0].value < settings.saturated:
            for start in search.best(1, settings.phrase_starts):
                search.grow(start.tokens)
        searches.append((search, probe.subset(holdout_idx)))
        what = f"class {target}" if objective == "class" else "representation collapse"
        log(f"{what}: {len(search.scored)} candidates scored; best {phrase_text(tokenizer, search.best(1)[0].tokens)!r} ({search.best(1)[0].value:.3f})")
    return searches
