"""ONNX Runtime recipes for the PSIM beyond dynamic int8, each timed against fp32 in the same run.

Issue 31 asks int8 scoring at 3.3x the fp32 ceiling (2.8x with dynamic quantisation on the machine that filed it).
This bench tries the recipes ONNX Runtime documents for BERT-like encoders on a CPU, on the
bench-serve PSIM (P-tuning on MiniLM), and records what each gives on this machine:

- ``fp32``: the export ``peftshield`` ships (``models.runtime.export_onnx``, torch's dynamo exporter);
- ``int8 dynamic``: what ``--runtime onnx-int8`` runs today (``models.runtime.quantize_int8``);
- ``int8 dynamic, per channel``: one weight scale per output channel;
- ``int8 static (QDQ / QOperator)``: activation scales calibrated on 256 clean SST-2 training
  texts (MinMax), MatMuls only;
- ``plain encoder``: the P-tuning virtual tokens computed once and fed as a constant, so the
  graph is a plain BERT on ``inputs_embeds`` (same logits), exported with torch's TorchScript
  exporter so that ORT's transformer optimizer can fuse it: ``fused`` (Attention, SkipLayerNorm,
  BiasGelu) in fp32, and dynamic int8 with and without the fusion.

The fp32 ceiling is bench-serve's (a torch fp32 matmul's rate times the PSIM's FLOPs per text). Beside it
this bench measures the **int8 ceiling**: ONNX Runtime's own ``MatMulInteger`` (uint8 x int8, int32
sums, the kernel dynamic quantisation runs) on the same 2048x384 @ 384x1536 shapes, on 2 threads. No
int8 recipe can score texts faster than every multiply-accumulate at that rate, so its ratio to the
fp32 matmul rate bounds what any recipe can reach here as a multiple of the fp32 ceiling.

Every variant scores the same texts (SST-2 test and its triggered copies, as bench-serve) in
length-sorted batches of 32 on 2 threads, best of 5 passes taken in interleaved rounds; flags are compared with fp32's at
the PSIM's threshold. Needs bench-serve's models (runs/serve-bench). Run with nothing else busy.

    .venv/bin/python bench/int8_recipes.py --shared ../shared/data   (make bench-int8)

Writes bench/int8_recipes.json and bench/int8_recipes.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import serve_load  # noqa: E402  (the texts and the CPU's fp32 ceiling, as bench-serve measures them)

ROOT = Path(__file__).resolve().parent.parent
BATCH = 32
ROUNDS = 5  # passes of every variant, interleaved


def encoded_batches(psim, texts: list[str]) -> list[dict[str, np.ndarray]]:
    """``texts`` in batches of :data:`BATCH`, tokenised as the PSIM reads them, as ONNX inputs."""
    batches = []
    for start in range(0, len(texts), BATCH):
        encoded = psim.tokenizer_(texts[start:start + BATCH], padding=True, truncation=True, max_length=psim.max_length, return_tensors="np")
        batches.append({"input_ids": encoded["input_ids"].astype(np.int64), "attention_mask": encoded["attention_mask"].astype(np.int64)})
    return batches


def plain_encoder_export(psim, path: Path) -> Path:
    """The P-tuning PSIM as a plain encoder: its virtual tokens computed once, fed as a constant
    before the texts' word embeddings (TorchScript exporter, which ORT's optimizer can fuse)."""
    import torch

    model = psim.model_.eval()
    prompts = model.get_prompt(batch_size=1).detach()
    inner = model.base_model

    class PlainEncoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner
            self.register_buffer("prompts", prompts)

        def forward(self, input_ids, attention_mask):
            rows = input_ids.shape[0]
            embeds = torch.cat([self.prompts.expand(rows, -1, -1), self.inner.bert.embeddings.word_embeddings(input_ids)], 1)
            mask = torch.cat([torch.ones(rows, self.prompts.shape[1], dtype=attention_mask.dtype), attention_mask], 1)
            return self.inner(inputs_embeds=embeds, attention_mask=mask).logits

    ids = torch.full((2, 8), 5, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(PlainEncoder().eval(), (ids, torch.ones_like(ids)), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], dynamic_axes={"input_ids": {0: "b", 1: "l"}, "attention_mask": {0: "b", 1: "l"}, "logits": {0: "b"}},
                          dynamo=False, opset_version=17)
    return path


def build_variants(psim, folder: Path, calibration_texts: list[str]) -> tuple[dict[str, Path], dict[str, int]]:
    """Each recipe's graph in ``folder``, and the fusions ORT's optimizer made in the plain encoder."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.transformers import optimizer

    from peftshield.models.runtime import export_onnx, quantize_int8, without_traced_shapes

    untyped = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    fp32 = export_onnx(psim.model_, folder / "fp32.onnx")
    variants = {"fp32": fp32, "int8 dynamic": quantize_int8(fp32, folder / "int8.onnx")}
    without_traced_shapes(fp32, folder / "bare.onnx")
    quantize_dynamic(str(folder / "bare.onnx"), str(folder / "int8-pc.onnx"), weight_type=QuantType.QInt8, per_channel=True, extra_options=untyped)
    variants["int8 dynamic, per channel"] = folder / "int8-pc.onnx"

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(encoded_batches(psim, calibration_texts))

        def get_next(self):
            return next(self.batches, None)

    for name, fmt in (("int8 static, QDQ", QuantFormat.QDQ), ("int8 static, QOperator", QuantFormat.QOperator)):
        target = folder / f"static-{fmt.name}.onnx"
        quantize_static(str(folder / "bare.onnx"), str(target), Batches(), quant_format=fmt, op_types_to_quantize=["MatMul"],
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax, extra_options=untyped)
        variants[name] = target
    plain = plain_encoder_export(psim, folder / "plain.onnx")
    variants["plain encoder, fp32"] = plain
    config = psim.model_.config
    fused = optimizer.optimize_model(str(plain), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size, opt_level=1)
    fused.save_model_to_file(str(folder / "plain-fused.onnx"))
    variants["plain encoder, fused, fp32"] = folder / "plain-fused.onnx"
    quantize_dynamic(str(plain), str(folder / "plain-int8.onnx"), weight_type=QuantType.QInt8, extra_options=untyped)
    variants["plain encoder, int8 dynamic"] = folder / "plain-int8.onnx"
    quantize_dynamic(str(folder / "plain-fused.onnx"), str(folder / "plain-fused-int8.onnx"), weight_type=QuantType.QInt8, extra_options=untyped)
    variants["plain encoder, fused, int8 dynamic"] = folder / "plain-fused-int8.onnx"
    fusions = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
    return variants, fusions


def timed(variants: dict[str, Path], batches: list[dict], texts: int, rounds: int) -> dict[str, tuple[float, np.ndarray]]:
    """Each variant's best texts/s over ``rounds`` passes and its logits. The rounds interleave the
    variants (one pass of each per round), so a machine that slows down or speeds up during the
    run (a shared host, a clock) does not favour whichever recipe ran first."""
    import onnxruntime as ort

    sessions = {}
    for name, path in variants.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.log_severity_level = 3
        sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for batch in batches[:2]:
            sessions[name].run(["logits"], batch)
    best = {name: 0.0 for name in sessions}
    logits = {}
    for _ in range(rounds):
        for name, session in sessions.items():
            started = time.perf_counter()
            logits[name] = np.concatenate([session.run(["logits"], batch)[0] for batch in batches])
            best[name] = max(best[name], texts / (time.perf_counter() - started))
    return {name: (best[name], logits[name]) for name in sessions}


def int8_matmul_gops(repeats: int = 30, rounds: int = 3) -> float:
    """ONNX Runtime's ``MatMulInteger`` rate (uint8 x int8 -> int32) on 2 threads, in GOP/s (2 ops per
    multiply-accumulate, as GFLOP/s counts them), best of ``rounds``: the int8 ceiling of this CPU."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rows, inner, columns = 2048, 384, 1536
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.integers(-127, 128, (inner, columns), dtype=np.int8), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "int8_matmul",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [rows, inner])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [rows, columns])], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"a": rng.integers(0, 256, (rows, inner), dtype=np.uint8)}
    for _ in range(3):
        session.run(None, feed)
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            session.run(None, feed)
        best = max(best, 2 * rows * inner * columns * repeats / (time.perf_counter() - started) / 1e9)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--work", default=str(ROOT / "runs" / "serve-bench"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "int8_recipes"))
    args = parser.parse_args()
    from peftshield.data import load_splits
    from peftshield.defenses import PSIM
    from peftshield.io import atomic_write_json, atomic_write_text
    from peftshield.models.inference import softmax

    shared, psim_dir = Path(args.shared), Path(args.work) / "psim"
    if not (psim_dir / "finetune.json").is_file():
        raise SystemExit(f"{psim_dir}: no PSIM; run make bench-serve first")
    psim = PSIM.load(psim_dir)
    clean, triggered = serve_load.evaluation_texts(shared)
    texts = sorted(clean + triggered, key=len)
    triggered_set = set(triggered)
    is_triggered = np.array([t in triggered_set for t in texts])
    calibration = list(load_splits(str(shared / "psim/sst-2"), ("train",))["train"].texts[:256])
    batches = encoded_batches(psim, texts)
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="peftshield-int8-") as folder:
        variants, fusions = build_variants(psim, Path(folder), calibration)
        rows, reference = [], None
        for name, (rate, logits) in timed(variants, batches, len(texts), ROUNDS).items():
            scores = softmax(logits).max(axis=1)
            reference = scores if reference is None else reference
            rows.append({"recipe": name, "texts_per_s": round(rate, 1), "max_score_diff": float(np.abs(scores - reference).max()),
                         "flag_agreement": float(((scores > psim.threshold_) == (reference > psim.threshold_)).mean()),
                         "triggered_flagged": float((scores[is_triggered] > psim.threshold_).mean())})
    ceiling = serve_load.cpu_limit(psim_dir, rows[0]["texts_per_s"], shared)
    ceiling["matmul_gops_int8"] = round(int8_matmul_gops(), 1)
    ceiling["int8_over_fp32_matmul"] = round(ceiling["matmul_gops_int8"] / ceiling["matmul_gflops_fp32"], 2)
    for row in rows:
        row["times_fp32_ceiling"] = round(row["texts_per_s"] / ceiling["limit_texts_per_s_fp32"], 2)
    summary = {"date": time.strftime("%Y-%m-%d"), "texts": len(texts), "batch": BATCH, "threshold": psim.threshold_, "ceiling": ceiling,
               "fusions": fusions, "recipes": rows}
    atomic_write_json(Path(args.out + ".json"), summary)
    atomic_write_text(Path(args.out + ".md"), render(summary))
    print(render(summary))


def render(summary: dict) -> str:
    ceiling = summary["ceiling"]
    lines = [
        "# ONNX Runtime recipes for the PSIM beyond dynamic int8",
        "",
        f"Command: `make bench-int8` (= `.venv/bin/python bench/int8_recipes.py`), {summary['date']}, nothing else running. The bench-serve PSIM "
        f"(P-tuning on MiniLM) scores {summary['texts']} texts (SST-2 test and its triggered copies) in length-sorted batches of {summary['batch']} "
        f"on 2 threads, best of {ROUNDS} passes taken in interleaved rounds (one pass of every recipe per round). Flags compared with fp32's at the PSIM's threshold.",
        "",
        f"fp32 ceiling in this run: a 2048x384 @ 384x1536 matmul at {ceiling['matmul_gflops_fp32']} GFLOP/s, {ceiling['mflops_per_text']} MFLOPs "
        f"per text, so **{ceiling['limit_texts_per_s_fp32']} texts/s**. Fusions found in the plain encoder: "
        + ", ".join(f"{name} {count}" for name, count in summary["fusions"].items()) + ".",
        "",
        f"int8 ceiling in this run: ONNX Runtime's `MatMulInteger` (uint8 x int8) on the same shapes at {ceiling['matmul_gops_int8']} GOP/s, "
        f"**{ceiling['int8_over_fp32_matmul']:.2f}x** the fp32 matmul rate. A recipe whose every multiply-accumulate ran at that rate, with nothing "
        f"else to compute, would score {ceiling['int8_over_fp32_matmul']:.2f}x the fp32 ceiling; no int8 recipe can do more on this CPU.",
        "",
        "| recipe | texts/s | x fp32 ceiling | max score diff | flag agreement | triggered flagged |",
        "|---|---|---|---|---|---|",
        *[f"| {r['recipe']} | {r['texts_per_s']:.0f} | {r['times_fp32_ceiling']:.2f} | {r['max_score_diff']:.2e} | {r['flag_agreement']:.4f} | "
          f"{r['triggered_flagged']:.4f} |" for r in summary["recipes"]],
        "",
    ]
    best = max(summary["recipes"], key=lambda r: r["texts_per_s"])
    lines += [f"Fastest here: **{best['recipe']}** at {best['times_fp32_ceiling']:.2f}x the fp32 ceiling (issue 31 asks 3.3x), "
              f"{best['times_fp32_ceiling'] / ceiling['int8_over_fp32_matmul']:.0%} of what this CPU's int8 matmul rate allows "
              f"({ceiling['int8_over_fp32_matmul']:.2f}x).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
