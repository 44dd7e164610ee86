"""The loss library against hand-computed values and the properties in DESIGN.md."""

import math

import pytest
import torch
import torch.nn.functional as F

from codistill import losses
from codistill.config import LossConfig
from codistill.errors import ConfigError


def test_config_validates_divergences_against_the_registry_alone():
    """No second list: a divergence registered in codistill.losses is a valid loss.divergence, and an
    unknown one is refused naming every registered name."""
    with pytest.raises(ConfigError, match=r"^loss.divergence: got 'cosine'; allowed: 'kl' \| 'reverse_kl'"):
        LossConfig(divergence="cosine")
    losses.DIVERGENCES["cosine"] = lambda s, t, temperature: 1 - F.cosine_similarity(s, t, dim=-1)
    try:
        assert LossConfig(divergence="cosine").divergence == "cosine"
    finally:
        del losses.DIVERGENCES["cosine"]


def test_kl_hand_computed_and_direction():
    # p = teacher = [0.5, 0.5], q = student = [0.75, 0.25] at T = 1 (logits log p, log q)
    s = torch.tensor([[math.log(0.75), math.log(0.25)]])
    t = torch.tensor([[math.log(0.5), math.log(0.5)]])
    forward = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(p || q), teacher first
    reverse = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(q || p)
    assert losses.kl(s, t, 1.0).item() == pytest.approx(forward, rel=1e-5)
    assert losses.reverse_kl(s, t, 1.0).item() == pytest.approx(reverse, rel=1e-5)
    assert forward != pytest.approx(reverse, rel=1e-3)  # the test can tell a swapped direction
    # PyTorch's own kl_div(input=log q, target=p) is KL(p || q): the same as ours
    ref = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")
    assert losses.kl(s, t, 1.0).mean().item() == pytest.approx(ref.item(), rel=1e-5)


def test_temperature_applied_to_logits_before_softmax_and_t_squared_factor():
    s = torch.tensor([[2.0, 0.0, -1.0]])
    t = torch.tensor([[0.5, 1.0, 0.0]])
    T = 4.0
    p = F.softmax(t / T, -1)
    q = F.softmax(s / T, -1)
    expected = T**2 * (p * (p.log() - q.log())).sum()
    assert losses.kl(s, t, T).item() == pytest.approx(expected.item(), rel=1e-5)
    # T^2 factor: the same KL without it is T^2 smaller
    assert (losses.kl(s, t, T) / T**2).item() == pytest.approx((p * (p.log() - q.log())).sum().item(), rel=1e-5)


def test_js_hand_computed_symmetric_and_bounded():
    p = torch.tensor([0.5, 0.5])
    q = torch.tensor([0.9, 0.1])
    m = (p + q) / 2
    expected = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    s, t = q.log().unsqueeze(0), p.log().unsqueeze(0)
    assert losses.js(s, t, 1.0).item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses.js(s, t, 1.0).item() == pytest.approx(losses.js(t, s, 1.0).item(), rel=1e-6)
    far = losses.js(torch.tensor([[50.0, -50.0]]), torch.tensor([[-50.0, 50.0]]), 1.0).item()
    assert far <= math.log(2) + 1e-6 and far == pytest.approx(math.log(2), rel=1e-4)


def test_mse_hand_computed():
    s = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.tensor([[0.0, 2.0, 5.0]])
    assert losses.mse(s, t, 7.0).item() == pytest.approx((1 + 0 + 4) / 3)


@pytest.mark.parametrize("name", list(losses.DIVERGENCES))
def test_nonnegative_and_zero_iff_equal(name):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(32, 10, generator=g) * 3
    t = torch.randn(32, 10, generator=g) * 3
    d = losses.DIVERGENCES[name](s, t, 2.0)
    assert d.shape == (32,)
    assert (d > 0).all()
    assert losses.DIVERGENCES[name](s, s.clone(), 2.0).abs().max().item() < 1e-5


def test_batchmean_not_per_class_mean():
    # Two identical samples: the batch loss equals one sample's sum over classes
    # (a per-class mean would be C x smaller).
    s = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 2)
    t = torch.tensor([[0.0, 1.0, 0.0, 0.0]] * 2)
    d = losses.distillation_loss(s, [t], divergence="kl", temperature=1.0)
    one = losses.kl(s[:1], t[:1], 1.0).item()
    p, q = F.softmax(t[0], -1), F.softmax(s[0], -1)
    assert one == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-5)
    assert d.item() == pytest.approx(one, rel=1e-6)


def test_zscore_invariant_to_shift_and_scale_of_student_logits():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(16, 10, generator=g)
    t = torch.randn(16, 10, generator=g) * 5 + 2
    for name in losses.DIVERGENCES:
        base = losses.distillation_loss(s, [t], divergence=name, temperature=2.0, standardize=True)
        moved = losses.distillation_loss(3.7 * s - 11.0, [t], divergence=name, temperature=2.0, standardize=True)
        assert moved.item() == pytest.approx(base.item(), rel=1e-4, abs=1e-6), name
        plain = losses.distillation_loss(3.7 * s - 11.0, [t], divergence=name, temperature=2.0)
        assert plain.item() != pytest.approx(base.item(), rel=1e-2)  # without zscore it does change


def test_mse_gradient_is_twice_kl_gradient_at_high_temperature():
    """Hinton et al. 2015, sec. 2.1: with zero-mean logits and T >> |logits|, the T^2-scaled KD
    gradient (q - p) T tends to (s - t) / N, and d/ds of mean((s - t)^2) is 2 (s - t) / N."""
    g = torch.Generator().manual_seed(2)
    s = torch.randn(8, 10, generator=g)
    t = torch.randn(8, 10, generator=g)
    s, t = s - s.mean(-1, keepdim=True), t - t.mean(-1, keepdim=True)
    grads: dict[str, torch.Tensor] = {}
    for name in ("kl", "mse"):
        x = s.clone().requires_grad_(True)
        losses.DIVERGENCES[name](x, t, 1000.0).sum().backward()
        assert x.grad is not None
        grads[name] = x.grad
    ratio = grads["mse"] / grads["kl"]
    assert torch.allclose(ratio, torch.full_like(ratio, 2.0), rtol=1e-2)
    # at T = 1 the relation does not hold: the test distinguishes
    x = s.clone().requires_grad_(True)
    losses.kl(x, t, 1.0).sum().backward()
    assert x.grad is not None
    assert not torch.allclose(grads["mse"] / x.grad, torch.full_like(ratio, 2.0), rtol=1e-1)


def test_teacher_logits_are_detached():
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    loss = losses.distillation_loss(s, [t * 2], divergence="kl", temperature=2.0)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None  # no gradient leaks into another peer


def test_teacher_reduce_each_probs_logits():
    g = torch.Generator().manual_seed(3)
    s, t1, t2 = (torch.randn(6, 4, generator=g) for _ in range(3))
    T = 2.0
    each = losses.distillation_loss(s, [t1, t2], divergence="kl", temperature=T, teacher_reduce="each")
    assert each.item() == pytest.approx(
        0.5 * (losses.kl(s, t1, T).mean() + losses.kl(s, t2, T).mean()).item(), rel=1e-5
    )
    logits = losses.distillation_loss(s, [t1, t2], divergence="kl", temperature=T, teacher_reduce="logits")
    assert logits.item() == pytest.approx(losses.kl(s, (t1 + t2) / 2, T).mean().item(), rel=1e-5)
    probs = losses.distillation_loss(s, [t1, t2], divergence="kl", temperature=T, teacher_reduce="probs")
    p = (F.softmax(t1 / T, -1) + F.softmax(t2 / T, -1)) / 2
    q = F.softmax(s / T, -1)
    assert probs.item() == pytest.approx((T**2 * (p * (p.log() - q.log())).sum(-1)).mean().item(), rel=1e-5)
    assert len({round(v.item(), 5) for v in (each, logits, probs)}) == 3


def test_sample_weights_scale_terms():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    w = torch.tensor([1.0, 0.0, 2.0, 1.0])
    got = losses.distillation_loss(s, [t], divergence="js", temperature=1.5, sample_weights=w)
    assert got.item() == pytest.approx((losses.js(s, t, 1.5) * w).mean().item(), rel=1e-6)
    ones = losses.distillation_loss(s, [t], divergence="js", temperature=1.5, sample_weights=torch.ones(4))
    assert ones.item() == pytest.approx(losses.distillation_loss(s, [t], divergence="js", temperature=1.5).item())


def test_total_loss_alpha_and_burn_in():
    s = torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    t = torch.randn(8, 10)
    cfg = LossConfig(alpha=0.3, temperature=2.0, burn_in=5)
    ce = F.cross_entropy(s, y)
    before = losses.total_loss(s, y, [t], cfg, step=4)
    assert before.alpha == 0.0 and before.total.item() == pytest.approx(ce.item())
    after = losses.total_loss(s, y, [t], cfg, step=5)
    d = losses.kl(s, t, 2.0).mean()
    assert after.total.item() == pytest.approx((0.7 * ce + 0.3 * d).item(), rel=1e-5)
    none = losses.total_loss(s, y, None, cfg, step=50)
    assert none.alpha == 0.0 and none.total.item() == pytest.approx(ce.item())
