"""Can a detector trained on labelled adapters rank a fleet where the unsupervised outlier score
could not? (bench/screen_detector.{json,md}, ``make bench-screen-detector``)

Stage 1's shipped score (``FleetScreen``) measures how unusual an adapter is against its cohort:
same base model, rank and modules. On zoo v2's test half it ranked backdoored adapters below
clean ones (AUROC 0.42, bench/screen.md, screen-score revision 1). Two things are measured here:

1. **Where the outlier score's premise fails.** It assumes backdoored adapters are a minority of
   their cohort. For each cohort of the test half: its size, its backdoored share (from the
   manifest) and the outlier score's AUROC inside it. These re-read revision 1's score (the same
   deterministic computation, nothing chosen), per cohort.
2. **A supervised detector** (issue 27: "optionally a detector trained on a labelled zoo"):
   logistic regression over an adapter's own stage-1 features (no fleet needed). Everything it
   chooses (which features, the regularisation) is chosen by leave-one-out AUROC on the
   **design** half's adapters only; the chosen detector is then fitted on the whole design half
   and scored once on the **test** half (screen-score revision 2, bench/zoo/revisions.md).

    .venv/bin/python bench/screen_detector.py [--zoo runs/zoo-v2]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "screen_detector.json"
sys.path.insert(0, str(BENCH))
from screen import auroc  # noqa: E402

REGULARISATION = (0.01, 0.1, 1.0, 10.0)  # sklearn's C: the inverse of the L2 penalty


def zoo_adapters(zoo: Path, split: str):
    """(manifest entry, stage-1 features) of every built LoRA adapter of ``split``; the names not built."""
    from peftshield.screen.weights import adapter_features

    manifest = json.loads((BENCH / "zoo" / "manifest.json").read_text())
    found, missing = [], []
    for entry in manifest["entries"]:
        if entry["split"] != split or entry["kind"] != "adapter":
            continue
        built = zoo / "entries" / f"{entry['name']}.json"
        if not built.is_file():
            missing.append(entry["name"])
            continue
        found.append((entry, adapter_features(json.loads(built.read_text())["audit"]["adapter"])))
    return found, missing


def feature_sets(names: list[str]) -> dict[str, list[str]]:
    """The candidate inputs: fleet-wide summaries, the same with the rank, every per-module statistic."""
    summary = [n for n in names if n.startswith(("all.", "head."))]
    return {"log rank alone (baseline: the zoo's construction)": ["log_rank"], "summary": summary,
            "summary + log rank": summary + ["log_rank"], "every module": names + ["log_rank"]}


def table(adapters, columns: list[str]) -> np.ndarray:
    rows = []
    for _, features in adapters:
        value = dict(zip(features.names, features.values))
        value["log_rank"] = math.log(features.details["rank"][0])
        rows.append([value[c] for c in columns])
    return np.array(rows, dtype=np.float64)


def model(c: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=5000))


# Clean families trained with the backdoored adapters' own recipe (learning rate, rows, epochs);
# the other clean variants change the recipe itself.
SAME_RECIPE = ("clean-r4", "clean-r16", "clean-seed", "shortcut", "label-noise")


def recipe_group(entry: dict, features) -> str:
    """The recipe an adapter was trained with, as far as a score could tell it apart: its rank,
    and whether the clean variant changed the backdoored adapters' learning rate, rows or epochs."""
    same = entry["backdoored"] or entry["family"] in SAME_RECIPE
    return f"r{features.details['rank'][0]}/{'default' if same else entry['family']}"


def same_recipe_auroc(scores: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float | None:
    """AUROC over the (backdoored, clean) pairs trained with one recipe and rank only. The zoo gave
    its backdoored adapters ranks 4, 8 and 16 in turn, most clean ones rank 8, and some clean ones
    another learning rate, size or length of training: a score that learnt any of these would
    rank well overall. Compared within a recipe, only the data (the poison) differs."""
    pairs = [(p > n) + 0.5 * (p == n) for g in np.unique(groups)
             for p in scores[(y == 1) & (groups == g)] for n in scores[(y == 0) & (groups == g)]]
    return float(np.mean(pairs)) if pairs else None


def leave_one_out_scores(x: np.ndarray, y: np.ndarray, c: float) -> np.ndarray:
    scores = np.empty(len(y))
    for held in range(len(y)):
        keep = np.arange(len(y)) != held
        scores[held] = model(c).fit(x[keep], y[keep]).decision_function(x[held:held + 1])[0]
    return scores


def top_share_recall(scores: np.ndarray, y: np.ndarray, share: float) -> dict:
    k = math.ceil(share * len(y) - 1e-9)
    order = np.argsort(-scores, kind="stable")[:k]
    return {"k": k, "backdoored_in_top": int(y[order].sum())}


def per_cohort(test) -> list[dict]:
    """Revision 1's outlier score over the test half, read per cohort."""
    from peftshield.screen import FleetScreen
    from peftshield.screen.fleet import cohort_id

    features = [f for _, f in test]
    scores = FleetScreen().fit(features).score(features)
    out = []
    for cohort in sorted({f.cohort for f in features}, key=lambda c: json.loads(c)["ranks"]):
        members = [i for i, f in enumerate(features) if f.cohort == cohort]
        bad = [scores[i] for i in members if test[i][0]["backdoored"]]
        good = [scores[i] for i in members if not test[i][0]["backdoored"]]
        out.append({"cohort": cohort_id(cohort), "rank": json.loads(cohort)["ranks"][0], "adapters": len(members), "backdoored": len(bad),
                    "outlier_auroc": auroc(bad, good) if bad and good else None})
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zoo", default="runs/zoo-v2")
    parser.add_argument("--design-only", action="store_true", help="print the design half's candidates; never look at the test half")
    args = parser.parse_args()
    zoo = ROOT / args.zoo
    design, design_missing = zoo_adapters(zoo, "design")
    test, test_missing = zoo_adapters(zoo, "test")
    if not design or not test:
        raise SystemExit(f"build zoo v2's adapters first (bench/zoo/build.py): {len(design)} design, {len(test)} test built")
    names = design[0][1].names
    common = [n for n in names if all(n in f.names for _, f in design + test)]
    y_design = np.array([int(e["backdoored"]) for e, _ in design])

    # --- choices, on the design half only
    group_design = np.array([recipe_group(e, f) for e, f in design])
    candidates = []
    for label, columns in feature_sets(common).items():
        x = table(design, columns)
        for c in REGULARISATION:
            loo = leave_one_out_scores(x, y_design, c)
            candidates.append({"features": label, "C": c, "columns": columns, "design_loo_auroc": auroc(loo[y_design == 1].tolist(), loo[y_design == 0].tolist()),
                               "design_loo_same_recipe_auroc": same_recipe_auroc(loo, y_design, group_design)})
    # Chosen by the same-recipe figure (the overall one rewards learning the zoo's construction); ties go
    # to fewer inputs, then to the stronger penalty. The rank-alone baseline is never chosen.
    eligible = [r for r in candidates if r["columns"] != ["log_rank"]]
    chosen = max(eligible, key=lambda r: (round(r["design_loo_same_recipe_auroc"] or 0.0, 6), -len(r["columns"]), -r["C"]))
    if args.design_only:
        for r in candidates:
            print(f"{r['features'][:24]:>24} C={r['C']:<5g} design LOO AUROC {r['design_loo_auroc']:.3f} same recipe {r['design_loo_same_recipe_auroc']:.3f}")
        print(f"chosen: {chosen['features']}, C={chosen['C']:g}; {len(design)} design adapters, not built: {design_missing}")
        return

    # --- one look at the test half
    y_test = np.array([int(e["backdoored"]) for e, _ in test])
    fitted = model(chosen["C"]).fit(table(design, chosen["columns"]), y_design)
    scores = fitted.decision_function(table(test, chosen["columns"]))
    group_test = np.array([recipe_group(e, f) for e, f in test])
    baseline = model(1.0).fit(table(design, ["log_rank"]), y_design).decision_function(table(test, ["log_rank"]))
    held_out = {"auroc": auroc(scores[y_test == 1].tolist(), scores[y_test == 0].tolist()),
                "same_recipe_auroc": same_recipe_auroc(scores, y_test, group_test),
                "rank_alone_auroc": auroc(baseline[y_test == 1].tolist(), baseline[y_test == 0].tolist()),
                **{f"top_{int(s * 100)}pct": top_share_recall(scores, y_test, s) for s in (0.10, 0.25, 0.50)}}
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "design": {"adapters": len(design), "backdoored": int(y_design.sum()), "not_built": design_missing},
        "test": {"adapters": len(test), "backdoored": int(y_test.sum()), "not_built": test_missing},
        "test_cohorts": per_cohort(test),
        "candidates": [{k: v for k, v in r.items() if k != "columns"} | {"inputs": len(r["columns"])} for r in candidates],
        "chosen": {"features": chosen["features"], "C": chosen["C"], "inputs": len(chosen["columns"]),
                   "design_loo_auroc": chosen["design_loo_auroc"], "design_loo_same_recipe_auroc": chosen["design_loo_same_recipe_auroc"]},
        "held_out": held_out,
    }
    from peftshield.io import atomic_write_json, atomic_write_text

    atomic_write_json(RESULTS, results)
    atomic_write_text(BENCH / "screen_detector.md", render(results))
    print(render(results))


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render(r: dict) -> str:
    d, t, h = r["design"], r["test"], r["held_out"]
    lines = [
        "# Stage 1 on zoo v2: where the outlier score fails, and a detector trained on the design half", "",
        f"Recorded by `make bench-screen-detector` (`bench/screen_detector.py`), {r['date']}. "
        f"Design half: {d['adapters']} LoRA adapters ({d['backdoored']} backdoored). "
        f"Test half: {t['adapters']} ({t['backdoored']} backdoored). Labels from bench/zoo/manifest.json.", "",
        "## The outlier score per cohort of the test half (revision 1's score, read per cohort)", "",
        "| cohort | rank | adapters | backdoored | outlier-score AUROC inside it |", "|---|---|---|---|---|",
    ]
    for c in r["test_cohorts"]:
        value = "-" if c["outlier_auroc"] is None else f"{c['outlier_auroc']:.2f}"
        lines.append(f"| {c['cohort']} | {c['rank']} | {c['adapters']} | {c['backdoored']} ({c['backdoored'] / c['adapters']:.0%}) | {value} |")
    lines += [
        "", "## A supervised detector: chosen on the design half, scored once on the test half", "",
        "Logistic regression (standardised inputs, balanced classes) over an adapter's own stage-1 features. "
        "Leave-one-out AUROC on the design half for each candidate:", "",
        "| inputs | count | C | design leave-one-out AUROC | the same, within a recipe |", "|---|---|---|---|---|",
    ]
    for c in r["candidates"]:
        lines.append(f"| {c['features']} | {c['inputs']} | {c['C']:g} | {c['design_loo_auroc']:.2f} | {_figure(c['design_loo_same_recipe_auroc'])} |")
    ch = r["chosen"]
    lines += [
        "", "The zoo gave its backdoored adapters ranks 4, 8 and 16 in turn, most clean ones rank 8, and some clean ones another "
        "learning rate, size or length of training: a score could learn the zoo's construction. A candidate is therefore chosen "
        "by its AUROC *within a recipe*: only (backdoored, clean) pairs of one rank and one training recipe are compared (clean "
        f"families trained as the backdoored ones are: {', '.join(SAME_RECIPE)}), so only the data differs. The rank-alone "
        "baseline is never chosen.", "",
        f"Chosen: **{ch['features']}, C = {ch['C']:g}** (design leave-one-out AUROC {ch['design_loo_auroc']:.2f}, within a recipe "
        f"{_figure(ch['design_loo_same_recipe_auroc'])}), fitted on the whole design half.", "",
        "| held-out figure (test half, screen-score revision 2) | value |", "|---|---|",
        f"| AUROC, backdoored vs clean | {h['auroc']:.2f} |",
        f"| **AUROC within a recipe** (only the poison differs) | **{_figure(h['same_recipe_auroc'])}** |",
        f"| AUROC of the rank alone (baseline fitted on the design half) | {h['rank_alone_auroc']:.2f} |",
    ]
    for key, label in (("top_10pct", "10%"), ("top_25pct", "25%"), ("top_50pct", "50%")):
        lines.append(f"| backdoored in its top {label} (top {h[key]['k']}) | {h[key]['backdoored_in_top']} of {t['backdoored']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
