"""Supervised fine-tuning loss: next-token negative log-likelihood on response tokens only."""
from __future__ import annotations

import torch

from rayllm.algorithms.logprobs import masked_sum, token_logprobs


def sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed NLL over masked target tokens and their count.

    logits [B, T, V] predict input_ids shifted by one; loss_mask [B, T] marks the tokens whose
    prediction counts (response tokens). Returns the *sum* and the count, not the mean: the
    caller divides by the token count of the whole global batch, so the loss of a step is the
    same whatever the number of ranks and micro-batches it was split into.
    """
    logp = token_logprobs(logits[:, :-1], input_ids[:, 1:])
    mask = loss_mask[:, 1:].to(logp.dtype)
    return -masked_sum(logp, mask), int(mask.sum().item())
