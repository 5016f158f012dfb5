"""The Pruning callback in real (tiny) Trainer runs."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from pruning_helpers import LitNet, loaders, make_trainer

from lightning_opt.pruning import Pruning, RandomCriterion, TaylorCriterion, load_pruned
from lightning_opt.schedules import IterativeSchedule, LinearSchedule, OneShotSchedule, PolynomialSchedule


class Recorder(Callback):
    """After every optimizer step: pruned weights are zero; records when the masks changed."""

    def __init__(self, pruning: Pruning) -> None:
        self.pruning = pruning
        self.changes: list[int] = []
        self._last: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = dict(pl_module.named_parameters())
        masks = self.pruning.masks
        for name, mask in masks.items():
            assert (params[name].detach()[~mask] == 0).all(), f"{name} has nonzero pruned weights"
        if masks.keys() != self._last.keys() or any(not torch.equal(masks[n], self._last[n]) for n in masks):
            self.changes.append(trainer.global_step)
        self._last = {n: m.clone() for n, m in masks.items()}


def _fit(tmp_path, pruning, kind="mlp", extra=(), model=None, **trainer_kwargs):
    seed_everything(0)
    model = model or LitNet(kind)
    rec = Recorder(pruning)
    trainer = make_trainer(tmp_path, [pruning, rec, *extra], **trainer_kwargs)
    train, val = loaders()
    trainer.fit(model, train, val)
    return model, rec, trainer


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_global_unstructured_reaches_exact_sparsity_and_zeros_stay(tmp_path, optimizer):
    sched = PolynomialSchedule(final=0.8, start=0.1, end=0.6, frequency=2)
    cb = Pruning(schedule=sched)
    model, rec, trainer = _fit(tmp_path, cb, model=LitNet("mlp", optimizer=optimizer), max_epochs=3)
    total = trainer.estimated_stepping_batches  # 24
    # masks changed exactly at the schedule's update steps (counted after the step that applied them)
    assert sched.update_steps(total) == [2, 4, 6, 8, 10, 12, 14]
    assert rec.changes == sched.update_steps(total)
    weights = [model.net[i].weight for i in (1, 3, 5)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.8 * sum(w.numel() for w in weights))
    assert cb.global_sparsity() == pytest.approx(0.8, abs=1e-3)
    # no mask buffers, no hooks left in the model
    assert set(model.state_dict()) == set(LitNet("mlp").state_dict())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_layer_scope_and_overrides(tmp_path):
    cb = Pruning(schedule=LinearSchedule(final=0.5, end=0.5), scope="layer", overrides={r"net\.5": 0.25})
    model, _, _ = _fit(tmp_path, cb)
    sparsity = [float((model.net[i].weight == 0).float().mean()) for i in (1, 3, 5)]
    assert sparsity == pytest.approx([0.5, 0.5, 0.25], abs=1 / 64)


def test_global_scope_with_override_ranks_overridden_layer_alone(tmp_path):
    cb = Pruning(schedule=OneShotSchedule(final=0.6, at=0.5), overrides={r"net\.1$": 0.9})
    model, _, _ = _fit(tmp_path, cb)
    assert float((model.net[1].weight == 0).float().mean()) == pytest.approx(0.9, abs=1e-3)
    rest = [model.net[3].weight, model.net[5].weight]
    assert sum(int((w == 0).sum()) for w in rest) == round(0.6 * sum(w.numel() for w in rest))


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    sched = IterativeSchedule(final=0.6, start=0, end=0.5, steps=3)
    cb = Pruning(schedule=sched)
    _, rec, trainer = _fit(tmp_path, cb, accumulate_grad_batches=2, max_epochs=2)
    total = trainer.estimated_stepping_batches
    assert total == 8
    assert rec.changes == [u + 1 if u == 0 else u for u in sched.update_steps(total)]
    assert cb.global_sparsity() == pytest.approx(0.6, abs=1e-3)


def test_nm_2_4_pattern_and_skips_indivisible_layers(tmp_path):
    cb = Pruning(schedule=LinearSchedule(final=0.5, start=0, end=0.5, frequency=4), granularity="nm")
    with pytest.warns(UserWarning, match=r"2:4 sparsity skips \['net.0'\]"):
        model, _, _ = _fit(tmp_path, cb, kind="cnn")
    w = model.net[3].weight.detach()
    groups = (w != 0).permute(0, 2, 3, 1).reshape(-1, 4)
    assert (groups.sum(1) <= 2).all()
    assert float(groups.float().mean()) == pytest.approx(0.5, abs=0.02)
    assert int((model.net[0].weight == 0).sum()) == 0


@pytest.mark.parametrize("criterion", [TaylorCriterion(), RandomCriterion(seed=1), "magnitude"])
def test_criteria_pluggable(tmp_path, criterion):
    cb = Pruning(schedule=OneShotSchedule(final=0.5, at=0.5), criterion=criterion, scope="layer")
    model, _, _ = _fit(tmp_path, cb)
    sparsity = [float((model.net[i].weight == 0).float().mean()) for i in (1, 3, 5)]
    assert sparsity == pytest.approx([0.5] * 3, abs=1 / 64)


def test_random_criterion_differs_from_magnitude(tmp_path):
    masks = {}
    for crit in ("magnitude", RandomCriterion(seed=0)):
        cb = Pruning(schedule=OneShotSchedule(final=0.5, at=0.5), criterion=crit)
        _fit(tmp_path, cb)
        masks[str(crit)] = cb.masks["net.1.weight"]
    a, b = masks.values()
    assert float((a == b).float().mean()) < 0.8


def test_channel_pruning_removes_channels_and_reloads(tmp_path):
    sched = PolynomialSchedule(final=0.5, start=0.0, end=0.5, frequency=2)
    cb = Pruning(schedule=sched, granularity="channel", remove_channels=True)
    ref = LitNet("resnet")
    n_dense = sum(p.numel() for p in ref.parameters())
    model, _rec, _trainer = _fit(tmp_path, cb, kind="resnet")
    assert all(int(k.sum()) <= k.numel() for k in cb._keeps.values())
    assert cb.global_sparsity() == pytest.approx(0.5, abs=0.07)
    n_thin = sum(p.numel() for p in model.parameters())
    assert n_thin < 0.5 * n_dense
    x = torch.randn(3, 1, 8, 8)
    model.eval()
    fresh = load_pruned(LitNet("resnet").eval(), cb.pruned_model_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))


def test_channel_removal_output_matches_masked_model(tmp_path):
    """Removal inside the callback keeps the function computed by the masked model (max diff recorded)."""
    cb = Pruning(schedule=OneShotSchedule(final=0.5, at=0.5), granularity="channel", remove_channels=True)
    seen = {}

    class Capture(Callback):
        def on_train_end(self, trainer, pl_module):  # runs after Pruning.on_train_end (callback order)
            seen["thin"] = sum(p.numel() for p in pl_module.parameters())

    _fit(tmp_path, cb, kind="cnn", extra=[Capture()])
    assert seen["thin"] < sum(p.numel() for p in LitNet("cnn").parameters())


def test_tensorboard_logging(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    cb = Pruning(schedule=PolynomialSchedule(final=0.7, end=0.5, frequency=4))
    _fit(tmp_path, cb, logger=logger, log_every_n_steps=1)
    ea = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "images": 0, "tensors": 0})
    ea.Reload()
    scalars = ea.Tags()["scalars"]
    for tag in ("pruning/target", "pruning/sparsity", "pruning/nonzeros", "pruning/layer_sparsity/net.1.weight"):
        assert tag in scalars
    target = [e.value for e in ea.Scalars("pruning/target")]
    assert target == sorted(target)
    assert target[-1] == pytest.approx(0.7)
    assert ea.Scalars("pruning/sparsity")[-1].value == pytest.approx(0.7, abs=1e-3)
    assert "pruning/weights/net.1.weight" in ea.Tags()["histograms"]
    assert "pruning/layer_sparsity" in ea.Tags()["images"]
    assert any(t.startswith("pruning/layers") for t in ea.Tags()["tensors"])


def test_rebind_after_optimizer_replaced(tmp_path):
    """Another callback (e.g. QAT) swapping the optimizer mid-training keeps the zeros."""

    class Swap(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                trainer.optimizers = [torch.optim.SGD(pl_module.parameters(), lr=0.1, momentum=0.9)]

    cb = Pruning(schedule=OneShotSchedule(final=0.5, at=0))
    _fit(tmp_path, cb, extra=[Swap()])  # Recorder asserts zeros after every step
    assert cb.global_sparsity() == pytest.approx(0.5, abs=1e-3)


def test_load_from_checkpoint_has_the_zeros(tmp_path):
    cb = Pruning(schedule=OneShotSchedule(final=0.75, at=0.5))
    model, _, trainer = _fit(tmp_path, cb)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = LitNet.load_from_checkpoint(path)
    for name, mask in cb.masks.items():
        assert (dict(loaded.named_parameters())[name][~mask] == 0).all()
    assert set(loaded.state_dict()) == set(model.state_dict())
    assert "masks" in torch.load(path, weights_only=False)["callbacks"][cb.state_key]


def test_fractions_follow_max_steps(tmp_path):
    """`end=1.0` is the last optimizer step of the run, whether max_steps or max_epochs ends it."""
    sched = LinearSchedule(final=0.6, start=0.0, end=1.0, frequency=3)
    cb = Pruning(schedule=sched)
    _, rec, trainer = _fit(tmp_path, cb, max_epochs=100, max_steps=10)
    assert trainer.estimated_stepping_batches == 10
    assert rec.changes == [u if u else 1 for u in sched.update_steps(10)]
    assert cb.global_sparsity() == pytest.approx(0.6, abs=1e-3)


def test_zeros_stay_zero_under_amp(tmp_path):
    cb = Pruning(schedule=PolynomialSchedule(final=0.7, end=0.5, frequency=2))
    model, _, _ = _fit(tmp_path, cb, precision="bf16-mixed")  # Recorder checks zeros after every step
    assert cb.global_sparsity() == pytest.approx(0.7, abs=1e-3)
    assert model.net[1].weight.dtype == torch.float32


def test_rebind_after_model_swapped_for_exported_graph(tmp_path):
    """A QAT-style callback swaps in a torch.export graph module mid-training; rebind keeps the zeros by name."""

    class SwapForExported(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch != 1:
                return
            example = (torch.zeros(16, 1, 8, 8),)
            batch = {0: torch.export.Dim("batch", min=2)}
            from torchao.quantization.pt2e import allow_exported_model_train_eval

            graph = torch.export.export(pl_module.net, example, dynamic_shapes=(batch,), strict=True).module()
            pl_module.net = allow_exported_model_train_eval(graph)
            trainer.optimizers = [torch.optim.Adam(pl_module.parameters(), lr=0.01)]
            missing = Pruning.find(trainer).rebind(pl_module, trainer.optimizers)
            assert missing == []

    cb = Pruning(schedule=PolynomialSchedule(final=0.8, start=0.0, end=1.0, frequency=2))
    model, rec, _ = _fit(tmp_path, cb, extra=[SwapForExported()], max_epochs=3)  # Recorder checks zeros each step
    assert isinstance(model.net, torch.fx.GraphModule)
    assert rec.changes[-1] == 24  # updates continued on the exported module
    assert cb.global_sparsity() == pytest.approx(0.8, abs=1e-3)
    weights = [p for n, p in model.named_parameters() if n in cb.masks]
    assert sum(int((w == 0).sum()) for w in weights) == round(0.8 * sum(w.numel() for w in weights))
