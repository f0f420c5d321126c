"""PNG plots of a grid run (matplotlib, no display needed)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import roc_curve

from peftshield.grid.store import NO_DEFENSE
from peftshield.plotting import pyplot

plt = pyplot()  # this module only draws


def _save(figure, path: Path, layout_rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    figure.tight_layout(rect=layout_rect)
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    tmp.replace(path)
    return path


def confidence_histograms(scores: dict, title: str, path: Path) -> Path:
    """Target-class confidence of clean vs triggered texts under the victim, and PSIM scores."""
    panels = [(NO_DEFENSE, "victim: target-class confidence")] + ([("psim", "PSIM: max softmax confidence")] if "psim" in scores else [])
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    bins = np.linspace(0, 1, 41)
    for axis, (key, label) in zip(axes[0], panels):
        axis.hist(scores[key]["clean"], bins=bins, alpha=0.6, label="clean", color="tab:blue")
        axis.hist(scores[key]["poisoned"], bins=bins, alpha=0.6, label="triggered", color="tab:red")
        axis.set_yscale("log")
        axis.set_ylim(bottom=0.7)  # a single text still shows as a bar on the log axis
        axis.set_xlabel(label)
        axis.set_ylabel("texts (log)")
        axis.legend()
    figure.suptitle(title)
    return _save(figure, path)


def roc_curves(scores: dict, title: str, path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(4.8, 4.4))
    for defense, values in scores.items():
        if defense == NO_DEFENSE or not values["clean"] or not values["poisoned"]:
            continue
        truth = np.r_[np.zeros(len(values["clean"])), np.ones(len(values["poisoned"]))]
        fpr, tpr, _ = roc_curve(truth, np.r_[values["clean"], values["poisoned"]])
        axis.plot(fpr, tpr, label=defense)
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axis.set_xlabel("false rejection rate (clean)")
    axis.set_ylabel("detection rate (triggered)")
    axis.set_title(title)
    axis.legend(loc="lower right")
    return _save(figure, path)


def asr_per_method(rows: list[dict], path: Path) -> Path:
    """Mean undefended ASR per fine-tuning method, one group of bars per dataset x trigger."""
    values: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["defense"] == NO_DEFENSE and row["metric"] == "attack_success_rate":
            values[(row["dataset"], row["trigger"])][row["method"]].append(row["value"])
    groups = sorted(values)
    methods = sorted({m for g in groups for m in values[g]}, key=lambda m: (m != "full", m))
    figure, axis = plt.subplots(figsize=(max(5, 1.2 * len(groups) * len(methods) / 2 + 2), 3.8))
    width = 0.8 / max(1, len(methods))
    for index, method in enumerate(methods):
        means = [np.mean(values[g][method]) if values[g][method] else np.nan for g in groups]
        axis.bar(np.arange(len(groups)) + index * width, means, width, label=method)
    axis.set_xticks(np.arange(len(groups)) + width * (len(methods) - 1) / 2, [f"{d}\n{t}" for d, t in groups])
    axis.set_ylim(0, 1.3)
    axis.set_yticks(np.linspace(0, 1, 6))
    axis.set_ylabel("attack success rate")
    axis.set_title("ASR after victim fine-tuning, per method")
    axis.legend(loc="upper center", ncol=min(8, len(methods)), fontsize=8)
    return _save(figure, path)


def asr_over_epochs(cells: list[dict], path: Path) -> Path:
    """ASR (solid) and clean accuracy (dashed) after every victim epoch, one colour and marker per method
    (mean over seeds), one panel per dataset x trigger, one legend for the figure."""
    curves: dict[tuple, dict[str, dict[str, dict[int, list[float]]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    for cell in cells:
        for epoch in cell["details"].get("epochs", []):
            for metric in ("attack_success_rate", "clean_accuracy"):
                if metric in epoch:
                    curves[(cell["dataset"], cell["trigger"])][cell["method"]][metric][epoch["epoch"]].append(epoch[metric])
    groups = sorted(curves)
    methods = sorted({method for group in groups for method in curves[group]})
    markers = "osD^vPX*"
    figure, axes = plt.subplots(1, max(1, len(groups)), figsize=(4.2 * max(1, len(groups)), 3.9), squeeze=False)
    for axis, group in zip(axes[0], groups):
        for index, method in enumerate(methods):
            style = {"color": f"C{index}", "marker": markers[index % len(markers)], "markersize": 9 - 2 * (index % 4)}
            for metric, linestyle, label in (("attack_success_rate", "-", "ASR"), ("clean_accuracy", "--", "CA")):
                by_epoch = curves[group][method][metric]
                epochs = sorted(by_epoch)
                if epochs:
                    axis.plot(epochs, [np.mean(by_epoch[e]) for e in epochs], linestyle=linestyle, label=f"{method} {label}", **style)
        axis.set_title(f"{group[0]} / {group[1]}")
        axis.set_xlabel("victim fine-tuning epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel("probe subset")
        axis.set_ylim(-0.02, 1.05)
    legend = {label: handle for axis in axes[0] for handle, label in zip(*axis.get_legend_handles_labels())}
    figure.legend(legend.values(), legend.keys(), loc="lower center", ncol=min(8, len(legend)), fontsize=8, frameon=False)
    return _save(figure, path, layout_rect=(0, 0.07, 1, 1))
