"""Text from outside (a model folder's name, a trigger from a tokenizer's vocabulary, a path)
made safe to place in Markdown: it shows as the same characters and cannot open a tag, a
link, an image, emphasis, a code span or a table cell of its own.

Every Markdown file peftshield writes goes through these two helpers; CI jobs paste them into
job summaries, where a forged row or raw HTML would be read as the tool's own.
"""

from __future__ import annotations

import re

# The characters that can end a code span, open inline markup or HTML, or split a table cell.
_SPECIAL = re.compile(r"([\\`*_\[\]|~!])")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def md_text(text: str) -> str:
    """``text`` as plain Markdown: HTML characters as entities, markup characters escaped,
    line breaks folded into spaces."""
    flat = _one_line(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _SPECIAL.sub(r"\\\1", flat)


def md_code(text: str) -> str:
    """``text`` as an inline code span (HTML inside a code span is shown, never run): fenced
    with one backtick more than its longest run of backticks, ``|`` escaped for table cells."""
    flat = _one_line(text).replace("|", "\\|")
    fence = "`" * (max((len(run) for run in re.findall(r"`+", flat)), default=0) + 1)
    pad = " " if flat.startswith("`") or flat.endswith("`") or not flat else ""
    return f"{fence}{pad}{flat}{pad}{fence}"


__all__ = ["md_code", "md_text"]
