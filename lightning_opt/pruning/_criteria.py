"""Pluggable importance criteria: a weight (and its gradient) -> an importance score per element."""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = ["Criterion", "MagnitudeCriterion", "RandomCriterion", "TaylorCriterion", "resolve_criterion"]


class Criterion(ABC):
    """Base class of importance criteria; the lowest scores are pruned first.

    Subclass it and pass ``criterion: {class_path: my_pkg.MyCriterion, init_args: {...}}`` in YAML to plug in a new
    one. A criterion returns one score per element; structured granularities sum the scores of a channel.

    Attributes:
        needs_grad: whether `score` reads the gradient (the callback then scores in
            ``on_before_optimizer_step``, where gradients of the current step are complete and unscaled).
    """

    needs_grad: bool = False

    @abstractmethod
    def score(self, weight: Tensor, grad: Tensor | None, *, name: str, step: int) -> Tensor:
        """Return a non-negative importance per element of ``weight``.

        Args:
            weight: the parameter (detached).
            grad: its gradient at this step, or ``None`` when absent.
            name: the parameter's name in the LightningModule (for per-tensor seeding).
            step: the optimizer step of this update (for seeding).

        Returns:
            A float tensor with the shape of ``weight``.
        """

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class MagnitudeCriterion(Criterion):
    """``|w| ** p``: magnitude pruning (Han et al. 2015, Zhu & Gupta 2017); for channels, the Lp norm of a filter.

    Args:
        p: the norm order, 1 (L1) or 2 (L2). Per element the ranking is the same; per channel it differs.

    Raises:
        ValueError: if ``p`` is not 1 or 2.

    Examples:
        >>> MagnitudeCriterion(p=2).score(torch.tensor([-3.0, 1.0]), None, name="w", step=0)
        tensor([9., 1.])
    """

    def __init__(self, p: int = 1) -> None:
        if p not in (1, 2):
            raise ValueError(f"`p` must be 1 or 2 (L1 or L2 norm), got {p!r}.")
        self.p = p

    def score(self, weight: Tensor, grad: Tensor | None, *, name: str, step: int) -> Tensor:
        return weight.abs() if self.p == 1 else weight.square()


class RandomCriterion(Criterion):
    """Uniform random scores, seeded from ``(seed, step, parameter name)``: a baseline, identical on every rank.

    Args:
        seed: base seed; the same seed gives the same masks in every process and on resume.

    Examples:
        >>> c = RandomCriterion(seed=3)
        >>> torch.equal(c.score(torch.ones(4), None, name="a", step=5), c.score(torch.ones(4), None, name="a", step=5))
        True
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)

    def score(self, weight: Tensor, grad: Tensor | None, *, name: str, step: int) -> Tensor:
        g = torch.Generator(device="cpu")
        g.manual_seed((self.seed * 1_000_003 + step * 9_176 + zlib.crc32(name.encode())) % (2**63 - 1))
        return torch.rand(weight.shape, generator=g).to(weight.device)


class TaylorCriterion(Criterion):
    """First-order Taylor importance ``|w * g|`` (Molchanov et al. 2017/2019), the loss change from zeroing ``w``.

    Scores use the gradient of the update step (after gradient accumulation, unscaled under AMP). Before the first
    backward pass there is no gradient and the score falls back to ``|w|``.

    Examples:
        >>> TaylorCriterion().score(torch.tensor([2.0, -1.0]), torch.tensor([0.5, 3.0]), name="w", step=0)
        tensor([1., 3.])
    """

    needs_grad = True

    def score(self, weight: Tensor, grad: Tensor | None, *, name: str, step: int) -> Tensor:
        if grad is None:
            return weight.abs()
        return (weight * grad).abs()


_NAMES: dict[str, type[Criterion]] = {
    "magnitude": MagnitudeCriterion,
    "random": RandomCriterion,
    "taylor": TaylorCriterion,
}


def resolve_criterion(criterion: Criterion | str) -> Criterion:
    """Turn a criterion name (``"magnitude"``, ``"random"``, ``"taylor"``) or instance into an instance.

    Args:
        criterion: a `Criterion` instance or one of the names.

    Returns:
        The criterion instance.

    Raises:
        ValueError: for an unknown name or type.
    """
    if isinstance(criterion, Criterion):
        return criterion
    if isinstance(criterion, str) and criterion in _NAMES:
        return _NAMES[criterion]()
    raise ValueError(
        f"`criterion` must be one of {sorted(_NAMES)} or a Criterion instance (class_path in YAML), got {criterion!r}. "
        "HINT: `criterion: {class_path: lightning_opt.pruning.TaylorCriterion}`."
    )
