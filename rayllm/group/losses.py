"""The losses a rank can train with, as adapters from a micro-batch to rayllm.algorithms.

Each adapter takes the rank engine and one micro-batch (tensors on the device) and returns the
loss *sum* over the micro-batch's counted units (target tokens, or pairs), their count, and sums
of diagnostics. The rank scales the sum by world_size / global_count, so a step's update is the
mean over the whole global batch whatever the world size and micro-batch split; the driver turns
the diagnostic sums into means the same way.

Per-token inputs of the PPO losses (old log-probs, advantages, ...) are [B, T-1], aligned with the
targets input_ids[:, 1:]; `loss_mask[:, 1:]` marks the response tokens that count.
"""
from __future__ import annotations

import torch

from rayllm.algorithms import (
    entropy_from_logits,
    pairwise_loss,
    policy_loss,
    sft_loss,
    token_logprobs,
    value_loss,
)


def sft(eng, mb: dict) -> tuple[torch.Tensor, int, dict]:
    s, n = sft_loss(eng._logits(mb), mb["input_ids"], mb["loss_mask"])
    return s, n, {}


def pairwise(eng, mb: dict, margin: float = 0.0) -> tuple[torch.Tensor, int, dict]:
    """Bradley-Terry on rows [chosen_0, rejected_0, chosen_1, ...]; a pair counts unless it is
    filler (all-zero mask)."""
    scores = eng._logits(mb).float().squeeze(-1)
    live = mb["loss_mask"].amax(dim=1)[0::2].float()
    chosen, rejected = scores[0::2], scores[1::2]
    loss = pairwise_loss(chosen, rejected, margin or None)
    return (loss * live).sum(), int(live.sum().item()), {
        "accuracy_sum": ((chosen > rejected).float() * live).sum(),
        "margin_sum": ((chosen - rejected) * live).sum(),
    }


def ppo_policy(eng, mb: dict, clip_eps: float = 0.2, dual_clip: float | None = None, entropy_coef: float = 0.0,
               temperature: float = 1.0) -> tuple[torch.Tensor, int, dict]:
    logits = eng._logits(mb)[:, :-1].float()
    if temperature not in (0.0, 1.0):
        logits = logits / temperature  # the footing the rollout log-probs were sampled on
    logp = token_logprobs(logits, mb["input_ids"][:, 1:])
    mask = mb["loss_mask"][:, 1:].float()
    loss, clipped = policy_loss(logp, mb["old_logprobs"], mb["advantages"], clip_eps, dual_clip, mb.get("is_weights"))
    entropy = entropy_from_logits(logits)
    total = loss - entropy_coef * entropy if entropy_coef else loss
    log_ratio = (logp - mb["old_logprobs"]).detach()
    return (total * mask).sum(), int(mask.sum().item()), {
        "policy_loss_sum": (loss.detach() * mask).sum(),
        "entropy_sum": (entropy.detach() * mask).sum(),
        "clipfrac_sum": (clipped.float() * mask).sum(),
        "approx_kl_sum": ((log_ratio.exp() - 1 - log_ratio) * mask).sum(),  # k3 of new vs old policy
    }


def ppo_value(eng, mb: dict, clip_eps: float | None = 0.2) -> tuple[torch.Tensor, int, dict]:
    values = eng._values(mb)
    mask = mb["loss_mask"][:, 1:].float()
    loss = value_loss(values, mb["old_values"], mb["returns"], clip_eps)
    return (loss * mask).sum(), int(mask.sum().item()), {
        "value_loss_sum": (loss.detach() * mask).sum(),
        "value_mean_sum": (values.detach() * mask).sum(),
    }


LOSSES = {"sft": sft, "pairwise": pairwise, "ppo_policy": ppo_policy, "ppo_value": ppo_value}
