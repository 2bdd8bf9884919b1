"""Reward-model objective: Bradley-Terry on (chosen, rejected) pairs of scalar scores."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """-log sigmoid(chosen - rejected - margin) per pair; [N] -> [N], unreduced.

    Under Bradley-Terry P(chosen > rejected) = sigmoid(r_c - r_r), so this is the NLL of the
    preference. `margin` [N] (or scalar) asks for a larger gap on strongly preferred pairs
    (Llama 2). logsigmoid is stable for large negative gaps.
    """
    diff = chosen.float() - rejected.float()
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


@torch.no_grad()
def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> float:
    """Fraction of pairs with chosen strictly above rejected (ties count as wrong)."""
    return (chosen > rejected).float().mean().item()
