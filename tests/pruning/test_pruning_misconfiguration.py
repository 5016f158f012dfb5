"""Bad input fails before training, naming the argument, the value and what is allowed."""

from __future__ import annotations

import pytest
import torch
from pruning_helpers import LitNet, loaders, make_trainer

from lightning_opt.pruning import Pruning
from lightning_opt.schedules import LinearSchedule, OneShotSchedule, PolynomialSchedule


def P(**kwargs):
    kwargs.setdefault("schedule", PolynomialSchedule(final=0.5))
    return Pruning(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"schedule": 0.9}, TypeError, r"`schedule` must be a lightning_opt.schedules.Schedule, got 0.9"),
        ({"schedule": LinearSchedule(final=1.5)}, ValueError, r"`schedule.final` must be in \[0, 1\), got 1.5. HINT"),
        ({"schedule": LinearSchedule(final=0.3, initial=0.5)}, ValueError, r"`schedule.initial` must be in \[0, "),
        ({"granularity": "block"}, ValueError, r"`granularity` must be one of \['unstructured', 'channel', 'nm'\]"),
        ({"scope": "model"}, ValueError, r"`scope` must be one of \['global', 'layer'\], got 'model'"),
        ({"criterion": "l1"}, ValueError, r"`criterion` must be one of \['magnitude', 'random', 'taylor'\].*'l1'"),
        ({"granularity": "nm", "n": 4, "m": 4}, ValueError, r"`n` must be < `m` for N:M sparsity, got n=4, m=4"),
        ({"granularity": "nm", "n": 0}, ValueError, r"`n` and `m` must be ints with 1 <= n < m"),
        ({"granularity": "nm", "n": 1}, ValueError, r"`schedule.final` must be 0.75 for 1:4 sparsity"),
        ({"overrides": {"fc": 1.2}}, ValueError, r"`overrides\['fc'\]` must be a final sparsity in \[0, 1\), got 1.2"),
        ({"include": "conv[", "exclude": None}, ValueError, r"`include` pattern 'conv\[' is not a valid regex"),
        ({"remove_channels": True}, ValueError, r"`remove_channels=True` needs granularity='channel'"),
        ({"example_input_shape": [1, 0, 8]}, ValueError, r"`example_input_shape` must be a list of positive ints"),
    ],
)
def test_init_rules(kwargs, error, match):
    with pytest.raises(error, match=match):
        P(**kwargs)


def test_nm_overrides_rejected():
    with pytest.raises(ValueError, match="`overrides` cannot be used with granularity='nm'"):
        Pruning(schedule=LinearSchedule(final=0.5), granularity="nm", overrides={"x": 0.5})


def test_start_after_end_fails_in_schedule():
    with pytest.raises(ValueError, match=r"`start` \(0.9\) must not be after `end` \(0.5\)"):
        PolynomialSchedule(final=0.9, start=0.9, end=0.5)


def _fit(tmp_path, cb, kind="mlp", **kw):
    trainer = make_trainer(tmp_path, [cb], **kw)
    train, val = loaders()
    trainer.fit(LitNet(kind), train, val)
    return trainer


def test_include_matching_nothing_lists_prunable_modules(tmp_path):
    with pytest.raises(ValueError, match=r"`include` pattern 'fc' matches no prunable module.*\['net.1', 'net.3'"):
        _fit(tmp_path, P(include=["fc"]))


def test_override_matching_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"`overrides` pattern 'head' matches no pruned module"):
        _fit(tmp_path, P(overrides={"head": 0.2}))


def test_mixed_units_start_after_end_fails_at_setup(tmp_path):
    with pytest.raises(ValueError, match=r"`start` \(100 -> step 100\) must not be after `end` \(0.5 -> step 8\)"):
        _fit(tmp_path, P(schedule=LinearSchedule(final=0.5, start=100, end=0.5)))


def test_fractions_need_a_finite_run(tmp_path):
    with pytest.raises(ValueError, match="fraction of the total training steps, but the total is inf"):
        _fit(tmp_path, P(), max_epochs=-1, max_steps=-1)


def test_channel_without_example_input_traces_the_first_training_batch(tmp_path):
    model = LitNet("cnn")
    model.example_input_array = None
    cb = P(granularity="channel")
    make_trainer(tmp_path, [cb]).fit(model, *loaders())
    first_inputs = next(iter(loaders()[0]))[0]
    assert torch.equal(cb._example, first_inputs[:2])  # real values of the first batch, not made up


@pytest.mark.ddp
def test_remove_channels_rejects_multiprocessing_launchers(tmp_path):
    cb = Pruning(schedule=OneShotSchedule(final=0.5), granularity="channel", remove_channels=True)
    trainer = make_trainer(tmp_path, [cb], strategy="ddp_fork", devices=2)
    with pytest.raises(Exception, match="`remove_channels=True` cannot be used with strategy 'ddp_fork'"):
        trainer.fit(LitNet("cnn"), *loaders())
