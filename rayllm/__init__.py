"""rayllm: SFT -> reward model -> PPO on Ray, each model role a sharded DeepSpeed group."""
from rayllm.config import (
    SFT,
    GroupConfig,
    LoraConfig,
    ModelConfig,
    OptimizerConfig,
    Pipeline,
    PrecisionConfig,
    PrepSettings,
    RayConfig,
    RolloutConfig,
    SamplingConfig,
    SFTDataConfig,
    TrainConfig,
)

__all__ = [
    "SFT",
    "GroupConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimizerConfig",
    "Pipeline",
    "PrecisionConfig",
    "PrepSettings",
    "RayConfig",
    "RolloutConfig",
    "SamplingConfig",
    "SFTDataConfig",
    "TrainConfig",
]
