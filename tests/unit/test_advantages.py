import math

import pytest
import torch

from rayllm.algorithms import (
    RunningMoments,
    compute_gae,
    grpo_advantages,
    masked_mean,
    masked_whiten,
    normalize_rewards,
    reinforce_pp_advantages,
    reinforce_pp_returns,
    rloo_advantages,
    token_rewards,
)


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def test_masked_mean_by_hand():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0], [7.0, 8.0, 9.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert masked_mean(x, m).item() == pytest.approx((1 + 2 + 3) / 3)
    assert close(masked_mean(x, m, dim=1), [1.5, 3.0, 0.0])  # empty row -> 0, not nan


def test_masked_whiten_by_hand_and_stats():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    # masked mean = 2, biased var = (1 + 0 + 1) / 3 = 2/3, so (x - 2) / sqrt(2/3); padding -> 0
    s = math.sqrt(2 / 3)
    assert close(masked_whiten(x, m), [[-1 / s, 0.0, 1 / s, 0.0]])
    assert close(masked_whiten(x, m, shift_mean=False), [[2 - 1 / s, 2.0, 2 + 1 / s, 0.0]])

    torch.manual_seed(0)
    x = torch.randn(4, 9) * 5 + 3
    m = (torch.rand(4, 9) > 0.4).long()
    w = masked_whiten(x, m)
    sel = w[m.bool()]
    assert sel.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert sel.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert (w[~m.bool()] == 0).all()


def test_gae_1x3_by_hand():
    r = torch.tensor([[1.0, 0.0, 2.0]])
    v = torch.tensor([[0.5, 1.0, 1.5]])
    m = torch.ones(1, 3)
    # gamma = 0.9, lam = 0.8, gamma * lam = 0.72; V = 0 past the last token.
    # t=2: delta = 2 + 0.9*0   - 1.5 = 0.5    A2 = 0.5
    # t=1: delta = 0 + 0.9*1.5 - 1.0 = 0.35   A1 = 0.35 + 0.72*0.5  = 0.71
    # t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4    A0 = 1.4  + 0.72*0.71 = 1.9112
    # returns = A + V = [2.4112, 1.71, 2.0]
    adv, ret = compute_gae(r, v, m, gamma=0.9, lam=0.8)
    assert close(adv, [[1.9112, 0.71, 0.5]])
    assert close(ret, [[2.4112, 1.71, 2.0]])


def test_gae_padding_is_terminal_and_zero():
    # Row 0 as above plus one padded token; row 1 has 2 valid tokens, garbage on the padding.
    r = torch.tensor([[1.0, 0.0, 2.0, 9.0], [1.0, 2.0, 5.0, 5.0]])
    v = torch.tensor([[0.5, 1.0, 1.5, 9.0], [0.5, 1.0, 7.0, 7.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # row 1: t=1: delta = 2 + 0 - 1 = 1 (V beyond the end is 0, not 7), A1 = 1
    #        t=0: delta = 1 + 0.9*1 - 0.5 = 1.4, A0 = 1.4 + 0.72*1 = 2.12; returns [2.62, 2]
    adv, ret = compute_gae(r, v, m, gamma=0.9, lam=0.8)
    assert close(adv, [[1.9112, 0.71, 0.5, 0.0], [2.12, 1.0, 0.0, 0.0]])
    assert close(ret, [[2.4112, 1.71, 2.0, 0.0], [2.62, 2.0, 0.0, 0.0]])


def test_gae_properties():
    torch.manual_seed(1)
    r = torch.randn(3, 6)
    m = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5])
    rtg = torch.flip(torch.cumsum(torch.flip(r * m, [1]), 1), [1]) * m  # sum_{k >= t} r_k
    # lam = gamma = 1, V = 0: advantages are the reward-to-go, and so are the returns.
    adv, ret = compute_gae(r, torch.zeros(3, 6), m, gamma=1.0, lam=1.0)
    assert close(adv, rtg) and close(ret, rtg)
    # lam = gamma = 1 with a critic: the sum telescopes to A_t = rtg_t - V_t, returns stay rtg.
    v = torch.randn(3, 6, requires_grad=True)
    adv, ret = compute_gae(r, v, m, gamma=1.0, lam=1.0)
    assert close(adv, (rtg - v * m).detach()) and close(ret, rtg)
    assert not adv.requires_grad and not ret.requires_grad
    # lam = 0: one-step TD error r_t + gamma V_{t+1} - V_t.
    adv, _ = compute_gae(r, v, m, gamma=0.5, lam=0.0)
    v0 = (v * m).detach()
    nxt = torch.cat([v0[:, 1:], torch.zeros(3, 1)], 1)
    assert close(adv, (r + 0.5 * nxt - v0) * m)


def test_grpo_two_groups_by_hand():
    s = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    # group 1: mean 2, unbiased std sqrt((1 + 0 + 1) / 2) = 1      -> [-1, 0, 1]
    # group 2: mean 2, unbiased std sqrt((4 + 4 + 16) / 2) = sqrt(12) -> [-2, -2, 4] / sqrt(12)
    q = math.sqrt(12)
    assert close(grpo_advantages(s, 3, eps=0.0), [-1, 0, 1, -2 / q, -2 / q, 4 / q])
    assert close(grpo_advantages(s, 3, eps=1.0), [-0.5, 0, 0.5, -2 / (q + 1), -2 / (q + 1), 4 / (q + 1)])
    assert close(grpo_advantages(s, 3, normalize_std=False), [-1, 0, 1, -2, -2, 4])
    # A group where every sample scores the same carries no signal: 0, not nan.
    # [1, 3]: mean 2, unbiased std sqrt((1 + 1) / 1) = sqrt(2)
    d = math.sqrt(2) + 1e-6
    assert close(grpo_advantages(torch.tensor([5.0, 5.0, 1.0, 3.0]), 2), [0, 0, -1 / d, 1 / d])


def test_rloo_two_groups_by_hand():
    s = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    # group 1: 1 - (2+3)/2 = -1.5, 2 - (1+3)/2 = 0, 3 - (1+2)/2 = 1.5
    # group 2: 0 - (0+6)/2 = -3,   0 - (0+6)/2 = -3, 6 - (0+0)/2 = 6
    a = rloo_advantages(s, 3)
    assert close(a, [-1.5, 0, 1.5, -3, -3, 6])
    # identity: s_i - mean_{-i} = G/(G-1) * (s_i - mean_g)
    assert close(a, 1.5 * grpo_advantages(s, 3, normalize_std=False))


def test_reinforce_pp_reward_to_go_and_whitening():
    r = torch.tensor([[0.1, -0.2, 1.0, 9.0], [2.0, 7.0, 7.0, 7.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    # gamma 0.5, row 0: G2 = 1.0, G1 = -0.2 + 0.5*1.0 = 0.3, G0 = 0.1 + 0.5*0.3 = 0.25; row 1: G0 = 2
    g = reinforce_pp_returns(r, m, gamma=0.5)
    assert close(g, [[0.25, 0.3, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    # gamma 1: plain sums 0.9, 0.8, 1.0
    assert close(reinforce_pp_returns(r, m), [[0.9, 0.8, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    # whitened over the 4 valid entries of the batch {0.25, 0.3, 1.0, 2.0}: mean 3.55/4 = 0.8875,
    # squared deviations 0.40640625 + 0.34515625 + 0.01265625 + 1.23765625 = 2.001875, var = /4
    mu, sd = 0.8875, math.sqrt(2.001875 / 4)
    a = reinforce_pp_advantages(r, m, gamma=0.5)
    assert close(a, [[(0.25 - mu) / sd, (0.3 - mu) / sd, (1.0 - mu) / sd, 0.0], [(2.0 - mu) / sd, 0, 0, 0]])


def test_token_rewards_score_at_last_valid_token():
    scores = torch.tensor([2.0, -1.0, 5.0])
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.4, 0.4, 0.4], [1.0, 1.0, 1.0, 1.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    # kl_coef 0.5: row 0: [-0.05, -0.1, -0.15 + 2, 0]; row 1: [-0.2 - 1, 0, 0, 0];
    # row 2 has no response token: no penalty and no score.
    out = token_rewards(scores, kl, m, kl_coef=0.5)
    assert close(out, [[-0.05, -0.1, 1.85, 0.0], [-1.2, 0.0, 0.0, 0.0], [0.0] * 4])


def test_running_moments_match_concatenated_batches():
    rm = RunningMoments()
    # batch [1, 2, 3, 4]: mean 2.5, sample std sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3) = sqrt(5/3)
    bm, bs = rm.update(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert (bm, bs) == (pytest.approx(2.5), pytest.approx(math.sqrt(5 / 3)))
    assert (rm.mean, rm.var, rm.std) == (pytest.approx(2.5), pytest.approx(1.25), pytest.approx(math.sqrt(5 / 3)))
    rm.update(torch.tensor([10.0, 20.0]))
    # all six: mean 40/6, population var 530/6 - (40/6)^2 = 43.888...
    assert rm.mean == pytest.approx(40 / 6) and rm.var == pytest.approx(530 / 6 - (40 / 6) ** 2)
    torch.manual_seed(0)
    batches = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0]), torch.randn(3, 5) * 4 + 1,
               torch.tensor([-7.0])]
    rm.update(batches[2])
    rm.update(batches[3])
    allx = torch.cat([b.flatten() for b in batches]).double()
    assert rm.count == 4 + 2 + 15 + 1
    assert rm.mean == pytest.approx(allx.mean().item(), rel=1e-9)
    assert rm.var == pytest.approx(allx.var(unbiased=False).item(), rel=1e-9)
    assert rm.std == pytest.approx(allx.std().item(), rel=1e-9)


def test_normalize_rewards():
    rm = RunningMoments()
    s = torch.tensor([1.0, 2.0, 3.0])
    # running mean 2, sample std 1 -> [-1, 0, 1]; then the same clamped to [-0.5, 0.5]
    assert close(normalize_rewards(s, rm, clip=None), [-1.0, 0.0, 1.0])
    rm = RunningMoments()
    assert close(normalize_rewards(s, rm, clip=0.5), [-0.5, 0.0, 0.5])
    # next batch [5]: stats of {1, 2, 3, 5}: mean 2.75, sample var (3.0625+0.5625+0.0625+5.0625)/3
    out = normalize_rewards(torch.tensor([5.0]), rm, clip=None)
    assert out.item() == pytest.approx((5 - 2.75) / math.sqrt(8.75 / 3), rel=1e-5)
    assert close(normalize_rewards(torch.tensor([-3.0, 0.5, 3.0]), None, clip=1.0), [-1.0, 0.5, 1.0])
