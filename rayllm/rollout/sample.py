"""What a rollout engine returns for one sampled response."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Sample:
    prompt_index: int  # position of the prompt in the batch given to RolloutPool.generate
    sample_index: int  # 0..n-1 among the samples of that prompt
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # of each response token under softmax(logits / temperature)
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    engine: int = -1  # which engine generated it
