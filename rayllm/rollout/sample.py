"""What a rollout engine returns for one sampled response, and the random stream it is drawn with."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Sample:
    prompt_index: int  # position of the prompt in the batch given to RolloutPool.generate
    sample_index: int  # 0..n-1 among the samples of that prompt
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # of each response token under softmax(logits / temperature)
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    engine: int = -1  # which engine generated it
    version: int = 0  # the policy version of the weights that drew it (its updates; set by the pool)


def stream_seed(seed: int, key: tuple[int, ...], index: int) -> int:
    """The sampling seed of prompt `index` of a batch drawn under `key` (PPO: the pipeline seed
    and the iteration). A pure function of its arguments, so a prompt requeued to another engine
    draws the same stream as on the first, while every iteration draws fresh noise: a seed of
    `seed + index` alone gave slot k of every iteration the same noise. SeedSequence mixes the
    words, so nearby keys give unrelated seeds; 63 bits fit any generator's manual_seed."""
    words = [int(x) % 2**64 for x in (seed, *key, index)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))
