"""PPO losses, per token and unreduced: every function returns [B, T]; the caller masks and sums,
then divides by the response-token count of the whole global batch (as sft_loss)."""
from __future__ import annotations

import torch


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                clip_eps: float = 0.2, dual_clip: float | None = None,
                is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate (Schulman et al. 2017); all inputs [B, T] -> (loss [B, T], clipped [B, T] bool).

        ratio = exp(logprobs - old_logprobs)
        loss  = -min(ratio * A, clamp(ratio, 1 - eps, 1 + eps) * A)
        dual clip c > 1, where A < 0:  loss = min(loss, -c * A)   (Ye et al. 2020)
        loss *= is_weights             (detached; e.g. truncated_is_weights)

    The dual clip bounds the loss of a token whose ratio has grown far above 1 with a negative
    advantage, which the plain clip leaves unbounded. `clipped` is True where a constant
    (clipped) branch was selected, i.e. the token gives no gradient: mean it for clipfrac.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped_term = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = torch.maximum(unclipped, clipped_term)
    clipped = clipped_term > unclipped
    if dual_clip is not None:
        assert dual_clip > 1, "dual_clip must be > 1"
        cap = -dual_clip * advantages
        dual = (advantages < 0) & (cap < loss)
        loss = torch.where(dual, cap, loss)
        clipped = clipped | dual
    if is_weights is not None:
        loss = loss * is_weights.detach()
    return loss, clipped


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               clip_eps: float | None = 0.2) -> torch.Tensor:
    """Clipped value loss; [B, T] -> [B, T].

        V_clip = old + clamp(V - old, -eps, eps)
        loss   = 0.5 * max((V - R)^2, (V_clip - R)^2)      (0.5 * (V - R)^2 if clip_eps is None)

    Pessimistic like the policy clip: the critic cannot profit from moving far from the values
    the advantages were computed with in a single step.
    """
    loss = (values - returns) ** 2
    if clip_eps is not None:
        v_clip = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        loss = torch.maximum(loss, (v_clip - returns) ** 2)
    return 0.5 * loss


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position; [B, T, V] -> [B, T], in fp32.

    H = logsumexp(z) - sum_v softmax(z)_v * z_v, which equals -sum p log p but never takes
    the log of a probability that underflowed to 0 (a very peaked row gives 0, not nan).
    """
    z = logits.float()
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1)


@torch.no_grad()
def truncated_is_weights(trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                         cap: float = 2.0) -> torch.Tensor:
    """Truncated importance sampling weights min(exp(trainer - rollout), cap); [B, T] -> [B, T].

    The rollout engine (vLLM, other kernels and precision) samples from a slightly different
    distribution than the trainer computes; weighting each token by pi_trainer / pi_rollout,
    truncated at `cap` to bound the variance, corrects that mismatch (Yao et al. 2025, "Your
    efficient RL framework secretly brings you off-policy RL training"). Detached: a weight,
    not a path for gradients.
    """
    return torch.exp(trainer_logprobs.float() - rollout_logprobs.float()).clamp(max=cap)
