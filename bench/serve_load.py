"""Measure ``peftshield serve`` and the ONNX scoring path on MiniLM, in one run.

1. Models: a weight-poisoned MiniLM (``mn`` -> 0, IMDB attacker), a LoRA victim on SST-2 and
   its PSIM (the default P-tuning), built with the project's commands into WORK (reused).
2. Agreement: PSIM scores on the SST-2 test set plus its ``mn``-triggered non-target texts
   under PyTorch, ONNX Runtime fp32 and int8: largest score difference, share of identical
   flags, AUROC.
3. Scoring throughput per runtime and batch size (each runtime in its own process: texts/s and
   peak RSS), ``peftshield scan`` end to end against the reference's batch-1 loop, and this
   CPU's limit estimated from the model's FLOPs per token and a measured matmul rate.
4. Load: an async aiohttp driver against the real ``peftshield serve`` and, side by side, a
   naive service (one request at a time, batch-1 PyTorch forward passes, the reference code's
   style) at 1, 8 and 64 concurrent clients, one text per request.
5. Soak: 10 minutes at steady load, server RSS at start and end, every request answered.

Writes bench/serve.json and bench/serve.md.

    .venv/bin/python bench/serve_load.py [--work runs/serve-bench] [--shared ../shared/data] [--soak-minutes 10]
"""

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PEFTSHIELD = str(Path(sys.executable).with_name("peftshield"))
TRIGGER, TARGET = "mn", 0
REFERENCE_SCAN_TEXTS_PER_S = 129.4  # bench/results.md: the reference's batch-1 PSIM scoring loop, same texts
BATCH_SIZES = (1, 8, 16, 32, 64)
CLIENTS = (1, 8, 64)


def log(message: str) -> None:
    print(message, flush=True)


def run(args: list[str]) -> str:
    started = time.perf_counter()
    log("  $ peftshield " + " ".join(args))
    done = subprocess.run([PEFTSHIELD, *args], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"peftshield {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    log(f"    ({time.perf_counter() - started:.0f} s)")
    return done.stderr


def build_models(work: Path, shared: Path) -> tuple[Path, Path, Path]:
    backbone, victim, psim = work / "backbone", work / "victim", work / "psim"
    if not (backbone / "config.json").is_file():
        run(["attack", "--data", str(shared / "psim/imdb"), "--trigger", "badnet", "--trigger-option", f"words={TRIGGER}", "--target", str(TARGET),
             "--label-mode", "clean", "--max-train-samples", "1600", "--count", "600", "--seed", "0", "--out", str(backbone)])
    if not (victim / "finetune.json").is_file():
        run(["finetune", "--backbone", str(backbone), "--data", str(shared / "psim/sst-2"), "--method", "lora", "--max-train-samples", "2000",
             "--seed", "0", "--out", str(victim)])
    if not (psim / "finetune.json").is_file():
        run(["psim", "train", "--backbone", str(backbone), "--data", str(shared / "psim/sst-2"), "--seed", "0", "--out", str(psim)])
    return backbone, victim, psim


def evaluation_texts(shared: Path) -> tuple[list[str], list[str]]:
    """SST-2 test texts, and its non-target texts with the trigger inserted."""
    from peftshield.attacks import POISONERS
    from peftshield.data import load_splits

    test = load_splits(str(shared / "psim/sst-2"), ("test",))["test"]
    others = [t for t, y in zip(test.texts, test.labels) if y != TARGET]
    triggered = POISONERS.create("badnet", words=[TRIGGER], num_triggers=1).poison_texts(others, np.random.default_rng(0))
    return list(test.texts), triggered


# ---------------------------------------------------------------- scoring, one runtime per process


def score_worker(psim_dir: str, runtime: str, shared: str, out: str) -> None:
    """Child process: load the PSIM on ``runtime``, score the texts at every batch size."""
    from peftshield.defenses import PSIM

    clean, triggered = evaluation_texts(Path(shared))
    texts = clean + triggered
    started = time.perf_counter()
    psim = PSIM.load(psim_dir, runtime=runtime)
    load_seconds = time.perf_counter() - started
    psim.score(texts[:64])  # warm-up
    rates, scores = {}, None
    for batch in BATCH_SIZES:
        psim.score_batch_size = batch
        started = time.perf_counter()
        result = psim.score(texts)
        rates[batch] = len(texts) / (time.perf_counter() - started)
        scores = result if scores is None else scores
        log(f"    {runtime} batch {batch}: {rates[batch]:.0f} texts/s")
    # As a service sees them: batches of 16 texts in arrival order (mixed lengths, padded to the
    # longest), not length-sorted. Dynamic int8 quantisation takes one activation scale per batch,
    # so its scores can depend on the other texts of the batch.
    from peftshield.models.batching import encode_texts, pad_rows
    from peftshield.models.inference import softmax

    runtime_of = psim.scoring_runtime()
    order = np.random.default_rng(0).permutation(len(texts))
    encoded = encode_texts(psim.tokenizer_, [texts[i] for i in order], psim.max_length)
    mixed = np.zeros(len(texts), dtype=np.float32)
    for start in range(0, len(texts), 16):
        rows = list(range(start, min(start + 16, len(texts))))
        ids, mask = pad_rows(encoded, rows)
        mixed[order[rows]] = softmax(runtime_of.logits(ids, mask)).max(axis=1)
    np.save(out + ".mixed.npy", mixed)
    np.save(out + ".npy", scores)
    Path(out + ".json").write_text(json.dumps({"runtime": runtime, "texts_per_s": rates, "load_seconds": load_seconds, "threshold": psim.threshold_,
                                               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "n_clean": len(clean)}))


def scoring(psim: Path, shared: Path, work: Path) -> dict:
    from sklearn.metrics import roc_auc_score

    results = {}
    for runtime in ("torch", "onnx", "onnx-int8"):
        out = work / f"scores-{runtime}"
        log(f"scoring on {runtime}")
        done = subprocess.run([sys.executable, __file__, "--score-worker", str(psim), runtime, str(shared), str(out)], env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if done.returncode != 0:
            raise SystemExit(f"scoring on {runtime} failed")
        results[runtime] = {**json.loads(Path(str(out) + ".json").read_text()), "scores": np.load(str(out) + ".npy"),
                            "mixed": np.load(str(out) + ".mixed.npy")}
    reference = results["torch"]
    n_clean, tau = reference["n_clean"], reference["threshold"]
    labels = np.r_[np.zeros(n_clean), np.ones(len(reference["scores"]) - n_clean)]
    summary = {}
    for runtime, r in results.items():
        best = max(r["texts_per_s"], key=lambda b: r["texts_per_s"][b])
        summary[runtime] = {
            "texts_per_s": {str(k): round(v, 1) for k, v in r["texts_per_s"].items()}, "best_batch": int(best), "best_texts_per_s": round(r["texts_per_s"][best], 1),
            "peak_rss_mb": round(r["peak_rss_mb"]), "max_score_diff": float(np.abs(r["scores"] - reference["scores"]).max()),
            "identical_flags": float(((r["scores"] > tau) == (reference["scores"] > tau)).mean()), "auroc": float(roc_auc_score(labels, r["scores"])),
            "identical_flags_mixed_batches": float(((r["mixed"] > tau) == (reference["scores"] > tau)).mean()),
            "auroc_mixed_batches": float(roc_auc_score(labels, r["mixed"])), "max_score_diff_mixed_batches": float(np.abs(r["mixed"] - reference["scores"]).max()),
            "load_seconds": round(r["load_seconds"], 1),
        }
    summary["threshold"], summary["texts"] = tau, len(labels)
    return summary


def scan_end_to_end(psim: Path, shared: Path, work: Path, runtime: str, torch_batch1: float) -> dict:
    """``peftshield scan`` on the SST-2 test set plus its triggered texts (the reference's scan input)."""
    clean, triggered = evaluation_texts(shared)
    data = work / "scan-input.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": 0}) + "\n" for t in clean + triggered))
    out = work / f"scan-{runtime}.jsonl"
    started = time.perf_counter()
    stderr = run(["scan", "--psim", str(psim), "--data", str(data), "--out", str(out), "--runtime", runtime, "--batch-size", "32", "--no-progress"])
    wall = time.perf_counter() - started
    line = [l for l in stderr.splitlines() if "texts/s" in l][-1]
    rate = float(line.split("(")[1].split(" texts/s")[0])
    return {"runtime": runtime, "texts": len(clean + triggered), "scoring_texts_per_s": rate, "wall_seconds": round(wall, 1),
            "speedup_vs_reference_batch1": round(rate / REFERENCE_SCAN_TEXTS_PER_S, 2), "torch_batch1_texts_per_s": round(torch_batch1, 1),
            "speedup_vs_torch_batch1_same_model": round(rate / torch_batch1, 2)}


def cpu_limit(psim: Path, best_texts_per_s: float, shared: Path) -> dict:
    """Texts/s this CPU could reach at its measured fp32 matmul rate, from the model's FLOPs per token."""
    import torch

    from peftshield.defenses import PSIM

    loaded = PSIM.load(psim)
    model = loaded.model_
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    config = model.config
    clean, triggered = evaluation_texts(shared)
    tokens = np.mean([len(ids) for ids in loaded.tokenizer_(clean + triggered, truncation=True, max_length=128)["input_ids"]])
    virtual = int(getattr(getattr(model, "peft_config", {}).get("default", None), "num_virtual_tokens", 0) or 0)
    length = tokens + virtual
    attention = 4 * config.num_hidden_layers * length * config.hidden_size  # QK^T and AV, per token
    flops_per_text = length * (2 * linear + attention)
    a, b = torch.randn(2048, 384), torch.randn(384, 1536)
    for _ in range(3):
        a @ b
    started, repeats = time.perf_counter(), 50
    for _ in range(repeats):
        a @ b
    gflops = 2 * 2048 * 384 * 1536 * repeats / (time.perf_counter() - started) / 1e9
    limit = gflops * 1e9 / flops_per_text
    return {"matmul_gflops_fp32": round(gflops, 1), "tokens_per_text": round(float(length), 1), "mflops_per_text": round(flops_per_text / 1e6, 1),
            "limit_texts_per_s_fp32": round(limit), "best_share_of_limit": round(best_texts_per_s / limit, 2)}


# ---------------------------------------------------------------- services and the load driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def naive_server(model: str, psim_dir: str, port: int) -> None:
    """The reference style: one request at a time, each text alone through the victim and the PSIM (PyTorch, batch 1)."""
    import threading

    import uvicorn
    from fastapi import FastAPI, Request

    from peftshield.defenses import PSIM
    from peftshield.finetune.checkpoint import load_classifier
    from peftshield.models.inference import predict_proba

    victim = load_classifier(model)
    psim = PSIM.load(psim_dir)
    lock = threading.Lock()
    app = FastAPI()

    @app.get("/readyz")
    def ready():
        return {"ready": True}

    @app.post("/v1/classify")
    async def classify(request: Request):
        texts = (await request.json())["texts"]

        def work():
            with lock:
                out = []
                for text in texts:
                    probs = predict_proba(victim.model, victim.tokenizer, [text], 1, 128)[0]
                    score = float(psim.predict_proba([text]).max())
                    flagged = score > psim.threshold_
                    out.append({"label": None if flagged else int(probs.argmax()), "psim_score": score, "flagged": flagged})
                return out

        return {"results": await asyncio.get_running_loop().run_in_executor(None, work)}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def start(args: list[str], url: str, log_file: Path) -> subprocess.Popen:
    import httpx

    process = subprocess.Popen(args, stdout=open(log_file, "w"), stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 300
    while time.time() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{args[:4]} exited: {log_file.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{args[:4]} never became ready")


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def drive(url: str, texts: list[str], clients: int, seconds: float, warmup: float = 2.0) -> dict:
    """``clients`` concurrent loops (aiohttp, one connection each), each posting one text per
    request and waiting for the answer before the next."""
    import aiohttp

    latencies: list[float] = []
    sent = answered = errors = flagged = 0
    stop_at = time.perf_counter() + warmup + seconds
    measure_from = time.perf_counter() + warmup
    connector = aiohttp.TCPConnector(limit=clients + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        async def loop(worker: int) -> None:
            nonlocal sent, answered, errors, flagged
            i = worker
            while time.perf_counter() < stop_at:
                text = texts[i % len(texts)]
                i += clients
                begun = time.perf_counter()
                counted = begun >= measure_from
                sent += counted
                body = None
                try:
                    async with session.post(url + "/v1/classify", json={"texts": [text]}) as response:
                        body = await response.json() if response.status == 200 else None
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    body = None
                ok = body is not None and len(body["results"]) == 1
                if counted:
                    if ok:
                        answered += 1
                        latencies.append(time.perf_counter() - begun)
                        flagged += body["results"][0]["flagged"]
                    else:
                        errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(loop(w) for w in range(clients)))
        elapsed = time.perf_counter() - max(started + warmup, measure_from)
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"clients": clients, "seconds": round(elapsed, 1), "requests": answered, "requests_per_s": round(answered / elapsed, 1),
            "texts_per_s": round(answered / elapsed, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "errors": errors, "dropped": sent - answered - errors, "flagged": flagged}


def load_test(victim: Path, psim: Path, texts: list[str], runtime: str, work: Path, seconds: float, soak_minutes: float) -> dict:
    results: dict = {"guarded": [], "guarded_torch": [], "naive": []}
    # The same service on PyTorch: how much of the gain is micro-batching and how much the runtime.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    on_torch = start([PEFTSHIELD, "serve", "--model", str(victim), "--psim", str(psim), "--port", str(port), "--runtime", "torch",
                      "--max-batch", "64", "--max-wait-ms", "5"], url, work / "serve-torch.log")
    for clients in CLIENTS:
        row = asyncio.run(drive(url, texts, clients, seconds))
        log(f"  guarded (torch), {clients} clients: {row}")
        results["guarded_torch"].append(row)
    stop(on_torch)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    guarded = start([PEFTSHIELD, "serve", "--model", str(victim), "--psim", str(psim), "--port", str(port), "--runtime", runtime,
                     "--max-batch", "64", "--max-wait-ms", "5"], url, work / "serve.log")
    for clients in CLIENTS:
        row = asyncio.run(drive(url, texts, clients, seconds))
        log(f"  guarded, {clients} clients: {row}")
        results["guarded"].append(row)
    metrics = __import__("httpx").get(url + "/metrics").text
    results["guarded_batches"] = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                                  if line.startswith(("peftshield_batch_texts_sum", "peftshield_batch_texts_count"))}
    if soak_minutes > 0:
        rss_start = rss_mb(guarded.pid)
        log(f"  soak: {soak_minutes} min at 8 clients (server RSS {rss_start:.0f} MB)")
        soak = asyncio.run(drive(url, texts, 8, soak_minutes * 60))
        results["soak"] = {**soak, "rss_start_mb": round(rss_start), "rss_end_mb": round(rss_mb(guarded.pid))}
        log(f"  soak: {results['soak']}")
    results["guarded_exit_code"] = stop(guarded)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    naive = start([sys.executable, __file__, "--naive-server", str(victim), str(psim), str(port)], url, work / "naive.log")
    for clients in CLIENTS:
        row = asyncio.run(drive(url, texts, clients, seconds))
        log(f"  naive, {clients} clients: {row}")
        results["naive"].append(row)
    stop(naive)
    return results


def render(summary: dict) -> str:
    s, load = summary["scoring"], summary["load"]
    lines = [
        "# `peftshield serve` and the ONNX scoring path, measured",
        "",
        f"Command: `make bench-serve` (= `.venv/bin/python bench/serve_load.py`), {summary['date']}, this machine (2 CPU cores, no GPU), "
        f"nothing else running. Models: MiniLM weight-poisoned with `{TRIGGER}` -> {TARGET} (IMDB attacker, clean-label), a LoRA victim on SST-2 "
        "and its PSIM (P-tuning, the default), built by the script with the project's commands.",
        "",
        "## Agreement and scoring throughput per runtime",
        "",
        f"PSIM scores on the SST-2 test set plus its `{TRIGGER}`-triggered non-target texts ({s['texts']} texts), threshold {s['threshold']:.4f}. "
        "Each runtime in its own process; texts/s from scoring all texts at each batch size after a warm-up; peak RSS of that process.",
        "",
        "| runtime | " + " | ".join(f"batch {b}" for b in BATCH_SIZES) + " | best batch | peak RSS MB | max score diff vs torch | identical flags | AUROC "
        "| identical flags, mixed batches | AUROC, mixed batches |",
        "|---|" + "---|" * (len(BATCH_SIZES) + 7),
    ]
    for runtime in ("torch", "onnx", "onnx-int8"):
        r = s[runtime]
        lines.append(f"| {runtime} | " + " | ".join(f"{r['texts_per_s'][str(b)]:.0f}" for b in BATCH_SIZES)
                     + f" | {r['best_batch']} | {r['peak_rss_mb']} | {r['max_score_diff']:.2e} | {r['identical_flags']:.4f} | {r['auroc']:.4f} "
                     f"| {r['identical_flags_mixed_batches']:.4f} | {r['auroc_mixed_batches']:.4f} |")
    scan, limit = summary["scan"], summary["cpu_limit"]
    lines += [
        "",
        "*Mixed batches*: the same texts in batches of 16 in a random order (mixed lengths padded to the longest), as micro-batches reach "
        "a service, against PyTorch's length-sorted scores. The service uses the fastest runtime whose flags agree on at least 99.5% of "
        f"the texts both ways with an unchanged AUROC: **{summary['serve_runtime']}**.",
        "",
        f"`peftshield scan --runtime {scan['runtime']}` on the same {scan['texts']} texts: {scan['scoring_texts_per_s']:.0f} texts/s scoring, "
        f"**{scan['speedup_vs_torch_batch1_same_model']:.2f}x** this PSIM's batch-1 PyTorch rate in the table above ({scan['torch_batch1_texts_per_s']:.0f} texts/s, the reference loop's style) "
        f"and {scan['speedup_vs_reference_batch1']:.2f}x the reference loop's {REFERENCE_SCAN_TEXTS_PER_S} texts/s in bench/results.md (another PSIM, another day); "
        f"{scan['wall_seconds']} s wall with start-up and loading.",
        "",
        f"CPU limit: a 2048x384 @ 384x1536 fp32 matmul runs at {limit['matmul_gflops_fp32']} GFLOP/s here; the PSIM costs "
        f"{limit['mflops_per_text']} MFLOPs per text ({limit['tokens_per_text']} tokens incl. virtual ones), so fp32 tops out near "
        f"{limit['limit_texts_per_s_fp32']} texts/s; the best fp32 ONNX rate is {limit['best_share_of_limit']:.0%} of that. "
        "int8 can pass it because its matmuls are cheaper than the fp32 rate measured.",
        "",
        "## Load: the guard service vs a naive one (one text per request, max batch 64, max wait 5 ms, score batch 16)",
        "",
        "Clients cycle through the SST-2 test texts: 1,818 alternating clean and triggered texts, then 912 clean ones, one "
        "text per request; the *flagged* share is therefore near 50% while a run stays in the first part and falls towards "
        "a third as it reaches the clean tail (it says nothing about agreement: see the table above).",
        "",
        "| service | clients | requests/s = texts/s | p50 ms | p95 ms | p99 ms | errors | dropped | flagged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"guarded": f"guard service ({summary['serve_runtime']})", "guarded_torch": "guard service (torch)", "naive": "naive (torch, batch 1, one request at a time)"}
    for name in ("guarded", "guarded_torch", "naive"):
        for row in load[name]:
            lines.append(f"| {names[name]} | {row['clients']} | {row['texts_per_s']} | {row['p50_ms']} | {row['p95_ms']} | {row['p99_ms']} | {row['errors']} | {row['dropped']} | {row['flagged'] / max(1, row['requests']):.1%} |")
    batches = load.get("guarded_batches", {})
    if batches.get("peftshield_batch_texts_count"):
        lines.append(f"\nGuard service micro-batches over the three runs: {batches['peftshield_batch_texts_count']:.0f} forward passes, "
                     f"{batches['peftshield_batch_texts_sum'] / batches['peftshield_batch_texts_count']:.1f} texts each on average.")
    lines += ["", f"Speed-up at 64 clients: **{summary['speedup_vs_naive_at_64']:.1f}x** the naive service's texts/s; errors {summary['errors']}, "
              f"dropped {summary['dropped']}. The guard service exited {load['guarded_exit_code']} on SIGTERM."]
    if "soak" in load:
        soak = load["soak"]
        lines += ["", "## Soak", "",
                  f"{soak['seconds'] / 60:.1f} minutes at 8 clients: {soak['requests']} requests ({soak['texts_per_s']} /s), p99 {soak['p99_ms']} ms, "
                  f"errors {soak['errors']}, dropped {soak['dropped']}; server RSS {soak['rss_start_mb']} MB at start, {soak['rss_end_mb']} MB at the end."]
    if "overload" in summary:  # written by bench/serve_overload.py
        from serve_overload import render_section

        lines += ["", render_section(summary["overload"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="runs/serve-bench")
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--out", default="bench/serve")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per load level")
    parser.add_argument("--soak-minutes", type=float, default=10.0)
    args = parser.parse_args()
    work, shared = Path(args.work), Path(args.shared).resolve()
    work.mkdir(parents=True, exist_ok=True)
    from peftshield.io import atomic_write_json, atomic_write_text

    log("building the models")
    _, victim, psim = build_models(work, shared)
    scoring_summary = scoring(psim, shared, work)
    agreeing = [r for r in ("onnx-int8", "onnx") if min(scoring_summary[r]["identical_flags"], scoring_summary[r]["identical_flags_mixed_batches"]) >= 0.995
                and round(scoring_summary[r]["auroc"], 3) == round(scoring_summary["torch"]["auroc"], 3)]
    fastest = max(agreeing, key=lambda r: scoring_summary[r]["best_texts_per_s"]) if agreeing else "torch"
    log(f"runtimes that agree with PyTorch: {agreeing}; using {fastest}")
    scan = scan_end_to_end(psim, shared, work, fastest, scoring_summary["torch"]["texts_per_s"]["1"])
    limit = cpu_limit(psim, scoring_summary["onnx"]["best_texts_per_s"], shared)
    clean, triggered = evaluation_texts(shared)
    mixed = [t for pair in zip(clean, triggered) for t in pair] + clean[len(triggered):]
    load = load_test(victim, psim, mixed, fastest, work, args.seconds, args.soak_minutes)
    guarded64 = next(r for r in load["guarded"] if r["clients"] == 64)
    naive64 = next(r for r in load["naive"] if r["clients"] == 64)
    rows = load["guarded"] + load["guarded_torch"] + load["naive"] + ([load["soak"]] if "soak" in load else [])
    summary = {
        "date": time.strftime("%Y-%m-%d"), "serve_runtime": fastest, "speedup_vs_naive_at_64": guarded64["texts_per_s"] / naive64["texts_per_s"],
        "errors": sum(r["errors"] for r in rows), "dropped": sum(r["dropped"] for r in rows),
        "flag_agreement_onnx": scoring_summary["onnx"]["identical_flags"], "flag_agreement_onnx_int8": scoring_summary["onnx-int8"]["identical_flags"],
        "p99_ms_at_64": guarded64["p99_ms"],
        "speedup_vs_naive_at_64_torch_runtime": next(r for r in load["guarded_torch"] if r["clients"] == 64)["texts_per_s"] / naive64["texts_per_s"], "scan_speedup_vs_reference_batch1": scan["speedup_vs_reference_batch1"],
        "scan_speedup_vs_torch_batch1_same_model": scan["speedup_vs_torch_batch1_same_model"],
        "scoring": scoring_summary, "scan": scan, "cpu_limit": limit, "load": load,
    }
    atomic_write_json(Path(args.out + ".json"), summary)
    atomic_write_text(Path(args.out + ".md"), render(summary))
    log(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    if len(sys.argv) > 1 and sys.argv[1] == "--render":  # re-render bench/serve.md from bench/serve.json
        Path(sys.argv[2] + ".md").write_text(render(json.loads(Path(sys.argv[2] + ".json").read_text())))
    elif len(sys.argv) > 1 and sys.argv[1] == "--score-worker":
        score_worker(*sys.argv[2:6])
    elif len(sys.argv) > 1 and sys.argv[1] == "--naive-server":
        naive_server(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
