"""matplotlib for files, not screens: the one place that picks its backend.

Importing pyplot costs most of a second, so the commands that may draw (audit, screen, grid
reports) import it through :func:`pyplot` when they draw, not when they start."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
