"""Lightning callbacks: quantization-aware training (QAT) and post-training static quantization (PTQ), int8."""

from __future__ import annotations

import json
import math
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
from lightning_opt.pruning import Pruning, Remasker
from lightning_opt.quantization import _artifact, _linear_callback, _pt2e
from lightning_opt.reporting import CompressionReport
from lightning_opt.schedules import check_point, resolve_step

__all__ = ["CHECKPOINT_KEY", "PostTrainingQuantization", "QuantizationAwareTraining", "restore_quantized_structure"]

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
        batch_size = self.latency_batch_size or (report.batch_size if report is not None else 1)
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
                    num_threads=self.num_threads,
                    batch_size=batch_size,
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


class QuantizationAwareTraining(_Int8Callback):
    """Quantization-aware training to int8 on torchao's pt2e flow (x86 inductor), ending in a real int8 artifact.

    At ``setup`` the quantized submodule is captured with ``torch.export`` (strict) and fake-quantizers are inserted
    (``prepare_qat_pt2e`` with ``X86InductorQuantizer``): int8 weights, per output channel and symmetric; uint8
    activations, per tensor and affine; Conv+BatchNorm pairs are fused the QAT way. Parameters keep their objects
    and names, so optimizers, pruning masks and checkpoints keep working. Training runs in fp32 until ``start``,
    then with fake quantization; observers stop moving at ``freeze_observers`` and BatchNorm statistics freeze at
    ``freeze_bn``. ``.train()``/``.eval()`` switch BatchNorm/dropout inside the graph; observers never update
    during validation. At fit end the graph is converted (``convert_pt2e``) to int8, saved with
    ``torch.export.save`` as ``.pt2``, loaded back, compiled with inductor freezing (oneDNN int8 kernels), evaluated
    on the test set and timed beside the fp32 model; the figures become the ``int8`` column of the
    `CompressionReport` and a ``.json`` next to the artifact.

    TensorBoard (each validation during QAT), per conv/linear layer of the quantized module, one name across the
    tags: ``quant/scale/<layer>`` and ``quant/zero_point/<layer>`` (of the layer's quantized input),
    ``quant/weight_scale/<layer>`` (mean per-channel scale of its weight), ``quant/sqnr_db/<layer>`` (its output,
    fake-quant vs fp32 on a validation batch); at the end ``quant/int8/test_acc`` beside ``quant/int8/fp32_test_acc``.

    Args:
        module: attribute path of the submodule to quantize; default: the model's ``backbone`` if it has one.
        start: when fake quantization starts: a global step (int) or a fraction of the training steps (float).
        freeze_observers: when the quantization ranges stop updating (step or fraction), or None (never).
        freeze_bn: when BatchNorm switches to its running statistics (step or fraction), or None (never).
        skip: regexes (full match on module names inside the quantized submodule) of layers kept in fp32.
        dtype: quantized dtype; only ``"int8"``.
        weight_scheme: only ``"per_channel_symmetric"``.
        activation_scheme: only ``"per_tensor_affine"``.
        reduce_range: 7-bit activations, for CPUs without VNNI whose int8 kernels could saturate.
        preserve_sparsity: keep weights that are exactly zero when training starts at zero (pruned models),
            re-applied after every optimizer step.
        convert_on_fit_end: convert, save and measure the int8 artifact when fit ends.
        artifact_path: where to save the ``.pt2``; default ``<log_dir>/int8.pt2``.
        evaluate: evaluate the artifact on the datamodule's test set.
        compile: run the artifact through ``torch.compile`` with freezing (the deployed, fast form).
        latency: time the artifact and the fp32 model.
        num_threads: torch threads while timing.
        latency_batch_size: rows of the timed input; default the CompressionReport's batch size (or 1).
        log_every_n_val: log ranges and SQNR every n-th validation run (0 turns it off).
        scheme: ``"pt2e_static"`` (this graph path, for CNNs), or a torchao ``quantize_`` scheme for Linear-heavy
            models: ``"int8_dynamic"`` / ``"int8_weight_only"`` (fake-quantized ``nn.Linear``/``nn.Embedding`` from
            the first step, converted at fit end; see `lightning_opt.quantization._linear`).

    Raises:
        ValueError: for an unsupported ``dtype`` or scheme, a bad ``start``/freeze point (negative, a fraction
            outside [0, 1], a freeze point before ``start``, a start at or after the end of training), a ``skip``
            pattern matching no module, a ``module`` path that does not exist.
        QuantizationExportError: when the model cannot be exported; names the submodule and the failing op.

    Examples:
        >>> from lightning_opt.module import ImageClassifier
        >>> qat = QuantizationAwareTraining(start=0.3, freeze_observers=0.8, freeze_bn=0.9, skip=["head"])
        >>> trainer = pl.Trainer(max_epochs=3, callbacks=[qat])  # doctest: +SKIP
    """

    mode = "qat"

    def __init__(
        self,
        module: str | None = None,
        start: int | float = 0,
        freeze_observers: int | float | None = None,
        freeze_bn: int | float | None = None,
        skip: list[str] | None = None,
        dtype: str = "int8",
        weight_scheme: str = "per_channel_symmetric",
        activation_scheme: str = "per_tensor_affine",
        reduce_range: bool = False,
        preserve_sparsity: bool = True,
        convert_on_fit_end: bool = True,
        artifact_path: str | None = None,
        evaluate: bool = True,
        compile: bool = True,
        latency: bool = True,
        num_threads: int = 1,
        latency_batch_size: int | None = None,
        log_every_n_val: int = 1,
        scheme: str = "pt2e_static",
    ) -> None:
        super().__init__(
            module,
            skip,
            dtype,
            weight_scheme,
            activation_scheme,
            reduce_range,
            convert_on_fit_end,
            artifact_path,
            evaluate,
            compile,
            latency,
            num_threads,
            latency_batch_size,
        )
        check_point(start, "start")
        check_point(freeze_observers, "freeze_observers", allow_none=True)
        check_point(freeze_bn, "freeze_bn", allow_none=True)
        if log_every_n_val < 0:
            raise ValueError(f"`log_every_n_val` must be >= 0, got {log_every_n_val}.")
        self.start = start
        self.freeze_observers = freeze_observers
        self.freeze_bn = freeze_bn
        self.preserve_sparsity = preserve_sparsity
        self.log_every_n_val = log_every_n_val
        self.start_step: int | None = None
        self.freeze_observers_step: int | None = None
        self.freeze_bn_step: int | None = None
        self._phase: tuple[bool, bool, bool] | None = None
        self._masks: dict[str, torch.Tensor] = {}
        self._remasker = Remasker()
        self._val_batch: Any = None
        self._val_runs = 0
        self.scheme = scheme
        self.linear = _linear_callback.stage_for(
            self, scheme, start=(start, 0), freeze_observers=(freeze_observers, None), freeze_bn=(freeze_bn, None)
        )

    # ----------------------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.linear is not None:
            return self.linear.setup(trainer, pl_module, stage)
        self._install_load_hook(pl_module)
        if stage == "fit":
            _check_order(trainer, self)
            self.ensure_prepared(trainer, pl_module)

    def phase_steps(self, total_steps: float) -> dict[str, int | None]:
        """The global steps of ``start``, ``freeze_observers`` and ``freeze_bn`` in a run of ``total_steps`` steps.

        What fit uses (`resolve_steps` sets them from here; the planner's timeline reads them): a fraction is
        ``round(fraction * total_steps)`` (the schedules' rule); a fractional ``freeze_observers`` that rounds onto
        ``start`` moves one step after it. Nothing is checked here: `phase_problems` lists what fit would refuse.

        Args:
            total_steps: the run's optimizer steps (``trainer.estimated_stepping_batches``).

        Returns:
            ``{"start": step, "freeze_observers": step or None, "freeze_bn": step or None}``.

        Raises:
            ValueError: if a fraction is given and ``total_steps`` is infinite.

        Examples:
            >>> QuantizationAwareTraining(start=0.5, freeze_observers=0.8).phase_steps(100)
            {'start': 50, 'freeze_observers': 80, 'freeze_bn': None}
        """
        start = _resolve_point(self.start, total_steps, "start")
        assert start is not None
        observers = _resolve_point(self.freeze_observers, total_steps, "freeze_observers")
        bn = _resolve_point(self.freeze_bn, total_steps, "freeze_bn")
        if isinstance(self.freeze_observers, float) and observers is not None and observers <= start:
            observers = start + 1  # fractions of a very short run can round onto `start`: observe for at least a step
        return {"start": start, "freeze_observers": observers, "freeze_bn": bn}

    def phase_problems(self, total_steps: float) -> list[tuple[str, str]]:
        """What fit would refuse about the phase points in a run of ``total_steps`` steps, as ``(argument, message)``.

        Args:
            total_steps: the run's optimizer steps.

        Returns:
            One entry per problem (empty when the points are consistent): ``start`` at or after the end of training,
            a freeze point before ``start``.

        Examples:
            >>> QuantizationAwareTraining(start=50, freeze_bn=10).phase_problems(100)[0][0]
            'freeze_bn'
        """
        steps = self.phase_steps(total_steps)
        start = steps["start"]
        assert start is not None
        problems = []
        if not math.isinf(total_steps) and start >= total_steps:
            problems.append(
                (
                    "start",
                    f"`start` {self.start!r} is step {start}, at or after the end of training ({int(total_steps)} "
                    "steps): fake quantization would never run. HINT: use a fraction such as 0.5, or raise "
                    "max_steps/max_epochs.",
                )
            )
        for name in ("freeze_observers", "freeze_bn"):
            value = steps[name]
            if value is not None and value < start:
                problems.append(
                    (
                        name,
                        f"`{name}` is step {value}, before `start` (step {start}): nothing would be observed or "
                        "trained with fake quantization first. HINT: freeze points come after `start`.",
                    )
                )
        return problems

    def resolve_steps(self, trainer: pl.Trainer) -> None:
        """Turn ``start``/freeze points into global steps and check them against the training length.

        Raises:
            ValueError: the first of `phase_problems`.
        """
        total = float(trainer.estimated_stepping_batches)
        problems = self.phase_problems(total)
        if problems:
            raise ValueError(problems[0][1])
        steps = self.phase_steps(total)
        self.start_step = steps["start"]
        self.freeze_observers_step = steps["freeze_observers"]
        self.freeze_bn_step = steps["freeze_bn"]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.resolve_steps(trainer)
        self._phase = None

    def phase_at(self, step: int) -> tuple[bool, bool, bool]:
        """(fake-quant on, observers on, BatchNorm frozen) at a global step."""
        assert self.start_step is not None
        active = step >= self.start_step
        observers = active and (self.freeze_observers_step is None or step < self.freeze_observers_step)
        bn_frozen = self.freeze_bn_step is not None and step >= self.freeze_bn_step
        return active, observers, bn_frozen

    def _apply_phase(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        graph = self.graph(pl_module)
        if graph is None or self.start_step is None:
            return
        _pt2e.sync_mode(graph)  # Lightning restores `.training` by assignment after validation
        phase = self.phase_at(trainer.global_step)
        if phase == self._phase:
            return
        active, observers, bn_frozen = phase
        _pt2e.set_graph_mode(graph, bool(_pt2e.state_of(graph).get("training", True)), bn_frozen=bn_frozen)
        _pt2e.set_phase(graph, fake_quant=active, observers=observers)
        self._phase = phase

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        graph = self.graph(pl_module)
        if self.preserve_sparsity and graph is not None:
            self._masks = {
                name: p.detach() != 0 for name, p in graph.named_parameters() if p.dim() > 1 and bool((p == 0).any())
            }
            params = dict(graph.named_parameters())
            self._remasker.set([(params[name], mask) for name, mask in self._masks.items()])
        self._apply_phase(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._apply_phase(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._masks:
            self._remasker.apply()  # the pruning callback's kernel: in place, one pass for all weights

    # ----------------------------------------------------------------------------------------------------------------
    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx == 0 and not trainer.sanity_checking:
            self._val_batch = inputs.to_cpu(inputs.batch_inputs(batch))

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.log_every_n_val == 0:
            return
        graph = self.graph(pl_module)
        if graph is None or self._phase is None or not self._phase[0] or self._val_batch is None:
            return
        self._val_runs += 1
        if (self._val_runs - 1) % self.log_every_n_val or trainer.global_rank != 0:
            return
        metrics: dict[str, float] = {}  # one layer name (the conv/linear module) across every quant/ tag
        quantized = {layer: params for layer, params in _pt2e.layer_quant_params(graph).items() if params}
        for layer, params in quantized.items():
            for key, value in params.items():
                metrics[f"quant/{key}/{layer}"] = value
        for layer, value in _pt2e.layer_sqnr(graph, self._val_batch).items():
            if layer in quantized:  # a skipped (fp32) layer has no quant/ tags
                metrics[f"quant/sqnr_db/{layer}"] = min(value, 200.0)
        self.last_metrics = metrics
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.linear is not None:
            self.linear.on_fit_end(trainer, pl_module)
            self.results = self.linear.results
            return
        graph = self.graph(pl_module)
        if not self.convert_on_fit_end or graph is None or trainer.global_rank != 0 or trainer.interrupted:
            return
        if self._phase is None or not self._phase[0]:
            rank_zero_warn("Fit ended before fake quantization started; the int8 artifact is plain PTQ-free rounding.")
        self.finalize(trainer, pl_module, graph)

    # ----------------------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict() if self.spec is not None else None,
            "start_step": self.start_step,
            "freeze_observers_step": self.freeze_observers_step,
            "freeze_bn_step": self.freeze_bn_step,
            "val_runs": self._val_runs,
            "results": self.results,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("spec") is not None:
            self.spec = _pt2e.QuantSpec.from_dict(state_dict["spec"])
        self._val_runs = int(state_dict.get("val_runs", 0))
        self.results = dict(state_dict.get("results") or {})
        self._phase = None


class PostTrainingQuantization(_Int8Callback):
    """Post-training static int8 quantization at fit end: calibrate observers on training batches, convert, measure.

    The baseline QAT has to beat. Uses the same int8 scheme as `QuantizationAwareTraining` (histogram
    observers for activations, per-channel min/max for weights) and writes the same kind of artifact and figures,
    as the ``int8_ptq`` column of the compression report.

    Args:
        calibration_batches: training batches run through the observers.
        module: attribute path of the submodule to quantize; default: ``backbone`` if present.
        skip: regexes of layers kept in fp32.
        dtype: only ``"int8"``.
        weight_scheme: only ``"per_channel_symmetric"``.
        activation_scheme: only ``"per_tensor_affine"``.
        reduce_range: 7-bit activations (CPUs without VNNI).
        artifact_path: where to save the ``.pt2``; default ``<log_dir>/int8_ptq.pt2``.
        evaluate: evaluate the artifact on the test set.
        compile: run it through inductor with freezing.
        latency: time it beside fp32.
        num_threads: torch threads while timing.
        latency_batch_size: rows of the timed input.
        scheme: ``"pt2e_static"`` (calibrated static graph), or ``"int8_dynamic"`` / ``"int8_weight_only"``
            (torchao ``quantize_`` on the Linear layers at fit end, no calibration).

    Raises:
        ValueError: for ``calibration_batches`` < 1, an unsupported dtype/scheme, a ``skip`` pattern matching
            nothing, a missing ``module``.

    Examples:
        >>> ptq = PostTrainingQuantization(calibration_batches=10)
        >>> ptq.stage_name
        'int8_ptq'
    """

    stage_name = "int8_ptq"
    mode = "ptq"

    def __init__(
        self,
        calibration_batches: int = 10,
        module: str | None = None,
        skip: list[str] | None = None,
        dtype: str = "int8",
        weight_scheme: str = "per_channel_symmetric",
        activation_scheme: str = "per_tensor_affine",
        reduce_range: bool = False,
        artifact_path: str | None = None,
        evaluate: bool = True,
        compile: bool = True,
        latency: bool = True,
        num_threads: int = 1,
        latency_batch_size: int | None = None,
        scheme: str = "pt2e_static",
    ) -> None:
        if calibration_batches < 1:
            raise ValueError(f"`calibration_batches` must be >= 1, got {calibration_batches}.")
        super().__init__(
            module,
            skip,
            dtype,
            weight_scheme,
            activation_scheme,
            reduce_range,
            True,
            artifact_path,
            evaluate,
            compile,
            latency,
            num_threads,
            latency_batch_size,
        )
        self.calibration_batches = calibration_batches
        self.scheme = scheme
        self.linear = _linear_callback.stage_for(self, scheme, reduce_range=(reduce_range, False))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.linear is not None:
            return self.linear.setup(trainer, pl_module, stage)
        if stage == "fit":  # fail before training: skip patterns, module path, capture, convert, save
            example = _example_input(trainer, pl_module)
            self.spec = self.build_spec(pl_module, example)
            self._root_example = inputs.first_rows(example, 1)
            self.rehearse(trainer, pl_module, example)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.linear is not None:
            self.linear.on_fit_end(trainer, pl_module)
            self.results = self.linear.results
            return
        if trainer.global_rank != 0 or trainer.interrupted or self.spec is None:
            return
        target = _pt2e.get_submodule(pl_module, self.spec.module)
        if _pt2e.is_prepared(target):
            rank_zero_warn("PostTrainingQuantization: the submodule is already quantized (QAT); skipping PTQ.")
            return
        loader = trainer.datamodule.train_dataloader()  # type: ignore[attr-defined]
        graph = calibrate(target, self.spec, loader, self.calibration_batches)
        self.finalize(trainer, pl_module, graph)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = dict(state_dict.get("results") or {})


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
