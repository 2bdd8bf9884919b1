"""Advantage estimators and reward shaping for RL on sequences (PPO/GAE, GRPO, RLOO, REINFORCE++).

Shapes: B rows (samples), T response tokens; `mask` [B, T] is 1 on the response tokens of a row
(a contiguous run from t=0) and 0 on the padding after it. Everything here is bookkeeping on
rollout data, so it runs without grad and returns detached tensors.
"""
from __future__ import annotations

import math

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the entries where mask is 1 (over all of them, or along `dim`).

    An empty mask gives 0 rather than nan (the count is clamped to 1): a zero-length response
    must not poison a whole batch statistic.
    """
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with mean and (biased, unbiased=False) var over masked entries.

    Padding does not enter the statistics and is 0 in the output. With shift_mean=False the mean
    is added back (only the scale is normalised). The statistics are those of the tensor given:
    under data parallelism that is the local batch unless the caller gathers first.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


@torch.no_grad()
def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016); all tensors [B, T] -> (A, R) [B, T].

        delta_t = r_t + gamma * m_{t+1} * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
        R_t     = A_t + V_t          (the value target)

    m_{t+1} = 0 past the last response token: the episode ends there, so V = 0 beyond it
    (terminal, not bootstrapped). Rewards and values on padding are ignored; A and R are 0
    there. Unwhitened: whiten A with masked_whiten if wanted.
    """
    m = mask.to(values.dtype)
    r, v = rewards.detach() * m, values.detach() * m
    T = r.shape[1]
    adv = torch.zeros_like(v)
    last = torch.zeros_like(v[:, 0])
    for t in reversed(range(T)):
        m_next = m[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        v_next = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = r[:, t] + gamma * m_next * v_next - v[:, t]
        last = delta + gamma * lam * m_next * last
        adv[:, t] = last
    adv = adv * m
    return adv, (adv + v) * m


@torch.no_grad()
def grpo_advantages(scores: torch.Tensor, group_size: int, normalize_std: bool = True,
                    eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024): scores [N] -> [N].

    scores are ordered so each run of `group_size` consecutive entries are the samples of one
    prompt. A_i = (s_i - mean_g) / (std_g + eps), std with Bessel's correction (unbiased=True),
    as TRL 1.16's GRPOTrainer (scale_rewards="group": `nanstd(rewards.view(-1, G), dim=1)`, which
    applies count / (count - 1); its eps is 1e-4). A group whose samples all score the same gets 0.
    normalize_std=False gives s_i - mean_g (Dr. GRPO, Liu et al. 2025), which does not up-weight
    prompts whose samples nearly agree.
    """
    s = scores.detach().float().view(-1, group_size)
    adv = s - s.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (s.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


@torch.no_grad()
def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): scores [N] -> [N], groups as in grpo.

    A_i = s_i - (sum_g - s_i) / (G - 1): the baseline of a sample is the mean of the other
    G - 1 samples of its prompt, so it does not depend on the sample itself (unbiased).
    """
    assert group_size > 1, "RLOO needs at least two samples per prompt"
    s = scores.detach().float().view(-1, group_size)
    baseline = (s.sum(dim=1, keepdim=True) - s) / (group_size - 1)
    return (s - baseline).view(-1)


@torch.no_grad()
def reinforce_pp_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Discounted reward-to-go within the mask: G_t = r_t + gamma * m_{t+1} * G_{t+1}; [B, T] -> [B, T]."""
    m = mask.to(token_rewards.dtype)
    r = token_rewards.detach() * m
    out = torch.zeros_like(r)
    last = torch.zeros_like(r[:, 0])
    for t in reversed(range(r.shape[1])):
        m_next = m[:, t + 1] if t + 1 < r.shape[1] else torch.zeros_like(last)
        last = r[:, t] + gamma * m_next * last
        out[:, t] = last
    return out * m


@torch.no_grad()
def reinforce_pp_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): reward-to-go whitened over all response tokens of the batch; [B, T].

    No critic; the batch-wide whitening is the baseline (rather than a per-prompt group mean).
    """
    return masked_whiten(reinforce_pp_returns(token_rewards, mask, gamma), mask)


@torch.no_grad()
def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: scores [B], kl [B, T], mask [B, T] -> [B, T].

        r_t = -kl_coef * kl_t  on every response token,  + score  at the last response token

    (the OpenRLHF/TRL convention: the KL penalty is dense, the sequence score arrives when the
    episode ends). Rows with an empty mask get no score.
    """
    m = mask.to(kl.dtype)
    r = -kl_coef * kl.detach() * m
    pos = torch.arange(m.shape[1], device=m.device, dtype=m.dtype)
    last = (m * pos).argmax(dim=1, keepdim=True)  # index of the last 1 in each row
    has_any = (m.sum(dim=1, keepdim=True) > 0).to(r.dtype)
    return r.scatter_add(1, last, scores.detach().to(r.dtype).view(-1, 1) * has_any)


class RunningMoments:
    """Running mean and variance of all values seen, by Chan et al.'s merge of batch moments.

    Merging a batch (n, mean_b, var_b) into (N, mean, var), both variances biased:
        delta = mean_b - mean,  N' = N + n
        mean' = mean + delta * n / N'
        var'  = (N * var + n * var_b + delta^2 * N * n / N') / N'
    `.var` is the population variance of everything seen; `.std` is the sample std
    (sqrt(var * N / (N - 1)), as the RunningMoments of TRL's former PPO trainer). One update per batch, not per element.
    """

    def __init__(self):
        self.mean, self.var, self.std, self.count = 0.0, 1.0, 1.0, 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> tuple[float, float]:
        """Merge batch x (any shape) in; returns the batch's (mean, sample std)."""
        x = x.detach().double().flatten()
        n = x.numel()
        var_b, mean_b = torch.var_mean(x, unbiased=False)
        var_b, mean_b = var_b.item(), mean_b.item()
        delta, tot = mean_b - self.mean, self.count + n
        old_var = self.var if self.count else 0.0
        self.var = (self.count * old_var + n * var_b + delta**2 * self.count * n / tot) / tot
        self.mean += delta * n / tot
        self.count = tot
        self.std = math.sqrt(self.var * tot / max(tot - 1, 1))
        return mean_b, math.sqrt(var_b * n / max(n - 1, 1))


@torch.no_grad()
def normalize_rewards(scores: torch.Tensor, moments: RunningMoments | None, clip: float | None) -> torch.Tensor:
    """Scores [N] -> [N]: (s - running mean) / running std after merging this batch in, then
    clamped to [-clip, clip]. With moments=None only the clamp applies (None: no clamp either).

    Keeps the reward scale steady while the reward model's output drifts, so kl_coef and the
    value loss see the same magnitudes through training.
    """
    out = scores.detach().float()
    if moments is not None:
        moments.update(out)
        out = (out - moments.mean) / (moments.std + 1e-8)
    if clip is not None:
        out = out.clamp(-clip, clip)
    return out
