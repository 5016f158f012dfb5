"""The compression report: before/after figures in TensorBoard, ``report.json`` and ``report.md``."""

from lightning_opt.reporting._report import CompressionReport, format_report_markdown

__all__ = ["CompressionReport", "format_report_markdown"]
