"""Does longer full fine-tuning erase the backdoor? ``configs/cpu-erase.yaml`` and
``configs/cpu-erase-lr1e-4.yaml`` run and recorded (bench/cpu_erase.{json,md}).

Runs ``peftshield run`` on both configs (resumable: cells already in the run folders are
reused, and their time is the time they took then), then reads each run's results.sqlite:
the victim's ASR and CA on the probe texts after every epoch (``cells.details``), and the
PSIM's defended ASR, AUROC and FRR on the test texts.

    .venv/bin/python bench/cpu_erase.py
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RUNS = {"cpu-erase": "configs/cpu-erase.yaml", "cpu-erase-lr1e-4": "configs/cpu-erase-lr1e-4.yaml"}


def learning_rate(config: str, method: str) -> str:
    """The victim's learning rate for ``method`` as the grid config sets it (lr_full or lr_peft)."""
    from peftshield.grid import load_grid_config

    victim = load_grid_config(ROOT / config).victim
    import numpy as np

    return np.format_float_scientific(victim.lr_full if method == "full" else victim.lr_peft, trim="-", exp_digits=1)  # 2e-5


def run_grid(name: str, config: str) -> float:
    started = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).with_name("peftshield")), "run", config, "--out", f"runs/{name}", "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"peftshield run {config} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def read_run(name: str) -> list[dict]:
    from peftshield.grid.store import ResultStore

    store = ResultStore(ROOT / "runs" / name / "results.sqlite")
    metrics: dict[tuple[str, str], float] = {}
    for row in store.rows():
        metrics[(row["cell_key"], f"{row['defense']}.{row['metric']}")] = row["value"]
    out = []
    for cell in store.cells():
        key = cell["cell_key"]
        out.append({
            "run": name, "method": cell["method"], "learning_rate": learning_rate(RUNS[name], cell["method"]), "seconds": cell["seconds"],
            "epochs": [{"epoch": e["epoch"], "asr": e.get("attack_success_rate"), "ca": e.get("clean_accuracy")} for e in cell["details"].get("epochs", [])],
            "psim": {m: metrics.get((key, f"psim.{m}")) for m in ("defended_attack_success_rate", "detection_auroc", "detection_frr")},
        })
    return out


def render(summary: dict) -> str:
    width = max(len(r["epochs"]) for r in summary["rows"])
    lines = [
        "# Does longer full fine-tuning erase the backdoor?",
        "",
        f"Command: `make bench-erase` (= `.venv/bin/python bench/cpu_erase.py`: `peftshield run` on configs/cpu-erase.yaml and "
        f"configs/cpu-erase-lr1e-4.yaml), {summary['date']}, this machine (2 CPU cores); wall seconds per run: "
        + ", ".join(f"{name} {seconds:.0f}" for name, seconds in summary["wall_seconds"].items())
        + " (cells found in a run folder are reused). Each cell: ASR / CA on the probe texts after every victim epoch; PSIM on the test texts.",
        "",
        "| victim | " + " | ".join(f"epoch {i + 1}" for i in range(width)) + " | PSIM defended ASR | PSIM AUROC | PSIM FRR |",
        "|---|" + "---|" * (width + 3),
    ]
    for row in summary["rows"]:
        cells = [f"{e['asr']:.3f} / {e['ca']:.3f}" for e in row["epochs"]] + ["-"] * (width - len(row["epochs"]))
        psim = row["psim"]
        lines.append(f"| {row['method']}, lr {row['learning_rate']} | " + " | ".join(cells)
                     + f" | {psim['defended_attack_success_rate']:.3f} | {psim['detection_auroc']:.3f} | {psim['detection_frr']:.1%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from peftshield.io import atomic_write_json, atomic_write_text

    wall = {name: run_grid(name, config) for name, config in RUNS.items()}
    rows = [row for name in RUNS for row in read_run(name)]
    rows.sort(key=lambda r: (r["run"] != "cpu-erase", r["method"] != "full"))
    summary = {"date": time.strftime("%Y-%m-%d"), "wall_seconds": wall, "rows": rows}
    atomic_write_json(BENCH / "cpu_erase.json", summary)
    atomic_write_text(BENCH / "cpu_erase.md", render(summary))
    print(render(summary))


if __name__ == "__main__":
    main()
