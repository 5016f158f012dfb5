"""``lightning-opt report --ckpt PATH --config RECIPE``: measure a checkpoint the way a run's report is measured."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightning_opt._io import check_output_dir
from lightning_opt._utils import ConciseArgumentParser
from lightning_opt.reporting._report import CompressionReport, format_report_markdown


def _default_output_dir(ckpt: Path) -> Path:
    # runs/NAME/version_N/checkpoints/epoch=...ckpt -> runs/NAME/version_N
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def main(argv: Sequence[str]) -> dict:
    """Load the recipe's model from ``--ckpt``, measure it, test it, and write ``report.json``/``report.md``."""
    parser = ConciseArgumentParser(
        prog="lightning-opt report",
        description="Measure a checkpoint (params, nonzeros, size, FLOPs, latency, test metric) and write a report."
        " Arguments after the options are recipe overrides, as for `lightning-opt fit`.",
    )
    parser.add_argument("--ckpt", required=True, help="Checkpoint written by `lightning-opt fit`.")
    parser.add_argument("--config", action="append", required=True, help="The recipe the checkpoint was trained with.")
    parser.add_argument("--output_dir", default=None, help="Where to write report.json/.md (default: the run's dir).")
    parser.add_argument("--no_test", action="store_true", help="Skip evaluating the test metric.")
    args, overrides = parser.parse_known_args(list(argv))
    ckpt = Path(args.ckpt)
    if not ckpt.is_file():
        parser.error(f"--ckpt {str(ckpt)!r} does not exist or is not a file.")

    out = Path(args.output_dir or _default_output_dir(ckpt))
    check_output_dir(out, "--output_dir")  # before the model is built and measured
    from lightning_opt.cli import build_from_config

    cli_args: list[str] = []
    for config in args.config:
        cli_args += ["--config", config]
    cli_args += ["--trainer.logger=false", "--trainer.enable_progress_bar=false", *overrides]
    cli = build_from_config(cli_args, save_config_callback=None)  # measuring writes nothing but the report
    report = CompressionReport.find(cli.trainer) or CompressionReport()
    trainer, model = cli.trainer, cli.model
    if not args.no_test:
        trainer.test(model, datamodule=cli.datamodule, ckpt_path=str(ckpt), verbose=False)
        figures = report.measure(model, report.example(trainer, model))
        figures[report.test_metric] = report._metric(trainer, report.test_metric)
    else:
        import torch

        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)  # tensors and plain values only
        model.load_state_dict(checkpoint["state_dict"])
        figures = report.measure(model, report.example(trainer, model))
    report.stages = {"checkpoint": figures}
    report.write(output_dir=out)
    print(format_report_markdown(report.stages))
    print(f"\nReport written to {out / 'report.json'} and {out / 'report.md'}")
    return report.to_dict()
