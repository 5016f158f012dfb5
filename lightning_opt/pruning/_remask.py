"""Re-applying pruning masks in place after every optimizer step (what keeps pruned weights at exactly zero).

Two kernels give bit-identical weights:

- ``"foreach"``: one ``torch._foreach_mul_`` of the weights by float masks in the weights' dtype. Fast everywhere
  without compiling, but each mask needs a float copy as large as its weight.
- ``"compiled"``: an in-place ``weight.mul_(mask)`` compiled by ``torch.compile`` (inductor), reading the bool
  masks themselves as ``uint8``: no copy (1 byte per weight instead of 4 more), and about 0.8x the time of
  ``"foreach"`` on CPU, where the pass is memory-bound (``benchmarks/pruning.py --parts masks``). It compiles once
  per process (seconds; one dynamic-shape graph for all sizes) and needs a C++ compiler on CPU. Each call costs
  ~20 us, so only weights of at least ``COMPILED_MIN_NUMEL`` elements use it; smaller ones go through ``"foreach"``.

``"auto"`` picks ``"compiled"`` on CPU when at least ``AUTO_MIN_NUMEL`` weights are masked (where the saved time and
memory outweigh the compile), else ``"foreach"``. A compile that fails falls back to ``"foreach"`` with a warning.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

__all__ = ["AUTO_MIN_NUMEL", "COMPILED_MIN_NUMEL", "REMASK_KERNELS", "Remasker"]

REMASK_KERNELS = ("auto", "foreach", "compiled")
COMPILED_MIN_NUMEL = 1 << 16
AUTO_MIN_NUMEL = 1 << 22

_COMPILED: Callable[[Tensor, Tensor], None] | None = None


def _mul_(weight: Tensor, mask: Tensor) -> None:
    weight.mul_(mask)


def _compiled_mul() -> Callable[[Tensor, Tensor], None]:
    global _COMPILED
    if _COMPILED is None:
        # flat tensors and dynamic sizes: one graph serves every weight (no recompilation per layer or per model)
        _COMPILED = torch.compile(_mul_, fullgraph=True, dynamic=True)
    return _COMPILED


class Remasker:
    """Holds (weight, mask) pairs and zeroes the pruned elements in place with the chosen kernel.

    Args:
        kernel: ``"auto"``, ``"foreach"`` or ``"compiled"`` (see the module docstring).

    Examples:
        >>> import torch
        >>> w = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
        >>> r = Remasker("foreach")
        >>> r.set([(w, torch.tensor([[True, False], [False, True]]))])
        >>> r.apply()
        >>> w
        tensor([[1., -0.],
                [0., 4.]])
    """

    def __init__(self, kernel: Literal["auto", "foreach", "compiled"] = "auto") -> None:
        if kernel not in REMASK_KERNELS:
            raise ValueError(f"`remask` must be one of {list(REMASK_KERNELS)}, got {kernel!r}.")
        self.kernel = kernel
        self._pairs: list[tuple[Tensor, Tensor]] = []
        self._foreach_params: list[Tensor] = []
        self._foreach_masks: list[Tensor] = []
        self._compiled_pairs: list[tuple[Tensor, Tensor]] = []  # (weight, flat uint8 view of its bool mask)
        self._compiled_ok = True

    @property
    def resolved(self) -> str:
        """The kernel in use for the current pairs: ``"foreach"`` or ``"compiled"``."""
        return "compiled" if self._compiled_pairs else "foreach"

    def _wants_compiled(self, pairs: Sequence[tuple[Tensor, Tensor]]) -> bool:
        if self.kernel == "foreach" or not self._compiled_ok or not pairs:
            return False
        if self.kernel == "compiled":
            return True
        on_cpu = all(p.device.type == "cpu" for p, _ in pairs)
        return on_cpu and sum(p.numel() for p, _ in pairs) >= AUTO_MIN_NUMEL

    def set(self, pairs: Sequence[tuple[Tensor, Tensor]]) -> None:
        """Replace the (weight, bool mask) pairs; masks must have their weight's shape (True = kept)."""
        self._pairs = list(pairs)
        compiled = self._wants_compiled(self._pairs)
        self._compiled_pairs, rest = [], []
        for p, mk in self._pairs:
            mk = mk.to(device=p.device, dtype=torch.bool)
            if compiled and p.numel() >= COMPILED_MIN_NUMEL and p.is_contiguous() and mk.is_contiguous():
                self._compiled_pairs.append((p, mk.view(torch.uint8).view(-1)))
            else:
                rest.append((p, mk))
        self._foreach_params = [p for p, _ in rest]
        self._foreach_masks = [mk.to(dtype=p.dtype) for p, mk in rest]

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned elements of every weight in place."""
        if self._foreach_params:
            torch._foreach_mul_(self._foreach_params, self._foreach_masks)
        if not self._compiled_pairs:
            return
        mul = _compiled_mul()
        try:
            for p, mk in self._compiled_pairs:
                mul(p.view(-1), mk)
        except Exception as err:  # no C++ compiler, an unsupported device or dtype: the plain kernel still works
            rank_zero_warn(
                f"Pruning: the compiled re-masking kernel failed ({type(err).__name__}: {err}); using"
                " `remask='foreach'` (float copies of the masks) instead."
            )
            self._compiled_ok = False
            self.set(self._pairs)
            self.apply()

    def extra_bytes(self) -> int:
        """Memory held beyond the bool masks themselves (the float copies of the ``"foreach"`` kernel)."""
        return sum(m.numel() * m.element_size() for m in self._foreach_masks)
