"""Stage 1 of ``peftshield screen``, timed: adapters per hour on this machine, loading included
(bench/screen_stage1.{json,md}).

The fleet is made by copying one real MiniLM LoRA adapter (rank 8, query and value of 6 layers,
with its classification head: the demo's LoRA victim, runs/demo) ``--copies`` times into
``--work``, so the figure is a speed figure only: it says nothing of which adapters stage 1 ranks
high (that needs the labelled zoo v2, issue 27). The command is the real CLI, ``peftshield
screen --manifest FLEET.txt --stage1-only``, run once cold (first read of the copies, after the
page cache was dropped when the machine allows it) and once warm; the wall time counts the
process start, reading every file, the features and the report.

    .venv/bin/python bench/screen_stage1.py [--source runs/demo/stages/victim-*/model] [--copies 2000] [--work runs/screen-bench]
"""

from __future__ import annotations

import argparse
import glob
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEFTSHIELD = str(Path(sys.executable).with_name("peftshield"))


def lora_source(pattern: str) -> Path:
    """The first folder matching ``pattern`` that is a LoRA finetune folder."""
    import json

    for folder in sorted(glob.glob(pattern)):
        manifest = Path(folder) / "finetune.json"
        if manifest.is_file() and json.loads(manifest.read_text()).get("method") == "lora":
            return Path(folder)
    raise SystemExit(f"no LoRA finetune folder matches {pattern}: run make demo first")


def build_fleet(source: Path, work: Path, copies: int) -> Path:
    fleet = work / "fleet"
    fleet.mkdir(parents=True, exist_ok=True)
    names = ("finetune.json", "trainable.safetensors")
    for index in range(copies):
        target = fleet / f"adapter-{index:05d}"
        if not (target / names[-1]).is_file():
            target.mkdir(exist_ok=True)
            for name in names:
                shutil.copyfile(source / name, target / name)
    manifest = work / "fleet.txt"
    manifest.write_text("".join(f"{fleet / f'adapter-{i:05d}'}\n" for i in range(copies)))
    return manifest


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed_screen(manifest: Path, out: Path) -> tuple[float, int]:
    started = time.perf_counter()
    done = subprocess.run([PEFTSHIELD, "screen", "--manifest", str(manifest), "--stage1-only", "--out", str(out), "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"screen failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def render(summary: dict) -> str:
    lines = [
        "# `peftshield screen`, stage 1: adapters per hour",
        "",
        f"Command: `make bench-screen-stage1` (= `.venv/bin/python bench/screen_stage1.py --copies {summary['copies']}`), {summary['date']}, "
        f"this machine (2 CPU cores), nothing else running. A fleet of {summary['copies']} copies of one real MiniLM LoRA adapter "
        f"(`{summary['source']}`: rank 8 on query and value of 6 layers, with its head; {summary['adapter_bytes'] / 1e6:.2f} MB each), screened "
        "with the real CLI (`peftshield screen --manifest FLEET.txt --stage1-only`): process start, reading every file, the features and the "
        "report. A speed figure only: copies of one adapter say nothing of which adapters stage 1 ranks high.",
        "",
        "| run | wall s | adapters/hour | peak RSS (MB) |",
        "|---|---|---|---|",
    ]
    for row in summary["runs"]:
        lines.append(f"| {row['run']} | {row['seconds']:.1f} | {row['adapters_per_hour']:,.0f} | {row['peak_rss_kb'] / 1024:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default="runs/demo/stages/victim-*/model")
    parser.add_argument("--copies", type=int, default=2000)
    parser.add_argument("--work", default="runs/screen-bench")
    args = parser.parse_args()
    from peftshield.io import atomic_write_json, atomic_write_text

    source = lora_source(str(ROOT / args.source))
    work = ROOT / args.work
    manifest = build_fleet(source, work, args.copies)
    runs = []
    cold = drop_page_cache()
    for run in ("cold" if cold else "first (page cache not dropped)", "warm"):
        seconds, peak = timed_screen(manifest, work / "out")
        runs.append({"run": run, "seconds": seconds, "adapters_per_hour": args.copies / seconds * 3600, "peak_rss_kb": peak})
    summary = {"date": time.strftime("%Y-%m-%d"), "copies": args.copies, "source": str(source.relative_to(ROOT)),
               "adapter_bytes": sum(f.stat().st_size for f in source.iterdir() if f.name in ("finetune.json", "trainable.safetensors")),
               "runs": runs}
    atomic_write_json(BENCH / "screen_stage1.json", summary)
    atomic_write_text(BENCH / "screen_stage1.md", render(summary))
    print(render(summary))


if __name__ == "__main__":
    main()
