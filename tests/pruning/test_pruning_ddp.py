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


_DDP_SCRIPT = """
import sys

import torch
from lightning.pytorch import seed_everything

sys.path.insert(0, {helpers!r})
from pruning_helpers import LitNet, loaders, make_trainer

from lightning_opt.pruning import Pruning
from lightning_opt.schedules import PolynomialSchedule

seed_everything(0)
cb = Pruning(
    schedule=PolynomialSchedule(final=0.5, start=0.0, end=0.5, frequency=2),
    granularity="channel",
    remove_channels=True,
)
model = LitNet("resnet")
trainer = make_trainer({out!r}, [cb], strategy="ddp", devices=2, max_epochs=2, logger=True)
train, val = loaders()
trainer.fit(model, train, val)
model.eval()
with torch.no_grad():
    out = model(torch.ones(2, 1, 8, 8))
torch.save(
    {{"state": model.state_dict(), "out": out, "path": cb.pruned_model_path}},
    {out!r} + f"/rank{{trainer.global_rank}}.pt",
)
"""


@pytest.mark.ddp
def test_plain_ddp_removes_the_same_channels_on_every_rank(tmp_path):
    """Plain ``ddp`` (the script relaunched per rank, as on a cluster): both ranks end with the same thin model."""
    import subprocess
    import sys
    from pathlib import Path

    from lightning_opt.pruning import load_pruned

    script = tmp_path / "fit_ddp.py"
    script.write_text(_DDP_SCRIPT.format(helpers=str(Path(__file__).parent), out=str(tmp_path)))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    full = LitNet("resnet").state_dict()
    assert r0["state"].keys() == r1["state"].keys() == full.keys()
    for name, tensor in r0["state"].items():
        assert torch.equal(tensor, r1["state"][name]), name
    assert sum(t.numel() for t in r0["state"].values()) < 0.6 * sum(t.numel() for t in full.values())
    assert torch.equal(r0["out"], r1["out"])
    assert r0["path"] is not None and r1["path"] is None  # rank 0 writes pruned_model.pt
    thin = load_pruned(LitNet("resnet"), r0["path"]).eval()
    with torch.no_grad():
        assert torch.allclose(thin(torch.ones(2, 1, 8, 8)), r0["out"], atol=1e-6)
