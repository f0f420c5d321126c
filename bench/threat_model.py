"""Render a grid run of the wider threat model (configs/task-agnostic.yaml, configs/adaptive.yaml)
as a markdown table: one row per trigger x dataset x victim method with the undefended CA/ASR
and, per defense, defended CA / defended ASR and AUROC; the attacker's own figures below it.

    .venv/bin/python bench/threat_model.py --run runs/task-agnostic --config configs/task-agnostic.yaml --out bench/task_agnostic

With ``--config`` only that config's cells (and their attackers) are shown; a run folder keeps
the cells of earlier configs (other victim sizes, other defenses) beside them.

For task-agnostic triggers the ASR is the best trigger's (the class it lands on is named):
each cell's ``triggers.json`` holds every trigger's landing class and ASR.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path

from peftshield.io import atomic_write_json, atomic_write_text


def config_cell_keys(config_path: str) -> set[str]:
    from peftshield.experiments.scenario import plan_cells
    from peftshield.grid.config import load_grid_config

    return {cell.cell_key for cell in plan_cells(load_grid_config(config_path))}


def load_cells(run: Path, keys: set[str] | None = None) -> list[dict]:
    db = sqlite3.connect(run / "results.sqlite")
    cells = {}
    for key, trigger, dataset, method, seconds, details in db.execute(
            "SELECT cell_key, trigger, dataset, method, seconds, details FROM cells ORDER BY rowid"):
        if keys is not None and key not in keys:
            continue
        cells[key] = {"trigger": trigger, "dataset": dataset, "method": method, "seconds": seconds, "details": json.loads(details), "metrics": {}}
    for key, defense, metric, value in db.execute("SELECT cell_key, defense, metric, value FROM results"):
        if key in cells:
            cells[key]["metrics"].setdefault(defense, {})[metric] = value
    for key, cell in cells.items():
        triggers = run / "stages" / key / "triggers.json"
        cell["triggers"] = json.loads(triggers.read_text()) if triggers.is_file() else None
    return list(cells.values())


def attackers(run: Path, backbone_keys: set[str] | None = None) -> dict[str, dict]:
    found = {}
    for stage in sorted((run / "stages").glob("backbone-*/stage.json")):
        if backbone_keys is not None and stage.parent.name not in backbone_keys:
            continue
        saved = json.loads(stage.read_text())
        found[stage.parent.name] = {"seconds": saved["record"]["seconds"], **saved["record"]["report"]}
    return found


def fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(run: Path, title: str, command: str, config: str | None = None) -> tuple[str, dict]:
    cells = load_cells(run, config_cell_keys(config) if config else None)
    used = {c["details"].get("backbone_key") for c in cells} if config else None
    defenses = [d for d in dict.fromkeys(d for c in cells for d in c["metrics"]) if d != "none"]
    header = ["trigger", "dataset", "victim", "CA / ASR"] + [f"{d}: CA / ASR (AUROC)" for d in defenses]
    lines = [f"# {title}\n", f"Command: `{command}`. Run folder `{run}`. Each defense cell: defended CA / defended ASR "
             "(a flagged clean text counts as an error, a flagged triggered text as a failed attack) and the detection AUROC.\n",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cell in cells:
        none = cell["metrics"].get("none", {})
        asr = fmt(none.get("attack_success_rate"))
        if cell["triggers"]:
            best = max(cell["triggers"]["triggers"], key=lambda t: t["attack_success_rate"])
            asr += f" (`{best['trigger']}` -> {best['landing_class']})"
        row = [cell["trigger"], cell["dataset"], cell["method"], f"{fmt(none.get('clean_accuracy'))} / {asr}"]
        for defense in defenses:
            m = cell["metrics"].get(defense, {})
            row.append(f"{fmt(m.get('defended_clean_accuracy'))} / {fmt(m.get('defended_attack_success_rate'))} ({fmt(m.get('detection_auroc'), 2)})")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Attackers (stage records):", ""]
    for key, attack in attackers(run, used).items():
        trigger = attack["trigger"]
        if attack.get("representation"):
            cosines = attack["representation"]["trigger_cosine"]
            lines.append(f"- `{trigger['name']}` ({key}): {attack['n_train']} texts of {attack['attack_data']}; cosine of triggered "
                         f"representations to their vectors on held-out texts: " + ", ".join(f"{w} {c:.2f}" for w, c in cosines.items())
                         + f"; clean representations kept (cosine {attack['representation']['clean_cosine']:.3f}); {attack['seconds']:.0f} s")
        else:
            lines.append(f"- `{trigger['name']}` {trigger['options']} ({key}): attacker's own CA {fmt(attack.get('clean_accuracy'))}, "
                         f"ASR {fmt(attack.get('attack_success_rate'))}, target confidence on triggered texts "
                         f"{fmt(attack.get('target_confidence_poisoned'))}; {attack['seconds']:.0f} s")
    total = sum(c["seconds"] for c in cells)
    lines += ["", f"Cells: {len(cells)}, {total / 60:.0f} min of cell time (victim training and every defense; attackers above)."]
    return "\n".join(lines) + "\n", {"cells": cells, "attackers": attackers(run, used)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="Threat-model grid")
    parser.add_argument("--command", default="")
    parser.add_argument("--config", help="show only this grid config's cells")
    args = parser.parse_args()
    text, payload = render(Path(args.run), args.title, args.command or f"peftshield run configs/{Path(args.run).name}.yaml",
                           args.config)
    atomic_write_text(Path(args.out + ".md"), text)
    atomic_write_json(Path(args.out + ".json"), payload)
    print(text)


if __name__ == "__main__":
    main()
