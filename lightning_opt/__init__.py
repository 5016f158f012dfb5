"""lightning-opt: pruning, quantization-aware training, distillation and model search for PyTorch Lightning."""

from __future__ import annotations

__version__ = "0.1.0"
