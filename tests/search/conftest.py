"""Fixtures of the search tests: a tiny digits recipe with a `search:` section (each trial takes about a second)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

TINY_RECIPE: dict[str, Any] = {
    "seed_everything": 0,
    "model": {
        "class_path": "lightning_opt.module.ImageClassifier",
        "init_args": {
            "backbone": "small_cnn",
            "num_classes": 10,
            "in_channels": 1,
            "input_size": 8,
            "backbone_kwargs": {"channels": [8, 16], "kernel_sizes": 3},
            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
        },
    },
    "data": {"class_path": "lightning_opt.data.DigitsDataModule", "init_args": {"batch_size": 64, "seed": 0}},
    "trainer": {
        "max_epochs": 2,
        "limit_train_batches": 3,
        "limit_val_batches": 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "runs", "name": "tiny"},
        },
    },
    "search": {
        "objectives": [{"name": "val/acc", "direction": "maximize"}],
        "space": {"model.init_args.optimizer.init_args.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}},
        "sampler": "random",
        "n_trials": 2,
        "seed": 0,
    },
}


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def make_recipe(tmp_path: Path):
    """Write the tiny recipe with edits: ``make_recipe(search={...}, **{"trainer.max_epochs": 3})``."""

    def make(name: str = "tiny", search: dict[str, Any] | None = None, **edits: Any) -> Path:
        from lightning_opt.search import set_path

        recipe = copy.deepcopy(TINY_RECIPE)
        recipe["search"].update(search or {})
        recipe["search"].setdefault("run_dir", str(tmp_path / "run"))
        for key, value in edits.items():
            set_path(recipe, key, value)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return make
