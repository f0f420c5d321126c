"""``peftshield report RUN_DIR``: tables (Markdown and HTML) and plots from a grid run."""

from __future__ import annotations

import html
from pathlib import Path

from peftshield.errors import ConfigError
from peftshield.experiments.config import slug
from peftshield.grid.runner import CONFIG_FILE, STORE_FILE
from peftshield.grid.store import NO_DEFENSE, ResultStore
from peftshield.io import atomic_write_text, read_json
from peftshield.markdown import md_code, md_text
from peftshield.report import plots
from peftshield.report.tables import attack_table, defense_table

PEFT_PREFERENCE = ("lora", "ptuning", "prompt", "prefix", "adapter", "ia3", "adalora", "full")


def _representative_cells(cells: list[dict]) -> dict[tuple, dict]:
    """One cell per dataset x trigger for the per-run plots: a PEFT victim (LoRA first), lowest seed."""
    chosen: dict[tuple, dict] = {}
    for cell in sorted(cells, key=lambda c: (PEFT_PREFERENCE.index(c["method"]) if c["method"] in PEFT_PREFERENCE else 99, c["seed"])):
        chosen.setdefault((cell["dataset"], cell["trigger"]), cell)
    return chosen


def render_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / STORE_FILE).is_file():
        raise ConfigError(f"{run_dir}: not a grid run (no {STORE_FILE}; create one with 'peftshield run CONFIG.yaml')")
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    store = ResultStore(run_dir / STORE_FILE)
    rows, cells = store.rows(), store.cells()
    if not rows:
        raise ConfigError(f"{run_dir / STORE_FILE}: no finished cells yet")
    config = read_json(run_dir / CONFIG_FILE)["config"] if (run_dir / CONFIG_FILE).is_file() else {}
    methods = config.get("methods") or sorted({r["method"] for r in rows})
    configured = [d.get("label") or d["name"] if isinstance(d, dict) else d for d in config.get("defenses") or []]
    defenses = [d for d in (configured or sorted({r["defense"] for r in rows})) if d != NO_DEFENSE]
    tables = [attack_table(rows, methods), defense_table(rows, defenses)]

    figures = [("ASR per fine-tuning method", plots.asr_per_method(rows, out / "asr_per_method.png")),
               ("ASR and clean accuracy over victim fine-tuning epochs", plots.asr_over_epochs(cells, out / "asr_over_epochs.png"))]
    for (dataset, trigger), cell in sorted(_representative_cells(cells).items()):
        scores_file = run_dir / "stages" / cell["cell_key"] / "scores.json"
        if not scores_file.is_file():
            continue
        scores = read_json(scores_file)
        tag = slug(f"{dataset}_{trigger}_{cell['method']}_seed{cell['seed']}")
        title = f"{dataset} / {trigger} / victim {cell['method']} (seed {cell['seed']})"
        figures.append((f"Confidence histograms: {title}", plots.confidence_histograms(scores, title, out / f"confidence_{tag}.png")))
        if len(scores) > 1:
            figures.append((f"ROC curves: {title}", plots.roc_curves(scores, title, out / f"roc_{tag}.png")))

    seeds = sorted({c["seed"] for c in cells})
    intro = f"Run {md_code(str(run_dir))}: {len(cells)} cells, seeds {seeds}; values are mean ± std over seeds where there are several."
    markdown = [f"# peftshield report: {md_text(str(config.get('name', run_dir.name)))}\n", intro + "\n"] + [t.markdown() for t in tables]
    markdown += [f"### {md_text(caption)}\n\n![{md_text(caption)}]({path.name})\n" for caption, path in figures]
    atomic_write_text(out / "report.md", "\n".join(markdown))
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>peftshield report</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>",
            f"<h1>peftshield report: {html.escape(str(config.get('name', run_dir.name)))}</h1><p>{html.escape(intro)}</p>"]
    page += [t.html() for t in tables]
    page += [f"<h3>{html.escape(caption)}</h3><img src='{path.name}' alt='{html.escape(caption)}'>" for caption, path in figures]
    atomic_write_text(out / "report.html", "\n".join(page) + "</body></html>\n")
    return out
