"""``lightning-opt export --config RECIPE --ckpt_path CKPT``: a checkpoint as a measured int8 ``.pt2`` or ONNX file.

The work is `lightning_opt.quantization.export.export_checkpoint`; this module reads the command line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from lightning_opt._errors import ConciseArgumentParser

__all__ = ["main"]


def main(argv: Sequence[str]) -> int:
    """Export a checkpoint and print its measured figures; unknown ``--key=value`` arguments go to the recipe.

    Args:
        argv: The arguments after ``export``.

    Returns:
        0.
    """
    from lightning_opt.quantization.export import FORMATS, METHODS, QUANTIZE, export_checkpoint

    parser = ConciseArgumentParser(
        prog="lightning-opt export",
        description="Turn a checkpoint into an int8 .pt2 or ONNX artifact and measure it (accuracy, latency, bytes).",
    )
    parser.add_argument("--config", required=True, action="append", help="recipe YAML (repeatable)")
    parser.add_argument("--ckpt_path", default=None, help="Lightning checkpoint to export")
    parser.add_argument("--format", default="pt2", choices=FORMATS)
    parser.add_argument("--quantize", default="int8", choices=QUANTIZE)
    parser.add_argument("--method", default="auto", choices=METHODS, help="int8 .pt2: QAT state or PTQ")
    parser.add_argument("--module", default=None, help="attribute path to quantize (PTQ); default backbone")
    parser.add_argument("--calibration_batches", type=int, default=10)
    parser.add_argument("--output", default=None, help="artifact path (.pt2 / .onnx)")
    parser.add_argument("--no_evaluate", action="store_true", help="skip the test-set accuracy")
    parser.add_argument("--no_compile", action="store_true", help="run the .pt2 eagerly (reference int8 ops)")
    parser.add_argument("--no_latency", action="store_true", help="skip timing")
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=1, help="rows of the timed input")
    args, rest = parser.parse_known_args(list(argv))
    config: list[str] = []
    for path in args.config:
        config += ["--config", path]
    figures = export_checkpoint(
        config + rest,
        ckpt_path=args.ckpt_path,
        format=args.format,
        quantize=args.quantize,
        method=args.method,
        module=args.module,
        calibration_batches=args.calibration_batches,
        output=args.output,
        evaluate=not args.no_evaluate,
        compile=not args.no_compile,
        latency=not args.no_latency,
        num_threads=args.num_threads,
        batch_size=args.batch_size,
    )
    print(json.dumps(figures, indent=2))
    return 0
