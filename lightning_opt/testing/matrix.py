"""The model-zoo support matrix: every technique on every zoo architecture, run as a user runs it, and classified.

A *cell* is one `ZOO` entry through one technique: `ZooModule` and
`ZooDataModule` fitted for ``max_steps=2`` by a real, quiet `Trainer` with the
technique's callback built from its default arguments plus the minimum a user must give (a schedule for pruning).
Post-training steps (ONNX export) follow the fit, with the library's public functions. Each cell ends in one of:

- ``"works"``: the run finished and the technique's own result checks out (see `TOLERANCES`):

  - ``unstructured``: the pruned weights are 50% zeros (the schedule's target) within 0.01;
  - ``nm``: every group of 4 consecutive input weights of every pruned layer holds at most 2 nonzeros (the input
    axis is dim 1 of ``Linear``/``Conv`` weights, dim 0 of Hugging Face's ``Conv1D``);
  - ``channel`` (``remove_channels=True``): fewer parameters after removal, and the thinned model's outputs equal the
    masked model's (taken just before removal) within ``channel_atol`` (relative to the largest output, at least 1);
  - ``qat`` / ``ptq``: the int8 ``.pt2`` artifact, loaded back from disk, gives finite outputs, bit-identical on two
    runs of the same input, within ``int8_rel_l2`` (relative L2 error) of the fake-quant (QAT) or fp32 (PTQ) model;
  - ``onnx``: the fp32 ONNX model (`export_onnx`) matches torch within
    ``onnx_atol``; its onnxruntime int8 version (`quantize_onnx`) is finite and
    within ``int8_rel_l2``;
  - ``report``: `CompressionReport` wrote ``baseline`` and ``final`` columns with
    positive, finite parameter and FLOP counts (and latency when measured);
  - ``distillation``: a `DistillationModule` with a teacher of the same
    architecture trains two steps with a finite loss and changes the student's weights.

- ``"refused"``: lightning-opt itself raised a ``ValueError``/``TypeError``/``NotImplementedError``/``RuntimeError``
  before the first training batch (construction, ``setup``, ``on_fit_start``: ``trainer.global_step == 0``), so no
  training time was lost; ``message`` is its first line. For ``onnx``, an export that runs after training like
  ``lightning-opt export``, a `QuantizationExportError` naming the layer (nothing
  written) is a refusal too.
- ``"crash"``: an exception once training started, in a post-training step or in a check, or before training but
  raised inside another library or as a ``KeyError``/``IndexError``/``AttributeError`` (a bug, not a refusal).
- ``"silent"``: everything ran, but the check failed (wrong outputs, target missed, nondeterministic artifact).

``tests/test_zoo_matrix.py``, ``benchmarks/zoo.py`` and ``docs/support.md`` all come from `run_cell`.

Examples:
    >>> import tempfile
    >>> cell = run_cell("resnet18", "unstructured", tempfile.mkdtemp())  # doctest: +SKIP
    >>> cell.status, cell.figures["sparsity_after"]  # doctest: +SKIP
    ('works', 0.5)
"""

from __future__ import annotations

import copy
import math
import os
import re
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_opt import inputs
from lightning_opt.testing import quiet_trainer
from lightning_opt.testing.zoo import ZOO, ZooDataModule, ZooModule, available

__all__ = [
    "QUICK_TECHNIQUES",
    "SLOW_TECHNIQUES",
    "TECHNIQUES",
    "TOLERANCES",
    "Cell",
    "Status",
    "run_cell",
    "run_matrix",
]

Status = Literal["works", "refused", "crash", "silent", "unavailable"]

#: Quick cells (seconds each) and slow ones (export, int8 conversion, compilation, Torch-Pruning's graph).
QUICK_TECHNIQUES = ("report", "unstructured", "nm", "distillation")
SLOW_TECHNIQUES = ("channel", "qat", "ptq", "onnx")
TECHNIQUES = QUICK_TECHNIQUES + SLOW_TECHNIQUES

#: The tolerances of the checks (see the module docstring).
TOLERANCES: dict[str, float] = {
    "sparsity": 0.01,  # |achieved - target| for unstructured pruning
    "channel_atol": 1e-4,  # max |removed - masked| / max(1, max |masked|)
    "int8_rel_l2": 0.25,  # ||int8 - reference|| / ||reference||
    "onnx_atol": 1e-4,  # max |onnx fp32 - torch| / max(1, max |torch|)
}

TARGET_SPARSITY = 0.5
CHANNEL_SPARSITY = 0.25
MAX_STEPS = 2


@dataclass
class Cell:
    """The outcome of one zoo entry through one technique.

    Attributes:
        model: the zoo entry.
        technique: one of `TECHNIQUES`.
        status: ``"works"``, ``"refused"``, ``"crash"``, ``"silent"`` (or ``"unavailable"`` when the entry's
            packages are not installed).
        message: the first line of the refusal or error, or what the check found.
        figures: measured figures; ``<figure>_before`` / ``<figure>_after`` for ``params``, ``flops``,
            ``latency_ms`` and ``size_bytes`` where the technique changes them, plus the checked quantity
            (``sparsity_after``, ``max_abs_diff``, ``rel_l2``...).
        seconds: wall time of the cell.
    """

    model: str
    technique: str
    status: Status
    message: str = ""
    figures: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """A json-ready dict."""
        return asdict(self)


class _ExportRefused(Exception):
    """An export that runs after training (ONNX) refused the model with its own message, writing nothing."""


class _CheckFailed(Exception):
    """A technique ran but its result is wrong (a *silent* cell)."""


class _Started(Callback):
    """Notes when the first training batch starts (listed first, so before any technique's batch hook)."""

    def __init__(self) -> None:
        self.started = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.started = True


#: Exception types that are refusals when lightning-opt raises them before training; a KeyError, IndexError,
#: AttributeError or AssertionError there is a bug, not a refusal.
_REFUSALS = (ValueError, TypeError, NotImplementedError, RuntimeError)


class _Snapshot(Callback):
    """Records the model's outputs on its example at train end, before other callbacks change it (channel removal).

    Listed first in ``trainer.callbacks`` so that its ``on_train_end`` runs before the technique's.
    """

    def __init__(self) -> None:
        self.output: Tensor | None = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            self.output = _logits(inputs.call(pl_module, _device_example(pl_module))).detach().cpu().clone()
        pl_module.train(training)


def _device_example(module: pl.LightningModule) -> Any:
    device = next(module.parameters()).device
    return inputs.map_tensors(module.example_input_array, lambda t: t.to(device))


def _logits(out: Any) -> Tensor:
    out = getattr(out, "logits", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor):
        raise _CheckFailed(f"the model returned {type(out).__name__}, not a logits tensor")
    return out.float()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(err: BaseException) -> str:
    """``Type: first line of the message``, then the first line of its root cause when it has one."""

    def line(e: BaseException) -> str:
        text = _ANSI.sub("", str(e)).strip()
        return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"

    out = line(err)
    cause = err.__cause__
    while cause is not None and cause.__cause__ is not None:
        cause = cause.__cause__
    if cause is not None:
        out += f" (cause: {line(cause)})"
    return out[:400]


def _raised_by_plugin(err: BaseException) -> bool:
    """Whether the innermost frame that raised ``err`` is lightning-opt's own code (a deliberate refusal)."""
    tb = err.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    if last is None:
        return False
    parts = Path(last).parts
    return "lightning_opt" in parts and "testing" not in parts[parts.index("lightning_opt") :]


def _trainer(root: str, callbacks: list[Callback]) -> pl.Trainer:
    return quiet_trainer(root, callbacks, max_steps=MAX_STEPS, limit_val_batches=1, num_sanity_val_steps=0)


def _rel_l2(out: Tensor, ref: Tensor) -> float:
    if out.shape != ref.shape:
        raise _CheckFailed(f"output shape {tuple(out.shape)} differs from the reference's {tuple(ref.shape)}")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def _scaled_max_diff(out: Tensor, ref: Tensor) -> float:
    if out.shape != ref.shape:
        raise _CheckFailed(f"output shape {tuple(out.shape)} differs from the reference's {tuple(ref.shape)}")
    return float((out - ref).abs().max()) / max(1.0, float(ref.abs().max()))


def _finite(t: Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise _CheckFailed(f"{what} holds non-finite values")


def _measure(model: nn.Module, example: Any, latency: bool, threads: int, prefix: str) -> dict[str, float]:
    from lightning_opt.measure import measure_model

    figures = measure_model(model, example, latency=latency, num_threads=threads, repeats=20, warmup=3)
    out = {
        f"params_{prefix}": float(figures["params"]),
        f"nonzero_params_{prefix}": float(figures["nonzero_params"]),
        f"flops_{prefix}": float(figures["flops"]),
        f"size_bytes_{prefix}": float(figures["size_bytes"]),
    }
    if latency:
        out[f"latency_ms_{prefix}"] = float(figures["latency_ms"])
    return out


def _interleaved_latency(models: dict[str, Any], example: Any, threads: int, rounds: int = 3) -> dict[str, float]:
    """Median latency (ms) of each model, timed in alternating rounds so that machine noise hits them alike."""
    from lightning_opt.measure import measure_latency

    runs: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            runs[name].append(measure_latency(model, example, warmup=2, repeats=10, num_threads=threads).median_ms)
    return {name: sorted(values)[len(values) // 2] for name, values in runs.items()}


# ---------------------------------------------------------------------------------------------------------- techniques
@dataclass
class _Run:
    """What a technique's ``build`` gives the runner: the module to fit, the callbacks, the check after fit."""

    module: pl.LightningModule
    callbacks: list[Callback]
    check: Callable[[pl.Trainer], dict[str, float]]


def _pruning_rows(cb: Any, module: pl.LightningModule) -> list[dict[str, Any]]:
    rows = cb.layer_stats(module)
    if not rows:
        raise _CheckFailed("no layer was pruned")
    return rows


def _unstructured(name: str, root: str, measure: bool, threads: int) -> _Run:
    from lightning_opt.pruning import ConstantSchedule, Pruning

    model = ZooModule(name)
    cb = Pruning(schedule=ConstantSchedule(final=TARGET_SPARSITY))

    def check(trainer: pl.Trainer) -> dict[str, float]:
        rows = _pruning_rows(cb, model)
        total = sum(r["params"] for r in rows)
        sparsity = 1.0 - sum(r["nonzeros"] for r in rows) / total
        figures = {"sparsity_after": sparsity, "pruned_params": float(total)}
        if abs(sparsity - TARGET_SPARSITY) > TOLERANCES["sparsity"]:
            raise _CheckFailed(f"the pruned weights are {sparsity:.3f} zeros, the target is {TARGET_SPARSITY}")
        return figures

    return _Run(model, [cb], check)


def _nm(name: str, root: str, measure: bool, threads: int) -> _Run:
    from lightning_opt.pruning import ConstantSchedule, Pruning

    model = ZooModule(name)
    cb = Pruning(schedule=ConstantSchedule(final=0.5), granularity="nm", n=2, m=4)

    def check(trainer: pl.Trainer) -> dict[str, float]:
        rows = _pruning_rows(cb, model)
        params = dict(model.named_parameters())
        bad = []
        for row in rows:
            w = params[row["layer"]].detach()
            owner = model.get_submodule(row["layer"].rpartition(".")[0])
            axis = 0 if type(owner).__name__ == "Conv1D" else 1  # Hugging Face's Conv1D stores (in, out)
            dims = [d for d in range(w.dim()) if d != axis]
            groups = w.permute(*dims, axis).reshape(-1, 4)  # input axis last, groups of 4
            if int((groups != 0).sum(1).max()) > 2:
                bad.append(row["layer"])
        total = sum(r["params"] for r in rows)
        figures = {"sparsity_after": 1.0 - sum(r["nonzeros"] for r in rows) / total, "pruned_params": float(total)}
        if bad:
            raise _CheckFailed(f"{len(bad)} layers break the 2:4 pattern, first {bad[0]}")
        return figures

    return _Run(model, [cb], check)


def _channel(name: str, root: str, measure: bool, threads: int) -> _Run:
    from lightning_opt.pruning import ConstantSchedule, Pruning

    model = ZooModule(name)
    snapshot = _Snapshot()
    cb = Pruning(schedule=ConstantSchedule(final=CHANNEL_SPARSITY), granularity="channel", remove_channels=True)
    before = {"params_before": float(sum(p.numel() for p in model.parameters()))}

    def check(trainer: pl.Trainer) -> dict[str, float]:
        if snapshot.output is None:
            raise _CheckFailed("the masked model's outputs were not recorded")
        model.eval()
        with torch.no_grad():
            out = _logits(inputs.call(model, model.example_input_array))
        figures = dict(before)
        figures["params_after"] = float(sum(p.numel() for p in model.parameters()))
        figures["max_abs_diff"] = _scaled_max_diff(out, snapshot.output)
        _finite(out, "the thinned model's output")
        if figures["params_after"] >= figures["params_before"]:
            raise _CheckFailed("no channel was removed (as many parameters after removal as before)")
        if figures["max_abs_diff"] > TOLERANCES["channel_atol"]:
            raise _CheckFailed(
                f"outputs after channel removal differ from the masked model's by {figures['max_abs_diff']:.3g} "
                f"(relative to the largest output; tolerance {TOLERANCES['channel_atol']})"
            )
        return figures

    return _Run(model, [snapshot, cb], check)


def _int8_check(
    model: pl.LightningModule, cb: Any, reference: Callable[[], Tensor]
) -> Callable[[pl.Trainer], dict[str, float]]:
    def check(trainer: pl.Trainer) -> dict[str, float]:
        from lightning_opt.quantization import load_artifact

        results = dict(cb.results)
        path = results.get("artifact")
        if not path or not os.path.isfile(path):
            raise _CheckFailed("no int8 artifact was written")
        artifact = load_artifact(path)
        example = model.example_input_array
        with torch.no_grad():
            first = _logits(inputs.call(artifact, example))
            second = _logits(inputs.call(artifact, example))
        _finite(first, "the int8 artifact's output")
        ref = reference()
        figures = {"rel_l2": _rel_l2(first, ref), "size_bytes_after": float(results.get("size_bytes", math.nan))}
        for key, out in (("latency_ms", "latency_ms_after"), ("fp32_latency_ms", "latency_ms_before")):
            if key in results:
                figures[out] = float(results[key])
        if not torch.equal(first, second):
            raise _CheckFailed(
                f"the int8 artifact gives different outputs on two runs of the same input "
                f"(max diff {float((first - second).abs().max()):.3g}): dropout left on?"
            )
        if figures["rel_l2"] > TOLERANCES["int8_rel_l2"]:
            raise _CheckFailed(
                f"the int8 artifact is {figures['rel_l2']:.3f} (relative L2) from its reference, tolerance "
                f"{TOLERANCES['int8_rel_l2']}"
            )
        return figures

    return check


def _eval_output(model: nn.Module) -> Tensor:
    model.eval()
    with torch.no_grad():
        return _logits(inputs.call(model, model.example_input_array))


def _qat(name: str, root: str, measure: bool, threads: int) -> _Run:
    from lightning_opt.quantization import QuantizationAwareTraining

    model = ZooModule(name)
    # torch.compile of the int8 graph only pays off in the latency figure: without measuring, run the artifact eagerly
    cb = QuantizationAwareTraining(latency=measure, compile=measure, num_threads=threads)
    return _Run(model, [cb], _int8_check(model, cb, lambda: _eval_output(model)))  # the fake-quant model


def _ptq(name: str, root: str, measure: bool, threads: int) -> _Run:
    from lightning_opt.quantization import PostTrainingQuantization

    model = ZooModule(name)
    cb = PostTrainingQuantization(latency=measure, compile=measure, num_threads=threads)
    return _Run(model, [cb], _int8_check(model, cb, lambda: _eval_output(model)))  # the fp32 model


def _onnx(name: str, root: str, measure: bool, threads: int) -> _Run:
    model = ZooModule(name)
    datamodule_batches = ZooDataModule(name).train_dataloader

    def check(trainer: pl.Trainer) -> dict[str, float]:
        from lightning_opt.quantization import OnnxRuntimeModel, QuantizationExportError, export_onnx, quantize_onnx

        example: Any = model.example_input_array  # in the model's own form (tensor, tuple or dict)
        ref = _eval_output(model)
        fp32_path, int8_path = os.path.join(root, "model.onnx"), os.path.join(root, "model_int8.onnx")
        try:
            figures = {"size_bytes_before": float(export_onnx(model, example, fp32_path))}
        except QuantizationExportError as err:  # the export command's own refusal, naming the layer
            raise _ExportRefused(_first_line(err)) from err
        figures["size_bytes_after"] = float(quantize_onnx(fp32_path, int8_path, datamodule_batches(), num_batches=2))
        fp32, int8 = OnnxRuntimeModel(fp32_path, num_threads=threads), OnnxRuntimeModel(int8_path, num_threads=threads)
        with torch.no_grad():
            out32 = _logits(inputs.call(fp32, example))
            out8 = _logits(inputs.call(int8, example))
        figures["max_abs_diff"] = _scaled_max_diff(out32, ref)
        figures["rel_l2"] = _rel_l2(out8, ref)
        if measure:
            timed = _interleaved_latency({"before": fp32, "after": int8}, example, threads)
            figures.update({f"latency_ms_{k}": v for k, v in timed.items()})
        _finite(out32, "the fp32 ONNX model's output")
        _finite(out8, "the int8 ONNX model's output")
        if figures["max_abs_diff"] > TOLERANCES["onnx_atol"]:
            raise _CheckFailed(
                f"the fp32 ONNX model differs from torch by {figures['max_abs_diff']:.3g} (tolerance "
                f"{TOLERANCES['onnx_atol']})"
            )
        if figures["rel_l2"] > TOLERANCES["int8_rel_l2"]:
            raise _CheckFailed(
                f"the int8 ONNX model is {figures['rel_l2']:.3f} (relative L2) from torch, tolerance "
                f"{TOLERANCES['int8_rel_l2']}"
            )
        return figures

    return _Run(model, [], check)


def _report(name: str, root: str, measure: bool, threads: int) -> _Run:
    from lightning_opt.reporting import CompressionReport

    model = ZooModule(name)
    cb = CompressionReport(latency=measure, num_threads=threads, repeats=20)

    def check(trainer: pl.Trainer) -> dict[str, float]:
        keys = ("params", "flops", "latency_ms") if measure else ("params", "flops")
        figures: dict[str, float] = {}
        for stage, suffix in (("baseline", "before"), ("final", "after")):
            values = cb.stages.get(stage)
            if not values:
                raise _CheckFailed(f"the report has no {stage!r} column")
            for key in keys:
                value = values.get(key)
                if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                    raise _CheckFailed(f"the report's {stage} {key} is {value!r}")
                figures[f"{key}_{suffix}"] = float(value)
        if cb.output_dir is None or not (cb.output_dir / "report.json").is_file():
            raise _CheckFailed("report.json was not written")
        return figures

    return _Run(model, [cb], check)


def _distillation(name: str, root: str, measure: bool, threads: int) -> _Run:
    from lightning_opt.distillation import DistillationModule

    torch.manual_seed(1)
    teacher = ZooModule(name)
    torch.manual_seed(0)
    student = ZooModule(name)
    start = {k: v.detach().clone() for k, v in student.state_dict().items()}
    module = DistillationModule(student=student, teacher=teacher)

    def check(trainer: pl.Trainer) -> dict[str, float]:
        loss = trainer.callback_metrics.get("train/loss")
        if loss is None:
            raise _CheckFailed("no train/loss was logged")
        figures = {"loss": float(loss)}
        if not math.isfinite(figures["loss"]):
            raise _CheckFailed(f"the distillation loss is {figures['loss']}")
        after = student.state_dict()
        if all(torch.equal(after[k], v) for k, v in start.items()):
            raise _CheckFailed("the student's weights did not change")
        for k, v in after.items():
            if torch.is_floating_point(v):
                _finite(v, f"the student's {k}")
        return figures

    return _Run(module, [], check)


_BUILDERS: dict[str, Callable[[str, str, bool, int], _Run]] = {
    "report": _report,
    "unstructured": _unstructured,
    "nm": _nm,
    "distillation": _distillation,
    "channel": _channel,
    "qat": _qat,
    "ptq": _ptq,
    "onnx": _onnx,
}


@contextmanager
def _quiet() -> Iterator[None]:
    import logging

    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def run_cell(
    model: str,
    technique: str,
    root: str | os.PathLike[str],
    measure: bool = False,
    num_threads: int = 1,
    seed: int = 0,
) -> Cell:
    """Run one zoo entry through one technique, as a user would, and classify the outcome.

    Args:
        model: a `ZOO` entry.
        technique: one of `TECHNIQUES`.
        root: an empty directory for the run (logs, artifacts).
        measure: also time the model before and after (CPU latency at ``num_threads`` threads) and, where a
            technique changes them, count its parameters and FLOPs before and after; off, only what the checks
            need is computed.
        num_threads: torch threads while timing (and of the ONNX Runtime sessions).
        seed: the global seed set before the models are built.

    Returns:
        The `Cell`.

    Raises:
        ValueError: if ``model`` is not in the zoo or ``technique`` is not one of `TECHNIQUES`.
    """
    if model not in ZOO:
        raise ValueError(f"`model` must be one of {sorted(ZOO)}, got {model!r}.")
    if technique not in _BUILDERS:
        raise ValueError(f"`technique` must be one of {list(TECHNIQUES)}, got {technique!r}.")
    if not available(model):
        missing = ", ".join(ZOO[model].requires)
        return Cell(model, technique, "unavailable", f"needs {missing} (pip install 'lightning-opt[zoo]')")
    root = str(root)
    os.makedirs(root, exist_ok=True)
    start = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    trainer: pl.Trainer | None = None
    started = _Started()
    figures: dict[str, float] = {}
    with _quiet():
        try:
            run = _BUILDERS[technique](model, root, measure, num_threads)
            reference = copy.deepcopy(run.module).eval() if measure else None  # the model before training
            if reference is not None:
                figures.update(_measure(reference, reference.example_input_array, False, num_threads, "before"))
            trainer = _trainer(root, [started, *run.callbacks])
            trainer.fit(run.module, datamodule=ZooDataModule(model))
        except Exception as err:
            step = trainer.global_step if trainer is not None else 0
            if not started.started and _raised_by_plugin(err) and isinstance(err, _REFUSALS):
                status: Status = "refused"
                message = _first_line(err)
            else:
                status = "crash"
                where = f"in training step {step}" if started.started else "before training"
                message = f"{where}: {_first_line(err)}"
            return Cell(model, technique, status, message, figures, time.perf_counter() - start)
        try:
            figures.update(run.check(trainer))
            if reference is not None and technique in ("unstructured", "nm", "channel", "distillation"):
                example = run.module.example_input_array
                figures.update(_measure(run.module, example, False, num_threads, "after"))
                run.module.eval()
                timed = _interleaved_latency({"before": reference, "after": run.module}, example, num_threads)
                figures.update({f"latency_ms_{k}": v for k, v in timed.items()})
        except _CheckFailed as err:
            return Cell(model, technique, "silent", str(err), figures, time.perf_counter() - start)
        except _ExportRefused as err:  # an export step (ONNX) said no with a message, before writing anything
            return Cell(model, technique, "refused", str(err), figures, time.perf_counter() - start)
        except Exception as err:
            frame = traceback.extract_tb(err.__traceback__)[-1]
            message = f"in the check ({Path(frame.filename).name}:{frame.lineno}): {_first_line(err)}"
            return Cell(model, technique, "crash", message, figures, time.perf_counter() - start)
    return Cell(model, technique, "works", "", figures, time.perf_counter() - start)


def run_matrix(
    root: str | os.PathLike[str],
    models: list[str] | None = None,
    techniques: list[str] | None = None,
    measure: bool = False,
    num_threads: int = 1,
    on_cell: Callable[[Cell], None] | None = None,
) -> list[Cell]:
    """Run `run_cell` for every model x technique (each in its own sub-directory of ``root``).

    Args:
        root: a directory for the runs.
        models: zoo entries (default: all of `ZOO`).
        techniques: techniques (default: all of `TECHNIQUES`).
        measure: time and count before/after (see `run_cell`).
        num_threads: torch threads while timing.
        on_cell: called with each cell as soon as it is done (progress output).

    Returns:
        The cells, model by model.
    """
    cells = []
    for model in models or list(ZOO):
        for technique in techniques or list(TECHNIQUES):
            cell = run_cell(model, technique, Path(root) / f"{model}-{technique}", measure, num_threads)
            cells.append(cell)
            if on_cell is not None:
                on_cell(cell)
    return cells
