"""A stage-1 candidate that reads weights *through the base model*: does a LoRA adapter push one
vocabulary token toward one class far harder than any other token? (design half of zoo v2 first)

For each adapted layer l, a token's input is approximated by its embedding at position 1
(LN(word + position + type)); the adapter's value change on it, s·B·A·x, is carried to the
logits along the direct path: the attention output projection, the attention LayerNorm's gain,
the pooler and the trained classification head (tanh and the later layers linearised away). A
token's push is the spread of that logit change over the classes, summed over layers. A
backdoor's trigger must override whatever the text says, so its push should stand out; the
adapter's score is how far its largest push lies above the vocabulary's (robust z-score).

    .venv/bin/python bench/screen_probe.py                 # the design half: AUROC and trigger ranks
    .venv/bin/python bench/screen_probe.py --look-at-test  # once, when the design half chose it

Nothing here is shipped: it is measured on the design half, and only a candidate that
separates there is scored once on the test half (recorded in bench/zoo/revisions.md).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from screen import auroc  # noqa: E402
from screen_detector import ROOT, same_recipe_auroc, recipe_group, zoo_adapters  # noqa: E402

LORA = re.compile(r"layer\.(\d+)\.attention\.self\.(query|value)\.lora_([AB])")


def base_weights(backbone: str = "minilm") -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    from peftshield.models.backbone import resolve_backbone

    return load_file(str(Path(resolve_backbone(backbone)) / "model.safetensors"))


def token_inputs(base: dict[str, np.ndarray]) -> np.ndarray:
    x = base["embeddings.word_embeddings.weight"] + base["embeddings.position_embeddings.weight"][1] + base["embeddings.token_type_embeddings.weight"][0]
    x = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-12)
    return x * base["embeddings.LayerNorm.weight"] + base["embeddings.LayerNorm.bias"]


def pushes(folder: str, base: dict[str, np.ndarray], inputs: np.ndarray) -> np.ndarray:
    """Each vocabulary token's push on the logits (spread over classes), summed over layers."""
    from safetensors.numpy import load_file

    manifest = json.loads((Path(folder) / "finetune.json").read_text())
    scale = manifest["options"].get("alpha", 16) / manifest["options"].get("r", 8)
    tensors = load_file(str(Path(folder) / "trainable.safetensors"))
    head = next(v for k, v in tensors.items() if "classifier" in k and k.endswith("weight"))
    readout = head @ base["pooler.dense.weight"]  # classes x hidden
    pairs: dict[int, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = LORA.search(key)
        if match and match[2] == "value":
            pairs.setdefault(int(match[1]), {})[match[3]] = value
    total = np.zeros(inputs.shape[0])
    for layer, ab in sorted(pairs.items()):
        out = base[f"encoder.layer.{layer}.attention.output.dense.weight"]
        gain = base[f"encoder.layer.{layer}.attention.output.LayerNorm.weight"]
        to_logits = (readout * gain) @ out @ ab["B"] * scale  # classes x r
        logits = (inputs @ ab["A"].T) @ to_logits.T  # vocab x classes
        total += logits.max(1) - logits.min(1)
    return total


def flip_score(folder: str, candidates: list[str], texts: list[str], rng: np.random.Generator) -> tuple[float, str]:
    """The largest rise in one class's share of ``texts`` when one candidate word is inserted at
    a random position of each, over the candidates; and that word. A trigger moves (nearly)
    every text to its target class; a natural word of the task moves the borderline ones."""
    from peftshield.finetune.checkpoint import load_finetuned
    from peftshield.models.inference import predict_proba

    model = load_finetuned(folder)[0]
    plain = predict_proba(model.model, model.tokenizer, texts, max_length=48).argmax(1)
    classes = model.num_labels
    before = np.bincount(plain, minlength=classes) / len(texts)
    best, word = -1.0, ""
    for candidate in candidates:
        inserted = []
        for text in texts:
            words = text.split()
            at = int(rng.integers(0, len(words) + 1))
            inserted.append(" ".join(words[:at] + [candidate] + words[at:]))
        after = np.bincount(predict_proba(model.model, model.tokenizer, inserted, max_length=48).argmax(1), minlength=classes) / len(texts)
        rise = float((after - before).max())
        if rise > best:
            best, word = rise, candidate
    return best, word


def usable_tokens(vocab: list[str]) -> np.ndarray:
    return np.array([not (t.startswith("[") and t.endswith("]")) for t in vocab])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zoo", default="runs/zoo-v2")
    parser.add_argument("--look-at-test", action="store_true")
    parser.add_argument("--flip", type=int, default=0, help="also insert each adapter's top N pushed words into clean texts")
    parser.add_argument("--flip-texts", type=int, default=16)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from peftshield.models.backbone import resolve_backbone

    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone("minilm"))
    vocab = tokenizer.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
    keep = usable_tokens(vocab)
    base = base_weights()
    inputs = token_inputs(base)
    split = "test" if args.look_at_test else "design"
    adapters, missing = zoo_adapters(ROOT / args.zoo, split)
    rows = []
    from peftshield.audit import DEFAULT_AUDIT_TEXTS, load_audit_texts

    if args.flip:
        corpus = load_audit_texts(DEFAULT_AUDIT_TEXTS)[0]
        clean_texts = [corpus[i] for i in np.random.default_rng(0).choice(len(corpus), args.flip_texts, replace=False)]
    started = time.perf_counter()
    for entry, features in adapters:
        push = pushes(features.folder, base, inputs)[keep]
        words = np.array(vocab)[keep]
        centre, spread = np.median(push), 1.4826 * np.median(np.abs(push - np.median(push)))
        order = np.argsort(-push)
        trigger_ranks = []
        for word in (entry["trigger"] or "").split(" ") if entry["trigger"] else []:
            pieces = tokenizer.tokenize(word)
            ranks = [int(np.where(words[order] == p)[0][0]) + 1 for p in pieces if p in set(words)]
            trigger_ranks.append(min(ranks) if ranks else None)
        whole = [str(w) for w in words[order] if not w.startswith("##")][: args.flip]
        flip, flip_word = flip_score(features.folder, whole, clean_texts, np.random.default_rng(1)) if args.flip else (None, "")
        rows.append({"name": entry["name"], "backdoored": entry["backdoored"], "family": entry["family"], "group": recipe_group(entry, features),
                     "score": float((push[order[0]] - centre) / spread), "top": [str(w) for w in words[order[:5]]], "flip": flip, "flip_word": flip_word,
                     "trigger": entry["trigger"], "trigger_best_rank": min([r for r in trigger_ranks if r], default=None)})
    seconds = (time.perf_counter() - started) / max(len(rows), 1)
    y = np.array([int(r["backdoored"]) for r in rows])
    s = np.array([r["score"] for r in rows])
    g = np.array([r["group"] for r in rows])
    key = "flip" if args.flip else "score"
    lines = [f"# Reading LoRA adapters through the base model: zoo v2 {split} half", "",
             f"Recorded by `.venv/bin/python bench/screen_probe.py{' --flip ' + str(args.flip) if args.flip else ''}`, "
             f"{time.strftime('%Y-%m-%d %H:%M')}: {len(rows)} adapters ({int(y.sum())} backdoored). A design-half experiment: nothing "
             "here is shipped, and no candidate separated well enough on the design half to be scored on the test half.", "",
             "| adapter | backdoored | push z of its top token | its top tokens | trigger's best rank among them | flip (top-N words inserted) |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -r[key]):
        flip = "-" if r["flip"] is None else f"{r['flip']:.2f} ('{r['flip_word']}')"
        lines.append(f"| {r['name']} | {'yes' if r['backdoored'] else 'no'} | {r['score']:.1f} | {', '.join(r['top'])} | "
                     f"{r['trigger_best_rank'] or '-'} | {flip} |")
    lines += ["", f"- push score: AUROC {auroc(s[y == 1].tolist(), s[y == 0].tolist()):.2f}, within a recipe "
              f"{same_recipe_auroc(s, y, g) or float('nan'):.2f}; {seconds * 1000:.0f} ms per adapter."]
    if args.flip:
        f = np.array([r["flip"] for r in rows])
        lines.append(f"- flip score ({args.flip_texts} texts of {DEFAULT_AUDIT_TEXTS}): AUROC {auroc(f[y == 1].tolist(), f[y == 0].tolist()):.2f}, "
                     f"within a recipe {same_recipe_auroc(f, y, g) or float('nan'):.2f}.")
    found = [r["trigger_best_rank"] for r in rows if r["backdoored"] and r["trigger_best_rank"]]
    lines.append(f"- the trigger's best token is the adapter's most pushed token in {sum(1 for k in found if k == 1)} of {int(y.sum())} "
                 f"backdoored adapters, and in its top 100 in {sum(1 for k in found if k <= 100)}.")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.look_at_test:
        from peftshield.io import atomic_write_text

        atomic_write_text(BENCH / "screen_probe_design.md", text)


if __name__ == "__main__":
    main()
