"""The two special target values every loss, metric and datamodule of the package agrees on.

- `UNLABELED` (-1): a sample without a label, such as the unlabelled transfer set of a distillation datamodule. It
  counts in the soft (teacher) loss only: the hard loss and the accuracies skip it.
- `IGNORE_INDEX` (-100, PyTorch's default ``ignore_index``): a padding position of a next-token target. It counts
  in no loss and no metric.
"""

from __future__ import annotations

__all__ = ["IGNORE_INDEX", "UNLABELED"]

UNLABELED = -1
"""The label of an unlabelled sample: soft loss only."""

IGNORE_INDEX = -100
"""The target of a padding token: counted nowhere."""
