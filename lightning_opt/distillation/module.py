"""``DistillationModule``: wraps the user's own LightningModule (the student) and adds a frozen teacher."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Mapping
from typing import Any

import lightning
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch import LightningModule
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn
from typing_extensions import override

from lightning_opt import inputs
from lightning_opt._io import AtomicCheckpointIO, atomic_save
from lightning_opt.distillation._teacher import freeze, load_teacher
from lightning_opt.distillation.losses import (
    FeatureDistillationLoss,
    KDDivergence,
    agreement,
    check_alpha,
    check_divergence,
    check_temperature,
    distillation_loss,
    token_logits,
)
from lightning_opt.lm import TOKENIZER_KEY
from lightning_opt.schedules import Schedule
from lightning_opt.targets import UNLABELED
from lightning_opt.text import tokenizer_from_state

__all__ = ["DistillationModule"]

_SCHEDULE_PROBES = (0.0, 0.25, 0.5, 0.75, 1.0)


def _check_value_or_schedule(value: float | Schedule, name: str) -> float | Schedule:
    check = check_alpha if name == "alpha" else check_temperature
    if isinstance(value, Schedule):
        for frac in _SCHEDULE_PROBES:
            v = value.value(round(frac * 1000), 1000)
            check(v, name=f"{name} (a schedule, at {frac:.0%} of training)")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a number or a lightning_opt.schedules.Schedule, got {value!r}.")
    return check(value, name=name)


def _layer_names(module: nn.Module) -> list[str]:
    return [n for n, _ in module.named_modules() if n]


def _check_layers(module: nn.Module, names: list[str], role: str) -> None:
    valid = _layer_names(module)
    for name in names:
        if name not in valid:
            shown = ", ".join(valid[:60]) + (f", ... ({len(valid)} in all)" if len(valid) > 60 else "")
            raise ValueError(
                f"`feature_layers` names {role} layer {name!r}, which does not exist in {type(module).__name__}. "
                f"Valid names: {shown}."
            )


class DistillationModule(LightningModule):
    """Trains a student LightningModule with soft targets (and optionally features) from a frozen teacher.

    The student keeps its own ``configure_optimizers``, ``validation_step``, ``test_step``, ``predict_step`` and
    metrics (``val/acc`` stays ``val/acc``), so checkpoint monitors, early stopping and pruning/QAT callbacks work
    unchanged. Only the training loss changes:
    ``loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, y) + feature_weight * hint_loss``.

    **How the teacher is stored.** The teacher is *not* a registered sub-module: it is absent from ``state_dict()``,
    ``parameters()`` (so no optimizer state, no DDP gradient sync), ``named_modules()`` (so pruning and quantization
    callbacks that walk the LightningModule act on the student only) and every checkpoint. It follows the module's
    device and dtype (``.to()``/``.cuda()``) and stays in eval mode with ``requires_grad=False``. On resume or
    ``load_from_checkpoint`` it is rebuilt from the arguments recorded in the hyperparameters (``teacher_checkpoint``
    path, or the ``teacher`` config the CLI saved), so a checkpoint weighs what the student (plus feature adapters)
    weighs.

    **Student out alone.** `export_student` (or the `StudentCheckpoint`
    callback at the end of fit) writes a Lightning checkpoint of the student only, loadable with
    ``StudentClass.load_from_checkpoint`` and, with the ``student.yaml`` the callback writes beside it, by
    ``lightning-opt export``. A teacher passed as a Python object is not recorded: pass it again when rebuilding.

    Batches are ``(inputs, y)``, ``(inputs, y, index)`` or a dict (``{"input_ids": ..., "attention_mask": ...,
    "labels": ...}``), read with `lightning_opt.inputs`: ``inputs`` is a tensor (``student(x)``), a tuple of
    positional tensors (``student(input_ids, attention_mask)``) or a dict of keyword tensors, with their real dtypes;
    ``student.example_input_array`` may take any of these forms too. Samples labelled -1 (the unlabelled *transfer
    set* of a datamodule's ``labeled_size``) get the soft (and feature) loss only: the hard loss averages over the
    labelled samples (zero in a batch without any), ``train/acc`` and ``train/teacher_acc`` count labelled samples
    only. The index (``return_index=True`` on the project's datamodules) is needed only for
    ``cache_teacher_outputs``. The student's ``forward`` returns logits: ``(N, C)`` for a classifier, or next-token
    logits ``(B, L, V)`` with targets ``(B, L)`` for a language model, distilled per token over the vocabulary
    (`token_logits`).

    Args:
        student: The LightningModule to train (its ``forward`` returns logits).
        teacher: A trained ``nn.Module``/LightningModule; with ``teacher_checkpoint`` its weights are loaded from there.
        teacher_class: Dotted class path of a LightningModule rebuilt with ``load_from_checkpoint(teacher_checkpoint)``.
        teacher_checkpoint: Path of the teacher's checkpoint. Alone, the class is read from the ``_class_path`` that
            ``lightning-opt fit`` records in the checkpoint.
        alpha: Weight of the soft loss in [0, 1] (1 - alpha goes to the hard-label cross-entropy), or a
            `Schedule` over training steps.
        temperature: Softmax temperature > 0, or a schedule.
        feature_layers: ``{student_layer_name: teacher_layer_name}`` pairs for FitNets hint losses; a learned
            adapter (1x1 conv or linear) maps each student feature to its teacher's shape when they differ.
        feature_weight: Weight of the mean hint loss (used only with ``feature_layers``), >= 0.
        cache_teacher_outputs: Keep the teacher's logits per training sample index after the first epoch instead of
            recomputing them. Valid only for a fixed, unaugmented training set whose batches carry indices.
        log_teacher_metrics: Also run the teacher on validation/test batches to log ``val/teacher_acc`` and
            ``val/agreement`` (teacher-student top-1 agreement).
        kd_loss: Direction of the soft loss: ``"forward_kl"`` = ``KL(teacher_T || student_T)`` (Hinton, the
            default) or ``"reverse_kl"`` = ``KL(student_T || teacher_T)`` (mode-seeking, as in MiniLLM); both
            ``T^2``-scaled, per token for next-token logits.
        teacher_top_k: Keep only the teacher's ``k`` largest logits per row (per token for a language model): the
            soft loss is `topk_kd_loss`, both distributions renormalised
            over those ``k`` tokens (exactly the full loss when ``k`` is the vocabulary). With
            ``cache_teacher_outputs`` the cache holds only those values and their ids: ``k`` values plus ``k`` ids
            (int16 below 32,768 tokens, else int32) per token instead of the whole vocabulary, so its memory is
            bounded by ``k`` (`teacher_cache_bytes`). ``None`` (default): the full logits.

    **Language models.** For ``(B, L, V)`` logits with ``(B, L)`` targets the soft and hard losses are means over
    the real tokens: targets equal to -100 (padding, `lightning_opt.lm.IGNORE_INDEX`) count in neither, whatever
    the logits there. Teacher and student may differ in width and depth but must share the vocabulary: the logits'
    last dimension is compared on the probe (at construction when the student has an ``example_input_array``, else
    at ``setup``), and the tokenizer fingerprint recorded in ``teacher_checkpoint`` (by
    `LanguageModel`) is compared with the datamodule's tokenizer at ``setup``, both before
    the first step. For a fixed corpus (``TextDataModule(return_index=True)``) ``cache_teacher_outputs=True`` with
    ``teacher_top_k`` keeps the teacher's top-k logits per token after the first epoch, in bounded memory.

    Raises:
        ValueError: If ``alpha`` is outside [0, 1], ``temperature <= 0`` (also for a schedule's values),
            ``feature_weight < 0``, a ``feature_layers`` name does not exist (the message lists the valid names),
            the teacher's and student's outputs differ in shape (their vocabularies, for next-token logits), the
            teacher checkpoint's tokenizer differs from the datamodule's, ``kd_loss`` is unknown, ``teacher_top_k``
            is not an integer >= 1 or exceeds the number of classes (the vocabulary), or the teacher arguments are
            missing, ambiguous or its checkpoint incompatible.
        FileNotFoundError: If ``teacher_checkpoint`` does not exist.

    Examples:
        >>> from lightning_opt.module import ImageClassifier
        >>> teacher = ImageClassifier("small_cnn", backbone_kwargs={"channels": [16, 32]})
        >>> student = ImageClassifier("mlp", backbone_kwargs={"hidden": [16]})
        >>> model = DistillationModule(student=student, teacher=teacher, alpha=0.9, temperature=4.0)
        >>> model(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
        >>> [n for n, _ in model.named_children()]  # the teacher is not a sub-module
        ['student']
    """

    _teacher: nn.Module
    student: LightningModule

    def __init__(
        self,
        student: LightningModule,
        teacher: nn.Module | None = None,
        teacher_class: str | None = None,
        teacher_checkpoint: str | None = None,
        alpha: float | Schedule = 0.5,
        temperature: float | Schedule = 4.0,
        feature_layers: dict[str, str] | None = None,
        feature_weight: float = 1.0,
        cache_teacher_outputs: bool = False,
        log_teacher_metrics: bool = True,
        kd_loss: KDDivergence = "forward_kl",
        teacher_top_k: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(student, LightningModule):
            raise ValueError(f"`student` must be a LightningModule, got {type(student).__name__}.")
        given = _given_hyperparameters.get()
        self.save_hyperparameters(ignore=["student", "teacher"])
        # Built by LightningCLI: keep the student's/teacher's YAML config (not the module objects) so that
        # `DistillationModule.load_from_checkpoint` and resume can rebuild them.
        hparams: Any = self._hparams
        hparams_initial: Any = self._hparams_initial
        for key in ("student", "teacher"):
            if isinstance(given, Mapping) and isinstance(given.get(key), Mapping):
                hparams[key] = copy.deepcopy(given[key])
                hparams_initial[key] = copy.deepcopy(given[key])
        self.alpha = _check_value_or_schedule(alpha, "alpha")
        self.temperature = _check_value_or_schedule(temperature, "temperature")
        self.kd_loss: KDDivergence = check_divergence(kd_loss)
        if teacher_top_k is not None and (
            isinstance(teacher_top_k, bool) or not isinstance(teacher_top_k, int) or teacher_top_k < 1
        ):
            raise ValueError(
                f"`teacher_top_k` must be an integer >= 1 or None (the full logits), got {teacher_top_k!r}. HINT: "
                "the teacher's k largest logits per token are kept; k = the vocabulary size is exact."
            )
        self.teacher_top_k = teacher_top_k
        if not (isinstance(feature_weight, (int, float)) and math.isfinite(feature_weight) and feature_weight >= 0):
            raise ValueError(f"`feature_weight` must be a finite number >= 0, got {feature_weight!r}.")
        self.feature_weight = float(feature_weight)
        self.student = student
        self._fix_student_hparams()
        loaded = freeze(load_teacher(teacher, teacher_class, teacher_checkpoint))
        # Deliberately not registered as a sub-module (see the class docstring).
        object.__setattr__(self, "_teacher", loaded)
        self.feature_layers: dict[str, str] = dict(feature_layers or {})
        _check_layers(student, list(self.feature_layers), "student")
        _check_layers(loaded, list(self.feature_layers.values()), "teacher")
        self.cache_teacher_outputs = bool(cache_teacher_outputs)
        self.log_teacher_metrics = bool(log_teacher_metrics)
        self.feature_loss: FeatureDistillationLoss | None = None
        self._probed = False
        self._cache: Tensor | None = None  # per training sample: the teacher's logits, or its top-k values
        self._cache_ids: Tensor | None = None  # with teacher_top_k: the token ids of those values
        self._cached: Tensor | None = None
        self._total_steps: float = math.inf
        example = getattr(student, "example_input_array", None)
        if inputs.is_example(example):  # a tensor, a tuple of positional inputs or a dict of keyword inputs
            self.example_input_array = example
            self._probe(example)

    def _fix_student_hparams(self) -> None:
        """Give a student built from YAML its own hyperparameters.

        LightningCLI records the *top-level* model config into every LightningModule it instantiates, the nested
        student included, so the student's ``hparams`` would describe the DistillationModule and its checkpoints
        would not load. Rebuild them from the student's own ``class_path``/``init_args`` the CLI recorded here.
        """
        cfg = self.hparams.get("student")
        if not isinstance(cfg, Mapping) or "class_path" not in cfg:
            return
        hp: dict[str, Any] = {
            "_class_path": cfg["class_path"],
            **dict(cfg.get("init_args") or {}),
            **dict(cfg.get("dict_kwargs") or {}),
        }
        if "_instantiator" in self.hparams:
            hp["_instantiator"] = self.hparams["_instantiator"]
        student: Any = self.student
        student._hparams = AttributeDict(hp)
        student._hparams_initial = copy.deepcopy(student._hparams)
        student._hparams_name = "kwargs"

    # ------------------------------------------------------------------ teacher plumbing
    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (not part of ``state_dict`` nor ``parameters``)."""
        return self._teacher

    @override
    def _apply(self, fn: Any, recurse: bool = True) -> LightningModule:
        super()._apply(fn, recurse)
        self._teacher._apply(fn)
        if self._cache is not None:
            self._cache = fn(self._cache)
            self._cached = self._cached.to(self._cache.device) if self._cached is not None else None
            self._cache_ids = self._cache_ids.to(self._cache.device) if self._cache_ids is not None else None
        return self

    @override
    def to(self, *args: Any, **kwargs: Any) -> DistillationModule:
        out = super().to(*args, **kwargs)
        if isinstance(self._teacher, LightningModule):  # keep the teacher's `.device` property right
            self._teacher.to(*args, **kwargs)
        return out

    def _teacher_forward(self, x: Any) -> Tensor:
        if self._teacher.training:
            self._teacher.eval()
        with torch.no_grad():
            return inputs.call(self._teacher, x)

    @contextlib.contextmanager
    def _capture(self) -> Iterator[tuple[dict[str, Tensor], dict[str, Tensor]]]:
        s_feats: dict[str, Tensor] = {}
        t_feats: dict[str, Tensor] = {}
        if not self.feature_layers:  # the common case: no hooks, no module walk on the hot path
            yield s_feats, t_feats
            return
        handles = []
        s_mods, t_mods = dict(self.student.named_modules()), dict(self._teacher.named_modules())
        for s_name, t_name in self.feature_layers.items():

            def s_hook(_m: nn.Module, _i: Any, out: Any, key: str = s_name) -> None:
                s_feats[key] = out

            def t_hook(_m: nn.Module, _i: Any, out: Any, key: str = s_name) -> None:
                t_feats[key] = out

            handles.append(s_mods[s_name].register_forward_hook(s_hook))
            handles.append(t_mods[t_name].register_forward_hook(t_hook))
        try:
            yield s_feats, t_feats
        finally:
            for h in handles:
                h.remove()

    def _probe(self, x: Any) -> None:
        """Dry forward of both models on the example ``x`` (eval mode, no grad): checks shapes, builds adapters."""
        if self._probed:
            return
        t_context, first = getattr(self._teacher, "context", None), inputs.flat_tensors(x)[0]
        if isinstance(t_context, int) and first.dim() == 2 and first.shape[-1] > t_context:  # next-token models
            raise ValueError(
                f"the teacher's `context` is {t_context} tokens, shorter than the student's inputs ({first.shape[-1]} "
                f"tokens: {inputs.describe(x)}). HINT: the teacher must read every window the student trains on: set "
                f"the data's and the student's `context` <= {t_context}, or use a teacher trained with a longer one."
            )
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad(), self._capture() as (s_feats, t_feats):
                s_out = inputs.call(self.student, x)
                t_out = self._teacher_forward(x)
        finally:
            self.student.train(was_training)
        if not isinstance(s_out, Tensor) or not isinstance(t_out, Tensor):
            raise ValueError(
                f"student and teacher must return a logits tensor from forward, got {type(s_out).__name__} and "
                f"{type(t_out).__name__} on an input ({inputs.describe(x)}). HINT: return `output.logits` from a "
                "Hugging Face model's forward."
            )
        if s_out.dim() == 3 and t_out.dim() == 3 and s_out.shape[-1] != t_out.shape[-1]:
            raise ValueError(
                f"teacher and student vocabularies differ: the student predicts {s_out.shape[-1]} tokens, the teacher "
                f"{t_out.shape[-1]} (next-token logits {tuple(s_out.shape)} vs {tuple(t_out.shape)}). HINT: "
                "token-level distillation needs one tokenizer: give the student the teacher's `vocab_size` and "
                "train both on the same tokenizer."
            )
        if s_out.shape != t_out.shape:
            raise ValueError(
                f"teacher and student outputs differ in shape: student {tuple(s_out.shape)}, teacher "
                f"{tuple(t_out.shape)}. HINT: both must predict the same classes (check `num_classes`)."
            )
        if self.teacher_top_k is not None and t_out.dim() not in (2, 3):
            raise ValueError(
                f"`teacher_top_k` needs (N, C) or (B, L, V) logits, got {tuple(t_out.shape)}. HINT: set it to None."
            )
        if self.teacher_top_k is not None and self.teacher_top_k > t_out.shape[-1]:
            raise ValueError(
                f"`teacher_top_k`={self.teacher_top_k} exceeds the teacher's {t_out.shape[-1]} classes (vocabulary). "
                f"HINT: use at most {t_out.shape[-1]} (that many is exact), or None for the full logits."
            )
        if self.feature_layers:
            shapes = {}
            for name in self.feature_layers:
                s, t = s_feats[name], t_feats[name]
                if not isinstance(s, Tensor) or not isinstance(t, Tensor):
                    raise ValueError(f"`feature_layers` pair {name!r} must output tensors in both models.")
                shapes[name] = (tuple(s.shape[1:]), tuple(t.shape[1:]))
            self.feature_loss = FeatureDistillationLoss(shapes).to(s_out.device)
        self._probed = True

    # ------------------------------------------------------------------ schedules
    def current_alpha(self) -> float:
        """Alpha at the trainer's current global step (the constant itself when not scheduled)."""
        return self._scheduled(self.alpha, "alpha")

    def current_temperature(self) -> float:
        """Temperature at the trainer's current global step (the constant itself when not scheduled)."""
        return self._scheduled(self.temperature, "temperature")

    def _scheduled(self, value: float | Schedule, name: str) -> float:
        if not isinstance(value, Schedule):
            return float(value)
        total = self._total_steps if math.isfinite(self._total_steps) else max(self.trainer.global_step, 1)
        v = value.value(self.trainer.global_step, int(total))
        return check_alpha(v, name) if name == "alpha" else check_temperature(v, name)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def forward(self, x: Any = None, *args: Any, **kwargs: Any) -> Any:
        # A named first input (not a bare `*args`) keeps `torch.export`'s per-argument dynamic shapes working when the
        # module is exported whole; keyword-only students (`student(**{"input_ids": ...})`) get `x=None`.
        return self.student(*args, **kwargs) if x is None else self.student(x, *args, **kwargs)

    @override
    def setup(self, stage: str) -> None:
        if not self._probed:  # no example_input_array: check shapes (and size adapters) on one training batch
            x = self._example_batch_input()
            if x is not None:
                self._probe(x)
            elif self.feature_layers:
                raise ValueError(
                    "`feature_layers` needs one input to size the adapters before training: set "
                    "`student.example_input_array` or fit with a datamodule."
                )
        self._check_tokenizer()
        if stage == "fit" and self.cache_teacher_outputs:
            dm = getattr(self.trainer, "datamodule", None)
            if getattr(dm, "return_index", None) is False:
                raise ValueError(
                    "`cache_teacher_outputs`=True keys the cache by sample index, but the datamodule has "
                    "return_index=False. HINT: set `return_index: true` in the datamodule's init_args."
                )
            shift = getattr(dm, "augment_shift", 0)
            if shift:
                raise ValueError(
                    f"`cache_teacher_outputs`=True needs a fixed, unaugmented training set, but the datamodule has "
                    f"augment_shift={shift}. HINT: set augment_shift=0 or turn the cache off."
                )

    def _check_tokenizer(self) -> None:
        """Refuse a teacher checkpoint whose recorded tokenizer differs from the datamodule's (the student's)."""
        path = self.hparams.get("teacher_checkpoint")
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tokenizer = getattr(dm, "tokenizer", None)
        if not path or tokenizer is None or not hasattr(tokenizer, "fingerprint"):
            return
        state = torch.load(path, map_location="cpu", weights_only=True).get(TOKENIZER_KEY)
        if not state:
            return

        teacher_tok = tokenizer_from_state(state)
        if teacher_tok.fingerprint() != tokenizer.fingerprint():
            raise ValueError(
                f"the teacher was trained with another tokenizer: `teacher_checkpoint`={path!r} records a "
                f"{state.get('kind')} tokenizer of {teacher_tok.vocab_size} tokens (fingerprint "
                f"{teacher_tok.fingerprint()}), the datamodule has {type(tokenizer).__name__} of "
                f"{tokenizer.vocab_size} tokens (fingerprint {tokenizer.fingerprint()}). HINT: token ids must mean "
                "the same text for both models: pass the teacher's tokenizer to the datamodule (`tokenizer_path`)."
            )

    def _example_batch_input(self) -> Any:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return None
        with contextlib.suppress(Exception):
            example = inputs.module_example(self.student, dm.train_dataloader())
            return None if example is None else inputs.first_rows(example, 2)
        return None

    @override
    def on_fit_start(self) -> None:
        self._total_steps = float(self.trainer.estimated_stepping_batches)
        self._teacher.to(self.device)

    @override
    def configure_optimizers(self) -> Any:
        config = self.student.configure_optimizers()
        if self.feature_loss is not None and any(True for _ in self.feature_loss.parameters()):
            _add_adapter_params(config, list(self.feature_loss.parameters()))
        return config

    @override
    def lr_scheduler_step(self, scheduler: Any, metric: Any | None) -> None:
        self.student.lr_scheduler_step(scheduler, metric)

    @override
    def configure_callbacks(self) -> Any:
        return self.student.configure_callbacks()

    @property
    def teacher_cache_bytes(self) -> int:
        """Bytes held by the teacher-output cache (``cache_teacher_outputs``): values, token ids and the hit flags."""
        return sum(t.numel() * t.element_size() for t in (self._cache, self._cache_ids, self._cached) if t is not None)

    def _top_k(self, logits: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """The teacher's logits, or with ``teacher_top_k`` its ``(values, ids)`` of the k largest along the last dim."""
        if self.teacher_top_k is None:
            return logits
        values, ids = logits.topk(min(self.teacher_top_k, logits.shape[-1]), dim=-1)
        return values, ids.to(torch.int16 if logits.shape[-1] <= torch.iinfo(torch.int16).max else torch.int32)

    def _teacher_logits_cached(self, x: Any, idx: Tensor | None) -> Tensor | tuple[Tensor, Tensor]:
        if not self.cache_teacher_outputs:
            return self._top_k(self._teacher_forward(x))
        if idx is None:
            raise ValueError(
                "`cache_teacher_outputs`=True needs batches (x, y, index). HINT: set `return_index: true` on the "
                "datamodule (DigitsDataModule, MNIST5kDataModule, TextDataModule, ...) or yield the sample index third."
            )
        idx = idx.to(inputs.flat_tensors(x)[0].device).long()
        needed = int(idx.max()) + 1
        if self._cache is not None and self._cached is not None and needed <= self._cache.shape[0]:
            hit = self._cached[idx]
            if bool(hit.all()):
                return self._cache[idx] if self._cache_ids is None else (self._cache[idx], self._cache_ids[idx])
        out = self._top_k(self._teacher_forward(x))
        values, ids = out if isinstance(out, tuple) else (out, None)
        if self._cache is None or self._cached is None:
            self._cache = values.new_zeros((needed, *values.shape[1:]))
            self._cache_ids = None if ids is None else ids.new_zeros((needed, *ids.shape[1:]))
            self._cached = torch.zeros(needed, dtype=torch.bool, device=values.device)
        elif needed > self._cache.shape[0]:
            grow = needed - self._cache.shape[0]
            self._cache = torch.cat([self._cache, values.new_zeros((grow, *values.shape[1:]))])
            if ids is not None and self._cache_ids is not None:
                self._cache_ids = torch.cat([self._cache_ids, ids.new_zeros((grow, *ids.shape[1:]))])
            self._cached = torch.cat([self._cached, torch.zeros(grow, dtype=torch.bool, device=values.device)])
        self._cache[idx] = values.detach()
        if ids is not None and self._cache_ids is not None:
            self._cache_ids[idx] = ids
        self._cached[idx] = True
        return out

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, idx = inputs.batch_inputs(batch), inputs.batch_target(batch), inputs.batch_index(batch)
        if y is None:
            raise ValueError(
                "DistillationModule needs labelled batches for the hard loss: (inputs, y), (inputs, y, index) or a "
                f"dict with a 'labels' key, got a {type(batch).__name__} without a target."
            )
        alpha, temperature = self.current_alpha(), self.current_temperature()
        use_cache = self.cache_teacher_outputs and not self.feature_layers
        with self._capture() as (s_feats, t_feats):
            s_logits = inputs.call(self.student, x)
            t_out = self._teacher_logits_cached(x, idx) if use_cache else self._top_k(self._teacher_forward(x))
        # with teacher_top_k: the teacher's k largest logits and their ids, (..., k) each
        t_logits, t_ids = t_out if isinstance(t_out, tuple) else (t_out, None)
        if s_logits.shape[:-1] != t_logits.shape[:-1] or (t_ids is None and s_logits.shape != t_logits.shape):
            raise ValueError(
                f"teacher and student outputs differ in shape: student {tuple(s_logits.shape)}, teacher "
                f"{tuple(t_logits.shape)}. HINT: both must predict the same classes."
            )
        loss, soft, hard, rows = distillation_loss(s_logits, t_logits, y, alpha, temperature, self.kd_loss, t_ids)
        s_logits, t_logits, t_ids, y, real = rows  # one row per sample or token, for the metrics below
        n = inputs.batch_size(x)
        log = {"train/hard_loss": hard.detach(), "train/soft_loss": soft.detach()}
        if self.feature_loss is not None:
            feat = self.feature_loss(s_feats, t_feats)
            loss = loss + self.feature_weight * feat
            log["train/feature_loss"] = feat.detach()
        with torch.no_grad():
            labeled = y != UNLABELED
            n_labeled = int(labeled.sum())
            t_top1 = t_logits.argmax(1) if t_ids is None else t_ids[:, 0].long()  # top-k values come sorted
            if n_labeled:  # accuracies over the labelled samples only, weighted by their number in the epoch mean
                self.log("train/acc", (s_logits[labeled].argmax(1) == y[labeled]).float().mean(), batch_size=n_labeled)
                t_acc = (t_top1[labeled] == y[labeled]).float().mean()
                self.log("train/teacher_acc", t_acc, batch_size=n_labeled)
            same = s_logits.argmax(1) == t_top1  # top-1 agreement
            log["train/agreement"] = (same if real is None else same[real]).float().mean()
        if isinstance(self.alpha, Schedule):
            log["train/alpha"] = torch.tensor(alpha)
        if isinstance(self.temperature, Schedule):
            log["train/temperature"] = torch.tensor(temperature)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n)
        self.log_dict(log, batch_size=n)
        return loss

    def _delegate(self, hook: str, *args: Any) -> Any:
        self.student._current_fx_name = self._current_fx_name
        try:
            return getattr(self.student, hook)(*args)
        finally:
            self.student._current_fx_name = None

    def _log_teacher(self, batch: Any, prefix: str) -> None:
        if not self.log_teacher_metrics:
            return
        x, y = inputs.batch_inputs(batch), inputs.batch_target(batch)
        with torch.no_grad():
            s_logits = inputs.call(self.student, x)
            t_logits = self._teacher_forward(x)
        if not isinstance(s_logits, Tensor) or not isinstance(t_logits, Tensor) or s_logits.shape != t_logits.shape:
            return
        s_logits, y = token_logits(s_logits, y)
        t_logits, _ = token_logits(t_logits)
        if s_logits.ndim != 2:
            return
        logs = {f"{prefix}/agreement": agreement(s_logits, t_logits)}
        if y is not None and y.shape == t_logits.shape[:1]:
            logs[f"{prefix}/teacher_acc"] = (t_logits.argmax(1) == y).float().mean()
        self.log_dict(logs, batch_size=inputs.batch_size(x))

    @override
    def validation_step(self, batch: Any, batch_idx: int, *args: Any) -> Any:
        out = self._delegate("validation_step", batch, batch_idx, *args)
        self._log_teacher(batch, "val")
        return out

    @override
    def test_step(self, batch: Any, batch_idx: int, *args: Any) -> Any:
        out = self._delegate("test_step", batch, batch_idx, *args)
        self._log_teacher(batch, "test")
        return out

    @override
    def predict_step(self, batch: Any, batch_idx: int, *args: Any) -> Any:
        return self._delegate("predict_step", batch, batch_idx, *args)

    @override
    def on_validation_epoch_start(self) -> None:
        self._delegate("on_validation_epoch_start")

    @override
    def on_validation_epoch_end(self) -> None:
        self._delegate("on_validation_epoch_end")

    @override
    def on_test_epoch_start(self) -> None:
        self._delegate("on_test_epoch_start")

    @override
    def on_test_epoch_end(self) -> None:
        self._delegate("on_test_epoch_end")

    # ------------------------------------------------------------------ checkpoints
    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # `DistillationModule.load_from_checkpoint` of a QAT run: rebuild the student's fake-quant structure first.
        if _quantization_key() is not None and checkpoint.get(_quantization_key() or ""):
            from lightning_opt.quantization import restore_quantized_structure

            restore_quantized_structure(self, checkpoint)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["distillation"] = {
            "student_class": f"{type(self.student).__module__}.{type(self.student).__qualname__}",
            "student_hyper_parameters": dict(self.student.hparams),
            "teacher_checkpoint": self.hparams.get("teacher_checkpoint"),
        }

    def student_checkpoint(self, checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
        """Return a Lightning checkpoint dict of the student alone.

        Args:
            checkpoint: A full checkpoint of this module (its ``callbacks`` state, epoch and step are kept, so the
                pruning/QAT callbacks' records travel with the student); ``None`` builds a minimal one.

        Returns:
            ``{"state_dict": student weights, "hyper_parameters": student hparams, ...}`` without teacher, adapters,
            optimizer or loop states: ``StudentClass.load_from_checkpoint`` loads it.
        """
        out: dict[str, Any] = {}
        if checkpoint is not None:
            out.update({k: v for k, v in checkpoint.items() if k in ("epoch", "global_step", "callbacks")})
        quant = _quantization_key()
        if checkpoint is not None and quant is not None and checkpoint.get(quant):
            # QAT records name the quantized submodule from the DistillationModule ("student.backbone"): re-root them
            # at the student ("backbone") so that export and the student's own loading find it.
            specs = []
            for spec in checkpoint[quant].get("specs", []):
                module = str(spec.get("module", ""))
                if module == "student" or module.startswith("student."):
                    specs.append({**spec, "module": module[len("student.") :] if module != "student" else ""})
            if specs:
                out[quant] = {**checkpoint[quant], "specs": specs}
        out["pytorch-lightning_version"] = lightning.__version__
        out["state_dict"] = {k: v.detach().cpu() for k, v in self.student.state_dict().items()}
        hp = dict(self.student.hparams)
        out[LightningModule.CHECKPOINT_HYPER_PARAMS_KEY] = hp
        name = getattr(self.student, "_hparams_name", None)
        if name:
            out[LightningModule.CHECKPOINT_HYPER_PARAMS_NAME] = name
        self.student.on_save_checkpoint(out)
        out.pop("distillation", None)
        return out

    def _callback_records(self, trainer: Any) -> dict[str, Any]:
        """What a checkpoint of the run would hold besides weights and loops: epoch, step, each callback's state and
        what the callbacks add in ``on_save_checkpoint`` (the pruning and QAT records), through their public hooks.
        """
        records: dict[str, Any] = {"epoch": trainer.current_epoch, "global_step": trainer.global_step}
        states = {cb.state_key: cb.state_dict() for cb in trainer.callbacks}
        records["callbacks"] = {key: state for key, state in states.items() if state}
        for callback in trainer.callbacks:
            callback.on_save_checkpoint(trainer, self, records)
        return records

    def export_student(self, path: str) -> str:
        """Write the student alone as a Lightning checkpoint at ``path`` (rank zero writes) and return the path.

        Examples:
            >>> import os, tempfile
            >>> from lightning_opt.module import ImageClassifier
            >>> student = ImageClassifier("mlp", backbone_kwargs={"hidden": [16]})
            >>> model = DistillationModule(student=student, teacher=ImageClassifier("small_cnn"))
            >>> path = model.export_student(os.path.join(tempfile.mkdtemp(), "student.ckpt"))
            >>> type(ImageClassifier.load_from_checkpoint(path).backbone).__name__
            'MLP'
        """
        trainer = self._trainer
        ckpt = self.student_checkpoint(None if trainer is None else self._callback_records(trainer))
        if trainer is not None and type(trainer.strategy.checkpoint_io) not in (TorchCheckpointIO, AtomicCheckpointIO):
            trainer.strategy.save_checkpoint(ckpt, path)  # the user's own checkpoint plugin (remote, async)
        elif trainer is None or trainer.is_global_zero:
            atomic_save(ckpt, path)
        if trainer is not None:
            trainer.strategy.barrier("export_student")
        return path


def _quantization_key() -> str | None:
    """The checkpoint key of the QAT records, when lightning_opt.quantization is available."""
    try:
        from lightning_opt.quantization import CHECKPOINT_KEY
    except ImportError:
        return None
    return CHECKPOINT_KEY


def _add_adapter_params(config: Any, params: list[nn.Parameter]) -> None:
    """Add the feature adapters' parameters to the student's first optimizer (and keep its schedulers in step)."""
    optimizers, schedulers = _split_optim_config(config)
    if not optimizers:
        raise ValueError(
            "the student's configure_optimizers returned no optimizer, so the feature adapters cannot be trained."
        )
    opt = optimizers[0]
    n_before = len(opt.param_groups)
    opt.add_param_group({"params": params})
    group = opt.param_groups[-1]
    group.setdefault("initial_lr", group["lr"])
    for sched in schedulers:
        if getattr(sched, "optimizer", None) is not opt:
            continue
        for attr in ("base_lrs", "min_lrs", "lr_lambdas", "max_lrs", "_last_lr"):
            values = getattr(sched, attr, None)
            if isinstance(values, list) and len(values) == n_before:
                values.append(values[-1] if attr != "base_lrs" else group["initial_lr"])


def _split_optim_config(config: Any) -> tuple[list[Any], list[Any]]:
    optimizers: list[Any] = []
    schedulers: list[Any] = []

    def visit(item: Any) -> None:
        if isinstance(item, torch.optim.Optimizer):
            optimizers.append(item)
        elif isinstance(item, Mapping):
            if "optimizer" in item:
                visit(item["optimizer"])
            if "lr_scheduler" in item:
                visit(item["lr_scheduler"])
            if "scheduler" in item:
                schedulers.append(item["scheduler"])
        elif isinstance(item, (list, tuple)):
            for i in item:
                visit(i)
        elif hasattr(item, "step") and hasattr(item, "optimizer"):
            schedulers.append(item)

    visit(config)
    return optimizers, schedulers
