"""An audit's files: ``audit.json``, ``report.md``, ``report.html`` and ``audit.png``."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np

from peftshield.audit.auditor import AuditResult
from peftshield.markdown import md_code, md_text
from peftshield.plotting import pyplot

PLOT_FILE = "audit.png"


def plot_audit(result: AuditResult, path: Path) -> Path:
    """Left: the search effect of the best scored candidates per target class. Right: the
    clean texts' confidence against the held-out texts carrying the top trigger."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    for target in range(result.num_labels):
        effects = sorted((c["search_effect"] for c in result.candidates if c["target"] == target), reverse=True)[:200]
        if effects:
            left.plot(range(1, len(effects) + 1), effects, marker=".", linewidth=1, label=f"target {target}")
    left.set_xlabel("candidate rank")
    left.set_ylabel("mean target probability (search texts)")
    left.set_ylim(0, 1.02)
    left.set_title("per-candidate effect")
    left.legend()
    bins = np.linspace(0, 1, 41)
    right.hist(result.clean_confidences, bins=bins, alpha=0.6, color="tab:blue", label="clean texts (max prob)")
    if result.triggers:
        right.hist(result.triggered_confidences, bins=bins, alpha=0.6, color="tab:red",
                   label=f"with '{result.triggers[0].text}' (target {result.triggers[0].target} prob)")
    right.axvline(result.reference_confidence, color="grey", linestyle="--", linewidth=1, label="confident-flip reference")
    right.set_yscale("log")
    right.set_ylim(bottom=0.7)
    right.set_xlabel("confidence")
    right.set_ylabel("texts (log)")
    right.set_title("clean vs triggered")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def markdown_report(result: AuditResult) -> str:
    target = f" + adapter {md_code(result.adapter)}" if result.adapter else ""
    calibration = result.calibration
    cal_line = (f"clean reference: mean {calibration['clean_mean']:.3f}, sd {calibration['clean_std']:.3f} over {calibration['n_clean']} clean checkpoints"
                f" ({md_text(calibration['source'])})" if calibration else "no calibration available: verdict left inconclusive")
    lines = [
        f"# Audit of {md_code(result.checkpoint)}{target}", "",
        f"**Verdict: {result.verdict}** (suspicion {_fmt(result.score)}, raw score {result.raw_score:.3f}; {cal_line}).", "",
        f"Probe: {'the checkpoint' + chr(39) + 's own classification head' if result.probe == 'head' else 'a random-label PSIM fitted on the clean texts (no trained head)'}; "
        f"clean texts: {md_code(result.texts)}; a flip counts as confident at target probability >= {result.reference_confidence:.3f}.", "",
        *[f"**Caveat:** {md_text(c)}." for c in result.caveats], *([""] if result.caveats else []),
        "| # | trigger | target | flip rate | confidence | confident flips | collapse | raw score |", "|---|---|---|---|---|---|---|---|",
    ]
    for i, t in enumerate(result.triggers, 1):
        lines.append(f"| {i} | {md_code(t.text)} | {t.target} | {t.flip_rate:.3f} | {t.confidence:.3f} | {t.confident_flip_rate:.3f} | {t.collapse:.3f} | {t.raw_score:.3f} |")
    lines += ["", "Seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items())
              + "; texts through the model: " + ", ".join(f"{k} {v:,}" for k, v in result.forward_rows.items()) + ".", "",
              f"![per-candidate effect and confidences]({PLOT_FILE})", ""]
    return "\n".join(lines)


def html_report(result: AuditResult) -> str:
    rows = "".join(
        f"<tr><td>{i}</td><td><code>{html.escape(t.text)}</code></td><td>{t.target}</td><td>{t.flip_rate:.3f}</td><td>{t.confidence:.3f}</td>"
        f"<td>{t.confident_flip_rate:.3f}</td><td>{t.collapse:.3f}</td><td>{t.raw_score:.3f}</td></tr>"
        for i, t in enumerate(result.triggers, 1)
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>peftshield audit</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{padding:.2em .6em;border-bottom:1px solid #ddd}</style></head><body>"
        f"<h1>Audit of <code>{html.escape(result.checkpoint)}</code>{' + ' + html.escape(result.adapter) if result.adapter else ''}</h1>"
        f"<p><b>Verdict: {result.verdict}</b> (suspicion {_fmt(result.score)}, raw score {result.raw_score:.3f}); probe: {result.probe}; "
        f"clean texts: <code>{html.escape(result.texts)}</code>.</p>"
        + "".join(f"<p><b>Caveat:</b> {html.escape(c)}.</p>" for c in result.caveats) +
        "<table><tr><th>#</th><th>trigger</th><th>target</th><th>flip rate</th><th>confidence</th><th>confident flips</th><th>collapse</th><th>raw score</th></tr>"
        f"{rows}</table><p>Seconds per stage: {html.escape(json.dumps({k: round(v, 1) for k, v in result.seconds.items()}))}</p>"
        f"<img src='{PLOT_FILE}' alt='per-candidate effect and confidences' style='max-width:100%'></body></html>\n"
    )


def write_audit(result: AuditResult, folder: Path) -> None:
    """Write the audit's files into ``folder`` (the caller makes the folder atomic)."""
    payload = result.to_dict()
    payload["score"] = None if math.isnan(result.score) else result.score
    (folder / "audit.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    (folder / "report.md").write_text(markdown_report(result), encoding="utf-8")
    (folder / "report.html").write_text(html_report(result), encoding="utf-8")
    plot_audit(result, folder / PLOT_FILE)
