"""The study's two tables from the result store's rows, mean and std over seeds."""

from __future__ import annotations

import html
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from peftshield.grid.store import NO_DEFENSE
from peftshield.markdown import md_text


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = [f"### {md_text(self.title)}", "", "| " + " | ".join(map(md_text, self.columns)) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(map(md_text, row)) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in self.rows)
        return f"<h3>{html.escape(self.title)}</h3>\n<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n"


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def collect(rows: list[dict]) -> dict[tuple, list[float]]:
    """(dataset, trigger, method, defense, metric) -> one value per seed."""
    grouped: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        grouped[(row["dataset"], row["trigger"], row["method"], row["defense"], row["metric"])].append(row["value"])
    return grouped


def attack_table(rows: list[dict], methods: list[str]) -> Table:
    """CA / ASR per dataset x trigger (rows) and fine-tuning method (columns), undefended."""
    grouped = collect(rows)
    keys = sorted({(r["dataset"], r["trigger"]) for r in rows})
    table_rows = []
    for dataset, trigger in keys:
        cells = []
        for method in methods:
            ca = mean_std(grouped.get((dataset, trigger, method, NO_DEFENSE, "clean_accuracy"), []))
            asr = mean_std(grouped.get((dataset, trigger, method, NO_DEFENSE, "attack_success_rate"), []))
            cells.append(f"{ca} / {asr}")
        table_rows.append([dataset, trigger, *cells])
    return Table("CA / ASR per attack and fine-tuning method (no defense)", ["dataset", "trigger", *methods], table_rows)


def defense_table(rows: list[dict], defenses: list[str]) -> Table:
    """Defended CA / ASR and detection per dataset x trigger x method x defense."""
    grouped = collect(rows)
    keys = sorted({(r["dataset"], r["trigger"], r["method"]) for r in rows})
    table_rows = []
    for dataset, trigger, method in keys:
        def get(defense: str, metric: str) -> str:
            return mean_std(grouped.get((dataset, trigger, method, defense, metric), []))

        table_rows.append([dataset, trigger, method, "none", get(NO_DEFENSE, "clean_accuracy"), get(NO_DEFENSE, "attack_success_rate"), "-", "-"])
        for defense in defenses:
            table_rows.append([dataset, trigger, method, defense, get(defense, "defended_clean_accuracy"), get(defense, "defended_attack_success_rate"),
                               get(defense, "detection_auroc"), get(defense, "detection_frr")])
    return Table("Defended CA / ASR per defense, attack and dataset", ["dataset", "trigger", "method", "defense", "CA", "ASR", "AUROC", "FRR"], table_rows)
