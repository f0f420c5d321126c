"""peftshield against a faithful re-implementation of the reference scripts' loops.

Same machine, model (MiniLM), data and settings; each stage of each implementation runs
in its own process that loads its own model (as the reference scripts do), and is timed
from process start to exit. Writes bench/results.md and bench/results.json.

Reference loops (a): fixed batches of 32 in shuffled arrival order, each padded to its
longest text by the tokenizer at batch time; PSIM confidences one text per forward pass.
peftshield (b): the library's trainer (texts tokenised once, length-bucketed batches,
dynamic padding) and batched, length-sorted inference.

    .venv/bin/python bench/reference_loops.py --shared ../shared/data
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STAGES = ("weight_poison", "victim_lora", "psim_train", "psim_scan")
MAX_LENGTH = 128
BATCH = 32


# --- one stage in this process (the worker side) ------------------------------------------

def _read(path: Path) -> tuple[list[str], list[int]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def _peft_wrap(model, method: str):
    from peft import LoraConfig, PromptEncoderConfig, TaskType, get_peft_model

    if method == "lora":
        config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1)
    else:
        config = PromptEncoderConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=5, encoder_hidden_size=128)
    return get_peft_model(model, config)


def reference_train(texts: list[str], labels: list[int], method: str, learning_rate: float, seed: int, backbone: str):
    """The reference loop: shuffle, fixed batches of 32, tokenise and pad each batch as it arrives."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=2)
    if method != "full":
        model = _peft_wrap(model, method)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    model.train()
    order = torch.randperm(len(texts)).tolist()
    for start in range(0, len(order), BATCH):
        batch = order[start : start + BATCH]
        encoded = tokenizer([texts[i] for i in batch], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        loss = model(**encoded, labels=torch.tensor([labels[i] for i in batch])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def peftshield_train(texts: list[str], labels: list[int], method: str, learning_rate: float, seed: int, backbone: str):
    from peftshield.data import TextDataset
    from peftshield.finetune import METHODS, TrainingConfig, seed_torch, train_classifier
    from peftshield.models import load_backbone

    seed_torch(seed)
    base = load_backbone(backbone, 2)
    data = TextDataset(texts, labels, [str(i) for i in range(len(texts))])
    training = TrainingConfig(learning_rate=learning_rate, epochs=1, batch_size=BATCH, max_length=MAX_LENGTH, select_on_dev=False, warmup_ratio=0.0)
    model, _ = train_classifier(base.model, base.tokenizer, data, None, METHODS.create(method), training, np.random.default_rng(seed), progress=False)
    return model


def reference_scan(psim_dir: str, texts: list[str]) -> tuple[np.ndarray, float]:
    """Scores and the seconds spent scoring (after loading)."""
    import torch

    from peftshield.defenses import PSIM

    psim = PSIM.load(psim_dir)
    model, tokenizer = psim.model_.eval(), psim.tokenizer_
    started = time.perf_counter()
    scores = []
    with torch.no_grad():
        for text in texts:  # batch size 1, as the reference computes PSIM confidence
            encoded = tokenizer(text, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
            scores.append(float(torch.softmax(model(**encoded).logits, dim=-1).max()))
    return np.asarray(scores), time.perf_counter() - started


def peftshield_scan(psim_dir: str, texts: list[str]) -> tuple[np.ndarray, float]:
    """Scores and the seconds spent scoring (after loading)."""
    from peftshield.defenses import PSIM

    psim = PSIM.load(psim_dir)
    started = time.perf_counter()
    return psim.score(texts), time.perf_counter() - started


def batch_size_sweep(psim_dir: str, texts: list[str]) -> dict[str, float]:
    """Texts/s of the PSIM's forward passes alone at several batch sizes (length-sorted, in this
    process, after loading): the ceiling batching can reach on this machine."""
    from peftshield.defenses import PSIM
    from peftshield.models.inference import predict_proba

    psim = PSIM.load(psim_dir)
    rates = {}
    for batch_size in (1, 16, 64, 256):
        started = time.perf_counter()
        predict_proba(psim.model_, psim.tokenizer_, texts, batch_size=batch_size, max_length=MAX_LENGTH)
        rates[str(batch_size)] = len(texts) / (time.perf_counter() - started)
    return rates


def run_stage(args) -> None:
    from peftshield.models.backbone import resolve_backbone

    backbone = resolve_backbone(args.backbone)
    work = Path(args.work)
    result: dict = {}
    if args.stage == "psim_scan":
        texts, _ = _read(work / "scan.jsonl")
        scores, result["scoring_seconds"] = (reference_scan if args.impl == "reference" else peftshield_scan)(str(work / "psim"), texts)
        np.save(work / f"scan-{args.impl}.npy", scores)
        result["samples"] = len(texts)
    elif args.stage == "scan_batch_sizes":
        texts, _ = _read(work / "scan.jsonl")
        result.update(samples=len(texts), texts_per_second_by_batch_size=batch_size_sweep(str(work / "psim"), texts))
    else:
        data_file, method, lr = {"weight_poison": ("attack.jsonl", "full", 5e-5), "victim_lora": ("victim.jsonl", "lora", 2e-3),
                                 "psim_train": ("psim.jsonl", "ptuning", 2e-5)}[args.stage]
        texts, labels = _read(work / data_file)
        texts, labels = texts[: args.samples], labels[: args.samples]
        model = (reference_train if args.impl == "reference" else peftshield_train)(texts, labels, method, lr, 0, backbone)
        result["samples"] = len(texts)
        if args.stage == "victim_lora":  # evaluation is not training: its time is taken out
            started = time.perf_counter()
            result.update(_victim_metrics(model, backbone, work))
            result["excluded_seconds"] = time.perf_counter() - started
        if args.stage == "psim_train" and args.impl == "peftshield":
            _save_psim(model, backbone, work / "psim")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def _victim_metrics(model, backbone: str, work: Path) -> dict:
    from transformers import AutoTokenizer

    from peftshield.metrics import attack_metrics
    from peftshield.models.inference import predict_proba

    tokenizer = AutoTokenizer.from_pretrained(backbone)
    clean, clean_labels = _read(work / "test.jsonl")
    triggered, _ = _read(work / "test_triggered.jsonl")
    metrics = attack_metrics(predict_proba(model, tokenizer, clean), np.asarray(clean_labels), predict_proba(model, tokenizer, triggered), 0, 0.0)
    return {"clean_accuracy": metrics.clean_accuracy, "attack_success_rate": metrics.attack_success_rate}


def _save_psim(model, backbone: str, out: Path) -> None:
    """A PSIM directory from the trained P-tuning model, with a fixed threshold (0.7)."""
    from transformers import AutoTokenizer

    from peftshield.defenses import PSIM, ThresholdPolicy
    from peftshield.finetune import TrainResult

    psim = PSIM(threshold=ThresholdPolicy(kind="fixed", value=0.7))
    psim.model_, psim.tokenizer_, psim.backbone_, psim.num_labels_ = model, AutoTokenizer.from_pretrained(backbone), backbone, 2
    psim.method_config_ = {"num_virtual_tokens": 5, "encoder_hidden_size": 128}
    psim.num_training_steps_, psim.threshold_, psim.train_result_ = 1, 0.7, TrainResult(method="ptuning", learning_rate=2e-5)
    psim.save(out)


# --- the driver ---------------------------------------------------------------------------

def prepare(shared: Path, work: Path, samples: int) -> None:
    from peftshield.attacks import POISONERS, PoisonSpec, build_asr_set, poison_dataset
    from peftshield.data import load_splits
    from peftshield.data.transforms import truncate_words
    from peftshield.defenses import random_label_reset

    rng = np.random.default_rng(0)
    badnet = POISONERS.create("badnet", words="mn")
    imdb = truncate_words(load_splits(shared / "psim" / "imdb")["train"], 80).sample(samples, rng)
    attack = poison_dataset(imdb, badnet, PoisonSpec(target_label=0, count=int(samples * 0.375), rate=None, label_mode="clean"), rng).data
    sst2 = load_splits(shared / "psim" / "sst-2")
    victim = sst2["train"].sample(samples, rng)
    psim = random_label_reset(sst2["train"].sample(samples, rng), 2, rng)
    test = sst2["test"]
    triggered = build_asr_set(test, badnet, 0, rng)
    work.mkdir(parents=True, exist_ok=True)
    for name, data in (("attack", attack), ("victim", victim), ("psim", psim), ("test", test), ("test_triggered", triggered)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(data.texts, data.labels)), encoding="utf-8")
    (work / "scan.jsonl").write_text((work / "test.jsonl").read_text() + (work / "test_triggered.jsonl").read_text(), encoding="utf-8")


def timed(stage: str, impl: str, samples: int, args) -> dict:
    command = [sys.executable, __file__, "--worker", "--stage", stage, "--impl", impl, "--samples", str(samples), "--work", args.work, "--backbone", args.backbone,
               "--max-length", str(args.max_length)]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"{stage}/{impl} failed:\n{finished.stderr[-2000:]}")
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    seconds = time.perf_counter() - started - result.get("excluded_seconds", 0.0)
    result.update({"stage": stage, "impl": impl, "seconds": seconds, "samples_per_second": result["samples"] / seconds})
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", choices=(*STAGES, "scan_batch_sizes"))
    parser.add_argument("--impl", choices=("reference", "peftshield"))
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--scaling", default="1000,2000,4000", help="training-set sizes for the scaling table (victim LoRA)")
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--work", default="runs/reference-bench")
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH)
    args = parser.parse_args()
    globals()["MAX_LENGTH"] = args.max_length
    if args.worker:
        return run_stage(args)
    sizes = [int(s) for s in args.scaling.split(",") if s]
    if args.backbone == "tiny":  # the reference side loads with plain transformers: give it a directory
        from peftshield.models import load_backbone
        from peftshield.models.backbone import save_backbone

        args.backbone = str(save_backbone(load_backbone("tiny", 2), Path(args.work) / "tiny-backbone"))
    prepare(Path(args.shared), Path(args.work), max([args.samples, *sizes]))
    results = [timed(stage, impl, args.samples, args) for stage in STAGES for impl in ("reference", "peftshield")]
    scaling = [timed("victim_lora", impl, n, args) for n in sizes for impl in ("reference", "peftshield")]
    sweep = timed("scan_batch_sizes", "peftshield", args.samples, args)
    write_results(args, results, scaling, sweep)


def write_results(args, results: list[dict], scaling: list[dict], sweep: dict) -> None:
    from peftshield.io import atomic_write_json, atomic_write_text

    work = Path(args.work)
    reference_scores, our_scores = np.load(work / "scan-reference.npy"), np.load(work / "scan-peftshield.npy")
    scan_diff = float(np.abs(reference_scores - our_scores).max())
    flags_equal = bool(((reference_scores > 0.7) == (our_scores > 0.7)).all())
    by = {(r["stage"], r["impl"]): r for r in results}
    lines = ["# peftshield vs the reference loops\n",
             f"Same machine (2 CPU cores), backbone `{args.backbone}`, {args.samples} training samples per stage, 1 epoch, max length {MAX_LENGTH}; "
             f"the scan covers the SST-2 test set plus its `mn`-triggered non-target texts ({len(reference_scores)} texts). "
             "Each stage runs in its own process and loads its own model; seconds are wall time from process start to exit "
             "(minus the victim's CA/ASR evaluation, which is not training).\n",
             f"Command: `.venv/bin/python bench/reference_loops.py --shared {args.shared}`\n",
             "| stage | reference s | peftshield s | reference samples/s | peftshield samples/s | speed-up (b/a) | reference peak MB | peftshield peak MB |",
             "|---|---|---|---|---|---|---|---|"]
    total = {"reference": [0.0, 0], "peftshield": [0.0, 0]}
    for stage in STAGES:
        a, b = by[(stage, "reference")], by[(stage, "peftshield")]
        for impl, r in (("reference", a), ("peftshield", b)):
            total[impl][0] += r["seconds"]
            total[impl][1] += r["samples"]
        lines.append(f"| {stage} | {a['seconds']:.1f} | {b['seconds']:.1f} | {a['samples_per_second']:.1f} | {b['samples_per_second']:.1f} | "
                     f"{b['samples_per_second'] / a['samples_per_second']:.2f}x | {a['peak_rss_mb']:.0f} | {b['peak_rss_mb']:.0f} |")
    end_to_end = (total["peftshield"][1] / total["peftshield"][0]) / (total["reference"][1] / total["reference"][0])
    lines.append(f"| **all four stages** | {total['reference'][0]:.1f} | {total['peftshield'][0]:.1f} | "
                 f"{total['reference'][1] / total['reference'][0]:.1f} | {total['peftshield'][1] / total['peftshield'][0]:.1f} | **{end_to_end:.2f}x** | | |")
    va, vb = by[("victim_lora", "reference")], by[("victim_lora", "peftshield")]
    lines += ["", f"PSIM scan agreement: largest score difference {scan_diff:.2e}; flags at 0.7 identical: {flags_equal}.",
              f"Victim LoRA (on the clean backbone, so ASR only measures the trigger word's side effect) after 1 epoch: "
              f"reference CA {va['clean_accuracy']:.3f} / ASR {va['attack_success_rate']:.3f}; peftshield CA {vb['clean_accuracy']:.3f} / ASR {vb['attack_success_rate']:.3f}. "
              "Not identical: the batches differ (length buckets vs arrival order) and peftshield's trainer decays the learning rate linearly where the reference keeps it constant.",
              "", "## Victim LoRA training time against training-set size\n",
              "| samples | reference s | peftshield s | reference samples/s | peftshield samples/s | speed-up |", "|---|---|---|---|---|---|"]
    sizes = sorted({r["samples"] for r in scaling})
    for n in sizes:
        a = next(r for r in scaling if r["samples"] == n and r["impl"] == "reference")
        b = next(r for r in scaling if r["samples"] == n and r["impl"] == "peftshield")
        lines.append(f"| {n} | {a['seconds']:.1f} | {b['seconds']:.1f} | {a['samples_per_second']:.1f} | {b['samples_per_second']:.1f} | "
                     f"{b['samples_per_second'] / a['samples_per_second']:.2f}x |")
    sa, sb = by[("psim_scan", "reference")], by[("psim_scan", "peftshield")]
    lines += ["", "## PSIM scan: where the time goes\n",
              "| | reference | peftshield |", "|---|---|---|",
              f"| process start, imports, loading (s) | {sa['seconds'] - sa['scoring_seconds']:.1f} | {sb['seconds'] - sb['scoring_seconds']:.1f} |",
              f"| scoring (s) | {sa['scoring_seconds']:.1f} | {sb['scoring_seconds']:.1f} |",
              f"| scoring texts/s | {sa['samples'] / sa['scoring_seconds']:.1f} | {sb['samples'] / sb['scoring_seconds']:.1f} "
              f"({sa['scoring_seconds'] / sb['scoring_seconds']:.2f}x) |",
              "", "Forward passes alone, length-sorted, at several batch sizes (same texts, one process, after loading): "
              "the most that batching can buy on this machine.\n",
              "| batch size | texts/s |", "|---|---|"]
    lines += [f"| {size} | {rate:.1f} |" for size, rate in sweep["texts_per_second_by_batch_size"].items()]
    atomic_write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")
    atomic_write_json(Path(args.out + ".json"), {"stages": results, "scaling": scaling, "scan_batch_sizes": sweep,
                                                 "scan_max_difference": scan_diff, "scan_flags_identical": flags_equal})


if __name__ == "__main__":
    main()
