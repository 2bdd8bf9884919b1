"""Per-token log-probabilities of given tokens."""
from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels[b, t] | ...) for logits [B, T, V] and labels [B, T] -> [B, T].

    Uses log_softmax in fp32 (logits of a bf16 model are upcast) so the result does not depend
    on the training precision more than it has to; the fused kernel replaces this later.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum()
