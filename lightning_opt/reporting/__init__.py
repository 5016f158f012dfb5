"""The compression report: before/after figures in TensorBoard, ``report.json`` and ``report.md``."""

from lightning_opt.reporting._report import (
    CompressionReport,
    format_language_model_markdown,
    format_report_markdown,
    language_model_figures,
)

__all__ = ["CompressionReport", "format_language_model_markdown", "format_report_markdown", "language_model_figures"]
