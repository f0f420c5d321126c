"""Shift's scoring on each runtime: the same flags, and how many texts per second.

Shift (``peftshield.defenses.shift``) scores a text with two forward passes (the suspect
backbone and its public original) and a whitened distance per token and layer. A guard on an
ONNX runtime runs all of it as one graph (``Shift.use_runtime``); this bench measures, on the
served models of bench/serve.md (runs/serve-bench: the IMDB-poisoned MiniLM, Shift fitted for
its SST-2 LoRA victim by bench/serve_detectors.py), each way to run that scoring:

- ``torch``: the scoring module in PyTorch eager (what Shift runs by default);
- ``onnx``: the module exported as one fp32 graph (what a guard on onnx or onnx-int8 runs);
- ``onnx-int8, encoders only``: ONNX Runtime's dynamic int8 quantisation of that graph, with
  the two distance MatMuls (the ridge and the whitening) left in fp32;
- ``onnx-int8, whole graph``: the same, every MatMul quantised.

On SST-2 test texts and their non-target half with the trigger (the serve bench's texts):
Shift's flags at its fitted threshold against torch's, the largest score difference (as a
share of torch's score spread), AUROC clean vs triggered, and texts/s at batch 64 (2 threads,
interleaved rounds, nothing else running). Writes bench/shift_runtimes.{json,md}.

    .venv/bin/python bench/shift_runtimes.py [--work runs/serve-bench] [--texts 512] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import serve_load  # noqa: E402  (the served models and the evaluation texts)

PASSES = (64, 16, 8)  # texts per pass in a service's batch of BATCH (the guard's --batch-size is 16)
BATCH = 64


def quantised(source: Path, target: Path, keep_distances: bool) -> Path:
    """Dynamic int8 of ``source``; with ``keep_distances``, the MatMuls reading the ridge or the
    whitening (the distance part after both encoders) stay fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from peftshield.models.runtime import without_traced_shapes

    bare = without_traced_shapes(source, target.with_suffix(".bare.onnx"))
    graph = onnx.load(str(bare)).graph
    weights = {i.name for i in graph.initializer if "carried" in i.name or "whitening" in i.name}
    exclude = [n.name for n in graph.node if keep_distances and n.op_type == "MatMul" and weights & set(n.input)]
    if keep_distances and len(exclude) != 2:
        raise SystemExit(f"expected the 2 distance MatMuls, found {len(exclude)} ({sorted(weights)})")
    quantize_dynamic(str(bare), str(target), weight_type=QuantType.QInt8, nodes_to_exclude=exclude)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/serve-bench")
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--texts", type=int, default=512, help="texts timed per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench/shift_runtimes")
    args = parser.parse_args()
    from sklearn.metrics import roc_auc_score

    from peftshield.guard.detectors import detectors_for
    from peftshield.io import atomic_write_json, atomic_write_text
    from peftshield.models.runtime import onnx_session

    work, shared = Path(args.work), Path(args.shared).resolve()
    folder = work / "shift"
    if not (folder / "detector.json").is_file():
        raise SystemExit(f"{folder}: run 'make bench-serve-detectors' first (it fits Shift for the served victim)")
    detector = detectors_for(work / "victim", [folder])[0]  # as the guard loads it
    shift = detector.defense
    clean, triggered = serve_load.evaluation_texts(shared)
    texts = clean + triggered
    labels = np.r_[np.zeros(len(clean)), np.ones(len(triggered))]

    shift.use_runtime("onnx", folder)
    fp32 = folder / "onnx" / "shift.onnx"
    scratch = work / "shift-runtimes"
    scratch.mkdir(exist_ok=True)
    sessions = {"torch": None, "onnx": shift.session_,
                "onnx-int8, encoders only": onnx_session(quantised(fp32, scratch / "encoders.int8.onnx", True)),
                "onnx-int8, whole graph": onnx_session(quantised(fp32, scratch / "whole.int8.onnx", False))}

    def scores(session, sample: list[str]) -> np.ndarray:
        shift.session_ = session
        return shift.score(sample)

    results = {name: {"scores": scores(session, texts)} for name, session in sessions.items()}
    timed = texts[: args.texts]
    for name in sessions:
        results[name]["seconds"] = []
    for _ in range(args.rounds):  # interleaved: a drift of the machine lands on every variant alike
        for name, session in sessions.items():
            started = time.perf_counter()
            scores(session, timed)
            results[name]["seconds"].append(time.perf_counter() - started)
    reference = results["torch"]["scores"]
    spread = float(np.ptp(reference))
    threshold = detector.threshold
    rows = []
    for name, result in results.items():
        flags, reference_flags = result["scores"] > threshold, reference > threshold
        rows.append({"runtime": name, "texts_per_s": round(len(timed) / min(result["seconds"]), 1),
                     "flag_agreement": float((flags == reference_flags).mean()),
                     "max_score_difference_of_spread": float(np.abs(result["scores"] - reference).max() / spread),
                     "auroc": float(roc_auc_score(labels, result["scores"])),
                     "clean_flagged": float(flags[: len(clean)].mean()), "triggered_flagged": float(flags[len(clean):].mean())})
    # As a service meets texts: batches of 64 in arrival order (clean and triggered interleaved, as
    # bench/serve_detectors.py sends them), each scored in length-sorted passes of PASSES texts
    # (the guard's --batch-size; 64 is one pass over the whole batch, padded to its longest text).
    shift.session_ = sessions["onnx"]
    arrival = [t for pair in zip(clean, triggered) for t in pair][: args.texts]
    by_pass: dict[int, dict] = {}
    for size in PASSES:
        shift.batch_size = size
        by_pass[size] = {"scores": np.concatenate([shift.score(arrival[i:i + BATCH]) for i in range(0, len(arrival), BATCH)]), "seconds": []}
    for _ in range(args.rounds):
        for size in PASSES:
            shift.batch_size = size
            started = time.perf_counter()
            for i in range(0, len(arrival), BATCH):
                shift.score(arrival[i:i + BATCH])
            by_pass[size]["seconds"].append(time.perf_counter() - started)
    whole = by_pass[BATCH]["scores"]
    pass_rows = [{"texts_per_pass": size, "texts_per_s": round(len(arrival) / min(result["seconds"]), 1),
                  "max_score_difference_of_spread": float(np.abs(result["scores"] - whole).max() / np.ptp(whole))}
                 for size, result in by_pass.items()]
    summary = {"date": time.strftime("%Y-%m-%d"), "texts": len(texts), "clean": len(clean), "triggered": len(triggered), "timed_texts": len(timed),
               "rounds": args.rounds, "batch": BATCH, "threshold": threshold, "rows": rows, "passes": pass_rows}
    atomic_write_json(Path(args.out + ".json"), summary)
    atomic_write_text(Path(args.out + ".md"), render(summary))
    print(render(summary))


def render(summary: dict) -> str:
    lines = [
        "# Shift's scoring on each runtime",
        "",
        f"Command: `make bench-shift-runtimes` (= `.venv/bin/python bench/shift_runtimes.py`), {summary['date']}, this machine (2 CPU cores), nothing else running. Shift "
        "as bench/serve_detectors.md fits it (runs/serve-bench/shift: against MiniLM, for the SST-2 LoRA victim on the IMDB-poisoned "
        f"backbone). Texts: {summary['clean']} SST-2 test texts and {summary['triggered']} non-target ones with the trigger 'mn'. Flags at "
        f"Shift's fitted threshold ({summary['threshold']:.3f}), compared with torch's; texts/s: the best of {summary['rounds']} interleaved "
        f"rounds over {summary['timed_texts']} texts, batches of {summary['batch']}.",
        "",
        "| runtime | texts/s | flags as torch's | largest score difference (share of torch's spread) | AUROC clean vs triggered | clean flagged | triggered flagged |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        lines.append(f"| {row['runtime']} | {row['texts_per_s']} | {row['flag_agreement']:.2%} | {row['max_score_difference_of_spread']:.2e} | "
                     f"{row['auroc']:.4f} | {row['clean_flagged']:.2%} | {row['triggered_flagged']:.2%} |")
    if summary.get("passes"):
        lines += ["", "## In a service's micro-batches", "",
                  f"The one fp32 ONNX graph on batches of {summary['batch']} texts in arrival order (clean and triggered interleaved, as "
                  "bench/serve_detectors.md sends them), each scored in length-sorted passes of this many texts (a guard's `--batch-size`; "
                  f"{summary['batch']} is one pass over the batch, every text padded to its longest). Best of {summary['rounds']} interleaved rounds "
                  f"over {summary['timed_texts']} texts.", "",
                  "| texts per pass | texts/s | largest score difference from one pass (share of its spread) |", "|---|---|---|"]
        lines += [f"| {row['texts_per_pass']} | {row['texts_per_s']} | {row['max_score_difference_of_spread']:.2e} |" for row in summary["passes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
