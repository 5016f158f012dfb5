"""Lightning callbacks: quantization-aware training (QAT) and post-training static quantization (PTQ), int8."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_opt import inputs
from lightning_opt._io import atomic_write
from lightning_opt._utils import local_log_dir
from lightning_opt.pruning import Pruning
from lightning_opt.quantization import _artifact, _linear_callback, _pt2e
from lightning_opt.reporting import CompressionReport
from lightning_opt.schedules import resolve_step

__all__ = ["CHECKPOINT_KEY", "calibrate", "restore_quantized_structure", "submodule_example"]

CHECKPOINT_KEY = "lightning_opt_quantization"
"""Where a checkpoint keeps the quantization state (which submodules are fake-quantized, with their specs)."""


def _resolve_point(value: int | float | None, total: float, name: str) -> int | None:
    """The step of a phase (``start``, ``freeze_observers``, ``freeze_bn``): the schedules' one rule, None = never."""
    return None if value is None else resolve_step(value, total, name)


def _train_batches(trainer: pl.Trainer) -> Any:
    datamodule = getattr(trainer, "datamodule", None)
    return datamodule.train_dataloader() if datamodule is not None else None


def _example_input(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
    """The root's example input: ``example_input_array`` (any form), else the first training batch's real inputs."""
    example = inputs.module_example(pl_module, _train_batches(trainer))
    if example is None:
        raise ValueError(
            "Quantization needs an example input to export the model: set `example_input_array` in the LightningModule "
            "(a tensor, a tuple of positional tensors or a dict of keyword tensors, e.g. "
            "`self.example_input_array = (input_ids, attention_mask)`) or train from a LightningDataModule."
        )
    return example


def submodule_example(root: nn.Module, path: str, example: Any) -> Any:
    """The inputs the submodule at ``path`` really receives when ``root`` runs on ``example`` (eval mode, no grad).

    Args:
        root: the model.
        path: attribute path of the submodule (``""``: the root, whose example is ``example`` itself).
        example: the root's example input.

    Raises:
        ValueError: when the submodule is not called, or is called with positional and keyword tensors at once.
    """
    if not path:
        return example
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not seen:
            seen.append((args, kwargs))

    modes = {m: m.training for m in root.modules()}
    handle = _pt2e.get_submodule(root, path).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        root.eval()
        with torch.no_grad():
            inputs.call(root, example)
    finally:
        handle.remove()
        for m, mode in modes.items():
            m.training = mode
    if not seen:
        raise ValueError(
            f"`module` {path!r} is not called when the model runs on its example input. HINT: name the submodule "
            "that `forward` calls, e.g. 'backbone'."
        )
    args, kwargs = seen[0]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if args and kwargs:
        raise ValueError(
            f"`module` {path!r} is called with positional and keyword inputs at once ({len(args)} positional, "
            f"keywords {sorted(kwargs)}); quantization captures one form. HINT: call it with keywords only."
        )
    if kwargs:
        return inputs.to_cpu(kwargs)
    return inputs.to_cpu(args[0] if len(args) == 1 else tuple(args))


def _spec_from_checkpoint(checkpoint: dict[str, Any]) -> list[_pt2e.QuantSpec]:
    raw = checkpoint.get(CHECKPOINT_KEY)
    if not raw:
        return []
    return [_pt2e.QuantSpec.from_dict(s) for s in raw.get("specs", [])]


def _prepare_at(root: nn.Module, spec: _pt2e.QuantSpec, example: Any = None) -> torch.fx.GraphModule:
    eager = _pt2e.get_submodule(root, spec.module)
    graph = _pt2e.prepare(eager, spec, example)
    _artifact.remember_eager(graph, eager)
    if spec.module:
        _pt2e.set_submodule(root, spec.module, graph)
    return graph


def restore_quantized_structure(model: nn.Module, checkpoint: dict[str, Any]) -> bool:
    """Rebuild the fake-quant structure a checkpoint was saved with, so its ``state_dict`` loads.

    Call it from ``LightningModule.on_load_checkpoint`` (Lightning calls that hook before loading the weights) so
    that ``Model.load_from_checkpoint(path)`` works on a QAT checkpoint without the callback. Trainer paths
    (``fit(ckpt_path=...)``, ``test(ckpt_path=...)``) need nothing: the callback restores the structure itself.

    Args:
        model: the freshly built LightningModule (or any root module).
        checkpoint: the loaded checkpoint dict.

    Returns:
        True when a structure was rebuilt.

    Raises:
        ValueError: if the whole model was quantized (``module=""``): a root cannot replace itself; quantize a
            submodule such as ``backbone`` to make the checkpoint loadable without the callback.

    Examples:
        >>> class Classifier(pl.LightningModule):  # doctest: +SKIP
        ...     def on_load_checkpoint(self, checkpoint):
        ...         restore_quantized_structure(self, checkpoint)
    """
    rebuilt = False
    for spec in _spec_from_checkpoint(checkpoint):
        if not spec.module:
            raise ValueError(
                "This checkpoint quantized the whole model (`module=''`), which cannot be rebuilt in place. "
                "HINT: quantize a submodule (the default `backbone`) or load it through the Trainer with the callback."
            )
        if not _pt2e.is_prepared(_pt2e.get_submodule(model, spec.module)):
            _prepare_at(model, spec)
            rebuilt = True
    return rebuilt


class _Int8Callback(Callback):
    """Shared parts: spec, submodule, conversion to a measured ``.pt2`` artifact at fit end."""

    stage_name = "int8"
    mode = "qat"
    linear: _linear_callback.LinearStage | None = None  # the torchao quantize_ path (scheme != "pt2e_static")

    def __init__(
        self,
        module: str | None,
        skip: list[str] | None,
        dtype: str,
        weight_scheme: str,
        activation_scheme: str,
        reduce_range: bool,
        convert_on_fit_end: bool,
        artifact_path: str | None,
        evaluate: bool,
        compile: bool,
        latency: bool,
        num_threads: int,
        latency_batch_size: int | None,
    ) -> None:
        _pt2e.validate_scheme(dtype, weight_scheme, activation_scheme)
        if module is not None and not isinstance(module, str):
            raise ValueError(f"`module` must be an attribute path such as 'backbone', got {module!r}.")
        if skip is not None and (isinstance(skip, str) or not all(isinstance(p, str) for p in skip)):
            raise ValueError(f"`skip` must be a list of regular expressions, got {skip!r}.")
        if num_threads < 1:
            raise ValueError(f"`num_threads` must be >= 1, got {num_threads}.")
        if latency_batch_size is not None and latency_batch_size < 1:
            raise ValueError(f"`latency_batch_size` must be >= 1, got {latency_batch_size}.")
        if artifact_path is not None and not str(artifact_path).endswith(".pt2"):
            raise ValueError(f"`artifact_path` must end with '.pt2', got {artifact_path!r}.")
        self.module = module
        self.skip = list(skip or [])
        self.dtype = dtype
        self.weight_scheme = weight_scheme
        self.activation_scheme = activation_scheme
        self.reduce_range = reduce_range
        self.convert_on_fit_end = convert_on_fit_end
        self.artifact_path = artifact_path
        self.evaluate = evaluate
        self.compile = compile
        self.latency = latency
        self.num_threads = num_threads
        self.latency_batch_size = latency_batch_size
        self.spec: _pt2e.QuantSpec | None = None
        self._root_example: Any = None
        self.results: dict[str, Any] = {}
        self._hooked: set[int] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module, mode=self.mode)

    # ----------------------------------------------------------------------------------------------------------------
    def module_path(self, pl_module: nn.Module) -> str:
        """The attribute path quantized in ``pl_module`` (``module``, else ``backbone`` if present, else "")."""
        path = _pt2e.default_module_path(pl_module) if self.module is None else self.module
        try:
            _pt2e.get_submodule(pl_module, path)
        except AttributeError as err:
            names = [n for n, _ in pl_module.named_children()]
            raise ValueError(
                f"`module` {path!r} is not a submodule of {type(pl_module).__name__}; its children are {names}. "
                "HINT: give an attribute path such as 'backbone' or 'backbone.features', or '' for the whole model."
            ) from err
        return path

    def build_spec(self, pl_module: nn.Module, example: Any) -> _pt2e.QuantSpec:
        """Validate the configuration against the model and freeze it into a `QuantSpec`.

        Args:
            pl_module: the root model.
            example: the root's example input; the spec records what the quantized submodule receives from it.
        """
        path = self.module_path(pl_module)
        target = _pt2e.get_submodule(pl_module, path)
        if _pt2e.is_prepared(target):
            return _pt2e.spec_of(target)
        skip = _pt2e.resolve_skip_patterns(target, self.skip) if self.skip else []
        return _pt2e.QuantSpec.for_example(
            path,
            submodule_example(pl_module, path, example),
            mode=self.mode,
            skip=skip,
            dtype=self.dtype,
            weight_scheme=self.weight_scheme,
            activation_scheme=self.activation_scheme,
            reduce_range=self.reduce_range,
        )

    def rehearse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, example: Any) -> None:
        """Run what fit end will do on a copy of the submodule, before step 1, and refuse what would fail there.

        Capture, prepare, a training-mode forward with fake quantization on (QAT), calibration on a real batch,
        conversion, a forward of the int8 graph, the export of the whole model around it and, when there is a test
        set, one evaluation batch. No ``torch.compile`` (it stays cheap). Nothing the model holds is changed.

        Raises:
            QuantizationExportError: naming the layer that fails (or turns non-finite) and the ``skip``/``module``
                to use.
        """
        assert self.spec is not None
        target = _pt2e.get_submodule(pl_module, self.spec.module)
        if _pt2e.is_prepared(target):
            return
        batches = [inputs.batch_inputs(b) for _, b in zip(range(1), _train_batches(trainer) or [])]
        if not batches:
            batches = [self.spec.example_input()]
        modes = {m: m.training for m in pl_module.modules()}
        try:
            converted = _pt2e.rehearse(target, self.spec, batches)
            with _artifact.swapped(pl_module, self.spec.module, converted) as int8_model:
                try:
                    program = _pt2e.export_artifact(int8_model, example)
                    with torch.no_grad():
                        inputs.call(program.module(), example)
                    test = self._test_batches(trainer)
                    if test is not None:
                        _artifact.accuracy(int8_model, [next(iter(test))])
                except Exception as err:
                    raise _pt2e.QuantizationExportError(
                        f"Cannot quantize: the int8 model (`{self.spec.module or '<root>'}` converted) fails when "
                        f"saved or evaluated as fit end will do: {_pt2e._first_line(err)}. HINT: quantize the "
                        "network `forward` calls with `module=`, or keep the failing layers in fp32 with `skip=[...]`."
                    ) from err
        finally:
            for m, mode in modes.items():
                m.training = mode

    def _install_load_hook(self, pl_module: pl.LightningModule) -> None:
        """Rebuild the quantized structure right before a checkpoint's weights are loaded into ``pl_module``."""
        if id(pl_module) in self._hooked:
            return
        self._hooked.add(id(pl_module))
        callback = self

        def hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
            path = callback.module_path(module)
            quant_prefix = f"{prefix}{path}." if path else prefix
            if not any(k.startswith(quant_prefix + "activation_post_process_") for k in state_dict):
                return
            if _pt2e.is_prepared(_pt2e.get_submodule(module, path)):
                return
            if not path:
                raise RuntimeError(
                    "The checkpoint holds a quantized whole model (`module=''`) but the model is fp32; "
                    "prepare it first (run `setup`) or quantize a submodule."
                )
            spec = callback.spec or callback.build_spec(module, inputs.module_example(module))
            _prepare_at(module, spec)
            callback.spec = spec

        pl_module.register_load_state_dict_pre_hook(hook)

    def ensure_prepared(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.fx.GraphModule:
        """Prepare the submodule (once; a prepared one from an earlier ``fit`` is reused)."""
        path = self.module_path(pl_module)
        current = _pt2e.get_submodule(pl_module, path)
        if _pt2e.is_prepared(current):
            self.spec = _pt2e.spec_of(current)
            return current  # type: ignore[return-value]
        if not path:
            raise ValueError(
                "`module=''` (the whole LightningModule) cannot be replaced by a graph inside Lightning. "
                "HINT: quantize the network attribute the module calls in `forward`, e.g. `module='backbone'`."
            )
        example = _example_input(trainer, pl_module)
        self.spec = self.build_spec(pl_module, example)
        self._root_example = inputs.first_rows(example, 1)
        if self.convert_on_fit_end:
            self.rehearse(trainer, pl_module, example)
        graph = _prepare_at(pl_module, self.spec)
        return graph

    def graph(self, pl_module: nn.Module) -> torch.fx.GraphModule | None:
        """The prepared graph inside ``pl_module``, or None."""
        try:
            sub = _pt2e.get_submodule(pl_module, self.module_path(pl_module))
        except ValueError:
            return None
        return sub if _pt2e.is_prepared(sub) else None  # type: ignore[return-value]

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.spec is None or self.graph(pl_module) is None:
            return
        entry = checkpoint.setdefault(CHECKPOINT_KEY, {"specs": []})
        if all(spec.get("module") != self.spec.module for spec in entry["specs"]):
            entry["specs"].append(self.spec.to_dict())

    # ----------------------------------------------------------------------------------------------------------------
    @property
    def artifacts(self) -> dict[str, str]:
        """Files this callback wrote in the run, by what they hold (``lightning-opt fit`` lists them at the end)."""
        artifact = self.results.get("artifact")
        return {f"{self.stage_name} artifact": str(artifact)} if artifact else {}

    def _artifact_file(self, trainer: pl.Trainer) -> str:
        if self.artifact_path is not None:
            return self.artifact_path
        return os.path.join(local_log_dir(trainer), f"{self.stage_name}.pt2")  # rank zero only

    def _test_batches(self, trainer: pl.Trainer) -> Any:
        datamodule = trainer.datamodule  # type: ignore[attr-defined]
        if datamodule is None or not self.evaluate:
            return None
        try:
            datamodule.setup("test")
            return datamodule.test_dataloader()
        except Exception as err:  # a datamodule without a test split: report what we can
            rank_zero_warn(f"No test set to evaluate the int8 model on ({type(err).__name__}: {err}).")
            return None

    def finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule, graph: torch.fx.GraphModule) -> None:
        """Convert ``graph`` to int8, save the ``.pt2``, reload it, evaluate and time it, report the figures."""
        assert self.spec is not None
        path = self.spec.module
        missing = _pt2e.unobserved(graph)
        if missing and trainer.datamodule is not None:  # type: ignore[attr-defined]
            rank_zero_warn(
                f"{len(missing)} quantizers never observed data (training ended before their observers ran); "
                "calibrating them on 4 training batches before conversion."
            )
            loader = trainer.datamodule.train_dataloader()  # type: ignore[attr-defined]
            _pt2e.observe(graph, [inputs.batch_inputs(b) for _, b in zip(range(4), loader)])
        converted = _pt2e.convert(graph)
        example = self._root_example if self._root_example is not None else inputs.module_example(pl_module)
        if example is None:
            example = self.spec.example_input()
        eager = _artifact.eager_of(graph)
        file = self._artifact_file(trainer)
        pl_module.eval()
        with _artifact.swapped(pl_module, path, converted) as int8_model:
            artifact, size = _artifact.save_and_reload(int8_model, example, file)
        report = CompressionReport.find(trainer)
        # one timing protocol per report: its fp32 rows and this int8 row share batch, threads and repeats
        batch_size = report.batch_size if report is not None else (self.latency_batch_size or 1)
        num_threads = report.num_threads if report is not None else self.num_threads
        repeats = report.repeats if report is not None else 30
        reference = None
        figures: dict[str, Any] = {}
        with _artifact.swapped(pl_module, path, eager if eager is not None else graph) as fp32_model:
            if eager is not None:
                reference = fp32_model
            figures.update(
                _artifact.measure_artifact(
                    artifact,
                    reference,
                    example,
                    self._test_batches(trainer),
                    compile=self.compile,
                    latency=self.latency,
                    num_threads=num_threads,
                    batch_size=batch_size,
                    repeats=repeats,
                )
            )
        figures["size_bytes"] = size
        figures["artifact"] = os.path.abspath(file)
        self.results = figures
        with atomic_write(Path(file).with_suffix(".json")) as fh:
            fh.write(json.dumps(figures, indent=2))
        if report is not None:
            report.add_stage(self.stage_name, figures)
        scalars = {
            f"quant/{self.stage_name}/{k.replace('/', '_')}": float(v)
            for k, v in figures.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
        rank_zero_info(f"[lightning-opt] {self.stage_name} artifact {file}: {json.dumps(figures)}")


def _check_order(trainer: pl.Trainer, quantization: Callback) -> None:
    """Pruning selects its layers by type at setup, so it must see the eager model: it has to come first."""
    callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]
    mine = callbacks.index(quantization)
    late = [type(c).__name__ for c in callbacks[mine + 1 :] if isinstance(c, Pruning)]
    if late:
        raise ValueError(
            f"{late[0]} is listed after {type(quantization).__name__} in `trainer.callbacks`, so it would look for "
            "Conv/Linear modules in the already-quantized graph. HINT: list the pruning callback first."
        )


def calibrate(module: nn.Module, spec: _pt2e.QuantSpec, batches: Any, num_batches: int) -> torch.fx.GraphModule:
    """PTQ: prepare ``module`` (eval mode) with observers and run ``num_batches`` batches through it.

    Args:
        module: the trained fp32 module (left untouched; the graph shares its weights).
        spec: the quantization spec (``mode="ptq"``).
        batches: an iterable of dataloader batches; their model inputs (`lightning_opt.inputs.batch_inputs`)
            are used with their real values and dtypes.
        num_batches: how many batches to calibrate on.

    Returns:
        The calibrated graph, ready for `lightning_opt.quantization.convert`.
    """
    if spec.mode != "ptq":
        spec = _pt2e.QuantSpec.from_dict({**spec.to_dict(), "mode": "ptq"})
    training = module.training
    module.eval()
    try:
        graph = _pt2e.prepare(module, spec)
    finally:
        module.train(training)
    _artifact.remember_eager(graph, module)
    graph.eval()
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if i >= num_batches:
                break
            inputs.call(graph, inputs.batch_inputs(batch))
    return graph
