"""KL(pi || ref) per token from samples of pi, and controllers for the KL penalty coefficient."""
from __future__ import annotations

from typing import Literal

import torch


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                kind: Literal["k1", "k2", "k3"]) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) on tokens sampled from pi; [B, T] -> [B, T].

    With x = log pi(y_t) - log ref(y_t) (Schulman, "Approximating KL divergence", 2020):
        k1 = x                      unbiased, high variance, can be negative
        k2 = 0.5 * x^2              biased, low variance, >= 0
        k3 = exp(-x) - 1 + x        unbiased, low variance, >= 0 (since e^u >= 1 + u)
    k3 is (r - 1) - log r with r = ref / pi, whose expectation under pi is the KL.
    """
    x = logprobs.float() - ref_logprobs.float()
    if kind == "k1":
        return x
    if kind == "k2":
        return 0.5 * x**2
    if kind == "k3":
        return torch.expm1(-x) + x
    raise ValueError(f"unknown KL estimator {kind!r}")


class FixedKLController:
    """Constant KL coefficient; same interface as AdaptiveKLController."""

    def __init__(self, coef: float):
        self.value = coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Steers the KL coefficient towards a target KL (Ziegler et al. 2019, "Fine-tuning language
    models from human preferences"):

        e     = clip(current_kl / target - 1, -0.2, 0.2)
        coef *= 1 + e * n_steps / horizon

    so the coefficient grows while the policy drifts further than `target` and shrinks otherwise;
    the clip and `horizon` (in samples, as n_steps) keep each change small.
    """

    def __init__(self, init_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        err = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + err * n_steps / self.horizon
