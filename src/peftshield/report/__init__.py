"""Reports of a grid run: Markdown/HTML tables (mean and std over seeds) and matplotlib plots."""

from peftshield.report.render import render_report

__all__ = ["render_report"]
