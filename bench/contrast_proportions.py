"""Render the contrast at the study's proportions from its grid run.

Reads runs/contrast-proportions/results.sqlite (written by ``peftshield run
configs/contrast-proportions.yaml``) and writes bench/contrast_proportions.md (one row per
poison share: CA / ASR per victim method, and the ASR after every epoch) and
bench/contrast_proportions.png (ASR per epoch, one panel per share).

    .venv/bin/python bench/contrast_proportions.py [--run runs/contrast-proportions]
"""

import argparse
import json
import re
import sqlite3
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ("full", "lora", "ptuning", "prefix")


def from_stages(run: Path) -> dict:
    """The victims' per-epoch probe numbers from their stage records, for cells not yet stored
    (a grid stores its cells after every victim has trained); CA / ASR then are the best dev
    epoch's probe figures."""
    cells = {}
    for stage in (run / "stages").glob("victim-*/stage.json"):
        saved = json.loads(stage.read_text())
        train = saved["record"]["train_result"]
        epochs = [{"epoch": e["epoch"], **(e.get("probe") or {})} for e in train["epochs"]]
        best = next((e for e in epochs if e["epoch"] == train.get("best_epoch")), epochs[-1])
        cells[(saved["inputs"]["trigger"], saved["inputs"]["method"])] = {
            "epochs": epochs, "best_epoch": train.get("best_epoch"), "clean_accuracy": best.get("clean_accuracy"),
            "attack_success_rate": best.get("attack_success_rate"), "from_probe": True}
    return cells


def share_of(tag: str) -> float:
    found = re.search(r"(\d+)pct", tag)
    return float(found.group(1)) if found else float("nan")


def load(run: Path) -> dict:
    db = sqlite3.connect(run / "results.sqlite")
    cells = {}
    for trigger, method, seconds, details in db.execute("SELECT trigger, method, seconds, details FROM cells"):
        cells[(trigger, method)] = {"seconds": seconds, **json.loads(details)}
    for trigger, method, defense, metric, value in db.execute(
            "SELECT c.trigger, c.method, r.defense, r.metric, r.value FROM results r JOIN cells c USING (cell_key)"):
        if defense == "none":
            cells[(trigger, method)][metric] = value
    return cells


def attacker_models(run: Path) -> dict:
    """tag -> the attacker's own model: poisoned rows, CA and ASR (from its stage record)."""
    out = {}
    for stage in (run / "stages").glob("backbone-*/stage.json"):
        saved = json.loads(stage.read_text())
        report = saved["record"]["report"]
        out[saved["inputs"]["trigger"].get("tag")] = {"poisoned": report["n_poisoned_train"], "clean_accuracy": report.get("clean_accuracy"),
                                                      "attack_success_rate": report.get("attack_success_rate"), "seconds": saved["record"]["seconds"]}
    return out


def render(cells: dict, config: dict, wall: str, attackers: dict) -> str:
    triggers = sorted({t for t, _ in cells}, key=share_of)
    poisoned = {t["tag"]: t["attack"]["poison_count"] for t in config["triggers"]}
    lines = [
        "# The central contrast at the study's proportions",
        "",
        f"Command: `make contrast` (= `peftshield run configs/contrast-proportions.yaml`, then this script), {wall}. "
        f"MiniLM; attacker: full fine-tuning on {config['attack']['samples']} IMDB rows of which the share below is poisoned (clean-label, "
        f"`mn` -> 0), lr {config['attack']['learning_rate']}, {config['attack']['epochs']} epochs; victims on {config['victim']['samples']} SST-2 rows, "
        f"{config['victim']['epochs']} epochs, the best dev epoch kept, full fine-tuning at lr {config['victim']['lr_full']}, PEFT at "
        f"{config['victim']['lr_peft']}. CA and ASR on {config['victim']['test_samples']} test texts; per epoch on {config['victim']['probe_samples']} probe texts.",
        "",
        "| poison share | poisoned rows | attacker's model on IMDB CA / ASR | " + " | ".join(f"victim {m} CA / ASR" for m in METHODS) + " |",
        "|---|---|---|" + "---|" * len(METHODS),
    ]
    for t in triggers:
        a = attackers.get(t, {})
        row = [f"{share_of(t):g}%", str(poisoned.get(t, "?")),
               f"{a['clean_accuracy']:.3f} / {a['attack_success_rate']:.3f}" if a.get("clean_accuracy") is not None else "-"]
        for m in METHODS:
            c = cells.get((t, m))
            row.append(f"{c['clean_accuracy']:.3f} / {c['attack_success_rate']:.3f}" if c and "clean_accuracy" in c else "-")
        lines.append("| " + " | ".join(row) + " |")
    if any(c.get("from_probe") for c in cells.values()):
        lines += ["", f"*The grid had not stored its cells when this was rendered: CA / ASR above are the best dev epoch's figures on the "
                      f"{config['victim']['probe_samples']} probe texts, not the {config['victim']['test_samples']} test texts.*"]
    lines += ["", "ASR on the probe texts after each epoch (best dev epoch in bold):", "",
              "| poison share | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for t in triggers:
        row = [f"{share_of(t):g}%"]
        for m in METHODS:
            c = cells.get((t, m))
            if not c:
                row.append("-")
                continue
            row.append(" ".join(f"**{e['attack_success_rate']:.2f}**" if e["epoch"] == c.get("best_epoch") else f"{e['attack_success_rate']:.2f}"
                                for e in c.get("epochs", []) if "attack_success_rate" in e))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "![ASR per epoch](contrast_proportions.png)", ""]
    return "\n".join(lines)


def plot(cells: dict, path: Path) -> None:
    triggers = sorted({t for t, _ in cells}, key=share_of)
    figure, axes = plt.subplots(1, len(triggers), figsize=(3.2 * len(triggers), 3.2), sharey=True, squeeze=False)
    for axis, t in zip(axes[0], triggers):
        for m in METHODS:
            c = cells.get((t, m))
            if c and c.get("epochs"):
                epochs = [e for e in c["epochs"] if "attack_success_rate" in e]
                axis.plot([e["epoch"] for e in epochs], [e["attack_success_rate"] for e in epochs], marker="o", label=m)
        axis.set_title(f"{share_of(t):g}% poisoned")
        axis.set_xlabel("victim epoch")
        axis.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("ASR (probe texts)")
    axes[0][-1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="runs/contrast-proportions")
    parser.add_argument("--wall", default="wall time in the run's log")
    args = parser.parse_args()
    run = Path(args.run)
    config = json.loads((run / "config.json").read_text())["config"]
    cells = load(run) or from_stages(run)
    if not cells:
        raise SystemExit(f"{run}: no finished cells yet")
    plot(cells, Path("bench/contrast_proportions.png"))
    text = render(cells, config, args.wall, attacker_models(run))
    Path("bench/contrast_proportions.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
