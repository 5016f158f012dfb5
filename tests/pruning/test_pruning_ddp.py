"""Two CPU processes (ddp_spawn): masks identical on every rank, final sparsity exact."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from pruning_helpers import LitNet, loaders, make_trainer

from lightning_opt.pruning import Pruning, RandomCriterion
from lightning_opt.schedules import PolynomialSchedule


class SaveRankState(Callback):
    def __init__(self, path, pruning) -> None:
        self.path = path
        self.pruning = pruning

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {"masks": {n: m.cpu() for n, m in self.pruning.masks.items()}, "weights": pl_module.state_dict()},
            f"{self.path}/rank{trainer.global_rank}.pt",
        )


@pytest.mark.ddp
def test_ddp_masks_identical_and_exact(tmp_path):
    criterion = RandomCriterion(seed=3)  # random scores: identical only if seeded/broadcast the same on each rank
    seed_everything(0)
    cb = Pruning(schedule=PolynomialSchedule(final=0.9, start=0.0, end=0.75, frequency=2), criterion=criterion)
    trainer = make_trainer(tmp_path, [cb, SaveRankState(tmp_path, cb)], strategy="ddp_spawn", devices=2, max_epochs=2)
    train, val = loaders()
    trainer.fit(LitNet("mlp"), train, val)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["masks"].keys() == r1["masks"].keys() == {"net.1.weight", "net.3.weight", "net.5.weight"}
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name])
    for name in r0["weights"]:
        assert torch.equal(r0["weights"][name], r1["weights"][name])
    zeros = sum(int((r0["weights"][n] == 0).sum()) for n in r0["masks"])
    numel = sum(r0["weights"][n].numel() for n in r0["masks"])
    assert zeros == round(0.9 * numel)
