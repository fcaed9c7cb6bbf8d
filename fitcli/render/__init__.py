"""Output formats side by side: each a function from a report dict to text (or Rich renderables)."""

from fitcli.render.csv import render_csv
from fitcli.render.markdown import render_markdown
from fitcli.render.table import render_inspect, render_metrics, render_report

__all__ = ["render_csv", "render_markdown", "render_report", "render_inspect", "render_metrics"]
