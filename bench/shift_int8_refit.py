"""Can Shift run int8 if it is fitted on int8 states? An experiment, nothing shipped.

bench/shift_runtimes.md shows that Shift fitted on fp32 states and scored through a dynamic
int8 graph flags every clean text: quantisation noise is far larger than the clean left-over
Shift measures. Here Shift's statistics are fitted on the states the int8 graph itself gives,
so that its noise is part of the clean left-over. Both encoders (the served backbone of
runs/serve-bench and MiniLM, its original) are exported as one graph that outputs every layer's
token states, once fp32 and once with ONNX Runtime's dynamic int8; with each, the same recipe as
``Shift.fit`` (ridge per layer, Ledoit-Wolf on what it leaves, layer z-scores, mean over layers,
threshold at 1% of clean calibration texts) on SST-2 train texts (fit and calibration halves
disjoint), then SST-2 test texts and their non-target half with the trigger scored in batches of
64. Writes bench/shift_int8_refit.{json,md}.

    .venv/bin/python bench/shift_int8_refit.py [--work runs/serve-bench] [--fit-texts 500] [--calibration-texts 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import serve_load  # noqa: E402  (the served models and the evaluation texts)

BATCH = 64


class PairStates(torch.nn.Module):
    """Every layer's token states of two encoders on the same input: (layers, batch, tokens, hidden) each."""

    def __init__(self, suspect, original) -> None:
        super().__init__()
        self.suspect, self.original = suspect, original

    def forward(self, input_ids, attention_mask):
        states = torch.stack(self.suspect(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[1:])
        originals = torch.stack(self.original(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[1:])
        return states, originals


def token_states(session, tokenizer, texts: list[str], max_length: int = 128):
    """Per batch of 64 (length-sorted): (indices, states, originals, keep) from ``session``."""
    from peftshield.models.batching import encode_texts, own_tokens, pad_rows, sorted_batches

    encoded = encode_texts(tokenizer, texts, max_length)
    for indices in sorted_batches(encoded.lengths(), BATCH):
        ids, mask = pad_rows(encoded, indices)
        states, originals = session.run(["states", "originals"], {"input_ids": ids, "attention_mask": mask})
        yield indices, states, originals, own_tokens(tokenizer, ids, mask)


def fit_and_score(session, tokenizer, fit: list[str], calibration: list[str], evaluated: list[str], rng: np.random.Generator) -> tuple[np.ndarray, float]:
    from sklearn.covariance import LedoitWolf
    from sklearn.linear_model import Ridge

    states, originals = [], []
    for _, s, o, keep in token_states(session, tokenizer, fit):
        states.append(s[:, keep])
        originals.append(o[:, keep])
    states, originals = np.concatenate(states, axis=1), np.concatenate(originals, axis=1)
    if states.shape[1] > 20000:
        chosen = np.sort(rng.choice(states.shape[1], 20000, replace=False))
        states, originals = states[:, chosen], originals[:, chosen]
    layers = []
    for s, o in zip(states.astype(np.float64), originals.astype(np.float64)):
        ridge = Ridge(alpha=10.0).fit(o, s - o)
        left = LedoitWolf().fit(s - o - ridge.predict(o))
        layers.append((ridge.coef_.T, ridge.intercept_, left.location_, left.precision_))

    def distances(texts: list[str]) -> np.ndarray:
        out = np.zeros((len(layers), len(texts)))
        for indices, s, o, keep in token_states(session, tokenizer, texts):
            for layer, (coefficient, intercept, location, precision) in enumerate(layers):
                original = o[layer].astype(np.float64)
                left_over = s[layer] - original - (original @ coefficient + intercept) - location
                squared = ((left_over @ precision) * left_over).sum(axis=-1)
                out[layer, indices] = (squared * keep).sum(axis=1) / np.maximum(keep.sum(axis=1), 1)
        return out

    calibration_distances = distances(calibration)
    mean, std = calibration_distances.mean(axis=1), calibration_distances.std(axis=1) + 1e-9
    calibration_scores = ((calibration_distances - mean[:, None]) / std[:, None]).mean(axis=0)
    threshold = float(np.quantile(calibration_scores, 0.99))
    return ((distances(evaluated) - mean[:, None]) / std[:, None]).mean(axis=0), threshold


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/serve-bench")
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--fit-texts", type=int, default=500)
    parser.add_argument("--calibration-texts", type=int, default=1000)
    parser.add_argument("--out", default="bench/shift_int8_refit")
    args = parser.parse_args()
    from sklearn.metrics import roc_auc_score

    from peftshield.data import load_splits
    from peftshield.io import atomic_write_json, atomic_write_text
    from peftshield.models import load_backbone
    from peftshield.models.runtime import export_graph, onnx_session, without_traced_shapes

    work, shared = Path(args.work), Path(args.shared).resolve()
    if not (work / "backbone" / "config.json").is_file():
        raise SystemExit(f"{work}: run 'make bench-serve' first (it builds the models)")
    suspect, original = load_backbone(str(work / "backbone"), 2), load_backbone("minilm", 2)
    scratch = work / "shift-int8-refit"
    scratch.mkdir(exist_ok=True)
    fp32 = export_graph(PairStates(suspect.model.base_model, original.model.base_model), scratch / "pair.onnx", ["states", "originals"])
    from onnxruntime.quantization import QuantType, quantize_dynamic

    bare = without_traced_shapes(fp32, scratch / "pair.bare.onnx")
    quantize_dynamic(str(bare), str(scratch / "pair.int8.onnx"), weight_type=QuantType.QInt8)
    rng = np.random.default_rng(0)
    train = load_splits(str(shared / "psim/sst-2"), ("train",))["train"]
    chosen = rng.permutation(len(train.texts))[: args.fit_texts + args.calibration_texts]
    fit, calibration = [train.texts[i] for i in chosen[: args.fit_texts]], [train.texts[i] for i in chosen[args.fit_texts:]]
    clean, triggered = serve_load.evaluation_texts(shared)
    labels = np.r_[np.zeros(len(clean)), np.ones(len(triggered))]
    rows = []
    for name, path in (("fp32 states", fp32), ("int8 states", scratch / "pair.int8.onnx")):
        started = time.perf_counter()
        scores, threshold = fit_and_score(onnx_session(path), suspect.tokenizer, fit, calibration, clean + triggered, np.random.default_rng(0))
        flags = scores > threshold
        rows.append({"states": name, "auroc": float(roc_auc_score(labels, scores)), "clean_flagged": float(flags[: len(clean)].mean()),
                     "triggered_flagged": float(flags[len(clean):].mean()), "seconds": round(time.perf_counter() - started, 1)})
        print(rows[-1], flush=True)
    summary = {"date": time.strftime("%Y-%m-%d"), "fit_texts": len(fit), "calibration_texts": len(calibration), "clean": len(clean),
               "triggered": len(triggered), "rows": rows}
    atomic_write_json(Path(args.out + ".json"), summary)
    lines = ["# Shift fitted on int8 states: an experiment", "",
             f"Command: `make bench-shift-int8-refit` (= `.venv/bin/python bench/shift_int8_refit.py`), {summary['date']}, one seed, one backbone. Shift's recipe fitted on {len(fit)} SST-2 train texts and "
             f"calibrated (1% of clean scores) on {len(calibration)} others, each time on the token states of the graph it is then scored with "
             "(both encoders in one graph, fp32 or ONNX Runtime's dynamic int8; the distances in numpy); "
             f"scored on {len(clean)} SST-2 test texts and {len(triggered)} with the trigger 'mn' (batches of {BATCH}). Nothing shipped.", "",
             "| states fitted and scored on | AUROC clean vs triggered | clean flagged | triggered flagged | seconds (fit and score) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['states']} | {r['auroc']:.4f} | {r['clean_flagged']:.2%} | {r['triggered_flagged']:.2%} | {r['seconds']} |" for r in rows]
    atomic_write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
