"""Distillation losses: pure functions and thin ``nn.Module`` wrappers.

The functions hold the maths and are tested against reference formulas; the modules only keep the hyperparameters
(and, for feature distillation, the learned adapters) so that a `DistillationModule`
or any user code can hold them as sub-modules.

Conventions:

* ``alpha`` is the weight of the *soft* (teacher) term: ``loss = alpha * soft + (1 - alpha) * hard``.
  ``alpha = 0`` is plain supervised training, ``alpha = 1`` uses the teacher alone.
* The soft term is Hinton et al. (2015): ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over
  the batch. The ``T^2`` factor keeps its gradient magnitude comparable with the hard term when ``T`` changes.
* Sequence models (next-token logits ``(B, L, V)``) are distilled per token: `token_logits` flattens them to
  ``(B * L, V)`` (and their targets to ``(B * L,)``) so that the soft loss runs over the vocabulary, the last dim.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_opt.targets import IGNORE_INDEX, UNLABELED

__all__ = [
    "DistillationLoss",
    "DistillationRows",
    "FeatureAdapter",
    "FeatureDistillationLoss",
    "HintonLoss",
    "KDLoss",
    "agreement",
    "check_alpha",
    "check_divergence",
    "check_temperature",
    "distillation_loss",
    "feature_loss",
    "hinton_loss",
    "kd_loss",
    "labeled_cross_entropy",
    "token_kd_loss",
    "token_logits",
    "topk_kd_loss",
]

KDDivergence = Literal["forward_kl", "reverse_kl"]
"""Direction of the soft loss: ``forward_kl`` = KL(teacher || student) (Hinton, mean-seeking), ``reverse_kl`` =
KL(student || teacher) (mode-seeking, as in MiniLLM)."""

_DIVERGENCES = ("forward_kl", "reverse_kl")


def check_temperature(temperature: float, name: str = "temperature") -> float:
    """Return ``temperature`` as a float, or raise if it is not a finite number > 0.

    Raises:
        ValueError: If ``temperature <= 0`` or not finite.
    """
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(
            f"`{name}` must be a finite number > 0, got {temperature!r}. "
            "HINT: T = 1 gives the plain softmax; Hinton et al. use T in [2, 20] to soften the teacher's targets."
        )
    return t


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """Return ``alpha`` as a float, or raise if it is not in [0, 1].

    Raises:
        ValueError: If ``alpha`` is outside [0, 1].
    """
    a = float(alpha)
    if not (0.0 <= a <= 1.0):
        raise ValueError(
            f"`{name}` must be in [0, 1], got {alpha!r}. "
            "HINT: alpha is the weight of the soft (teacher) loss; the hard-label loss gets 1 - alpha."
        )
    return a


def _check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got student {tuple(student_logits.shape)} and "
            f"teacher {tuple(teacher_logits.shape)}. HINT: both models must predict the same classes."
        )


def token_logits(logits: Tensor, target: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Per-token view of sequence logits: ``(B, L, V)`` -> ``(B * L, V)`` and the target ``(B, L)`` -> ``(B * L,)``.

    Classifier logits ``(N, C)`` are returned as they are; a target with more dimensions than one whose size is the
    number of rows (a model that already flattens its tokens to ``(B * L, V)``, like Lightning's demo Transformer)
    is flattened to match.

    Args:
        logits: ``(N, C)`` classifier or ``(B, L, V)`` next-token logits.
        target: the matching class indices, or None.

    Returns:
        ``(logits, target)`` with the classes (the vocabulary) along dim 1 and one row per token.

    Examples:
        >>> logits, target = token_logits(torch.zeros(2, 5, 7), torch.zeros(2, 5, dtype=torch.long))
        >>> tuple(logits.shape), tuple(target.shape)
        ((10, 7), (10,))
        >>> tuple(token_logits(torch.zeros(10, 7), torch.zeros(2, 5, dtype=torch.long))[1].shape)
        (10,)
    """
    if logits.dim() == 3:
        logits = logits.reshape(-1, logits.shape[-1])
        target = None if target is None else target.reshape(-1)
    elif target is not None and logits.dim() == 2 and target.dim() > 1 and target.numel() == logits.shape[0]:
        target = target.reshape(-1)
    return logits, target


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Soft-target loss of Hinton et al. (2015): ``T^2 * KL(p_teacher^T || p_student^T)``, mean over the batch.

    Args:
        student_logits: ``(N, C)`` (or ``(N, C, ...)``, class dimension 1) raw student outputs.
        teacher_logits: Teacher outputs of the same shape; treated as constants (detached).
        temperature: Softmax temperature ``T > 0``.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: If the shapes differ or ``temperature <= 0``.

    Examples:
        >>> s = torch.tensor([[1.0, 2.0, 3.0]])
        >>> round(kd_loss(s, s, temperature=2.0).item(), 6)
        0.0
    """
    t = check_temperature(temperature)
    _check_logits(student_logits, teacher_logits)
    log_p_student = F.log_softmax(student_logits / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=1)
    # KL(teacher || student) summed over classes, averaged over the other dimensions (batch and any spatial ones).
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(dim=1)
    return kl.mean() * (t * t)


def check_divergence(kind: str, name: str = "kd_loss") -> KDDivergence:
    """Return ``kind`` if it is ``"forward_kl"`` or ``"reverse_kl"``, else raise.

    Raises:
        ValueError: If ``kind`` is anything else.
    """
    if kind not in _DIVERGENCES:
        raise ValueError(
            f"`{name}` must be one of {list(_DIVERGENCES)}, got {kind!r}. HINT: forward_kl = KL(teacher || student) "
            "(Hinton), reverse_kl = KL(student || teacher) (mode-seeking)."
        )
    return kind  # type: ignore[return-value]


def token_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    kind: KDDivergence = "forward_kl",
    mask: Tensor | None = None,
) -> Tensor:
    """Soft loss per row (token) in either KL direction, ``T^2``-scaled, averaged over the rows ``mask`` keeps.

    ``forward_kl``: ``T^2 * sum_v p_t(v) (log p_t(v) - log p_s(v))``; ``reverse_kl``:
    ``T^2 * sum_v p_s(v) (log p_s(v) - log p_t(v))``, with ``p = softmax(logits / T)`` over dim 1 (the classes, the
    vocabulary of `token_logits` rows). Rows where ``mask`` is False (padding, ``targets == -100``) contribute
    nothing, to the value or the gradient: the mean is over the kept rows (zero when none is kept).

    Args:
        student_logits: ``(N, C)`` (or ``(N, C, ...)``) raw student outputs.
        teacher_logits: Teacher outputs of the same shape; treated as constants (detached).
        temperature: Softmax temperature ``T > 0``.
        kind: ``"forward_kl"`` or ``"reverse_kl"``.
        mask: Boolean tensor of the logits' shape without dim 1 (``(N,)`` for rows); None keeps every row.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: If the shapes differ, ``temperature <= 0``, ``kind`` is unknown or ``mask`` has the wrong shape.

    Examples:
        >>> s, t = torch.tensor([[0.0, 1.0], [5.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 5.0]])
        >>> round(token_kd_loss(s, t, mask=torch.tensor([True, False])).item(), 4)  # the 2nd row counts in nothing
        0.4621
        >>> round(token_kd_loss(s, s, kind="reverse_kl").item(), 6)
        0.0
    """
    t = check_temperature(temperature)
    kind = check_divergence(kind)
    _check_logits(student_logits, teacher_logits)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    if kind == "forward_kl":
        kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(dim=1)
    else:
        kl = F.kl_div(log_p_t, log_p_s, reduction="none", log_target=True).sum(dim=1)
    if mask is None:
        return kl.mean() * (t * t)
    if mask.shape != kl.shape:
        raise ValueError(
            f"`mask` must have the logits' shape without the class dimension, {tuple(kl.shape)}, got "
            f"{tuple(mask.shape)}. HINT: flatten (B, L, V) logits and (B, L) targets with token_logits first."
        )
    keep = mask.to(kl.dtype)
    return (kl * keep).sum() / keep.sum().clamp(min=1.0) * (t * t)


def topk_kd_loss(
    student_logits: Tensor,
    teacher_values: Tensor,
    teacher_indices: Tensor,
    temperature: float = 1.0,
    kind: KDDivergence = "forward_kl",
    mask: Tensor | None = None,
) -> Tensor:
    """`token_kd_loss` against a teacher kept as its ``k`` largest logits per row (a memory-bounded cache).

    The approximation: both distributions are renormalised over the teacher's ``k`` kept tokens (the student's
    logits are gathered there), so the loss is the KL between the two restricted to that set. It equals
    `token_kd_loss` when ``k`` is the whole vocabulary; with a smaller ``k`` it ignores the teacher's tail (the
    mass outside the top-k) and the student's mass there gets no gradient from the soft loss.

    Args:
        student_logits: ``(N, V)`` raw student outputs, one row per token.
        teacher_values: ``(N, k)`` the teacher's ``k`` largest logits per row (``logits.topk(k)``).
        teacher_indices: ``(N, k)`` their token ids.
        temperature: Softmax temperature ``T > 0``.
        kind: ``"forward_kl"`` or ``"reverse_kl"``.
        mask: ``(N,)`` booleans, rows to count (padding: False); None counts every row.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: If the teacher's values and indices differ in shape or do not match the student's rows.

    Examples:
        >>> s, t = torch.randn(4, 9), torch.randn(4, 9)
        >>> full = token_kd_loss(s, t, 2.0)
        >>> values, indices = t.topk(9)
        >>> bool(torch.isclose(topk_kd_loss(s, values, indices, 2.0), full, atol=1e-6))
        True
    """
    if teacher_values.shape != teacher_indices.shape or teacher_values.dim() != 2:
        raise ValueError(
            f"`teacher_values` and `teacher_indices` must both be (N, k), got {tuple(teacher_values.shape)} and "
            f"{tuple(teacher_indices.shape)}. HINT: pass the two outputs of `teacher_logits.topk(k)`."
        )
    if student_logits.dim() != 2 or student_logits.shape[0] != teacher_values.shape[0]:
        raise ValueError(
            f"`student_logits` must be (N, V) with the teacher's N = {teacher_values.shape[0]} rows, got "
            f"{tuple(student_logits.shape)}. HINT: flatten (B, L, V) logits with token_logits first."
        )
    return token_kd_loss(student_logits.gather(1, teacher_indices.long()), teacher_values, temperature, kind, mask)


def labeled_cross_entropy(logits: Tensor, target: Tensor, unlabeled: int = UNLABELED) -> Tensor:
    """Cross-entropy averaged over the labelled samples only (label -1 marks an unlabelled one).

    Args:
        logits: ``(N, C)`` raw scores.
        target: ``(N,)`` class indices, -1 for unlabelled samples.
        unlabeled: The label of an unlabelled sample.

    Returns:
        The mean cross-entropy over the samples whose label is not -1; a zero that keeps the graph (so a backward pass
        gives zero gradients) when the batch holds no labelled sample, where plain ``F.cross_entropy`` returns NaN.

    Examples:
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
        >>> ce = F.cross_entropy(logits[:1], torch.tensor([0]))
        >>> bool(labeled_cross_entropy(logits, torch.tensor([0, -1])) == ce)
        True
        >>> labeled_cross_entropy(logits, torch.tensor([-1, -1])).item()
        0.0
    """
    if bool((target != unlabeled).any()):
        return F.cross_entropy(logits, target, ignore_index=unlabeled)
    return logits.sum() * 0.0


class DistillationRows(NamedTuple):
    """The rows a distillation loss was computed on: one per sample or token.

    ``target`` has padding (-100) turned into -1 (unlabelled); ``real`` marks the rows that are not padding, or is
    None when every row is real.
    """

    student: Tensor
    teacher: Tensor
    teacher_indices: Tensor | None
    target: Tensor
    real: Tensor | None


class DistillationLoss(NamedTuple):
    """The parts of a distillation loss: ``loss = alpha * soft + (1 - alpha) * hard``, and the rows it used."""

    loss: Tensor
    soft: Tensor
    hard: Tensor
    rows: DistillationRows


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 0.5,
    temperature: float = 4.0,
    kind: KDDivergence = "forward_kl",
    teacher_indices: Tensor | None = None,
) -> DistillationLoss:
    """The soft/hard mix every distillation in this package uses, for classifiers and next-token models alike.

    Rows are samples (``(N, C)`` logits) or tokens (``(B, L, V)`` logits, flattened by `token_logits`). A target of
    ``UNLABELED`` (-1, the unlabelled transfer set) counts in the soft loss only; ``IGNORE_INDEX`` (-100, padding)
    counts in neither. The soft loss is `kd_loss` (forward KL) or `token_kd_loss` (either direction, masked); with
    ``teacher_indices`` the teacher is its top-k logits and the soft loss is `topk_kd_loss`.

    Args:
        student_logits: ``(N, C)`` or ``(B, L, V)`` raw student outputs.
        teacher_logits: The teacher's outputs of the same shape, or its top-k values ``(..., k)``.
        target: ``(N,)`` or ``(B, L)`` class indices, with -1 and -100 as above.
        alpha: Weight of the soft term, in [0, 1].
        temperature: Softmax temperature of the soft term, > 0.
        kind: ``"forward_kl"`` or ``"reverse_kl"``.
        teacher_indices: The token ids of the teacher's top-k values (same shape as ``teacher_logits``), or None.

    Returns:
        The loss, its soft and hard parts, and the flattened rows (for metrics on the same rows).

    Raises:
        ValueError: If ``alpha`` or ``temperature`` is out of range, or the shapes do not match.

    Examples:
        >>> s, t = torch.zeros(3, 4), torch.zeros(3, 4)
        >>> parts = distillation_loss(s, t, torch.tensor([0, -1, 2]), alpha=0.0)
        >>> round(parts.hard.item(), 4) == round(math.log(4), 4), parts.soft.item()
        (True, 0.0)
    """
    a = check_alpha(alpha)
    flat_student, flat_target = token_logits(student_logits, target)
    flat_teacher, _ = token_logits(teacher_logits)
    indices = None if teacher_indices is None else teacher_indices.reshape(flat_teacher.shape)
    y = target if flat_target is None else flat_target
    real: Tensor | None = y != IGNORE_INDEX if y.shape == flat_student.shape[:1] else None
    if real is not None and not bool(real.all()):
        y = y.masked_fill(~real, UNLABELED)
    else:
        real = None
    hard = labeled_cross_entropy(flat_student, y)
    if indices is not None:
        soft = topk_kd_loss(flat_student, flat_teacher, indices, temperature, kind, mask=real)
    elif kind == "forward_kl" and real is None:
        soft = kd_loss(flat_student, flat_teacher, temperature)
    else:
        soft = token_kd_loss(flat_student, flat_teacher, temperature, kind, mask=real)
    rows = DistillationRows(flat_student, flat_teacher, indices, y, real)
    return DistillationLoss(a * soft + (1.0 - a) * hard, soft, hard, rows)


def hinton_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 0.5,
    temperature: float = 4.0,
) -> Tensor:
    """Hinton KD mixed with the hard-label cross-entropy: ``alpha * kd_loss + (1 - alpha) * CE(student, target)``.

    The loss of `distillation_loss` (forward KL): a target of -1 (unlabelled) gets the soft term only.

    Args:
        student_logits: ``(N, C)`` raw student outputs.
        teacher_logits: ``(N, C)`` raw teacher outputs (detached).
        target: ``(N,)`` integer class labels, -1 for an unlabelled sample.
        alpha: Weight of the soft term, in [0, 1].
        temperature: Softmax temperature of the soft term, > 0.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: If ``alpha`` is outside [0, 1], ``temperature <= 0`` or the logits' shapes differ.

    Examples:
        >>> s, t, y = torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1])
        >>> round(hinton_loss(s, t, y, alpha=0.0).item(), 4) == round(math.log(3), 4)
        True
    """
    return distillation_loss(student_logits, teacher_logits, target, alpha, temperature).loss


def feature_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """FitNets hint loss: mean squared error between (adapted) student features and teacher features.

    Args:
        student_features: Student activations, already mapped to the teacher's shape (see `FeatureAdapter`).
        teacher_features: Teacher activations (detached).

    Returns:
        A scalar tensor.

    Raises:
        ValueError: If the shapes differ.

    Examples:
        >>> round(feature_loss(torch.ones(2, 4), torch.zeros(2, 4)).item(), 4)
        1.0
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"feature shapes differ: student {tuple(student_features.shape)} vs teacher "
            f"{tuple(teacher_features.shape)}. HINT: wrap the student features in a FeatureAdapter."
        )
    return F.mse_loss(student_features, teacher_features.detach())


def agreement(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Fraction of samples on which student and teacher predict the same class (top-1).

    Examples:
        >>> agreement(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 0.0], [2.0, 0.0]])).item()
        0.5
    """
    _check_logits(student_logits, teacher_logits)
    return (student_logits.argmax(dim=1) == teacher_logits.argmax(dim=1)).float().mean()


class KDLoss(nn.Module):
    """Module form of `kd_loss`.

    Args:
        temperature: Softmax temperature ``T > 0``.

    Raises:
        ValueError: If ``temperature <= 0``.

    Examples:
        >>> loss = KDLoss(temperature=4.0)
        >>> loss(torch.randn(8, 10), torch.randn(8, 10)).shape
        torch.Size([])
    """

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return kd_loss(student_logits, teacher_logits, self.temperature)


class HintonLoss(nn.Module):
    """Module form of `hinton_loss`.

    Args:
        alpha: Weight of the soft term, in [0, 1].
        temperature: Softmax temperature ``T > 0``.

    Raises:
        ValueError: If ``alpha`` is outside [0, 1] or ``temperature <= 0``.

    Examples:
        >>> loss = HintonLoss(alpha=0.9, temperature=4.0)
        >>> loss(torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))).shape
        torch.Size([])
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 4.0) -> None:
        super().__init__()
        self.alpha = check_alpha(alpha)
        self.temperature = check_temperature(temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        return hinton_loss(student_logits, teacher_logits, target, self.alpha, self.temperature)


class FeatureAdapter(nn.Module):
    """Learned map from a student feature shape to a teacher feature shape (FitNets "regressor").

    * identical shapes: identity (no parameters);
    * ``(N, C, H, W)`` features: a 1x1 convolution ``C_s -> C_t``, then adaptive average pooling when the teacher's
      spatial size is smaller (bilinear interpolation when it is larger);
    * ``(N, D)`` (or any other rank): a ``Linear`` over the last dimension (after flattening to ``(N, D)`` when the
      ranks differ).

    Args:
        student_shape: Shape of one student feature sample, without the batch dimension.
        teacher_shape: Shape of one teacher feature sample, without the batch dimension.

    Examples:
        >>> adapter = FeatureAdapter((16, 8, 8), (32, 4, 4))
        >>> adapter(torch.randn(2, 16, 8, 8)).shape
        torch.Size([2, 32, 4, 4])
    """

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.student_shape = tuple(int(s) for s in student_shape)
        self.teacher_shape = tuple(int(s) for s in teacher_shape)
        self.proj: nn.Module
        if self.student_shape == self.teacher_shape:
            self.mode = "identity"
            self.proj = nn.Identity()
        elif len(self.student_shape) == 3 and len(self.teacher_shape) == 3:
            self.mode = "conv"
            self.proj = nn.Conv2d(self.student_shape[0], self.teacher_shape[0], kernel_size=1, bias=False)
        else:
            self.mode = "linear"
            self.proj = nn.Linear(math.prod(self.student_shape), math.prod(self.teacher_shape))

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "identity":
            return x
        if self.mode == "conv":
            y = self.proj(x)
            size = (self.teacher_shape[1], self.teacher_shape[2])
            if tuple(y.shape[-2:]) != size:
                if y.shape[-2] >= size[0] and y.shape[-1] >= size[1]:
                    y = F.adaptive_avg_pool2d(y, size)
                else:
                    y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            return y
        return self.proj(x.flatten(1)).view(x.shape[0], *self.teacher_shape)


class FeatureDistillationLoss(nn.Module):
    """FitNets-style loss over several named layer pairs, with one learned `FeatureAdapter` per pair.

    Args:
        shapes: ``{pair_name: (student_shape, teacher_shape)}``, shapes without the batch dimension.

    Examples:
        >>> loss = FeatureDistillationLoss({"block1": ((8, 4, 4), (16, 4, 4))})
        >>> out = loss({"block1": torch.randn(2, 8, 4, 4)}, {"block1": torch.randn(2, 16, 4, 4)})
        >>> out.shape
        torch.Size([])
    """

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
        super().__init__()
        # ModuleDict keys may not contain dots: layer names do, so pairs are stored under sanitised keys.
        self.keys = {name: f"pair{i}" for i, name in enumerate(shapes)}
        self.adapters = nn.ModuleDict({self.keys[n]: FeatureAdapter(s, t) for n, (s, t) in shapes.items()})

    def forward(self, student_features: dict[str, Tensor], teacher_features: dict[str, Tensor]) -> Tensor:
        losses = [
            feature_loss(self.adapters[key](student_features[name]), teacher_features[name])
            for name, key in self.keys.items()
        ]
        return torch.stack(losses).mean()
