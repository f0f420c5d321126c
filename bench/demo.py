"""``make demo``, recorded: the attack and PSIM end to end on MiniLM, its figures in bench/demo.{json,md}.

Runs the command ``make demo`` runs (``peftshield demo --out runs/demo --attack-data
../shared/data/psim/imdb --data ../shared/data/psim/sst-2``, its defaults; resumable: stages
already in runs/demo are reused and their time is the time they took then), then reads
runs/demo/demo.json and each victim's PSIM report and writes the table docs/results/demo.md
includes.

    .venv/bin/python bench/demo.py [--out runs/demo] [--shared ../shared/data]

With ``--attack-lr 2e-5 --out runs/demo-weak --name demo_weak`` (``make bench-demo-weak``): the
same demo with a weaker attacker, recorded in bench/demo_weak.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def render(summary: dict) -> str:
    demo, psim = summary["demo"], summary["psim"]
    weaker = f" with a weaker attacker (--attack-lr {summary['attack_lr']:g})" if summary.get("attack_lr") else ""
    lines = [
        f"# `make demo`{weaker}, measured",
        "",
        f"Command: `make bench-{summary.get('name', 'demo').replace('_', '-')}` (= `.venv/bin/python bench/demo.py`: `{summary['command']}`), {summary['date']}, this machine "
        f"(2 CPU cores, no GPU), {summary['seconds']:.0f} s wall ({'every stage computed in this run' if summary['fresh'] else 'stages found in the run folder were reused'}). "
        f"Attacker data `{demo['attack_data']}`, victim data `{demo['victim_data']}`.",
        "",
        "| model | CA | ASR | target conf. (triggered) | target conf. (clean) | PSIM defended CA | PSIM defended ASR |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in demo["rows"]:
        defended = row["defended"].get("psim")
        cells = [f"{row['clean_accuracy']:.3f}", f"{row['attack_success_rate']:.3f}", f"{row['target_confidence_poisoned']:.3f}",
                 f"{row['target_confidence_clean']:.3f}", *((f"{defended[0]:.3f}", f"{defended[1]:.3f}") if defended else ("-", "-"))]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"PSIM ({psim['method']}, threshold {psim['threshold']:.3f} calibrated on clean dev): AUROC {psim['auroc']:.3f}, FRR {psim['frr']:.1%}, "
        f"FAR {psim['far']:.1%}, precision {psim['precision']:.3f} on {psim['n_clean']} clean and {psim['n_poisoned']} triggered test texts "
        f"(the same for every victim: the PSIM sits on the backbone).",
        "",
        "Stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in demo["stage_seconds"].items()) + ".",
    ]
    for method, row in summary.get("at_reference_tau", {}).items():
        if row:
            lines += ["", f"At the study's fixed threshold {summary['reference_tau']} instead (the {method} victim): FRR {row['frr']:.1%}, "
                          f"defended CA {row['defended_clean_accuracy']:.3f}, defended ASR {row['defended_attack_success_rate']:.3f}."]
    return "\n".join(lines) + "\n"


REFERENCE_TAU = 0.7  # the study's fixed PSIM threshold, against the dev-calibrated one


def summarize(out: Path, seconds: float, fresh: bool, command: str, attack_lr: float | None = None) -> dict:
    """The figures of the demo in ``out`` (its demo.json and each victim's psim.json)."""
    demo = json.loads((out / "demo.json").read_text())
    reports = {method: json.loads((out / method / "psim.json").read_text()) for method in demo["config"]["methods"]}
    first = reports[demo["config"]["methods"][0]]
    psim = {**first["detection"], "n_clean": first["n_clean"], "n_poisoned": first["n_poisoned"],
            "method": demo["scenario"]["defenses"][0].get("options", {}).get("method", "ptuning")}
    at_reference = {m: next((row for row in r.get("threshold_sweep", []) if abs(row["threshold"] - REFERENCE_TAU) < 1e-9), None) for m, r in reports.items()}
    return {"date": time.strftime("%Y-%m-%d"), "seconds": seconds, "fresh": fresh, "attack_lr": attack_lr,
            "command": command,
            "demo": {k: demo[k] for k in ("rows", "attack_data", "victim_data", "stage_seconds", "notes")}, "psim": psim,
            "psim_per_method": {m: r["detection"] for m, r in reports.items()}, "reference_tau": REFERENCE_TAU, "at_reference_tau": at_reference}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--attack-lr", type=float, default=None, help="the attacker's learning rate (default: the demo's)")
    parser.add_argument("--name", default="demo", help="bench/NAME.{json,md}")
    args = parser.parse_args()
    from peftshield.io import atomic_write_json, atomic_write_text

    out, shared = Path(args.out), Path(args.shared)
    fresh = not out.exists()
    command = [str(Path(sys.executable).with_name("peftshield")), "demo", "--out", str(out), "--attack-data", str(shared / "psim/imdb"),
               "--data", str(shared / "psim/sst-2"), *(["--attack-lr", f"{args.attack_lr:g}"] if args.attack_lr else []), "--no-progress"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"demo failed:\n{done.stderr[-3000:]}")
    shown = " ".join(["peftshield", *command[1:-1]])  # the command as run (without the path to the venv and --no-progress)
    summary = {**summarize(out, time.perf_counter() - started, fresh, shown, args.attack_lr), "name": args.name}
    atomic_write_json(BENCH / f"{args.name}.json", summary)
    atomic_write_text(BENCH / f"{args.name}.md", render(summary))
    print(render(summary))


if __name__ == "__main__":
    main()
