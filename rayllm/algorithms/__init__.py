"""Loss functions and their building blocks, pure torch, testable on CPU without Ray."""
from rayllm.algorithms.logprobs import masked_sum, token_logprobs
from rayllm.algorithms.sft import sft_loss

__all__ = ["masked_sum", "sft_loss", "token_logprobs"]
