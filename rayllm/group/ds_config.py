"""GroupConfig -> DeepSpeed config dict, and the memory estimate that guards against models
that cannot fit a configuration."""
from __future__ import annotations

from rayllm.config import GroupConfig


def owns_gradients(cfg: GroupConfig, trainable: bool) -> bool:
    """ZeRO-0 in fp32 has no DeepSpeed optimizer wrapper, and DeepSpeed records no gradient norm
    there: rayllm's rank reduces, measures and clips the gradients itself (RankEngine.train_step),
    with one norm over all of them instead of DeepSpeed's per-parameter clipping pass."""
    return trainable and cfg.zero_stage == 0 and cfg.precision.dtype == "fp32"


def deepspeed_config(cfg: GroupConfig, world_size: int, trainable: bool, on_gpu: bool) -> dict:
    stage = cfg.zero_stage
    zero: dict = {"stage": stage, "contiguous_gradients": True, "overlap_comm": on_gpu and stage >= 2}
    if cfg.offload_optimizer and trainable:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    p = cfg.precision
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.micro_batch_size * world_size,
        # rayllm owns the accumulation boundary: a rank runs as many micro-batches as it was
        # given and step() reduces, so batch arithmetic is never fixed to a world size here.
        "managed_gradient_accumulation": False,
        "gradient_clipping": 0.0 if owns_gradients(cfg, trainable) else (cfg.grad_clip or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": p.dtype == "bf16"},
        "fp16": {
            "enabled": p.dtype == "fp16",
            "loss_scale": 0,  # 0 = dynamic
            "initial_scale_power": p.initial_scale_power,
            "loss_scale_window": p.loss_scale_window,
            "hysteresis": p.hysteresis,
            "min_loss_scale": p.min_loss_scale,
        },
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def bytes_per_rank(n_params: int, cfg: GroupConfig, world_size: int, trainable: bool) -> dict[str, float]:
    """Model-state bytes one rank holds on its device and in host memory (activations excluded).

    Mixed precision with Adam needs 16 bytes/parameter: 2 (half weights) + 2 (half grads) + 12
    (fp32 master, momentum, variance); plain fp32 needs 4 + 4 + 8. ZeRO-1 shards the optimizer
    states, ZeRO-2 also the gradients, ZeRO-3 also the weights.
    """
    half = cfg.precision.dtype != "fp32"
    w = 2 if half else 4
    weights, grads = w * n_params, (w * n_params if trainable else 0)
    optim = ((12 if half else 8) * n_params) if trainable else 0
    s, n = cfg.zero_stage, world_size
    optim /= n if s >= 1 else 1
    grads /= n if s >= 2 else 1
    weights /= n if s >= 3 else 1
    device = weights + grads + optim
    host = 0.0
    if cfg.offload_optimizer and trainable:
        device, host = device - optim, host + optim
    if cfg.offload_params:
        device, host = device - weights, host + weights
    return {"device": device, "host": host}
