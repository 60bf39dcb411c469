"""Reports of a run: JSON for machines, Markdown and a Pareto plot for people, rich tables on screen."""

from __future__ import annotations

from edgecv.report.render import FORMATS, ROW_FIELDS, bench_table, rows_table, write_report

__all__ = ["FORMATS", "ROW_FIELDS", "bench_table", "rows_table", "write_report"]
