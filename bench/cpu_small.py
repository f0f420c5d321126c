"""The study's shape on subsets: ``configs/cpu-small.yaml`` run and recorded (bench/cpu_small.{json,md}).

Runs ``peftshield run`` on the config (resumable: cells already in ``runs/cpu-small`` are reused,
and the wall time then covers only what was left), then ``peftshield report``, and records the
report's two tables (attack and defense, mean ± std over seeds), the run's wall seconds, the
peak resident memory of the run (``ru_maxrss`` of the child) and the report's seconds. The
report's epoch plot and one confidence histogram are copied to ``docs/cpu-small/``.

    .venv/bin/python bench/cpu_small.py
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CONFIG = "configs/cpu-small.yaml"
RUN = ROOT / "runs" / "cpu-small"
PLOTS = ("asr_over_epochs.png", "confidence_sst-2_badnet-mn_lora_seed0.png", "roc_cr_insent_lora_seed0.png")


def timed(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak resident kB of one ``peftshield`` command run from the repository root."""
    started = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).with_name("peftshield")), *command], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"peftshield {' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def report_tables(report_md: str) -> list[str]:
    """The Markdown tables of a ``peftshield report`` page (each as one block of ``|`` lines)."""
    tables, current = [], []
    for line in report_md.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append("\n".join(current))
            current = []
    if current:
        tables.append("\n".join(current))
    return tables


def render(summary: dict) -> str:
    lines = [
        "# The study's shape on subsets (configs/cpu-small.yaml)",
        "",
        f"Command: `make bench-grid` (= `.venv/bin/python bench/cpu_small.py`: `peftshield run {CONFIG}` then "
        f"`peftshield report runs/cpu-small`), {summary['date']}, this machine (2 CPU cores). "
        f"Run wall time {summary['run_seconds'] / 60:.1f} min ({summary['run_seconds']:.0f} s; cells found in the run folder are reused"
        f"{', and this time some were' if summary['reused_cells'] else ', none were this time'}), peak resident memory "
        f"{summary['peak_rss_kb'] / 2**20:.1f} GB, report {summary['report_seconds']:.1f} s. "
        f"{summary['cells']} cells; mean ± std over seeds {summary['seeds']}. CA is on the test texts, ASR on their non-target rows with the trigger."
        + (f" Note: {summary['note']}" if summary.get("note") else ""),
        "",
    ]
    for table in summary["tables"]:
        lines += [table, ""]
    return "\n".join(lines)


def main() -> None:
    import argparse
    import json

    from peftshield.grid.store import ResultStore
    from peftshield.io import atomic_write_json, atomic_write_text

    parser = argparse.ArgumentParser()
    parser.add_argument("--note", default="", help="a remark recorded with the run (e.g. other jobs shared the cores)")
    parser.add_argument("--render", action="store_true", help="re-render bench/cpu_small.md from its JSON (adding --note), running nothing")
    args = parser.parse_args()
    if args.render:
        summary = {**json.loads((BENCH / "cpu_small.json").read_text()), **({"note": args.note} if args.note else {})}
        atomic_write_json(BENCH / "cpu_small.json", summary)
        atomic_write_text(BENCH / "cpu_small.md", render(summary))
        return

    store_file = RUN / "results.sqlite"
    reused = len(ResultStore(store_file).cells()) if store_file.is_file() else 0
    run_seconds, peak = timed(["run", CONFIG, "--out", str(RUN.relative_to(ROOT)), "--no-progress"])
    report_seconds, _ = timed(["report", str(RUN.relative_to(ROOT))])
    cells = ResultStore(store_file).cells()
    report = RUN / "report"
    summary = {"date": time.strftime("%Y-%m-%d"), "config": CONFIG, "run_seconds": run_seconds, "reused_cells": reused,
               "peak_rss_kb": peak, "report_seconds": report_seconds, "cells": len(cells),
               "seeds": sorted({c["seed"] for c in cells}), "tables": report_tables((report / "report.md").read_text()), "note": args.note}
    plots = ROOT / "docs" / "cpu-small"
    plots.mkdir(exist_ok=True)
    for name in PLOTS:
        shutil.copyfile(report / name, plots / name)
    atomic_write_json(BENCH / "cpu_small.json", summary)
    atomic_write_text(BENCH / "cpu_small.md", render(summary))
    print(render(summary))


if __name__ == "__main__":
    main()
