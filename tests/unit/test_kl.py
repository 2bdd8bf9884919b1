import math

import pytest
import torch

from rayllm.algorithms import AdaptiveKLController, FixedKLController, kl_estimate


def test_kl_estimators_at_known_log_ratio():
    lp = torch.tensor([[-1.0, -1.5, -2.0]])
    ref = torch.tensor([[-1.5, -1.0, -2.0]])  # log_ratio x = [0.5, -0.5, 0]
    assert torch.allclose(kl_estimate(lp, ref, "k1"), torch.tensor([[0.5, -0.5, 0.0]]))
    assert torch.allclose(kl_estimate(lp, ref, "k2"), torch.tensor([[0.125, 0.125, 0.0]]))  # 0.5 * 0.25
    # k3 = e^-x - 1 + x: x=0.5: 0.606531 - 0.5 = 0.106531; x=-0.5: 1.648721 - 1.5 = 0.148721
    assert torch.allclose(kl_estimate(lp, ref, "k3"), torch.tensor([[0.106531, 0.148721, 0.0]]), atol=1e-6)
    with pytest.raises(ValueError):
        kl_estimate(lp, ref, "k4")


def test_k3_nonnegative_and_estimators_unbiased():
    torch.manual_seed(0)
    x = torch.randn(1000) * 5
    assert (kl_estimate(x, torch.zeros_like(x), "k3") >= 0).all()
    # pi = [0.7, 0.2, 0.1], ref = [0.4, 0.4, 0.2]; KL(pi||ref) = sum pi log(pi/ref)
    pi, rf = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    exact = (pi * (pi / rf).log()).sum().item()  # 0.7 ln 1.75 + 0.2 ln 0.5 + 0.1 ln 0.5 = 0.183799
    assert exact == pytest.approx(0.7 * math.log(1.75) + 0.3 * math.log(0.5))
    y = torch.multinomial(pi, 200_000, replacement=True)
    for kind in ("k1", "k3"):
        assert kl_estimate(pi.log()[y], rf.log()[y], kind).mean().item() == pytest.approx(exact, abs=5e-3)


def test_kl_controllers():
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05
    # target 6, horizon 10000, n_steps 256:
    #   kl 9:   9/6 - 1 = 0.5 -> clipped to 0.2;  coef = 0.1 * (1 + 0.2 * 256/10000) = 0.100512
    #   kl 3:   -0.5 -> -0.2;                     coef = 0.1 * (1 - 0.00512)          = 0.099488
    #   kl 6.6: 0.1 (inside the clip);            coef = 0.1 * (1 + 0.1 * 0.0256)    = 0.100256
    for kl, want in [(9.0, 0.100512), (3.0, 0.099488), (6.6, 0.100256)]:
        c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
        c.update(kl, 256)
        assert c.value == pytest.approx(want, rel=1e-9)
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    c.update(9.0, 256)
    c.update(9.0, 256)
    assert c.value == pytest.approx(0.1 * 1.00512**2, rel=1e-9)
