import math

import pytest
import torch

from rayllm.algorithms import (
    entropy_from_logits,
    pairwise_accuracy,
    pairwise_loss,
    policy_loss,
    truncated_is_weights,
    value_loss,
)


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def logps(ratios, old=-1.0):
    """(logprobs, old_logprobs) [1, n] whose exp-difference is `ratios`; logprobs requires grad."""
    old_lp = torch.full((1, len(ratios)), old)
    lp = (old_lp + torch.log(torch.tensor([ratios]))).requires_grad_()
    return lp, old_lp


def test_policy_loss_clip_cases_by_hand():
    # eps = 0.2, clip range [0.8, 1.2]; loss = max(-A*ratio, -A*clamp(ratio)):
    #   A=+1, r=1.5 (above): max(-1.5, -1.2) = -1.2  clipped (no gain for pushing further)
    #   A=+1, r=0.5 (below): max(-0.5, -0.8) = -0.5  unclipped
    #   A=-1, r=1.5 (above): max( 1.5,  1.2) =  1.5  unclipped
    #   A=-1, r=0.5 (below): max( 0.5,  0.8) =  0.8  clipped
    #   A=+2, r=1.1 (inside): -2.2                    unclipped
    lp, old = logps([1.5, 0.5, 1.5, 0.5, 1.1])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0]])
    loss, clipped = policy_loss(lp, old, adv, clip_eps=0.2)
    assert close(loss.detach(), [[-1.2, -0.5, 1.5, 0.8, -2.2]])
    assert clipped.tolist() == [[True, False, False, True, False]]
    # d(-A*ratio)/d logprob = -A*ratio on unclipped tokens, exactly 0 on clipped ones.
    loss.sum().backward()
    assert close(lp.grad, [[0.0, -0.5, 1.5, 0.0, -2.2]])
    assert (lp.grad[clipped] == 0).all() and (lp.grad[~clipped] != 0).all()


def test_policy_loss_dual_clip():
    # c = 3: for A < 0 the loss is capped at -c*A = 3.
    #   A=-1, r=4: max(4, 1.2) = 4 -> min(4, 3) = 3  (dual clip active, no gradient)
    #   A=-1, r=2: 2 < 3 stays 2                      (unclipped)
    #   A=+1, r=4: -1.2, ordinary clip; dual clip only applies to A < 0
    lp, old = logps([4.0, 2.0, 4.0])
    adv = torch.tensor([[-1.0, -1.0, 1.0]])
    loss, clipped = policy_loss(lp, old, adv, clip_eps=0.2, dual_clip=3.0)
    assert close(loss.detach(), [[3.0, 2.0, -1.2]])
    assert clipped.tolist() == [[True, False, True]]
    loss.sum().backward()
    assert close(lp.grad, [[0.0, 2.0, 0.0]])
    # without dual clip the first token would be the unbounded 4
    assert close(policy_loss(lp, old, adv, clip_eps=0.2)[0].detach(), [[4.0, 2.0, -1.2]])


def test_policy_loss_is_weights_scale_and_stay_detached():
    lp, old = logps([0.5, 1.1])
    adv = torch.tensor([[1.0, 2.0]])
    w = torch.tensor([[0.5, 2.0]], requires_grad=True)
    loss, _ = policy_loss(lp, old, adv, is_weights=w)
    # [-0.5, -2.2] * [0.5, 2.0]
    assert close(loss.detach(), [[-0.25, -4.4]])
    loss.sum().backward()
    assert w.grad is None
    assert close(lp.grad, [[-0.25, -4.4]])


def test_value_loss_clip_by_hand():
    # eps 0.2, old = 0, R = 1; V_clip = clamp(V, -0.2, 0.2)
    #   V= 0.5: max((0.5-1)^2 = 0.25, (0.2-1)^2 = 0.64) = 0.64 -> 0.32
    #   V=-0.5: max(2.25, (-0.2-1)^2 = 1.44) = 2.25            -> 1.125
    #   V= 0.1: inside the range, (0.1-1)^2 = 0.81              -> 0.405
    v = torch.tensor([[0.5, -0.5, 0.1]])
    old, ret = torch.zeros(1, 3), torch.ones(1, 3)
    assert close(value_loss(v, old, ret, clip_eps=0.2), [[0.32, 1.125, 0.405]])
    assert close(value_loss(v, old, ret, clip_eps=None), [[0.125, 1.125, 0.405]])


def test_entropy_from_logits():
    assert close(entropy_from_logits(torch.randn(2, 3, 1).expand(2, 3, 7)), torch.full((2, 3), math.log(7)))
    # p = [1/4, 3/4]: H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.562335
    h = entropy_from_logits(torch.tensor([[[0.0, math.log(3.0)]]]).to(torch.bfloat16))
    assert h.dtype == torch.float32 and h.item() == pytest.approx(0.562335, abs=2e-3)  # bf16 log 3
    assert entropy_from_logits(torch.tensor([[[0.0, -1000.0]]])).item() == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    z = torch.randn(2, 4, 11)
    ref = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    assert close(entropy_from_logits(z), ref)


def test_truncated_is_weights():
    trainer = torch.tensor([[-1.0, -1.0, -3.0, -0.5]], requires_grad=True)
    rollout = torch.tensor([[-1.5, -1.0, -1.0, -1.5]])
    # exp(0.5) = 1.648721, exp(0) = 1, exp(-2) = 0.135335, exp(1) = 2.718 capped at 2
    w = truncated_is_weights(trainer, rollout, cap=2.0)
    assert close(w, [[1.648721, 1.0, 0.135335, 2.0]])
    assert not w.requires_grad


def test_pairwise_loss_and_accuracy():
    assert close(pairwise_loss(torch.tensor([0.3, -2.0]), torch.tensor([0.3, -2.0])), [math.log(2)] * 2)
    # -logsigmoid(2) = log(1 + e^-2) = 0.126928; margin 1: log(1 + e^-1) = 0.313262
    assert close(pairwise_loss(torch.tensor([2.0]), torch.tensor([0.0])), [0.126928])
    assert close(pairwise_loss(torch.tensor([2.0]), torch.tensor([0.0]), margin=torch.tensor([1.0])), [0.313262])
    assert pairwise_loss(torch.tensor([0.0]), torch.tensor([100.0])).item() == pytest.approx(100.0)  # stable
    # [1>0, 2=2 tie, 3<5, 4>1] -> 2 of 4
    assert pairwise_accuracy(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.0, 2.0, 5.0, 1.0])) == 0.5
