"""Per-layer sensitivity of a trained model on its validation set, without training.

For each prunable weight: the validation metric with that weight alone pruned (magnitude, the ``Pruning``
callback's mask function at the layer's own target) at each sparsity of a grid, every other weight dense. For each
quantizable layer (Conv/Linear inside the quantized submodule): the metric and the output SQNR with that layer alone
fake-quantized in the int8 scheme of the QAT/PTQ callbacks, simulated: weights per output channel, symmetric
(``scale = max|w| / 127``, integers in [-127, 127]); the layer's input per tensor, affine uint8, with the range
observed over the scan's own batches (min/max including 0). This is a proxy of the pt2e graph the callbacks build
(no operator fusion, no output quantizers), documented in docs/plan.md.

The validation batches are read once and kept (inputs on the model's device, re-batched to ``batch_rows`` rows), the
dense model's outputs and metric are computed once; each evaluation is then one batched forward pass.
"""

from __future__ import annotations

import contextlib
import csv
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_opt import inputs
from lightning_opt.pruning import unstructured_masks
from lightning_opt.quantization import sqnr_db

__all__ = ["DEFAULT_GRID", "Evaluator", "SensitivityScan", "layer_flops", "quantized", "scan_sensitivity"]

#: Default sparsity grid of the scan (fractions of a layer's weights set to zero).
DEFAULT_GRID: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)

_QUANT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class Evaluator:
    """The validation metric of a model on cached batches.

    ``metric="accuracy"``: top-1 accuracy in percent of the rows whose target is not -1, computed directly from the
    model's ``(N, C)`` outputs (batched, no Trainer). Any other name: a metric the LightningModule logs in
    ``validation_step`` (``val/loss``), read from ``trainer.validate`` on the cached batches.

    Args:
        model: the LightningModule (evaluated in eval mode, no grad).
        batches: validation batches (a dataloader); read once.
        metric: ``"accuracy"``, ``"auto"`` (accuracy when the outputs are ``(N, C)`` scores and the batches hold
            integer targets) or a logged metric name.
        max_batches: read at most this many batches (None: all).
        batch_rows: rows per forward pass for the accuracy path.

    Raises:
        ValueError: if there are no batches, ``metric="auto"`` cannot use accuracy, or accuracy is asked for a model
            whose outputs are not class scores.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Any],
        metric: str = "auto",
        max_batches: int | None = None,
        batch_rows: int = 512,
    ) -> None:
        self.model = model
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        raw = []
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            raw.append(batch)
        if not raw:
            raise ValueError("the validation set is empty. HINT: the datamodule needs a `val_dataloader`.")
        self.raw = raw
        self.rows = sum(inputs.batch_size(inputs.batch_inputs(b)) for b in raw)
        targets = [inputs.batch_target(b) for b in raw]
        self.chunks: list[tuple[Any, Tensor]] = []
        can_accuracy = all(t is not None and not t.is_floating_point() and t.dim() == 1 for t in targets)
        if can_accuracy:
            xs = [inputs.batch_inputs(b) for b in raw]
            if all(isinstance(x, Tensor) for x in xs):
                x_all, t_all = torch.cat(xs), torch.cat([t for t in targets if t is not None])
                self.chunks = [
                    (x_all[i : i + batch_rows].to(self.device), t_all[i : i + batch_rows].to(self.device))
                    for i in range(0, len(x_all), batch_rows)
                ]
            else:
                self.chunks = [
                    (inputs.map_tensors(x, lambda t: t.to(self.device)), t.to(self.device))  # type: ignore[union-attr]
                    for x, t in zip(xs, targets)
                ]
        if metric == "auto":
            if not can_accuracy:
                raise ValueError(
                    "the validation batches hold no integer class targets, so the scan cannot use accuracy. "
                    "HINT: name a metric the model logs in validation_step with --metric (e.g. --metric val/loss)."
                )
            metric = "accuracy"
        if metric == "accuracy" and not can_accuracy:
            raise ValueError("--metric accuracy needs batches with integer class targets (inputs, labels).")
        self.metric = metric
        self.outputs: Tensor | None = None
        self.last_loss: float | None = None  # validation cross-entropy of the last accuracy evaluation
        if metric == "accuracy":
            out = self._forward_chunks()
            if out.dim() != 2:
                raise ValueError(
                    f"--metric accuracy needs (N, C) class scores from the model, got outputs of shape "
                    f"{list(out.shape)}. HINT: name a metric the model logs with --metric."
                )
            self.baseline, self.outputs = self._accuracy(out), out
            self.baseline_loss: float | None = self.last_loss
        else:
            self.baseline, self.outputs = self()
            self.baseline_loss = None

    def destroyed(self, share: float = 0.05) -> float | None:
        """For accuracy: the value ``share`` of the way from chance (``100 / classes``) to the baseline, below which a
        layer counts as destroyed (see ``scan_sensitivity(stop_at=...)``); None for other metrics.
        """
        if self.metric != "accuracy" or self.outputs is None:
            return None
        chance = 100.0 / max(int(self.outputs.shape[-1]), 1)
        return chance + share * max(self.baseline - chance, 0.0)

    @property
    def unit(self) -> str:
        """What a point of the metric is."""
        return "accuracy (%)" if self.metric == "accuracy" else self.metric

    @torch.no_grad()
    def _forward_chunks(self) -> Tensor:
        was = self.model.training
        self.model.eval()
        try:
            return torch.cat([inputs.call(self.model, x).float() for x, _ in self.chunks])
        finally:
            self.model.train(was)

    def __call__(self) -> tuple[float, Tensor | None]:
        """The metric of the model as it is now, and its outputs (for SQNR).

        Returns:
            ``(metric, outputs)``; outputs are None when the model's outputs are not one tensor.
        """
        if self.metric == "accuracy":
            out = self._forward_chunks()
            return self._accuracy(out), out
        return self._validate()

    def _accuracy(self, out: Tensor) -> float:
        target = torch.cat([t for _, t in self.chunks])
        labeled = target != -1
        ce = torch.nn.functional.cross_entropy(out[labeled], target[labeled]) if labeled.any() else torch.tensor(0.0)
        self.last_loss = float(ce)
        correct = (out.argmax(-1) == target) & labeled
        return 100.0 * float(correct.sum()) / max(int(labeled.sum()), 1)

    def _validate(self) -> tuple[float, Tensor | None]:
        import lightning.pytorch as pl

        captured: list[Tensor] = []

        def hook(_m: nn.Module, _a: Any, out: Any) -> None:
            if isinstance(out, Tensor):
                captured.append(out.detach().float().cpu())

        trainer = pl.Trainer(
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            accelerator="cpu" if self.device.type == "cpu" else "auto",
            devices=1,
        )
        handle = self.model.register_forward_hook(hook)
        try:
            trainer.validate(self.model, dataloaders=self.raw, verbose=False)  # type: ignore[arg-type]
        finally:
            handle.remove()
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            raise ValueError(
                f"--metric {self.metric!r} is not logged in validation; logged: {sorted(trainer.callback_metrics)}."
            )
        return float(value), (torch.cat(captured) if captured else None)


@dataclass
class SensitivityScan:
    """What the scan measured.

    Args:
        metric: the metric's name (``"accuracy"`` or a logged name).
        higher_is_better: whether a larger value is better (drops are ``baseline - value`` then).
        baseline: the dense model's metric.
        prune: ``{layer: [(sparsity, metric), ...]}`` (layer = the pruned weight's module name).
        prune_loss: ``{layer: [(sparsity, validation cross-entropy increase), ...]}`` (accuracy scans only): a cost
            that keeps growing after the accuracy of a destroyed layer has hit chance; the allocation uses it.
        quant: ``{layer: (metric, output SQNR in dB)}`` with that layer alone fake-quantized.
        quant_all: the metric with every scanned layer fake-quantized (None when no layer was scanned).
        params: ``{layer: weights}`` of the prunable layers.
        flops: ``{layer: FLOPs per sample}`` of the prunable layers (2 x multiply-adds).
        weights: ``{layer: parameter name}`` of the prunable layers.
        ranges: ``{layer: (min, max)}`` of each quantizable layer's input over the scan's batches.
        seconds: the scan's wall time.
        evaluations: forward passes over the validation set.
        rows: validation rows used.
    """

    metric: str
    higher_is_better: bool
    baseline: float
    prune: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    prune_loss: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    quant: dict[str, tuple[float, float]] = field(default_factory=dict)
    quant_all: float | None = None
    params: dict[str, int] = field(default_factory=dict)
    flops: dict[str, float] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    seconds: float = 0.0
    evaluations: int = 0
    rows: int = 0

    def drop(self, value: float) -> float:
        """How much worse ``value`` is than the baseline, in metric points (positive = worse).

        Examples:
            >>> SensitivityScan("accuracy", True, 90.0).drop(85.5)
            4.5
        """
        return self.baseline - value if self.higher_is_better else value - self.baseline

    def cost_curve(self, layer: str) -> list[tuple[float, float]]:
        """What the allocation minimises for a layer, ``[(sparsity, cost)]`` from ``(0, 0)``: the validation
        cross-entropy increase when the scan measured it (accuracy), else the metric drop (`curve`).
        """
        if layer in self.prune_loss:
            return [(0.0, 0.0), *self.prune_loss[layer]]
        return self.curve(layer)

    def curve(self, layer: str) -> list[tuple[float, float]]:
        """``[(sparsity, drop)]`` of a layer, starting at ``(0, 0)``."""
        return [(0.0, 0.0)] + [(s, self.drop(v)) for s, v in self.prune[layer]]

    def rows_csv(self) -> list[dict[str, Any]]:
        """One row per (prunable layer, sparsity), then one per quantizable layer, then the all-int8 row."""
        out: list[dict[str, Any]] = []
        for layer, points in self.prune.items():
            for s, v in points:
                out.append(
                    {
                        "kind": "prune",
                        "layer": layer,
                        "params": self.params.get(layer, ""),
                        "sparsity": s,
                        "metric": v,
                        "drop": self.drop(v),
                        "sqnr_db": "",
                    }
                )
        for layer, (v, q) in self.quant.items():
            out.append(
                {"kind": "int8", "layer": layer, "params": "", "sparsity": "", "metric": v, "drop": self.drop(v)}
                | {"sqnr_db": q}
            )
        if self.quant_all is not None:
            out.append(
                {"kind": "int8_all", "layer": "*", "params": "", "sparsity": "", "metric": self.quant_all}
                | {"drop": self.drop(self.quant_all), "sqnr_db": ""}
            )
        return out

    def write_csv(self, path: str | Path) -> Path:
        """Write `rows_csv` (columns kind, layer, params, sparsity, metric, drop, sqnr_db)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["kind", "layer", "params", "sparsity", "metric", "drop", "sqnr_db"])
            writer.writeheader()
            writer.writerows(self.rows_csv())
        return path

    def log_tensorboard(self, writer: Any) -> None:
        """One curve per layer: ``plan/sensitivity/<layer>`` (x = sparsity in per mille, y = metric), the int8 metric
        and SQNR per layer (``plan/int8_metric/<layer>``, ``plan/int8_sqnr_db/<layer>``, at step 0), and the
        CSV as a text table.
        """
        for layer, points in self.prune.items():
            writer.add_scalar(f"plan/sensitivity/{layer}", self.baseline, 0)
            for s, v in points:
                writer.add_scalar(f"plan/sensitivity/{layer}", v, round(s * 1000))
        for layer, (v, q) in self.quant.items():
            writer.add_scalar(f"plan/int8_metric/{layer}", v, 0)
            writer.add_scalar(f"plan/int8_sqnr_db/{layer}", min(q, 200.0), 0)
        lines = ["| kind | layer | sparsity | metric | drop | SQNR dB |", "|---|---|---|---|---|---|"]
        for r in self.rows_csv():
            sq = f"{r['sqnr_db']:.1f}" if isinstance(r["sqnr_db"], float) else ""
            lines.append(
                f"| {r['kind']} | {r['layer']} | {r['sparsity']} | {r['metric']:.3f} | {r['drop']:.3f} | {sq} |"
            )
        writer.add_text("plan/sensitivity", "\n".join(lines), 0)

    def figure(self) -> Any:
        """Metric against sparsity, one line per layer (matplotlib)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for layer, points in self.prune.items():
            xs = [0.0] + [s for s, _ in points]
            ys = [self.baseline] + [v for _, v in points]
            ax.plot(xs, ys, marker="o", markersize=3, label=f"{layer} ({self.params.get(layer, 0)})")
        ax.set_xlabel("sparsity of that layer alone")
        ax.set_ylabel(self.metric)
        ax.set_title("sensitivity: one layer pruned at a time (magnitude), no fine-tuning", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig


# ----------------------------------------------------------------------------------------------------- fake quant
def _weight_fake_quant(w: Tensor, out_axis: int = 0) -> Tensor:
    """Per-output-channel symmetric int8 (integers in [-127, 127], ``scale = max|w| / 127``)."""
    dims = [d for d in range(w.dim()) if d != out_axis]
    amax = w.detach().abs().amax(dim=dims, keepdim=True) if dims else w.detach().abs()
    scale = (amax / 127.0).clamp_min(1e-12)
    return (w / scale).round().clamp(-127, 127) * scale


def _act_fake_quant(x: Tensor, lo: float, hi: float) -> Tensor:
    """Per-tensor affine uint8 over ``[lo, hi]`` (widened to include 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, 1e-12)
    zero_point = int(min(max(round(-lo / scale), 0), 255))
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)


@contextlib.contextmanager
def quantized(modules: Mapping[str, nn.Module], ranges: Mapping[str, tuple[float, float]]) -> Iterator[None]:
    """Fake-quantize the weights (in place, restored on exit) and inputs (pre-hooks) of ``modules``.

    Args:
        modules: ``{name: Conv/Linear module}``.
        ranges: ``{name: (min, max)}`` of each module's observed input.
    """
    saved: list[tuple[Tensor, Tensor]] = []
    handles = []
    try:
        with torch.no_grad():
            for name, module in modules.items():
                w = module.weight
                assert isinstance(w, Tensor)
                saved.append((w, w.detach().clone()))
                w.copy_(_weight_fake_quant(w.detach(), 0))
                lo, hi = ranges[name]

                def pre(_m: nn.Module, args: tuple[Any, ...], lo: float = lo, hi: float = hi) -> tuple[Any, ...]:
                    if args and isinstance(args[0], Tensor) and args[0].is_floating_point():
                        return (_act_fake_quant(args[0], lo, hi), *args[1:])
                    return args

                handles.append(module.register_forward_pre_hook(pre))
        yield
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for w, original in saved:
                w.copy_(original)


@contextlib.contextmanager
def _observe_inputs(modules: Mapping[str, nn.Module], ranges: dict[str, tuple[float, float]]) -> Iterator[None]:
    def make(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            if args and isinstance(args[0], Tensor) and args[0].is_floating_point():
                x = args[0].detach()
                lo, hi = ranges.get(name, (math.inf, -math.inf))
                ranges[name] = (min(lo, float(x.min())), max(hi, float(x.max())))

        return hook

    handles = [m.register_forward_pre_hook(make(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def layer_flops(model: nn.Module, layers: Mapping[str, tuple[str, int]], example: Any) -> dict[str, float]:
    """FLOPs per sample of each weight's module on ``example``: 2 x output elements x weights per output element.

    Args:
        model: the model.
        layers: ``{weight name: (module name, input axis)}`` (`lightning_opt.pruning.select_weights`).
        example: one batch of model inputs.

    Returns:
        ``{module name: FLOPs per sample}`` (dense; a pruned layer does ``(1 - sparsity)`` of them).
    """
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    flops: dict[str, float] = {}
    rows = max(inputs.batch_size(example), 1)
    handles = []
    for wname, (mname, axis) in layers.items():
        w = params[wname]
        out_axis = 1 if axis == 0 and w.dim() == 2 else 0
        per_output = w.numel() / max(w.shape[out_axis], 1)

        def hook(_m: nn.Module, _a: Any, out: Any, mname: str = mname, per_output: float = per_output) -> None:
            if isinstance(out, Tensor):
                flops[mname] = flops.get(mname, 0.0) + 2.0 * out.numel() / rows * per_output

        handles.append(modules[mname].register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs.call(model, example)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return flops


# ----------------------------------------------------------------------------------------------------- the scan
def _worse_or_equal(value: float, bound: float, higher_is_better: bool) -> bool:
    return value <= bound if higher_is_better else value >= bound


def scan_sensitivity(
    model: nn.Module,
    evaluator: Evaluator,
    prune_layers: Mapping[str, tuple[str, int]],
    quant_layers: Mapping[str, nn.Module],
    grid: Sequence[float] = DEFAULT_GRID,
    higher_is_better: bool = True,
    progress: bool | None = None,
    stop_at: float | None = None,
) -> SensitivityScan:
    """Measure each layer's sensitivity to pruning and to int8, one layer at a time, on cached validation batches.

    Args:
        model: the trained model (weights are changed during the scan and restored).
        evaluator: the metric on the cached validation batches (its baseline is the dense model's).
        prune_layers: ``{weight name: (module name, input axis)}`` of the weights to scan for pruning.
        quant_layers: ``{name: Conv/Linear module}`` to scan for int8 (names as ``skip`` will name them).
        grid: sparsities to measure for every prunable weight, each in (0, 1).
        higher_is_better: whether a larger metric is better.
        progress: show a progress bar (None: when stderr is a terminal).
        stop_at: a metric value at which a layer counts as destroyed (e.g. near chance accuracy): its higher
            sparsities are not evaluated and get the last measured value (pruning more weights of a layer is
            assumed not to help). None evaluates every point. `Evaluator.destroyed` gives one for accuracy.

    Returns:
        The `SensitivityScan`.

    Raises:
        ValueError: if a grid value is outside (0, 1).
    """
    from tqdm.auto import tqdm

    grid = sorted({float(s) for s in grid})
    bad = [s for s in grid if not 0.0 < s < 1.0]
    if bad or not grid:
        raise ValueError(f"the sparsity grid must hold values in (0, 1), got {list(grid)}. HINT: 0.9 means 90% zeros.")
    t0 = time.perf_counter()
    params = dict(model.named_parameters())
    result = SensitivityScan(evaluator.metric, higher_is_better, evaluator.baseline, rows=evaluator.rows)
    for wname, (mname, _) in prune_layers.items():
        result.params[mname] = params[wname].numel()
        result.weights[mname] = wname
    ranges = result.ranges
    total = len(prune_layers) * len(grid) + len(quant_layers) + (1 if quant_layers else 0)
    bar = tqdm(total=total, desc="sensitivity scan", disable=None if progress is None else not progress, leave=False)
    try:
        if quant_layers:
            with _observe_inputs(quant_layers, ranges):
                evaluator()
        with torch.no_grad():
            for wname, (mname, _) in prune_layers.items():
                p = params[wname]
                original = p.detach().clone()
                score = {wname: original.abs()}
                ones = {wname: torch.ones_like(original, dtype=torch.bool)}
                points: list[tuple[float, float]] = []
                losses: list[tuple[float, float]] = []
                for s in grid:
                    bar.update(1)
                    last = points[-1][1] if points else None
                    if last is not None and stop_at is not None and _worse_or_equal(last, stop_at, higher_is_better):
                        points.append((s, last))
                        if losses:
                            losses.append((s, losses[-1][1]))
                        continue
                    mask = unstructured_masks(score, ones, [([wname], s)])[wname]
                    p.mul_(mask)
                    points.append((s, evaluator()[0]))
                    if evaluator.last_loss is not None and evaluator.baseline_loss is not None:
                        losses.append((s, evaluator.last_loss - evaluator.baseline_loss))
                    p.copy_(original)
                    result.evaluations += 1
                result.prune[mname] = points
                if losses:
                    result.prune_loss[mname] = losses
        reference = evaluator.outputs
        for name, module in quant_layers.items():
            result.evaluations += 1
            if name not in ranges:  # never called on the validation batches
                bar.update(1)
                continue
            with quantized({name: module}, ranges):
                value, out = evaluator()
            sq = sqnr_db(reference, out) if reference is not None and out is not None else math.nan
            result.quant[name] = (value, sq)
            bar.update(1)
        if quant_layers:
            with quantized({n: m for n, m in quant_layers.items() if n in ranges}, ranges):
                result.quant_all = evaluator()[0]
            bar.update(1)
            result.evaluations += 2  # the observing pass and this one
    finally:
        bar.close()
    result.evaluations += 1  # the baseline
    result.seconds = time.perf_counter() - t0
    return result
