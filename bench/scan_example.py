"""The scan page's two commands, recorded: a PSIM on the demo's poisoned backbone, then a scan
of the clean SST-2 training set (bench/scan_example.{json,md}).

    peftshield psim train --backbone BACKBONE --data ../shared/data/psim/sst-2 --out WORK/psim-sst2
    peftshield scan --psim WORK/psim-sst2 --data ../shared/data/psim/sst-2/train.json --out WORK/scan.jsonl

BACKBONE is the demo's weight-poisoned MiniLM (``make bench-demo`` first: the one stage folder
of runs/demo holding an attack.json). The training set is clean, so every flag is a false
rejection. Times are wall seconds of each command (start-up and model loading included).

    .venv/bin/python bench/scan_example.py [--demo runs/demo] [--work runs/scan-example]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def timed(args: list[str], allowed: tuple[int, ...] = (0,)) -> float:
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode not in allowed:
        raise SystemExit(f"{args[1:3]} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def render(summary: dict) -> str:
    return "\n".join([
        "# The scan page's commands, measured",
        "",
        f"Command: `make bench-scan-example` (= `.venv/bin/python bench/scan_example.py`), {summary['date']}, this machine (2 CPU cores), "
        f"nothing else running. Backbone: the demo's weight-poisoned MiniLM (`{summary['backbone']}`).",
        "",
        "| step | seconds | result |",
        "|---|---|---|",
        f"| `psim train` on SST-2 (P-tuning, threshold calibrated on dev) | {summary['psim_seconds']:.0f} | threshold {summary['threshold']:.3f} |",
        f"| `scan` of the clean SST-2 training set | {summary['scan_seconds']:.1f} | {summary['texts']} texts, {summary['texts_per_s']:.0f} texts/s, "
        f"{summary['flagged']} flagged ({summary['flagged_share']:.1%}) |",
        "",
        "The training set is clean: every flagged text is a false rejection, against the 1% the threshold was calibrated for on dev.",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--demo", default="runs/demo")
    parser.add_argument("--work", default="runs/scan-example")
    parser.add_argument("--shared", default="../shared/data")
    args = parser.parse_args()
    from peftshield.io import atomic_write_json, atomic_write_text

    found = sorted(p.parent for p in Path(args.demo).glob("stages/**/attack.json"))
    if len(found) != 1:
        raise SystemExit(f"{args.demo}: expected one poisoned backbone (a stage folder with attack.json), found {len(found)}; run 'make bench-demo' first")
    backbone, work, shared = found[0], Path(args.work), Path(args.shared)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    peftshield = str(Path(sys.executable).with_name("peftshield"))
    psim_seconds = timed([peftshield, "psim", "train", "--backbone", str(backbone), "--data", str(shared / "psim/sst-2"), "--out", str(work / "psim-sst2"),
                          "--no-progress"])
    scan_seconds = timed([peftshield, "scan", "--psim", str(work / "psim-sst2"), "--data", str(shared / "psim/sst-2/train.json"),
                          "--out", str(work / "scan.jsonl"), "--no-progress", "--no-config"], allowed=(0, 1))  # scan exits 1 when it flags texts
    rows = [json.loads(line) for line in (work / "scan.jsonl").read_text().splitlines()]
    threshold = json.loads((work / "psim-sst2" / "finetune.json").read_text())["psim"]["threshold"]
    flagged = sum(r["flagged"] for r in rows)
    summary = {"date": time.strftime("%Y-%m-%d"), "backbone": str(backbone), "psim_seconds": psim_seconds, "threshold": threshold,
               "scan_seconds": scan_seconds, "texts": len(rows), "texts_per_s": len(rows) / scan_seconds, "flagged": flagged,
               "flagged_share": flagged / len(rows)}
    atomic_write_json(BENCH / "scan_example.json", summary)
    atomic_write_text(BENCH / "scan_example.md", render(summary))
    print(render(summary))


if __name__ == "__main__":
    main()
