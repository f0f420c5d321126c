"""Every measured figure in README.md and docs/ is read from the bench file it cites.

    .venv/bin/python docs/check_figures.py        # exit 0: every checked figure found; 1: a figure drifted

The pages mark where figures come from with HTML comments (invisible once rendered):

- ``<!-- quote: bench/X.md -->`` ... ``<!-- /quote -->``: a table quoted from a bench file; every
  table row inside must be a line of that file, character for character (the README's headline table).
- ``<!-- figures: bench/X.md [bench/X.json ...] -->`` ... ``<!-- /figures -->``: prose that quotes
  figures; every figure inside (a decimal number, a percentage, a factor such as ``9.3x``) must
  appear in one of the cited files at the precision it is quoted with (``0.63`` matches ``0.626``,
  ``0.6%`` matches ``0.006``; ``0.626`` does not match ``0.63``).
- ``<!-- figures: unrecorded REASON -->`` ... ``<!-- /figures -->``: figures that no bench file holds
  yet (an earlier run's output typed by hand). Not checked; listed at the end so the debt stays visible.
- ``<!-- settings -->`` ... ``<!-- /settings -->``: numbers that are settings, facts about a
  data set, test thresholds or formula constants, not measurements. Not checked (also inside a
  figures block).

On the pages that report results (README.md, docs/index.md, docs/quickstart.md, docs/results/,
docs/known-limits.md) a figure outside those blocks is an error: tables and figures come in
through ``--8<-- "bench/X.md:2"`` includes (pymdownx.snippets), which copy the bench file as it
is from its second line on: its first line, its title, must be a heading (the page gives it one
of its own, so that the page keeps a single title and its table of contents).
The guide pages (how a command works) quote settings, not results; there only the blocks are
checked, and ``--list`` shows their other numbers for review. Code blocks, inline code and link
targets are ignored (commands, file names, versions).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
STRICT = ("README.md", "docs/index.md", "docs/quickstart.md", "docs/known-limits.md", "docs/results/")

BLOCK = re.compile(r"<!--\s*(quote|figures|settings):?\s*(.*?)\s*-->(.*?)<!--\s*/\1\s*-->", re.S)
INCLUDE = re.compile(r'^--8<--\s+"(bench/[^":]+)(:[^"]*)?"\s*$', re.M)
SETTINGS = re.compile(r"<!--\s*settings\s*-->.*?<!--\s*/settings\s*-->", re.S)  # may sit inside a figures block
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
COMMENT = re.compile(r"<!--.*?-->", re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK_TARGET = re.compile(r"\]\([^)]*\)")
# 1.43x, 0.626, 22.9%, 91% and ranges (0.5-1.8%, 0.63-0.98, 1.0–2.0 %): a range's suffix applies to both ends.
NUMBER = r"\d+(?:,\d{3})*(?:\.\d+)?"
FIGURE = re.compile(rf"(?<![\w.\-/+])({NUMBER})(?:\s*(?:-|–|to)\s*({NUMBER}))?(\s?%|x\b)?(?![\w.]*\d)")
NOT_A_FIGURE = re.compile(r"(?:release|revision|version|Python|since)\s*$", re.I)  # release 0.1, Python 3.11
FILE_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:e[-+]?\d+)?%?", re.I)


@dataclass
class Figure:
    text: str
    value: float
    decimals: int
    percent: bool


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    checked: int = 0
    quoted_rows: int = 0
    unrecorded: list[str] = field(default_factory=list)
    unblocked: list[str] = field(default_factory=list)


def figures(text: str) -> list[Figure]:
    """The measured-looking figures in prose: decimals, percentages and factors (a bare integer
    without % is a count or a setting, not a figure)."""
    text = LINK_TARGET.sub("]", INLINE_CODE.sub(" ", COMMENT.sub(" ", FENCE.sub(" ", text))))
    found = []
    for match in FIGURE.finditer(text):
        if NOT_A_FIGURE.search(text[max(match.start() - 12, 0):match.start()]):
            continue
        suffix = (match.group(3) or "").strip()
        for number in filter(None, (match.group(1), match.group(2))):
            if "." not in number and suffix != "%":
                continue  # 3 epochs, 2,000 rows, seed 0
            plain = number.replace(",", "")
            decimals = len(plain.split(".")[1]) if "." in plain else 0
            found.append(Figure(number + suffix, float(plain), decimals, suffix == "%"))
    return found


def file_values(path: Path) -> list[tuple[float, int]]:
    """Every number in a bench file (Markdown or JSON, keys and strings included), with the
    decimals it is written with; a percentage also as a fraction."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":  # numbers as JSON wrote them, plus those inside its strings
        tokens = FILE_NUMBER.findall(json.dumps(json.loads(text)))
    else:
        tokens = FILE_NUMBER.findall(text)
    values = []
    for token in tokens:
        plain = token.rstrip("%").replace(",", "")
        try:
            value = float(plain)
        except ValueError:
            continue
        mantissa = plain.lower().split("e")[0]
        decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
        if "e" in plain.lower():
            decimals = max(decimals - int(plain.lower().split("e")[1]), 0)
        values.append((abs(value), decimals))
        if token.endswith("%"):
            values.append((abs(value) / 100, decimals + 2))
    return values


def matches(figure: Figure, values: list[tuple[float, int]]) -> bool:
    """A figure quoted with d decimals matches a file value written with at least d decimals
    that rounds to it (a percentage is compared as a fraction)."""
    value, decimals = (figure.value / 100, figure.decimals + 2) if figure.percent else (figure.value, figure.decimals)
    tolerance = 0.5 * 10 ** -decimals + 1e-12
    return any(abs(v - value) <= tolerance and (d >= decimals or v == value) for v, d in values)


def check_page(page: Path, report: Report) -> None:
    text = page.read_text(encoding="utf-8")
    name = page.relative_to(ROOT)
    for match in BLOCK.finditer(text):
        kind, source, body = match.groups()
        body = SETTINGS.sub(" ", body)
        line = text.count("\n", 0, match.start()) + 1
        if kind == "settings":
            continue
        if kind == "figures" and source.startswith("unrecorded"):
            report.unrecorded.append(f"{name}:{line}: {len(figures(body))} figures ({source[len('unrecorded'):].strip()})")
            continue
        paths = [ROOT / p for p in source.split()]
        missing = [str(p.relative_to(ROOT)) for p in paths if not p.is_file() or not str(p.relative_to(ROOT)).startswith("bench/")]
        if not paths or missing:
            report.errors.append(f"{name}:{line}: the block cites {missing or 'no file'}: cite files under bench/ that exist")
            continue
        if kind == "quote":
            rows = [row for row in body.splitlines() if row.startswith("|")]
            lines = {row for p in paths for row in p.read_text(encoding="utf-8").splitlines()}
            for row in rows:
                if row not in lines:
                    report.errors.append(f"{name}:{line}: table row not in {source}: {row[:100]}")
            report.quoted_rows += len(rows)
            if not rows:
                report.errors.append(f"{name}:{line}: a quote block without table rows")
            continue
        values = [v for p in paths for v in file_values(p)]
        for figure in figures(body):
            report.checked += 1
            if not matches(figure, values):
                report.errors.append(f"{name}:{line}: {figure.text} is in none of {source}")
    for match in INCLUDE.finditer(text):
        path, lines = ROOT / match.group(1), match.group(2) or ""
        if not path.is_file():
            report.errors.append(f"{name}: includes {match.group(1)}, which does not exist")
        elif lines == ":2" and not path.read_text(encoding="utf-8").startswith("# "):
            report.errors.append(f"{name}: includes {match.group(1)} from its line 2, but its line 1 is not its title")
    # outside the blocks: no figure at all
    rest = BLOCK.sub(" ", text)
    rest = "\n".join(l for l in rest.splitlines() if not l.lstrip().startswith("--8<--"))
    strict = str(name).startswith(STRICT)
    for figure in figures(rest):
        if strict:
            report.errors.append(f"{name}: {figure.text} is quoted outside a figures block: include its bench file, "
                                 "or wrap the prose in <!-- figures: bench/... --> and check it")
        else:
            report.unblocked.append(f"{name}: {figure.text}")


def main(argv: list[str]) -> int:
    report = Report()
    for page in PAGES:
        check_page(page, report)
    for error in report.errors:
        print(f"error: {error}")
    print(f"{len(PAGES)} pages: {report.checked} figures checked against their bench files, "
          f"{report.quoted_rows} table rows quoted verbatim, {len(report.errors)} errors")
    if report.unrecorded:
        print("figures no bench file holds yet (not checked):")
        for entry in report.unrecorded:
            print(f"  {entry}")
    if "--list" in argv:
        print("numbers on guide pages outside any block (settings, not results, unless one slipped in):")
        for entry in report.unblocked:
            print(f"  {entry}")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
