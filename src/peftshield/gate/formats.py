"""A gate report in the formats CI tools read: text, JSON (with a shipped JSON Schema),
SARIF 2.1.0 (code-scanning dashboards), Markdown (job summaries) and HTML."""

from __future__ import annotations

import html
import json
from importlib import resources
from pathlib import Path

from peftshield.markdown import md_code, md_text
from peftshield.gate.report import LEVELS, RULES, GateReport, TargetRow

SARIF_SCHEMA_URI = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
SUFFIXES = {"json": ".json", "sarif": ".sarif", "markdown": ".md", "html": ".html"}
INFORMATION_URI = "https://github.com/peftshield/peftshield"


def report_schema() -> dict:
    """The JSON Schema of the ``json`` format (shipped in the package)."""
    return json.loads(resources.files("peftshield.gate").joinpath("report.schema.json").read_text(encoding="utf-8"))


def _score(row: TargetRow) -> str:
    return "-" if row.score is None else f"{row.score:.3f}"


def _what(row: TargetRow) -> str:
    return row.message + (" (cached)" if row.cached else "")


def render_text(report: GateReport) -> str:
    """A plain aligned table (one row per target, never wrapped, ASCII only) and the exit code, for CI logs."""
    header = ("target", "kind", "status", "score", "finding")
    rows = [header] + [(row.target, row.kind, row.status, _score(row), _what(row)) for row in report.rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1]))
    summary = "; ".join(f"{k} {v}" for k, v in report.to_dict()["summary"].items())
    return f"peftshield {report.command}\n" + "\n".join(lines) + f"\nexit {report.exit_code} ({summary})\n"


def render_json(report: GateReport) -> str:
    return json.dumps(report.to_dict(), indent=1) + "\n"


def artifact_uri(location: str) -> str:
    """A SARIF artifact URI: relative to the working folder when inside it, else a file URI; an
    ``hf://`` target as written. Percent-encoded, so a name with ``#``, ``%``, spaces or bytes
    that are not UTF-8 is still one valid URI naming that file."""
    from urllib.parse import quote

    if location.startswith("hf://"):
        return "hf://" + quote(location[len("hf://"):], safe="/", errors="backslashreplace")
    path = Path(location)
    if path.is_absolute():
        try:
            path = path.relative_to(Path.cwd())
        except ValueError:
            return "file://" + quote(path.as_posix(), safe="/", errors="backslashreplace")
    return quote(path.as_posix(), safe="/", errors="backslashreplace")


def sarif_text(text: str) -> str:
    """A SARIF plain-text message: ``[`` and ``]`` escaped, so text from a model or a fleet (a
    trigger, a config value) cannot make an embedded link (SARIF 2.1.0, 3.11.5-6)."""
    return text.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]")


def render_sarif(report: GateReport) -> str:
    """SARIF 2.1.0: one result per finding, the rule id its kind, the location its file."""
    used = sorted({f.rule for row in report.rows for f in row.findings} | ({"backdoor.trigger", "backdoor.inconclusive"} if report.command == "audit" else {"scan.flagged"}))
    rules = [sarif_rule(rule, RULES[rule], LEVELS[rule]) for rule in used]
    index = {rule: i for i, rule in enumerate(used)}
    results = []
    for row in report.rows:
        for finding in row.findings:
            result = {
                "ruleId": finding.rule, "ruleIndex": index[finding.rule], "level": finding.level, "message": {"text": sarif_text(finding.message)},
                "locations": [{"physicalLocation": {"artifactLocation": {"uri": artifact_uri(finding.location)}}}],
                "properties": {"target": row.target, **finding.properties},
            }
            if "line" in finding.properties:
                result["locations"][0]["physicalLocation"]["region"] = {"startLine": int(finding.properties["line"])}
            results.append(result)
    return sarif_log(rules, results, report.exit_code, {"command": report.command, "policy": report.policy})


def sarif_rule(rule: str, text: str, level: str) -> dict:
    return {"id": rule, "name": rule.replace(".", "-"), "shortDescription": {"text": text}, "defaultConfiguration": {"level": level}}


def sarif_log(rules: list[dict], results: list[dict], exit_code: int, properties: dict) -> str:
    """A SARIF 2.1.0 log of one peftshield run (exit code 2: the run did not finish its work)."""
    from peftshield import __version__

    log = {
        "$schema": SARIF_SCHEMA_URI, "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "peftshield", "version": __version__, "informationUri": INFORMATION_URI, "rules": rules}},
            "invocations": [{"executionSuccessful": exit_code != 2, "exitCode": exit_code}],
            "results": results,
            "properties": properties,
        }],
    }
    return json.dumps(log, indent=1) + "\n"


def render_markdown(report: GateReport) -> str:
    lines = [f"## peftshield {report.command}: exit {report.exit_code}", "",
             "| target | kind | status | score | finding |", "|---|---|---|---|---|"]
    for row in report.rows:
        lines.append(f"| {md_code(row.target)} | {md_text(row.kind)} | **{md_text(row.status)}** | {_score(row)} | {md_text(_what(row))} |")
    policy = ", ".join(f"{k}: {v}" for k, v in report.policy.items())
    lines += ["", f"Policy: {md_text(policy)}. Settings: {md_text(report.settings_file or 'defaults')}. {report.seconds:.0f} s.", ""]
    return "\n".join(lines)


def render_html(report: GateReport) -> str:
    rows = "".join(
        f"<tr class='{html.escape(row.status)}'><td><code>{html.escape(row.target)}</code></td><td>{html.escape(row.kind)}</td>"
        f"<td><b>{html.escape(row.status)}</b></td><td>{_score(row)}</td><td>{html.escape(_what(row))}</td></tr>"
        for row in report.rows
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>peftshield " + html.escape(report.command) + "</title>"
        "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}td,th{padding:.2em .6em;border-bottom:1px solid #ddd;text-align:left}"
        ".backdoored td,.flagged td,.error td{background:#fde8e8}.inconclusive td{background:#fff6dd}.clean td{background:#eaf7ea}</style></head><body>"
        f"<h1>peftshield {html.escape(report.command)}: exit {report.exit_code}</h1>"
        "<table><tr><th>target</th><th>kind</th><th>status</th><th>score</th><th>finding</th></tr>"
        f"{rows}</table><p>Policy: {html.escape(json.dumps(report.policy))}; settings: {html.escape(report.settings_file or 'defaults')}.</p>"
        "</body></html>\n"
    )


RENDERERS = {"text": render_text, "json": render_json, "sarif": render_sarif, "markdown": render_markdown, "html": render_html}


def report_files(base: Path, formats: list[str]) -> dict[str, Path]:
    """Where each file format goes: ``base`` plus the format's suffix (text goes to stdout)."""
    return {f: base.with_name(base.name + SUFFIXES[f]) for f in formats if f != "text"}
