"""A fleet screen's report in the formats a platform team reads: JSON (schema shipped in
``screen.schema.json``), SARIF 2.1.0 (a finding per audited adapter found backdoored or
inconclusive, and per adapter that could not be read or audited), Markdown, and one HTML page
with two plots (stage-1 scores per base model; stage-1 rank against the audit's verdict).

Every name in a report (targets, base models, messages) comes from the fleet and may be hostile:
HTML escapes it, Markdown quotes it, and the plots are PNG images embedded as data (no SVG text
from a fleet ever reaches the page)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from importlib import resources
from typing import TYPE_CHECKING

from peftshield.markdown import md_code, md_text
from peftshield.plotting import pyplot

if TYPE_CHECKING:
    from peftshield.screen.run import ScreenReport

SCREEN_RULES = {
    "backdoor.trigger": ("error", "The audit found a trigger that flips the adapter's predictions to one class: backdoored."),
    "backdoor.inconclusive": ("warning", "The audit found a trigger stronger than on clean models, but not enough to call a backdoor."),
    "screen.incomplete": ("error", "The adapter could not be read or audited; it is not reported as clean."),
}
VERDICT_RULES = {"backdoored": "backdoor.trigger", "inconclusive": "backdoor.inconclusive", "error": "screen.incomplete"}
VERDICT_COLOURS = {"backdoored": "tab:red", "inconclusive": "tab:orange", "clean": "tab:green", "error": "black", "": "tab:gray"}


def screen_schema() -> dict:
    """The JSON Schema of ``screen.json`` (shipped in the package)."""
    return json.loads(resources.files("peftshield.screen").joinpath("screen.schema.json").read_text(encoding="utf-8"))


def _finding_rule(row) -> str | None:
    if row.status == "error":
        return "screen.incomplete"
    return VERDICT_RULES.get(row.verdict)


def render_sarif(report: "ScreenReport") -> str:
    """SARIF 2.1.0: one result per adapter the audit found backdoored or inconclusive, or that could not be read or audited."""
    from peftshield.gate.formats import artifact_uri, sarif_log, sarif_rule, sarif_text

    used = list(SCREEN_RULES)
    results = []
    for row in report.rows:
        rule = _finding_rule(row)
        if rule is None:
            continue
        results.append({
            "ruleId": rule, "ruleIndex": used.index(rule), "level": SCREEN_RULES[rule][0],
            "message": {"text": sarif_text(row.message or f"audit verdict: {row.verdict}")},
            "locations": [{"physicalLocation": {"artifactLocation": {"uri": artifact_uri(row.target)}}}],
            "properties": {"target": row.target, "stage1_rank": row.rank, "stage1_score": _json_score(row.score), "audited": row.audited},
        })
    return sarif_log([sarif_rule(rule, text, level) for rule, (level, text) in SCREEN_RULES.items()], results, report.exit_code,
                     {"command": "screen", "fail_on": report.fail_on, "audit_budget": report.budget, "audit_sample": report.sample})


def _json_score(score):
    return None if score is None else (score if math.isfinite(score) else "inf")


def _score_text(score) -> str:
    return "-" if score is None else ("no peers" if not math.isfinite(score) else f"{score:.2f}")


def _counts(report: "ScreenReport") -> dict[str, int]:
    return {status: sum(r.status == status for r in report.rows) for status in ("scored", "no-peers", "error")}


def _summary(report: "ScreenReport") -> list[str]:
    counts = _counts(report)
    audited = [r for r in report.rows if r.audited]
    lines = [
        f"{len(report.rows)} adapters: {counts['scored']} scored against their cohort, {counts['no-peers']} without peers, "
        f"{counts['error']} unreadable. Stage 1 {report.stage1_seconds:.1f} s; stage 2 audited {len(audited)} "
        f"({sum(r.audited == 'top' for r in audited)} most unusual, {sum(r.audited == 'sample' for r in audited)} drawn at random) "
        f"in {report.stage2_seconds:.1f} s. Exit code {report.exit_code}.",
    ]
    if report.estimate.get("sampled"):
        e = report.estimate
        lines.append(f"Missed by stage 1 (from the random sample): {e['backdoored_in_sample']} of {e['sampled']} sampled adapters backdoored "
                     f"({e['unresolved_in_sample']} unresolved); about {e['estimated_missed']:.1f} in the {e['unaudited']} unaudited "
                     f"(95% upper bound {e['estimated_missed_upper_95']:.1f}, counting the unresolved as backdoored).")
    return lines


def _verdict_text(row) -> str:
    verdict = row.verdict or ("error" if row.status == "error" else "-")
    return verdict + (" (cached)" if row.cached else "")


def _ranked(report: "ScreenReport"):
    return sorted(report.rows, key=lambda r: (r.rank is None, r.rank or 0))


def render_markdown(report: "ScreenReport") -> str:
    lines = ["# peftshield screen", ""]
    for line in _summary(report):
        lines += [line, ""]
    lines += ["| rank | adapter | base model | cohort | stage-1 score | audited | verdict | note |", "|---|---|---|---|---|---|---|---|"]
    for row in _ranked(report):
        lines.append(f"| {row.rank or '-'} | {md_code(row.target)} | {md_code(row.base) if row.base else '-'} | {row.cohort or '-'} | "
                     f"{_score_text(row.score)} | {row.audited or '-'} | {_verdict_text(row)} | "
                     f"{md_text(row.message)} |")
    return "\n".join(lines) + "\n"


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    pyplot().close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_scores_per_base(report: "ScreenReport") -> str | None:
    """Stage-1 scores of each base model's adapters (a strip per base model; audited ones coloured by verdict), as a PNG data URI."""
    plt = pyplot()
    scored = [r for r in report.rows if r.score is not None and math.isfinite(r.score)]
    if not scored:
        return None
    bases = sorted({r.base or "?" for r in scored})
    figure, axis = plt.subplots(figsize=(7.5, 1.2 + 0.5 * len(bases)))
    for position, base in enumerate(bases):
        members = [r for r in scored if (r.base or "?") == base]
        for row_index, row in enumerate(members):
            jitter = ((row_index * 0.618) % 1 - 0.5) * 0.5
            axis.scatter(row.score, position + jitter, s=14 if row.verdict else 8, color=VERDICT_COLOURS.get(row.verdict, "tab:gray"),
                         alpha=0.9 if row.verdict else 0.5)
    axis.set_yticks(range(len(bases)), [f"base {i + 1}" for i in range(len(bases))])  # named in the table below, never drawn from fleet text
    axis.set_xlabel("stage-1 score (robust distance from the cohort)")
    _verdict_legend(axis)
    return _png(figure)


def plot_rank_against_verdict(report: "ScreenReport") -> str | None:
    """Each audited adapter's stage-1 rank, by the audit's verdict, as a PNG data URI."""
    plt = pyplot()

    audited = [r for r in report.rows if r.audited and r.rank is not None]
    if not audited:
        return None
    verdicts = ["clean", "inconclusive", "backdoored", "error"]
    figure, axis = plt.subplots(figsize=(7.5, 2.6))
    for row in audited:
        verdict = row.verdict if row.verdict in verdicts else "error"
        axis.scatter(row.rank, verdicts.index(verdict), marker="o" if row.audited == "top" else "s", color=VERDICT_COLOURS[verdict], s=22)
    scored = sum(r.rank is not None for r in report.rows)
    axis.axvline(report.budget + 0.5, color="gray", linestyle="--", linewidth=1)
    axis.set_xlim(0, max(scored, 1) + 1)
    axis.set_yticks(range(len(verdicts)), verdicts)
    axis.set_xlabel(f"stage-1 rank (1 = most unusual; dashed: the budget of {report.budget}; squares: the random sample)")
    return _png(figure)


def _verdict_legend(axis) -> None:
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", color=colour, label=label or "not audited")
               for label, colour in VERDICT_COLOURS.items() if label != "error"]
    axis.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the points, never over them


def render_html(report: "ScreenReport") -> str:
    bases = sorted({r.base or "?" for r in report.rows if r.score is not None and math.isfinite(r.score)})
    figures = [(plot_scores_per_base(report), "Stage-1 scores per base model"), (plot_rank_against_verdict(report), "Stage-1 rank against the audit's verdict")]
    plots = "".join(f"<figure><img alt='{html.escape(caption)}' src='{uri}'><figcaption>{html.escape(caption)}</figcaption></figure>"
                    for uri, caption in figures if uri)
    legend = "".join(f"<li>base {i + 1}: <code>{html.escape(base)}</code></li>" for i, base in enumerate(bases))
    rows = "".join(
        f"<tr class='{html.escape(row.verdict or row.status)}'><td>{row.rank or '-'}</td><td><code>{html.escape(row.target)}</code></td>"
        f"<td><code>{html.escape(row.base or '-')}</code></td><td>{html.escape(row.cohort or '-')}</td><td>{_score_text(row.score)}</td><td>{html.escape(row.audited or '-')}</td>"
        f"<td><b>{html.escape(_verdict_text(row))}</b></td><td>{html.escape(row.message)}</td></tr>"
        for row in _ranked(report)
    )
    summary = "".join(f"<p>{html.escape(line)}</p>" for line in _summary(report))
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>peftshield screen</title>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">"
        "<style>body{font-family:sans-serif;max-width:72em;margin:2em auto}td,th{padding:.2em .6em;border-bottom:1px solid #ddd;text-align:left}"
        "img{max-width:100%}.backdoored td,.error td{background:#fde8e8}.inconclusive td{background:#fff6dd}.clean td{background:#eaf7ea}</style>"
        f"</head><body><h1>peftshield screen: exit {report.exit_code}</h1>{summary}{plots}<ul>{legend}</ul>"
        "<table><tr><th>rank</th><th>adapter</th><th>base model</th><th>cohort</th><th>stage-1 score</th><th>audited</th><th>verdict</th><th>note</th></tr>"
        f"{rows}</table></body></html>\n"
    )


def render_json(report: "ScreenReport") -> str:
    return json.dumps(report.to_dict(), indent=2) + "\n"


REPORT_FILES = {"screen.json": render_json, "screen.sarif": render_sarif, "screen.md": render_markdown, "screen.html": render_html}
