"""Which detectors catch which attack: the defense table's attack rows, gathered from their bench files.

Every figure here is read from a bench file another benchmark wrote (nothing is re-run); this
script only lines the rows up per attack and per detector that a guard can load (``psim``, and
``detector fit`` for ``dan``, ``shift``, ``psimplus``):

- badnet and insent (clean-label, rare word / sentence): bench/defense_table_shift.json
- syntactic (HiddenKiller's SCPN template): bench/defense_table_syntactic.json, bench/syntactic_strong.json,
  bench/syntactic_ag.json
- neuba and por (task-agnostic): bench/task_agnostic.json
- lowconf and psimaware (adaptive), and badnet beside them: bench/adaptive.json

In each row a detector's threshold was calibrated on its own to 1% of the clean dev texts;
*detected* is the share of the triggered test texts above it (1 - FAR) and *FRR* the share of
the clean test texts. A row is **covered** by a detector that alone detects at least 90% of the
triggered texts at an FRR of at most 2% (a 1% target on a finite test set). The union of two
members is not in these files (they hold rates, not each text's flags); ``calibrate --detector``
bounds a union's false rejections by the one budget (bench/guard_drift.md).

    .venv/bin/python bench/attack_coverage.py        # writes bench/attack_coverage.{json,md}
"""

from __future__ import annotations

import json
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
DETECTORS = ("psim", "dan", "shift", "psimplus")
NEEDS = {
    "psim": "the suspect backbone and clean texts of the task (`psim train`)",
    "dan": "the deployed model and clean texts of its traffic (`detector fit dan`)",
    "shift": "the public original the backbone was fine-tuned from (`detector fit shift --option original=NAME`)",
    "psimplus": "the suspect backbone and clean texts (`detector fit psimplus`)",
}
COVERED = 0.9  # detected share of triggered texts
MAX_FRR = 0.02  # test FRR at a 1% calibration target
TABLES = ("defense_table_shift", "defense_table_syntactic", "syntactic_strong", "syntactic_ag")
CELLS = ("task_agnostic", "adaptive")


def rows_from_tables() -> list[dict]:
    rows: dict[tuple, dict] = {}
    for name in TABLES:
        for row in json.loads((BENCH / f"{name}.json").read_text())["rows"]:
            if row["defense"] not in DETECTORS:
                continue
            key = (row["trigger"].split("-")[0], row["dataset"], "lora", name)
            rows.setdefault(key, {"attack": key[0], "dataset": key[1], "victim": "lora", "source": f"bench/{name}.md", "members": {}})
            rows[key]["members"][row["defense"]] = {"detected": 1 - row["FAR"], "frr": row["FRR"], "triggered": row["n triggered"],
                                                   "clean": row["n clean"]}
    return list(rows.values())


def rows_from_cells() -> list[dict]:
    rows = []
    for name in CELLS:
        for cell in json.loads((BENCH / f"{name}.json").read_text())["cells"]:
            members = {defense: {"detected": 1 - values["detection_far"], "frr": values["detection_frr"],
                                 "triggered": int(cell["metrics"]["none"]["n_poisoned"]), "clean": int(cell["metrics"]["none"]["n_clean"])}
                       for defense, values in cell["metrics"].items() if defense in DETECTORS}
            rows.append({"attack": cell["trigger"].split("-")[0], "dataset": cell["dataset"], "victim": cell["method"],
                         "source": f"bench/{name}.md", "members": members})
    return rows


def judged(row: dict) -> dict:
    covering = [name for name in DETECTORS if name in row["members"]
                and row["members"][name]["detected"] >= COVERED and row["members"][name]["frr"] <= MAX_FRR]
    return {**row, "covered_by": covering}


def render(summary: dict) -> str:
    lines = [
        "# Which detectors catch which attack",
        "",
        f"Command: `make bench-coverage` (= `.venv/bin/python bench/attack_coverage.py`), {summary['date']}: gathered from the bench files "
        "named in each row, nothing re-run. Each cell: the share of triggered test texts the detector flags, and its FRR on the clean test "
        "texts, with its threshold calibrated on its own to 1% of clean dev texts. A row is covered by a detector that alone flags at "
        f"least {COVERED:.0%} of the triggered texts at an FRR of at most {MAX_FRR:.0%}; `-`: not measured in that bench.",
        "",
        "| attack | dataset | victim | " + " | ".join(DETECTORS) + " | covered by | bench file |",
        "|---|---|---|" + "---|" * len(DETECTORS) + "---|---|",
    ]
    for row in summary["rows"]:
        cells = [f"{row['members'][n]['detected']:.1%} ({row['members'][n]['frr']:.1%})" if n in row["members"] else "-" for n in DETECTORS]
        lines.append(f"| {row['attack']} | {row['dataset']} | {row['victim']} | " + " | ".join(cells) + " | "
                     + (", ".join(row["covered_by"]) or "**none**") + f" | {row['source']} |")
    lines += ["", "## Reading it", "", *summary["reading"], "", "What each detector needs:", ""]
    lines += [f"- **{name}**: {need}" for name, need in NEEDS.items()]
    return "\n".join(lines) + "\n"


def reading(rows: list[dict]) -> list[str]:
    def covered(members: tuple[str, ...]) -> int:
        return sum(any(name in r["covered_by"] for name in members) for r in rows)

    sets = [("psim",), ("psim", "shift"), ("psim", "dan"), ("psim", "dan", "shift")]
    cells = {(r["attack"], r["dataset"], r["victim"]) for r in rows}
    twice = sorted(f"{a} {d} {v}" for a, d, v in cells if sum((r["attack"], r["dataset"], r["victim"]) == (a, d, v) for r in rows) > 1)
    out = ["- Rows covered, of " + str(len(rows)) + ", by a detector set (a row counts when one member covers it; the set's FRR is at most "
           "the sum of its members'): " + "; ".join(f"{' + '.join(members)} {covered(members)}" for members in sets) + ".",
           f"- The {len(rows)} rows are measurements, not distinct attacks: {len(cells)} attack x dataset x victim cells"
           + (f", of which {', '.join(twice)} were measured in two bench files (separate runs, one row each)." if twice else ".")]
    for attack in dict.fromkeys(r["attack"] for r in rows):
        mine = [r for r in rows if r["attack"] == attack]
        counts = ", ".join(f"{name} {sum(name in r['covered_by'] for r in mine)}" for name in DETECTORS
                           if any(name in r["members"] for r in mine))
        uncovered = [f"{r['dataset']} ({r['source']})" for r in mine if not r["covered_by"]]
        out.append(f"- **{attack}** ({len(mine)} rows; covered by {counts})"
                   + (f": no detector covers {', '.join(uncovered)}." if uncovered else ": every row covered."))
    return out


def main() -> None:
    rows = [judged(row) for row in rows_from_tables() + rows_from_cells()]
    order = ("badnet", "insent", "syntactic", "neuba", "por", "lowconf", "psimaware")
    rows.sort(key=lambda r: (order.index(r["attack"]) if r["attack"] in order else len(order), r["source"], r["dataset"], r["victim"]))
    summary = {"date": time.strftime("%Y-%m-%d"), "covered_detected": COVERED, "covered_max_frr": MAX_FRR, "rows": rows, "reading": reading(rows)}
    (BENCH / "attack_coverage.json").write_text(json.dumps(summary, indent=2) + "\n")
    (BENCH / "attack_coverage.md").write_text(render(summary))
    print("\n".join(summary["reading"]))


if __name__ == "__main__":
    main()
