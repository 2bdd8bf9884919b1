"""Loss functions and their building blocks, pure torch, testable on CPU without Ray."""
from rayllm.algorithms.advantages import (
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
from rayllm.algorithms.kl import AdaptiveKLController, FixedKLController, kl_estimate
from rayllm.algorithms.logprobs import masked_sum, token_logprobs
from rayllm.algorithms.ppo import entropy_from_logits, policy_loss, truncated_is_weights, value_loss
from rayllm.algorithms.reward import pairwise_accuracy, pairwise_loss
from rayllm.algorithms.sft import sft_loss

__all__ = [
    "AdaptiveKLController", "FixedKLController", "RunningMoments", "compute_gae", "entropy_from_logits",
    "grpo_advantages", "kl_estimate", "masked_mean", "masked_sum", "masked_whiten", "normalize_rewards",
    "pairwise_accuracy", "pairwise_loss", "policy_loss", "reinforce_pp_advantages", "reinforce_pp_returns",
    "rloo_advantages", "sft_loss", "token_logprobs", "token_rewards", "truncated_is_weights", "value_loss",
]
