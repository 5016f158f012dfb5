from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_opt.distillation.losses import (
    FeatureAdapter,
    FeatureDistillationLoss,
    HintonLoss,
    KDLoss,
    agreement,
    feature_loss,
    hinton_loss,
    kd_loss,
)


def reference_kd(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    """Hinton et al. written out: T^2 * mean_n sum_c p_t (log p_t - log p_s)."""
    p_t = torch.softmax(t / temp, dim=1)
    log_p_s = torch.log_softmax(s / temp, dim=1)
    return (p_t * (torch.log(p_t) - log_p_s)).sum(dim=1).mean() * temp**2


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0, 20.0])
def test_kd_loss_matches_reference_and_kldivloss(temp: float) -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3
    expected = reference_kd(s, t, temp)
    torch.testing.assert_close(kd_loss(s, t, temp), expected)
    torch_ref = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(s / temp, 1), F.softmax(t / temp, 1)) * temp**2
    torch.testing.assert_close(kd_loss(s, t, temp), torch_ref)
    torch.testing.assert_close(KDLoss(temp)(s, t), expected)


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise() -> None:
    s = torch.randn(4, 5)
    assert kd_loss(s, s.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(s, torch.randn(4, 5), 3.0).item() > 0


def test_kd_gradient_is_t_times_softmax_difference() -> None:
    """d(T^2 KL)/ds = T (p_s - p_t) / N: the T^2 factor keeps the gradient scale ~independent of T."""
    temp = 4.0
    s = torch.randn(8, 10, requires_grad=True)
    t = torch.randn(8, 10, requires_grad=True)
    kd_loss(s, t, temp).backward()
    expected = temp * (torch.softmax(s.detach() / temp, 1) - torch.softmax(t.detach() / temp, 1)) / 8
    torch.testing.assert_close(s.grad, expected)
    assert t.grad is None, "the teacher's logits must be treated as constants"


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_hinton_loss_mixes_soft_and_hard_by_alpha(alpha: float) -> None:
    s, t, y = torch.randn(12, 10), torch.randn(12, 10), torch.randint(0, 10, (12,))
    expected = alpha * reference_kd(s, t, 2.0) + (1 - alpha) * F.cross_entropy(s, y)
    torch.testing.assert_close(hinton_loss(s, t, y, alpha=alpha, temperature=2.0), expected)
    torch.testing.assert_close(HintonLoss(alpha, 2.0)(s, t, y), expected)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_temperature_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match=r"`temperature` must be a finite number > 0"):
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), bad)
    with pytest.raises(ValueError, match=r"`temperature` must be a finite number > 0"):
        KDLoss(bad)
    with pytest.raises(ValueError, match=r"`temperature` must be a finite number > 0"):
        HintonLoss(0.5, bad)


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_alpha_must_be_in_unit_interval(bad: float) -> None:
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\], got"):
        hinton_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), alpha=bad)
    with pytest.raises(ValueError, match=r"`alpha` must be in \[0, 1\], got"):
        HintonLoss(bad)


def test_logit_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"same shape, got student \(2, 10\) and teacher \(2, 5\)"):
        kd_loss(torch.zeros(2, 10), torch.zeros(2, 5))


def test_feature_loss_is_mse_and_checks_shapes() -> None:
    a, b = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(feature_loss(a, b), ((a - b) ** 2).mean())
    with pytest.raises(ValueError, match="feature shapes differ"):
        feature_loss(torch.zeros(2, 3), torch.zeros(2, 4))


@pytest.mark.parametrize(
    ("student", "teacher", "mode", "has_params"),
    [
        ((8, 6, 6), (8, 6, 6), "identity", False),
        ((8, 6, 6), (16, 6, 6), "conv", True),
        ((8, 8, 8), (16, 4, 4), "conv", True),
        ((8, 2, 2), (16, 4, 4), "conv", True),
        ((32,), (64,), "linear", True),
        ((8, 2, 2), (20,), "linear", True),
    ],
)
def test_feature_adapter_maps_student_shape_to_teacher_shape(
    student: tuple[int, ...], teacher: tuple[int, ...], mode: str, has_params: bool
) -> None:
    adapter = FeatureAdapter(student, teacher)
    assert adapter.mode == mode
    assert adapter(torch.randn(3, *student)).shape == (3, *teacher)
    assert bool(list(adapter.parameters())) == has_params


def test_feature_distillation_loss_learns_the_adapter() -> None:
    """A 1x1 conv adapter can fit a teacher feature that is a channel mix of the student's: the loss must drop."""
    torch.manual_seed(0)
    mix = torch.randn(16, 8)
    s = torch.randn(64, 8, 4, 4)
    t = torch.einsum("oc,nchw->nohw", mix, s)
    loss_fn = FeatureDistillationLoss({"features.0": ((8, 4, 4), (16, 4, 4))})
    opt = torch.optim.Adam(loss_fn.parameters(), lr=0.05)
    first = loss_fn({"features.0": s}, {"features.0": t}).item()
    for _ in range(200):
        opt.zero_grad()
        loss = loss_fn({"features.0": s}, {"features.0": t})
        loss.backward()
        opt.step()
    assert loss.item() < 0.01 * first


def test_agreement_counts_matching_top1() -> None:
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [3.0, 0.0]])
    t = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    assert agreement(s, t).item() == pytest.approx(0.75)


def test_hinton_loss_takes_unlabelled_samples_in_the_soft_term_only() -> None:
    from lightning_opt.distillation.losses import hinton_loss, kd_loss

    torch.manual_seed(0)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    y = torch.tensor([0, -1, 2, -1, 4, 1])
    keep = y != -1
    expected = 0.3 * kd_loss(s, t, 2.0) + 0.7 * F.cross_entropy(s[keep], y[keep])
    torch.testing.assert_close(hinton_loss(s, t, y, alpha=0.3, temperature=2.0), expected)


def test_distillation_loss_counts_padding_tokens_nowhere() -> None:
    from lightning_opt.distillation.losses import distillation_loss, token_kd_loss

    torch.manual_seed(0)
    s, t = torch.randn(2, 4, 7), torch.randn(2, 4, 7)
    y = torch.tensor([[1, 2, -100, -100], [3, -1, 5, -100]])
    parts = distillation_loss(s, t, y, alpha=0.5, temperature=1.0)
    flat_s, flat_t, flat_y = s.reshape(-1, 7), t.reshape(-1, 7), y.reshape(-1)
    real = flat_y != -100
    labelled = real & (flat_y != -1)
    torch.testing.assert_close(parts.hard, F.cross_entropy(flat_s[labelled], flat_y[labelled]))
    torch.testing.assert_close(parts.soft, token_kd_loss(flat_s[real], flat_t[real], 1.0))
    torch.testing.assert_close(parts.loss, 0.5 * parts.soft + 0.5 * parts.hard)
