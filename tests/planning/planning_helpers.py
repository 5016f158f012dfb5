"""Tiny recipes for the planner's tests (digits, a small CNN, a few batches)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def pruning_entry(**init_args: Any) -> dict[str, Any]:
    schedule = init_args.pop("schedule", {"final": 0.8, "start": 0.1, "end": 0.7, "frequency": 2})
    return {
        "class_path": "lightning_opt.pruning.Pruning",
        "init_args": {
            "schedule": {"class_path": "lightning_opt.schedules.PolynomialSchedule", "init_args": schedule},
            "log_histograms": False,
            **init_args,
        },
    }


def qat_entry(**init_args: Any) -> dict[str, Any]:
    return {"class_path": "lightning_opt.quantization.QuantizationAwareTraining", "init_args": init_args}


def write_recipe(path: Path, callbacks: list[dict[str, Any]], **trainer: Any) -> str:
    """A digits recipe with a small CNN, quiet, writing under ``path``'s folder."""
    config = {
        "seed_everything": 0,
        "model": {
            "class_path": "lightning_opt.module.ImageClassifier",
            "init_args": {
                "backbone": "small_cnn",
                "input_size": 8,
                "backbone_kwargs": {"channels": [8, 16], "kernel_sizes": 3},
                "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
            },
        },
        "data": {"class_path": "lightning_opt.data.DigitsDataModule", "init_args": {"batch_size": 64, "seed": 0}},
        "trainer": {
            "max_epochs": 2,
            "limit_train_batches": 5,
            "limit_val_batches": 2,
            "limit_test_batches": 1,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(path.parent / "runs"),
            "callbacks": callbacks,
            **trainer,
        },
        "report": {"enabled": False},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)
