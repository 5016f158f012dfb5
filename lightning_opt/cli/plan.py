r"""``lightning-opt plan``: a recipe's timeline and conflicts; with ``--ckpt_path`` a sensitivity scan; with
``--max_drop`` / ``--target`` a per-layer plan written as a ready recipe ``plan.yaml``.

Examples:
    lightning-opt plan --config recipes/plan/mnist_compact.yaml
    lightning-opt plan --config recipes/plan/mnist_compact.yaml --ckpt_path runs/.../last.ckpt --max_drop 1 \
        --target sparsity=0.95 --output_dir runs/plan/mnist
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from torch import nn

from lightning_opt import inputs
from lightning_opt._errors import ConciseArgumentParser
from lightning_opt._utils import load_checkpoint
from lightning_opt.planning import (
    DEFAULT_GRID,
    Evaluator,
    Recipe,
    SensitivityScan,
    Timeline,
    allocate,
    build_recipe,
    fallback_layers,
    interpolate,
    layer_flops,
    nm_conflicts,
    quantized,
    read_recipe_file,
    recipe_timeline,
    run_length,
    scan_sensitivity,
)
from lightning_opt.pruning import DEFAULT_MODULE_TYPES, Pruning, select_modules, select_weights, unstructured_masks
from lightning_opt.quantization import PostTrainingQuantization, QuantizationAwareTraining

__all__ = ["TARGETS", "Target", "main", "parse_target"]

#: Target kinds of ``--target KIND=VALUE``.
TARGETS: dict[str, str] = {
    "sparsity": "global sparsity of the pruned weights, a fraction in (0, 1) (0.95 = 95% zeros)",
    "flops": "FLOPs per sample kept: a fraction of the dense model's (0.25) or an absolute count (> 1)",
    "bytes": "bytes of nonzero weights (fp32 4 B, int8 1 B) kept: a fraction of the dense fp32 model's or a count",
}


class Target:
    """A parsed ``--target``: ``kind`` in `TARGETS` and its ``value``."""

    def __init__(self, kind: str, value: float) -> None:
        self.kind = kind
        self.value = value

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"


def parse_target(text: str) -> Target:
    """Parse ``KIND=VALUE`` (or ``KIND:VALUE``).

    Raises:
        ValueError: for an unknown kind or a value out of range.

    Examples:
        >>> str(parse_target("sparsity=0.95"))
        'sparsity=0.95'
    """
    found = re.fullmatch(r"\s*([A-Za-z_]+)\s*[=:]\s*(\S*)\s*", text)
    kind, raw = (found.group(1), found.group(2)) if found else (text.strip(), "")
    kind = kind.strip()
    if kind not in TARGETS:
        allowed = "; ".join(f"{k}: {v}" for k, v in TARGETS.items())
        raise ValueError(
            f"`--target` kind must be one of {list(TARGETS)}, got {text!r}. Allowed: {allowed}. "
            "HINT: --target sparsity=0.95 (measured latency is not a plan target yet)."
        )
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"`--target {kind}=...` needs a number, got {raw!r}. HINT: --target {kind}=0.5.") from None
    if kind == "sparsity" and not 0.0 < value < 1.0:
        raise ValueError(f"`--target sparsity` must be in (0, 1), got {value}. HINT: 0.95 means 95% zeros.")
    if kind != "sparsity" and not value > 0.0:
        raise ValueError(f"`--target {kind}` must be > 0, got {value}.")
    return Target(kind, value)


def _parser() -> ConciseArgumentParser:
    parser = ConciseArgumentParser(
        prog="lightning-opt plan",
        description="Show a recipe's timeline and conflicts before training; with --ckpt_path, scan each layer's "
        "sensitivity on the validation set; with --max_drop/--target, write a per-layer plan as plan.yaml. "
        "Arguments after the options are recipe overrides, as for `lightning-opt fit`.",
    )
    parser.add_argument("--config", action="append", required=True, help="The recipe (YAML).")
    parser.add_argument(
        "--ckpt_path", dest="ckpt", default=None, help="A trained checkpoint of the recipe's model: runs the scan."
    )
    parser.add_argument("--max_drop", type=float, default=None, help="Metric points the plan may lose.")
    parser.add_argument(
        "--target", default=None, help="KIND=VALUE: " + "; ".join(f"{k} ({v})" for k, v in TARGETS.items())
    )
    parser.add_argument("--output_dir", default=None, help="Where outputs go (default runs/plan/<recipe name>).")
    parser.add_argument(
        "--grid", default=",".join(str(s) for s in DEFAULT_GRID), help="Sparsities scanned, comma-separated."
    )
    parser.add_argument("--metric", default="auto", help="'accuracy', 'auto' or a metric logged in validation_step.")
    parser.add_argument("--mode", default="auto", choices=["auto", "max", "min"], help="Whether higher is better.")
    parser.add_argument("--scan_batches", type=int, default=None, help="Validation batches scanned (default all).")
    parser.add_argument(
        "--timing_steps", type=int, default=20, help="Training steps timed to estimate a run's time (0: skip)."
    )
    parser.add_argument("--min_int8", type=float, default=0.8, help="Fraction of layers that must stay int8.")
    parser.add_argument(
        "--quant_share", type=float, default=0.5, help="Share of --max_drop given to int8 when both are planned."
    )
    parser.add_argument("--no_progress", action="store_true", help="No progress bar.")
    return parser


def _check_args(args: Any) -> None:
    if args.max_drop is not None and not (math.isfinite(args.max_drop) and args.max_drop >= 0):
        raise ValueError(
            f"`--max_drop` must be a number of metric points >= 0, got {args.max_drop}. HINT: --max_drop 1 allows "
            "the plan to lose one point of validation accuracy."
        )
    if (args.max_drop is not None or args.target is not None) and args.ckpt is None:
        raise ValueError(
            "`--max_drop`/`--target` plan from a sensitivity scan, which needs `--ckpt_path` of a trained model."
        )
    if args.ckpt is not None:
        load_checkpoint(args.ckpt)  # missing, unreadable or not weights-only: one clear error before anything runs
    if args.scan_batches is not None and args.scan_batches < 1:
        raise ValueError(f"`--scan_batches` must be >= 1, got {args.scan_batches}.")
    if args.timing_steps < 0:
        raise ValueError(f"`--timing_steps` must be >= 0, got {args.timing_steps}.")
    if not 0.0 <= args.min_int8 <= 1.0:
        raise ValueError(f"`--min_int8` must be a fraction in [0, 1], got {args.min_int8}.")
    if not 0.0 <= args.quant_share <= 1.0:
        raise ValueError(f"`--quant_share` must be a fraction in [0, 1], got {args.quant_share}.")


def _grid(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(
            f"`--grid` must be comma-separated sparsities, got {text!r}. HINT: --grid 0.5,0.9,0.99"
        ) from None
    if not values or any(not 0.0 < v < 1.0 for v in values):
        raise ValueError(f"`--grid` values must be in (0, 1), got {text!r}. HINT: 0.9 means 90% zeros.")
    return sorted(set(values))


# ----------------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lightning-opt plan``; returns 0, or 1 when the timeline found conflicts.

    Raises:
        ValueError: bad input (a negative ``--max_drop``, an unknown ``--target``, a recipe that does not build, a
            checkpoint that does not fit the recipe's model).
        FileNotFoundError: a missing recipe or checkpoint.
    """
    args, overrides = _parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    _check_args(args)
    target = parse_target(args.target) if args.target is not None else None
    grid = _grid(args.grid)
    files = list(args.config)
    raw = [read_recipe_file(f) for f in files]
    out = Path(args.output_dir or Path("runs") / "plan" / Path(files[-1]).stem)
    nm = [c for cfg in raw for c in nm_conflicts(cfg)]
    try:
        recipe = build_recipe(files, overrides)
    except ValueError as err:
        if nm:
            raise ValueError("the recipe does not build: " + "; ".join(str(c) for c in nm) + f" ({err})") from None
        raise
    run = run_length(recipe)
    timeline = recipe_timeline(recipe, run)
    out.mkdir(parents=True, exist_ok=True)
    writer = _writer(out)
    _write_timeline(timeline, out, writer)
    print(timeline.table())
    print(f"\ntimeline: {out / 'timeline.txt'}, {out / 'timeline.png'}, {out / 'timeline.json'}")
    if args.ckpt is not None:
        _scan_and_plan(args, files, raw, overrides, target, grid, out, writer, timeline)
    if writer is not None:
        writer.close()
    return 1 if timeline.conflicts else 0


def _writer(out: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out))


def _write_timeline(timeline: Timeline, out: Path, writer: Any) -> None:
    import matplotlib.pyplot as plt

    (out / "timeline.txt").write_text(timeline.table(max_per_kind=10**9) + "\n")
    (out / "timeline.json").write_text(json.dumps(timeline.to_dict(), indent=2, default=str))
    fig = timeline.figure()
    fig.savefig(out / "timeline.png", dpi=120)
    if writer is not None:
        writer.add_figure("plan/timeline", fig, 0)
        writer.add_text("plan/timeline", "```\n" + timeline.table() + "\n```", 0)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------- scan
def _load(recipe: Recipe, ckpt: str) -> None:
    checkpoint = load_checkpoint(ckpt)
    model = recipe.model
    model.on_load_checkpoint(checkpoint)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise ValueError(
            f"checkpoint {ckpt!r} does not fit the recipe's model: {' '.join(first[:2])}. HINT: give the recipe the "
            "checkpoint was trained with (and the same overrides)."
        ) from None


def _val_batches(recipe: Recipe) -> Any:
    dm = recipe.datamodule
    if dm is None or not callable(getattr(dm, "val_dataloader", None)):
        raise ValueError("the scan needs a datamodule with a `val_dataloader` (the recipe's `data:`).")
    dm.prepare_data()
    dm.setup("validate")
    return dm.val_dataloader()


def _prune_layers(recipe: Recipe) -> tuple[Pruning | None, dict[str, tuple[str, int]]]:
    found = recipe.callbacks(Pruning)
    model = recipe.model
    if found:
        cb = found[0]
        return cb, select_weights(model, cb.select_modules(model))
    return None, select_weights(model, select_modules(model, list(DEFAULT_MODULE_TYPES), None, None))


def _quant_layers(recipe: Recipe) -> tuple[Any, str, dict[str, nn.Module]]:
    model = recipe.model
    found = [c for c in recipe.callbacks((QuantizationAwareTraining, PostTrainingQuantization)) if c.linear is None]
    cb = found[0] if found else None
    path = cb.module_path(model) if cb is not None else ("backbone" if hasattr(model, "backbone") else "")
    root = model.get_submodule(path) if path else model
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return cb, path, {n: m for n, m in root.named_modules() if n and isinstance(m, kinds)}


class _Done(Exception):
    """Stops the timing fit."""


class _StepTimer(Callback):
    """Times training batches after ``warmup``, then stops the fit."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.times: list[float] = []
        self._t0 = 0.0
        self._seen = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._seen += 1
        if self._seen > self.warmup:
            self.times.append(time.perf_counter() - self._t0)
        if len(self.times) >= self.steps:
            raise _Done


def time_training_steps(files: Sequence[str], overrides: Sequence[str], steps: int, warmup: int = 3) -> float | None:
    """Median seconds per training batch of the recipe, over ``steps`` real batches after ``warmup`` (a fresh model;
    checkpointing and the compression report left out; no validation).

    Returns:
        The median, or None when the fit ended before (a very short run).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_opt.reporting import CompressionReport

    recipe = build_recipe(files, [*overrides, "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0"])
    trainer = recipe.trainer
    timer = _StepTimer(warmup, steps)
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    callbacks[:] = [c for c in callbacks if not isinstance(c, (ModelCheckpoint, CompressionReport))] + [timer]
    with contextlib.suppress(_Done):
        trainer.fit(recipe.model, datamodule=recipe.datamodule)
    return statistics.median(timer.times) if timer.times else None


def _scan_and_plan(
    args: Any,
    files: list[str],
    raw: list[dict[str, Any]],
    overrides: list[str],
    target: Target | None,
    grid: list[float],
    out: Path,
    writer: Any,
    timeline: Timeline,
) -> None:
    recipe = build_recipe(files, overrides)
    _load(recipe, args.ckpt)
    model = recipe.model
    model.eval()
    mode = args.mode if args.mode != "auto" else ("min" if "loss" in args.metric.lower() else "max")
    t0 = time.perf_counter()  # the scan's cost: reading the validation set, the dense pass, every evaluation
    evaluator = Evaluator(model, _val_batches(recipe), metric=args.metric, max_batches=args.scan_batches)
    pruning, prune_layers = _prune_layers(recipe)
    quant_cb, quant_path, quant_layers = _quant_layers(recipe)
    scan = scan_sensitivity(
        model,
        evaluator,
        prune_layers,
        quant_layers,
        grid,
        mode == "max",
        progress=False if args.no_progress else None,
    )
    example = inputs.first_rows(evaluator.chunks[0][0], 1) if evaluator.chunks else inputs.module_example(model)
    scan.flops = layer_flops(model, prune_layers, example) if example is not None else {}
    scan.seconds = time.perf_counter() - t0
    scan.write_csv(out / "sensitivity.csv")
    scan.log_tensorboard(writer)
    import matplotlib.pyplot as plt

    fig = scan.figure()
    fig.savefig(out / "sensitivity.png", dpi=120)
    writer.add_figure("plan/sensitivity", fig, 0)
    plt.close(fig)
    print(_scan_table(scan, evaluator))
    cost = _scan_cost(args, files, overrides, scan, timeline)
    print(cost["line"])
    result: dict[str, Any] = {"scan": {"seconds": scan.seconds, "evaluations": scan.evaluations, **cost}}
    if args.max_drop is not None or target is not None:
        plan = _plan(args, recipe, scan, evaluator, target, pruning, prune_layers, quant_cb, quant_path, quant_layers)
        result["plan"] = plan
        if len(files) > 1:
            raise ValueError("plan.yaml is written from one recipe file; give a single --config.")
        path = _write_plan(files[0], raw[0], recipe, plan, overrides, args, out)
        print(plan["summary"])
        print(f"\nplan written to {path}\nrun it: python -m lightning_opt fit --config {path} {' '.join(overrides)}")
    (out / "plan.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"scan: {out / 'sensitivity.csv'}, {out / 'sensitivity.png'}; TensorBoard: tensorboard --logdir {out}")


def _scan_table(scan: SensitivityScan, evaluator: Evaluator) -> str:
    lines = [
        f"\nsensitivity on {scan.rows} validation rows, {evaluator.unit}: dense {scan.baseline:.3f}",
        f"{'layer':<32} {'weights':>9} " + " ".join(f"{s:>7g}" for s, _ in next(iter(scan.prune.values()), [])),
    ]
    for layer, points in scan.prune.items():
        lines.append(f"{layer:<32} {scan.params[layer]:>9} " + " ".join(f"{v:>7.2f}" for _, v in points))
    if scan.quant:
        lines.append(f"\n{'int8 alone':<32} {'metric':>9} {'SQNR dB':>8}")
        for layer, (v, q) in scan.quant.items():
            lines.append(f"{layer:<32} {v:>9.2f} {q:>8.1f}")
        if scan.quant_all is not None:
            lines.append(f"{'(every layer int8)':<32} {scan.quant_all:>9.2f}")
    return "\n".join(lines)


def _scan_cost(
    args: Any, files: list[str], overrides: list[str], scan: SensitivityScan, timeline: Timeline
) -> dict[str, Any]:
    run = timeline.run
    if args.timing_steps == 0 or not math.isfinite(run.total_steps):
        return {"line": f"scan: {scan.seconds:.1f} s ({scan.evaluations} passes); training time not estimated."}
    step = time_training_steps(files, overrides, args.timing_steps)
    if step is None:
        return {"line": f"scan: {scan.seconds:.1f} s; the run is too short to time {args.timing_steps} steps."}
    batches = run.total_steps * run.accumulate_grad_batches
    epochs = math.ceil(run.total_steps / run.steps_per_epoch) if run.steps_per_epoch else 0
    val_runs = epochs // run.val_every_n_epochs if run.val_every_n_epochs else 0
    val_pass = scan.seconds / max(scan.evaluations, 1)
    estimate = step * batches + val_pass * val_runs
    fraction = scan.seconds / estimate
    line = (
        f"scan: {scan.seconds:.1f} s = {fraction:.1%} of one training run, estimated at {estimate:.0f} s = "
        f"{int(batches)} batches x {step * 1e3:.1f} ms (median of {args.timing_steps} real training steps of the "
        f"recipe after 3 warm-up steps) + {val_runs} validations x {val_pass:.2f} s (a scan pass)."
    )
    return {
        "line": line,
        "fraction_of_training": fraction,
        "training_estimate_s": estimate,
        "step_s": step,
        "batches": batches,
    }


# ----------------------------------------------------------------------------------------------------- plan
def _apply_masks(model: nn.Module, scan: SensitivityScan, sparsity: dict[str, float]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    saved = {}
    with torch.no_grad():
        for layer, s in sparsity.items():
            wname = scan.weights[layer]
            p = params[wname]
            saved[wname] = p.detach().clone()
            if s > 0:
                mask = unstructured_masks(
                    {wname: p.detach().abs()}, {wname: torch.ones_like(p, dtype=torch.bool)}, [([wname], s)]
                )
                p.mul_(mask[wname])
    return saved


def _restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)


def _plan(
    args: Any,
    recipe: Recipe,
    scan: SensitivityScan,
    evaluator: Evaluator,
    target: Target | None,
    pruning: Pruning | None,
    prune_layers: dict[str, tuple[str, int]],
    quant_cb: Any,
    quant_path: str,
    quant_layers: dict[str, nn.Module],
) -> dict[str, Any]:
    model = recipe.model
    plan_prune = pruning is not None and (target is not None or args.max_drop is not None)
    plan_quant = quant_cb is not None and args.max_drop is not None and bool(scan.quant)
    if target is not None and pruning is None:
        raise ValueError(
            f"`--target {target}` plans per-layer sparsity, but the recipe has no lightning_opt.pruning.Pruning "
            "callback. HINT: add one to trainer.callbacks (its schedule gives the shape; the plan fills `overrides`)."
        )
    if pruning is not None and plan_prune and pruning.granularity != "unstructured":
        raise ValueError(
            f"the plan sets per-layer unstructured sparsity, but the recipe's Pruning uses granularity="
            f"{pruning.granularity!r}. HINT: plan an unstructured recipe (N:M fixes the sparsity at (m - n) / m)."
        )
    max_drop = args.max_drop
    plan: dict[str, Any] = {"metric": scan.metric, "baseline": scan.baseline, "max_drop": max_drop}
    # int8 fallback first (it fixes which layers count 1 byte per weight)
    skip: list[str] = []
    quant_drop = 0.0
    if plan_quant:
        quant_budget = max_drop * (args.quant_share if plan_prune else 1.0)
        order = sorted(scan.quant, key=lambda n: (-scan.drop(scan.quant[n][0]), scan.quant[n][1]))
        scanned = {n: quant_layers[n] for n in order}

        def evaluate(fp32: list[str]) -> float:
            with quantized({n: m for n, m in scanned.items() if n not in fp32}, scan.ranges):
                return scan.drop(evaluator()[0])

        skip, history = fallback_layers(order, evaluate, quant_budget, args.min_int8)
        quant_drop = dict((tuple(h[0]), h[1]) for h in history)[tuple(skip)]
        plan["int8"] = {
            "budget": quant_budget,
            "all_int8_drop": history[0][1],
            "fp32_layers": skip,
            "drop": quant_drop,
            "int8_layers": len(order) - len(skip),
            "layers": len(order),
            "history": [{"fp32": h[0], "drop": h[1]} for h in history],
        }
    if plan_prune:
        params = dict(model.named_parameters())
        layers = list(scan.prune)
        full = {n: quant_path + "." + n if quant_path else n for n in scan.quant}
        int8 = {full[n] for n in scan.quant if n not in skip} if quant_cb is not None else set()
        curves = {n: scan.cost_curve(n)[1:] for n in layers}
        total_params = sum(p.numel() for p in params.values())
        prunable = sum(scan.params[n] for n in layers)
        budget: float | None = None
        if target is None or target.kind == "sparsity":
            cost = {n: float(scan.params[n]) for n in layers}
            if target is not None:
                budget = (1.0 - target.value) * prunable
        elif target.kind == "flops":
            from lightning_opt.measure import count_flops

            example = inputs.first_rows(evaluator.chunks[0][0], 1) if evaluator.chunks else inputs.module_example(model)
            dense = float(count_flops(model, example))
            cost = {n: scan.flops.get(n, 0.0) for n in layers}
            fixed = dense - sum(cost.values())
            goal = target.value * dense if target.value <= 1.0 else target.value
            budget = goal - fixed
            plan["flops"] = {"dense": dense, "goal": goal, "not_prunable": fixed}
        else:
            bytes_of = {n: (1.0 if n in int8 else 4.0) for n in layers}
            cost = {n: scan.params[n] * bytes_of[n] for n in layers}
            dense = 4.0 * total_params
            fixed = 4.0 * (total_params - prunable)
            goal = target.value * dense if target.value <= 1.0 else target.value
            budget = goal - fixed
            plan["bytes"] = {"dense_fp32": dense, "goal": goal, "not_prunable": fixed}
        if budget is not None and budget <= 0:
            raise ValueError(
                f"`--target {target}` cannot be met by pruning: the layers that are not pruned already take "
                f"{fixed:.6g} of it. HINT: a larger target, or prune more layers (Pruning `module_types`/`include`)."
            )
        prune_budget = None if max_drop is None else max(max_drop - quant_drop, 0.0)
        if budget is None and scan.prune_loss:  # capped by accuracy points: search the loss frontier for it
            allocation = _capped(curves, cost, scan, prune_budget or 0.0)
        else:
            allocation = allocate(curves, cost, budget=budget, max_drop=prune_budget)
        sparsity = {n: _whole(s, scan.params[n]) for n, s in allocation.sparsity.items()}
        layer_drop = {n: interpolate(scan.curve(n)[1:], sparsity[n]) for n in layers}
        allocation.layer_drop, allocation.predicted_drop = layer_drop, sum(layer_drop.values())
        global_sparsity = sum(scan.params[n] * sparsity[n] for n in layers) / prunable
        saved = _apply_masks(model, scan, sparsity)
        one_shot = scan.drop(evaluator()[0])
        combined = None
        if plan_quant:
            with quantized({n: m for n, m in quant_layers.items() if n in scan.ranges and n not in skip}, scan.ranges):
                combined = scan.drop(evaluator()[0])
        _restore(model, saved)
        plan["pruning"] = {
            "sparsity": sparsity,
            "global_sparsity": global_sparsity,
            "predicted_drop": allocation.predicted_drop,
            "layer_drop": allocation.layer_drop,
            "one_shot_drop": one_shot,
            "one_shot_drop_with_int8": combined,
            "kept": sum(cost[n] * (1 - sparsity[n]) for n in layers),
            "budget": budget,
            "cost_unit": "weights" if target is None or target.kind == "sparsity" else target.kind,
            "flops_kept": sum(scan.flops.get(n, 0.0) * (1 - sparsity[n]) for n in layers),
            "flops_dense": sum(scan.flops.get(n, 0.0) for n in layers),
        }
    plan["target"] = str(target) if target is not None else None
    plan["summary"] = _summary(plan, scan)
    return plan


def _capped(curves: dict[str, Any], cost: dict[str, float], scan: SensitivityScan, max_drop: float) -> Any:
    """The smallest kept resource whose loss-optimal allocation predicts at most ``max_drop`` accuracy points
    (bisection on the budget; the predicted accuracy drop grows as the budget shrinks).
    """
    total = sum(cost.values())
    lo, hi = 0.0, total  # hi always feasible (dense)
    best = allocate(curves, cost, budget=total)
    for _ in range(20):
        mid = (lo + hi) / 2
        try:
            trial = allocate(curves, cost, budget=mid)
        except ValueError:
            lo = mid
            continue
        drop = sum(interpolate(scan.curve(n)[1:], s) for n, s in trial.sparsity.items())
        if drop <= max_drop:
            best, hi = trial, mid
        else:
            lo = mid
    return best


def _whole(sparsity: float, numel: int) -> float:
    """The sparsity to write for a layer of ``numel`` weights: rounded up to whole weights (Pruning zeroes
    ``round(sparsity * numel)``), then up to 6 decimals, so that the written plan prunes at least what was planned.

    Examples:
        >>> _whole(0.3403, 160), round(_whole(0.3403, 160) * 160)
        (0.34375, 55)
    """
    zeros = math.ceil(sparsity * numel - 1e-9)
    return min(math.ceil(zeros / numel * 1e6) / 1e6, 0.999999)


def _summary(plan: dict[str, Any], scan: SensitivityScan) -> str:
    lines = [
        f"plan ({scan.metric}, dense {scan.baseline:.3f}; max drop {plan['max_drop']}; target {plan.get('target')}):"
    ]
    p = plan.get("pruning")
    if p:
        lines.append(
            f"  pruning: global sparsity {p['global_sparsity']:.4f}; predicted drop {p['predicted_drop']:.3f} (sum of "
            f"single-layer drops), measured one-shot {p['one_shot_drop']:.3f} (all layers pruned at once, before "
            "fine-tuning)"
        )
        for n, s in p["sparsity"].items():
            lines.append(
                f"    {n:<32} {scan.params[n]:>9} weights  sparsity {s:.4f}  predicted drop {p['layer_drop'][n]:.3f}"
            )
    q = plan.get("int8")
    if q:
        lines.append(
            f"  int8: {q['int8_layers']}/{q['layers']} layers int8, fp32 fallback {q['fp32_layers']}; measured drop "
            f"{q['drop']:.3f} (every layer int8: {q['all_int8_drop']:.3f}; budget {q['budget']:.3f})"
        )
    if p and q and p.get("one_shot_drop_with_int8") is not None:
        lines.append(f"  pruning + int8 together, one-shot: drop {p['one_shot_drop_with_int8']:.3f}")
    return "\n".join(lines)


def _write_plan(
    file: str,
    raw: dict[str, Any],
    recipe: Recipe,
    plan: dict[str, Any],
    overrides: list[str],
    args: Any,
    out: Path,
) -> Path:
    import copy

    import yaml

    config = copy.deepcopy(raw)
    entries = (config.get("trainer") or {}).get("callbacks") or []
    if isinstance(entries, dict):
        entries = [entries]
        config["trainer"]["callbacks"] = entries

    def entry_of(cb: Any) -> dict[str, Any]:
        key = recipe.key_of(cb)
        found = re.fullmatch(r"trainer\.callbacks\[(\d+)\]", key)
        if not found or int(found.group(1)) >= len(entries):
            raise ValueError(f"the plan cannot find {type(cb).__name__} in {file}'s trainer.callbacks.")
        entry = entries[int(found.group(1))]
        entry.setdefault("init_args", {})
        if entry["init_args"] is None:
            entry["init_args"] = {}
        return entry

    p, q = plan.get("pruning"), plan.get("int8")
    if p:
        cb = recipe.callbacks(Pruning)[0]
        entry = entry_of(cb)
        entry["init_args"]["overrides"] = {f"^{re.escape(n)}$": float(s) for n, s in p["sparsity"].items()}
        schedule = entry["init_args"].setdefault("schedule", {})
        schedule.setdefault("init_args", {})
        initial = float(cb.schedule.initial)
        schedule["init_args"]["final"] = max(math.floor(p["global_sparsity"] * 1e4) / 1e4, initial)
    if q and q["fp32_layers"]:
        for cb in recipe.callbacks((QuantizationAwareTraining, PostTrainingQuantization)):
            if cb.linear is None:
                entry = entry_of(cb)
                existing = list(entry["init_args"].get("skip") or [])
                entry["init_args"]["skip"] = existing + [
                    re.escape(n) for n in q["fp32_layers"] if re.escape(n) not in existing
                ]
    path = out / "plan.yaml"
    header = _header(file, plan, overrides, args, path)
    path.write_text(header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False))
    return path


def _header(file: str, plan: dict[str, Any], overrides: list[str], args: Any, path: Path) -> str:
    today = datetime.date.today().isoformat()
    lines = [
        f"Per-layer compression plan written by `lightning-opt plan` on {today} from {file}",
        f"and the checkpoint {args.ckpt} (sensitivity scan on the validation set, {plan['metric']}).",
        f"Budget: at most {plan['max_drop']} metric points lost; target {plan.get('target')}.",
    ]
    p, q = plan.get("pruning"), plan.get("int8")
    if p:
        lines.append(
            f"Pruning: per-layer sparsities in Pruning `overrides` (global sparsity {p['global_sparsity']:.4f}; "
            f"{p['cost_unit']} kept {p['kept']:.6g}" + (f" of a budget of {p['budget']:.6g})" if p["budget"] else ")")
        )
        lines.append(
            f"  chosen by a multiple-choice knapsack on the scan's curves (docs/plan.md); predicted drop "
            f"{p['predicted_drop']:.3f} (sum of single-layer drops before fine-tuning), measured one-shot "
            f"{p['one_shot_drop']:.3f} before fine-tuning."
        )
        if p["flops_dense"]:
            lines.append(f"  FLOPs of the pruned layers kept: {p['flops_kept'] / p['flops_dense']:.1%} of dense.")
    if q:
        lines.append(
            f"int8: {q['int8_layers']} of {q['layers']} layers int8, kept in fp32 (`skip`): "
            f"{q['fp32_layers'] or 'none'}; measured drop {q['drop']:.3f} with the scan's fake quantization "
            f"(every layer int8: {q['all_int8_drop']:.3f})."
        )
    if p and p.get("one_shot_drop_with_int8") is not None:
        lines.append(f"Pruning and int8 together, one-shot: measured drop {p['one_shot_drop_with_int8']:.3f}.")
    lines.append(f"Run: python -m lightning_opt fit --config {path} {' '.join(overrides)}".rstrip())
    lines.append("Test: --trainer.max_steps=2 --trainer.limit_val_batches=1 --trainer.limit_test_batches=1")
    original = [line for line in Path(file).read_text().splitlines() if line.startswith("#")]
    text = "".join(f"# {line}\n" for line in lines)
    if original:
        text += "#\n# The recipe's own header:\n" + "".join(
            f"#   {line.lstrip('#').strip()}\n" for line in original[:12]
        )
    return text
