"""The two re-masking kernels: bit-identical training, the memory the compiled one saves, its fallback."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import seed_everything
from pruning_helpers import LitNet, loaders, make_trainer

from lightning_opt.pruning import Pruning, _remask
from lightning_opt.pruning._remask import AUTO_MIN_NUMEL, Remasker
from lightning_opt.schedules import PolynomialSchedule


def _train(tmp_path, remask: str) -> tuple[LitNet, Pruning]:
    seed_everything(0)
    model = LitNet("mlp")
    cb = Pruning(schedule=PolynomialSchedule(final=0.8, start=0.1, end=0.6, frequency=2), remask=remask)
    train, val = loaders()
    make_trainer(tmp_path / remask, [cb], max_epochs=3).fit(model, train, val)
    return model, cb


def test_compiled_and_foreach_train_to_bit_identical_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(_remask, "COMPILED_MIN_NUMEL", 0)  # the helper MLP's layers are small: compile them all
    kernels: dict[str, str] = {}

    class Spy(Remasker):
        def apply(self) -> None:
            super().apply()
            kernels[self.kernel] = self.resolved

    monkeypatch.setattr("lightning_opt.pruning._callback.Remasker", Spy)
    compiled, cb_c = _train(tmp_path, "compiled")
    foreach, cb_f = _train(tmp_path, "foreach")
    assert kernels == {"compiled": "compiled", "foreach": "foreach"}
    for (name, a), b in zip(compiled.state_dict().items(), foreach.state_dict().values()):
        assert torch.equal(a, b), name
    assert cb_c.global_sparsity() == pytest.approx(0.8, abs=1e-3)
    zeros = sum(int((compiled.net[i].weight == 0).sum()) for i in (1, 3, 5))
    assert zeros == round(0.8 * sum(compiled.net[i].weight.numel() for i in (1, 3, 5)))


def test_compiled_kernel_keeps_no_float_copies_of_the_masks():
    w = torch.randn(512, 256)
    mask = torch.rand(512, 256) > 0.7
    foreach, compiled = Remasker("foreach"), Remasker("compiled")
    foreach.set([(w.clone(), mask)])
    compiled.set([(w.clone(), mask)])
    assert foreach.extra_bytes() == w.numel() * 4  # a float32 copy of the mask
    assert compiled.extra_bytes() == 0  # reads the bool mask itself


def test_auto_compiles_only_large_cpu_models():
    small = torch.randn(64, 64)
    large = torch.randn(AUTO_MIN_NUMEL // 1024, 1024)
    r = Remasker("auto")
    r.set([(small, torch.rand_like(small) > 0.5)])
    assert r.resolved == "foreach"
    mask = torch.rand_like(large) > 0.9
    expected = large * mask
    r.set([(large, mask), (small, torch.ones_like(small, dtype=torch.bool))])
    assert r.resolved == "compiled"
    r.apply()
    assert torch.equal(large, expected)


def test_a_failing_compile_falls_back_to_foreach_with_a_warning(monkeypatch):
    def broken(weight: torch.Tensor, mask: torch.Tensor) -> None:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(_remask, "_COMPILED", broken)
    w = torch.randn(300, 300)
    mask = torch.rand_like(w) > 0.5
    expected = w * mask
    r = Remasker("compiled")
    r.set([(w, mask)])
    with pytest.warns(UserWarning, match="compiled re-masking kernel failed.*no C\\+\\+ compiler"):
        r.apply()
    assert torch.equal(w, expected)
    assert r.resolved == "foreach"
    r.set([(w, mask)])  # later mask updates stay on the kernel that works
    assert r.resolved == "foreach"


def test_unknown_remask_kernel_is_refused():
    with pytest.raises(ValueError, match=r"`remask` must be one of \['auto', 'foreach', 'compiled'\], got 'fast'"):
        Pruning(schedule=PolynomialSchedule(final=0.5), remask="fast")  # type: ignore[arg-type]
