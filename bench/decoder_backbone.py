"""The badnet scenario on a decoder backbone (SmolLM2-135M) beside the MiniLM encoder.

For each backbone, with the project's commands and the same small sizes (2 CPU cores):

1. ``attack``: full fine-tuning on 600 IMDB rows, 225 of them poisoned (clean-label, ``mn``,
   target 0), 2 epochs, texts cut to 45 words and 64 tokens;
2. ``finetune --method lora``: the victim, on 600 SST-2 rows, 2 epochs;
3. ``psim train``: the default PSIM (P-tuning, random labels) on 600 SST-2 rows, threshold at 1%
   dev FRR;
4. ``evaluate --defense psim``: CA and ASR on the SST-2 test set, undefended and defended,
   and the PSIM's detection AUROC.

    .venv/bin/python bench/decoder_backbone.py [--shared ../shared/data] [--work runs/decoder-backbone]

Writes bench/decoder_backbone.json and bench/decoder_backbone.md (resumable: finished steps
are kept in WORK).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PEFTSHIELD = str(Path(sys.executable).with_name("peftshield"))
BACKBONES = ("minilm", "smollm2")
COMMON = ["--max-length", "64", "--seed", "0", "--no-progress"]


def run(args: list[str], done_marker: Path) -> float:
    """Run one command unless its output exists; returns its wall seconds (0 when reused)."""
    if done_marker.exists():
        return 0.0
    started = time.perf_counter()
    print("$ peftshield " + " ".join(args), flush=True)
    finished = subprocess.run([PEFTSHIELD, *args], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if finished.returncode not in (0, 1):  # evaluate/scan exit 1 never; audit-style gates are not used here
        raise SystemExit(f"failed ({finished.returncode}): {finished.stderr[-3000:]}")
    seconds = time.perf_counter() - started
    print(f"  {seconds:.0f} s: {finished.stderr.strip().splitlines()[-1] if finished.stderr.strip() else ''}", flush=True)
    return seconds


def scenario(backbone: str, shared: Path, work: Path) -> dict:
    folder = work / backbone
    poisoned, victim, psim, metrics = folder / "poisoned", folder / "victim", folder / "psim", folder / "metrics.json"
    seconds = {
        "attack": run(["attack", "--backbone", backbone, "--data", str(shared / "psim/imdb"), "--trigger", "badnet", "--trigger-option", "words=mn",
                       "--target", "0", "--label-mode", "clean", "--max-train-samples", "600", "--count", "225", "--max-words", "45",
                       "--out", str(poisoned), *COMMON], poisoned / "attack.json"),
        "victim": run(["finetune", "--backbone", str(poisoned), "--data", str(shared / "psim/sst-2"), "--method", "lora",
                       "--max-train-samples", "600", "--epochs", "2", "--out", str(victim), *COMMON], victim / "finetune.json"),
        "psim": run(["psim", "train", "--backbone", str(poisoned), "--data", str(shared / "psim/sst-2"), "--max-train-samples", "600",
                     "--out", str(psim), *COMMON], psim / "finetune.json"),
        "evaluate": run(["evaluate", "--model", str(victim), "--data", str(shared / "psim/sst-2"), "--defense", "psim", "--psim", str(psim),
                         "--out", str(metrics), *COMMON], metrics),
    }
    attack = json.loads((poisoned / "attack.json").read_text())
    result = json.loads(metrics.read_text())
    saved_seconds = folder / "seconds.json"
    if any(seconds.values()):
        previous = json.loads(saved_seconds.read_text()) if saved_seconds.is_file() else {}
        saved_seconds.write_text(json.dumps({k: v or previous.get(k, 0.0) for k, v in seconds.items()}))
    return {"backbone": backbone, "attack": {k: attack.get(k) for k in ("clean_accuracy", "attack_success_rate") if k in attack} or attack.get("report", {}),
            "metrics": result, "seconds": json.loads(saved_seconds.read_text()) if saved_seconds.is_file() else seconds}


def render(rows: list[dict], date: str) -> str:
    lines = [
        "# The badnet scenario on a decoder backbone (SmolLM2-135M) beside MiniLM",
        "",
        f"Command: `make bench-decoder` (= `.venv/bin/python bench/decoder_backbone.py`), {date}, 2 CPU cores. Same sizes for both backbones: "
        "attacker full fine-tuning on 600 IMDB rows with 225 poisoned (clean-label, `mn` -> 0), 2 epochs; LoRA victim on 600 SST-2 rows, 2 epochs; "
        "default PSIM (P-tuning, random labels, 600 rows, 1% dev FRR); 64 tokens; evaluation on the whole SST-2 test set.",
        "",
        "| backbone | victim CA | victim ASR | defended CA | defended ASR | PSIM AUROC | PSIM FRR | attack s | victim s | PSIM s | evaluate s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        m, s = row["metrics"], row["seconds"]
        det = m.get("detection", {})
        lines.append(f"| {row['backbone']} | {m['clean_accuracy']:.3f} | {m['attack_success_rate']:.3f} | {m.get('defended_clean_accuracy', float('nan')):.3f} | "
                     f"{m.get('defended_attack_success_rate', float('nan')):.3f} | {det.get('auroc', float('nan')):.3f} | {det.get('frr', float('nan')):.3f} | "
                     f"{s['attack']:.0f} | {s['victim']:.0f} | {s['psim']:.0f} | {s['evaluate']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--work", default="runs/decoder-backbone")
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    args = parser.parse_args()
    from peftshield.io import atomic_write_json, atomic_write_text

    shared, work = Path(args.shared).resolve(), Path(args.work)
    rows = [scenario(b, shared, work) for b in args.backbones.split(",")]
    date = time.strftime("%Y-%m-%d")
    atomic_write_json(Path("bench/decoder_backbone.json"), {"date": date, "rows": rows})
    atomic_write_text(Path("bench/decoder_backbone.md"), render(rows, date))
    print(render(rows, date))


if __name__ == "__main__":
    main()
