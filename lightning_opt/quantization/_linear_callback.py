"""Lightning glue of the torchao ``quantize_`` schemes: what the QAT/PTQ callbacks do when ``scheme`` is not pt2e.

`QuantizationAwareTraining` and `PostTrainingQuantization` hold a `LinearStage` when built with
``scheme="int8_dynamic"`` or ``"int8_weight_only"`` and hand it their ``setup`` and ``on_fit_end``; every other hook
of theirs finds no pt2e graph and does nothing. The pure steps are in `lightning_opt.quantization._linear`.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_opt import inputs
from lightning_opt._io import atomic_write
from lightning_opt._utils import load_checkpoint, local_log_dir
from lightning_opt.measure import saved_size_bytes
from lightning_opt.quantization import _linear
from lightning_opt.reporting import CompressionReport

__all__ = ["CALLBACK_SCHEMES", "LinearStage", "export_checkpoint", "stage_for", "validate_callback_scheme"]

#: ``scheme`` values of the QAT/PTQ callbacks: the pt2e static path and the torchao ``quantize_`` schemes.
CALLBACK_SCHEMES = ("pt2e_static", *_linear.SCHEMES)


def validate_callback_scheme(scheme: str, **pt2e_only: tuple[Any, Any]) -> None:
    """Check a callback's ``scheme`` and that pt2e-only arguments keep their defaults with a torchao scheme.

    Args:
        scheme: one of `CALLBACK_SCHEMES`.
        pt2e_only: ``name=(value, default)`` of arguments that only the pt2e path reads.

    Raises:
        ValueError: for an unknown scheme, or a pt2e-only argument changed with a torchao scheme.

    Examples:
        >>> validate_callback_scheme("int8_dynamic", start=(0, 0))
    """
    if scheme not in CALLBACK_SCHEMES:
        raise ValueError(
            f"`scheme` must be one of {list(CALLBACK_SCHEMES)}, got {scheme!r}. HINT: 'pt2e_static' (default) is the "
            "static int8 graph path for CNNs; 'int8_dynamic' / 'int8_weight_only' quantize Linear layers with "
            "torchao's quantize_ (transformers)."
        )
    if scheme == "pt2e_static":
        return
    for name, (value, default) in pt2e_only.items():
        if value != default:
            raise ValueError(
                f"`{name}`={value!r} applies to scheme 'pt2e_static' only, got scheme {scheme!r}. HINT: leave "
                f"`{name}` at its default ({default!r}); torchao's fake quantization runs from the first step."
            )


def stage_for(callback: Any, scheme: str, **pt2e_only: tuple[Any, Any]) -> LinearStage | None:
    """The `LinearStage` a QAT/PTQ callback delegates to for a torchao ``scheme`` (None for ``pt2e_static``).

    Args:
        callback: the callback (its ``mode``, ``module``, ``skip``, ``stage_name``, ``artifact_path``, ``compile``,
            ``latency``, ``num_threads``, ``latency_batch_size`` are read).
        scheme: one of `CALLBACK_SCHEMES`.
        pt2e_only: ``name=(value, default)`` of the callback's arguments that only the pt2e path reads.

    Raises:
        ValueError: see `validate_callback_scheme`.
    """
    validate_callback_scheme(scheme, **pt2e_only)
    if scheme == "pt2e_static":
        return None
    return LinearStage(
        scheme,
        callback.mode,
        callback.module,
        callback.skip,
        callback.stage_name,
        callback.artifact_path,
        callback.compile,
        callback.latency,
        callback.num_threads,
        callback.latency_batch_size,
        getattr(callback, "convert_on_fit_end", True),
    )


class LinearStage:
    """Apply a torchao ``quantize_`` scheme from a callback: QAT prepare at setup or PTQ at fit end; artifact + figures.

    Args:
        scheme: ``"int8_dynamic"`` or ``"int8_weight_only"``.
        mode: ``"qat"`` (fake quantization from ``setup``, converted at fit end) or ``"ptq"`` (quantized at fit end).
        module: attribute path of the quantized submodule; None: ``backbone`` if present, else the whole model.
        skip: regexes of module names (relative to that submodule) kept in fp32.
        stage_name: the report column and the default artifact name (``<log_dir>/<stage_name>.pt2``).
        artifact_path: where to save the ``.pt2`` (None: the default above).
        compile: time the artifact under ``torch.compile`` with freezing (else eagerly).
        latency: time the artifact beside the fp32 eager model.
        num_threads: torch threads while timing.
        latency_batch_size: rows of the timed input (None: the example's).
        convert_on_fit_end: build, save and measure the int8 artifact at fit end.

    Raises:
        ValueError: for an unknown scheme or mode.
    """

    def __init__(
        self,
        scheme: str,
        mode: str,
        module: str | None,
        skip: list[str] | None,
        stage_name: str,
        artifact_path: str | None = None,
        compile: bool = False,
        latency: bool = True,
        num_threads: int = 1,
        latency_batch_size: int | None = None,
        convert_on_fit_end: bool = True,
    ) -> None:
        _linear.validate_scheme(scheme)
        if mode not in ("qat", "ptq"):
            raise ValueError(f"`mode` must be 'qat' or 'ptq', got {mode!r}.")
        self.scheme = scheme
        self.mode = mode
        self.module = module
        self.skip = list(skip or [])
        self.stage_name = stage_name
        self.artifact_path = artifact_path
        self.compile = compile
        self.latency = latency
        self.num_threads = num_threads
        self.latency_batch_size = latency_batch_size
        self.convert_on_fit_end = convert_on_fit_end
        self.layers: list[str] = []
        self.results: dict[str, Any] = {}

    def target(self, pl_module: nn.Module) -> tuple[str, nn.Module]:
        """``(path, submodule)`` quantized inside ``pl_module``."""
        if self.module is None:
            backbone = getattr(pl_module, "backbone", None)
            path = "backbone" if isinstance(backbone, nn.Module) else ""
        else:
            path = self.module
        try:
            return path, (pl_module.get_submodule(path) if path else pl_module)
        except AttributeError as err:
            names = [n for n, _ in pl_module.named_children()]
            raise ValueError(
                f"`module` {path!r} is not a submodule of {type(pl_module).__name__}; its children are {names}. "
                "HINT: give an attribute path such as 'backbone', or '' for the whole model."
            ) from err

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """QAT: insert fake quantization (every stage, so that checkpoints load). PTQ: check the layers before fit."""
        _, target = self.target(pl_module)
        if self.mode == "qat":
            if not _linear.is_qat_prepared(target):
                self.layers = _linear.prepare_qat(target, self.scheme, self.skip)
        elif stage == "fit":
            _linear.select_layers(target, self.skip)  # refuses before training: bad skip, nothing to quantize

    def _example(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        datamodule = getattr(trainer, "datamodule", None)
        example = inputs.module_example(pl_module, datamodule.train_dataloader() if datamodule is not None else None)
        if example is None:
            raise ValueError(
                "The int8 artifact needs an example input: set `example_input_array` in the LightningModule or "
                "train from a LightningDataModule."
            )
        return example

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the int8 submodule (a copy), save the ``.pt2`` of the whole model with it, reload, measure."""
        if trainer.global_rank != 0 or trainer.interrupted or not self.convert_on_fit_end:
            return
        path, target = self.target(pl_module)
        fp32 = copy.deepcopy(target).eval()
        int8 = copy.deepcopy(target).eval()
        if self.mode == "qat":
            _linear.strip_qat(fp32)
            self.layers = _linear.convert_qat(int8, self.scheme)
        else:
            self.layers = _linear.quantize(int8, self.scheme, self.skip)
        example = self._example(trainer, pl_module)
        file = self.artifact_path or os.path.join(local_log_dir(trainer), f"{self.stage_name}.pt2")
        figures: dict[str, Any] = {"scheme": self.scheme, "layers": len(self.layers), "compiled": self.compile}
        figures.update(
            write_and_measure(
                pl_module,
                path,
                int8,
                fp32,
                example,
                file,
                self.compile,
                self.latency,
                self.num_threads,
                self.latency_batch_size,
            )
        )
        figures["artifact"] = os.path.abspath(file)
        self.results = figures
        with atomic_write(Path(file).with_suffix(".json")) as fh:
            fh.write(json.dumps(figures, indent=2))
        report = CompressionReport.find(trainer)
        if report is not None:
            report.add_stage(self.stage_name, figures)
        scalars = {
            f"quant/{self.stage_name}/{k}": float(v)
            for k, v in figures.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
        rank_zero_info(f"[lightning-opt] {self.stage_name} ({self.scheme}) artifact {file}: {json.dumps(figures)}")


def write_and_measure(
    root: nn.Module,
    path: str,
    int8: nn.Module,
    fp32: nn.Module,
    example: Any,
    file: str | os.PathLike[str],
    compile: bool = False,
    latency: bool = True,
    num_threads: int = 1,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Save ``root`` with ``int8`` at ``path`` as a ``.pt2``, load it back, compare and time it against ``fp32``.

    Args:
        root: the whole model (a LightningModule); left as it was.
        path: attribute path of the quantized submodule (``""``: ``int8``/``fp32`` are whole models).
        int8: the quantized submodule.
        fp32: the fp32 submodule with the same weights.
        example: an example input of ``root``.
        file: the ``.pt2`` to write.
        compile: time the artifact under ``torch.compile`` with inductor freezing.
        latency: time it (interleaved with the fp32 eager model).
        num_threads: torch threads while timing.
        batch_size: rows of the timed input (None: the example's).

    Returns:
        ``size_bytes`` (the ``.pt2``), ``weights_bytes`` / ``fp32_weights_bytes`` (``torch.save`` of the
        submodule's ``state_dict``), ``max_abs_diff_vs_fp32`` on the example, and with ``latency`` the figures of
        `lightning_opt.quantization._linear.measure`.
    """
    training = root.training
    root.eval()
    try:
        with _swapped(root, path, int8) as model:
            size = _linear.save_artifact(model, example, file)
        artifact = _linear.load_artifact(file)
        with _swapped(root, path, fp32) as model, torch.no_grad():
            figures: dict[str, Any] = {
                "size_bytes": size,
                "weights_bytes": _state_bytes(int8),
                "fp32_weights_bytes": _state_bytes(fp32),
                "max_abs_diff_vs_fp32": float(
                    (inputs.call(artifact, example) - inputs.call(model, example)).abs().max()
                ),
            }
            if latency:
                runner: Any = _compiled(artifact) if compile else artifact
                timed = _linear.measure(runner, model, example, num_threads, batch_size, repeats=15)
                figures.update({k: v for k, v in timed.items() if k not in ("size_bytes", "fp32_size_bytes")})
    finally:
        root.train(training)
    figures["artifact"] = os.path.abspath(file)
    return figures


def load_checkpoint_weights(model: nn.Module, ckpt_path: str) -> list[str]:
    """Load a Lightning checkpoint's ``state_dict`` into ``model``, also one saved by a torchao-scheme QAT run.

    Such a run replaced GPT-2's ``Conv1D`` by ``nn.Linear`` (transposed weights, same keys) and saved fake-quantized
    modules under the fp32 keys; the modules whose saved weight is transposed are linearized first.

    Returns:
        The linearized module names.
    """
    checkpoint = load_checkpoint(ckpt_path)  # weights-only: a file the user names never runs code
    state = checkpoint["state_dict"]
    transposed = []
    for name, module in model.named_modules():
        saved = state.get(f"{name}.weight")
        if _linear._is_conv1d(module) and saved is not None and saved.shape == module.weight.t().shape:
            transposed.append(name)
    if transposed:
        _linear.linearize_conv1d(model)
    model.load_state_dict(state)
    return transposed


def export_checkpoint(
    model: nn.Module,
    datamodule: Any,
    ckpt_path: str | None,
    scheme: str,
    module: str | None,
    output: str | None,
    compile: bool = False,
    latency: bool = True,
    num_threads: int = 1,
    batch_size: int = 1,
) -> dict[str, Any]:
    """``lightning-opt export --quantize int8_dynamic|int8_weight_only``: checkpoint -> int8 ``.pt2``, measured.

    A QAT checkpoint of these schemes holds fp32 weights under the usual keys (torchao's fake quantization is
    dynamic, without state), so PTQ and QAT checkpoints are converted the same way.

    Args:
        model: the recipe's model (fresh).
        datamodule: the recipe's datamodule (its first training batch is the example when the model has none).
        ckpt_path: the checkpoint, or None for the freshly initialised model.
        scheme: ``"int8_dynamic"`` or ``"int8_weight_only"``.
        module: attribute path to quantize (default ``backbone`` if present).
        output: the ``.pt2`` path (default next to the checkpoint).
        compile: time the artifact under ``torch.compile`` (inductor freezing).
        latency: time it beside the fp32 eager model.
        num_threads: threads while timing.
        batch_size: rows of the timed input.

    Raises:
        ValueError: for an unknown scheme, a missing ``module``, an ``output`` not ending in ``.pt2``.
    """
    _linear.validate_scheme(scheme)
    if ckpt_path is not None:
        load_checkpoint_weights(model, ckpt_path)
    model.eval()
    stage = LinearStage(scheme, "ptq", module, None, "int8")
    path, target = stage.target(model)
    if output is None:
        stem = Path(ckpt_path).with_suffix("") if ckpt_path else Path("model")
        output = f"{stem}.{scheme}.pt2"
    if not str(output).endswith(".pt2"):
        raise ValueError(f"`output` must end with '.pt2' for scheme {scheme!r}, got {output!r}.")
    if datamodule is not None:
        datamodule.setup("fit")
    example = inputs.module_example(model, datamodule.train_dataloader() if datamodule is not None else None)
    fp32 = copy.deepcopy(target).eval()
    _linear.strip_qat(fp32)
    int8 = copy.deepcopy(fp32)
    layers = _linear.quantize(int8, scheme)
    figures: dict[str, Any] = {"format": "pt2", "quantize": scheme, "checkpoint": ckpt_path, "layers": len(layers)}
    figures.update(
        write_and_measure(model, path, int8, fp32, example, output, compile, latency, num_threads, batch_size)
    )
    with atomic_write(Path(output).with_suffix(".pt2.json")) as fh:
        fh.write(json.dumps(figures, indent=2))
    return figures


def _state_bytes(module: nn.Module) -> int:
    return saved_size_bytes(module)


class _swapped:
    """Temporarily put ``module`` at ``path`` inside ``root`` (``""``: use ``module`` itself)."""

    def __init__(self, root: nn.Module, path: str, module: nn.Module) -> None:
        self.root, self.path, self.module = root, path, module
        self.original: nn.Module | None = None

    def __enter__(self) -> nn.Module:
        if not self.path:
            return self.module
        self.original = self.root.get_submodule(self.path)
        _set(self.root, self.path, self.module)
        return self.root

    def __exit__(self, *exc: object) -> None:
        if self.path and self.original is not None:
            _set(self.root, self.path, self.original)


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _compiled(model: nn.Module) -> Any:
    compiled = torch.compile(model, dynamic=False)

    def run(*args: Any, **kwargs: Any) -> Any:
        import torch._inductor.config as inductor_config

        with torch.no_grad(), inductor_config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return run
