"""``lightning-opt report --ckpt_path CKPT --config RECIPE``: measure a checkpoint as a run's report is measured."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightning_opt._errors import ConciseArgumentParser

__all__ = ["main"]


def _default_output_dir(ckpt: Path) -> Path:
    # runs/NAME/version_N/checkpoints/epoch=...ckpt -> runs/NAME/version_N
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def main(argv: Sequence[str]) -> int:
    """Load the recipe's model from ``--ckpt_path``, measure it, test it, and write ``report_<checkpoint>.json/.md``.

    The files are named after the checkpoint (``report_last.json`` for ``last.ckpt``), so the report that ``fit``
    wrote into the run folder (``report.json``, its before/after table) is never overwritten.

    Args:
        argv: The arguments after ``report``; unknown ``--key=value`` arguments are recipe overrides.

    Returns:
        0.
    """
    parser = ConciseArgumentParser(
        prog="lightning-opt report",
        description="Measure a checkpoint (params, nonzeros, size, FLOPs, latency, test metric) and write a report."
        " Arguments after the options are recipe overrides, as for `lightning-opt fit`.",
    )
    parser.add_argument("--ckpt_path", required=True, help="Checkpoint written by `lightning-opt fit`.")
    parser.add_argument("--config", action="append", required=True, help="The recipe the checkpoint was trained with.")
    parser.add_argument(
        "--output_dir", default=None, help="Where to write report_<checkpoint>.json/.md (default: the run's folder)."
    )
    parser.add_argument("--no_test", action="store_true", help="Skip evaluating the test metric.")
    args, overrides = parser.parse_known_args(list(argv))

    from lightning_opt._io import check_output_dir
    from lightning_opt._utils import load_checkpoint
    from lightning_opt.recipe import build_from_config
    from lightning_opt.reporting import CompressionReport, format_report_markdown

    ckpt = Path(args.ckpt_path)
    checkpoint = load_checkpoint(ckpt)  # weights-only, one clear error for a missing or unreadable file
    out = Path(args.output_dir) if args.output_dir else _default_output_dir(ckpt)
    check_output_dir(out, "--output_dir")  # before the model is built and measured
    cli_args: list[str] = []
    for config in args.config:
        cli_args += ["--config", config]
    cli_args += ["--trainer.logger=false", "--trainer.enable_progress_bar=false", *overrides]
    cli = build_from_config(cli_args, save_config_callback=None)  # measuring writes nothing but the report
    report = CompressionReport.find(cli.trainer) or CompressionReport()
    trainer, model = cli.trainer, cli.model
    if args.no_test:
        model.load_state_dict(checkpoint["state_dict"])
    else:
        trainer.test(model, datamodule=cli.datamodule, ckpt_path=str(ckpt), verbose=False)
    figures = report.measure(model, report.example(trainer, model))
    if not args.no_test:
        value = trainer.callback_metrics.get(report.test_metric)
        figures[report.test_metric] = None if value is None else float(value)
    report.stages = {"checkpoint": figures}
    written = report.write(output_dir=out, name=f"report_{ckpt.stem}")
    assert written is not None  # this process is rank zero
    print(format_report_markdown(report.stages))
    print(f"\nReport written to {written['json']} and {written['markdown']}")
    return 0
