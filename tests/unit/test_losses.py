import math

import pytest
import torch

from rayllm.algorithms import sft_loss, token_logprobs
from rayllm.config import GroupConfig
from rayllm.group.ds_config import bytes_per_rank, deepspeed_config


def test_token_logprobs_matches_definition():
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(2.0), 0.0]]])  # p = [1/4, 3/4], [2/3, 1/3]
    lp = token_logprobs(logits, torch.tensor([[1, 0]]))
    assert torch.allclose(lp, torch.tensor([[math.log(0.75), math.log(2 / 3)]]))


def test_sft_loss_sums_masked_next_token_nll():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    s, n = sft_loss(logits, ids, mask)
    # By hand: position t predicts ids[:, t] from logits[:, t-1], counted where mask[:, t] == 1.
    expect = 0.0
    for b in range(2):
        for t in range(1, 5):
            if mask[b, t]:
                expect -= torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]].item()
    assert n == 5  # 3 in row 0 (t=2,3,4) + 2 in row 1 (t=1,2)
    assert s.item() == pytest.approx(expect, rel=1e-6)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1), reduction="none")
    assert s.item() == pytest.approx((ref * mask[:, 1:].reshape(-1)).sum().item(), rel=1e-6)


def test_memory_estimate_follows_zero_arithmetic():
    P = 1_000_000
    mixed = GroupConfig(zero_stage=0, precision={"dtype": "bf16"})
    assert bytes_per_rank(P, mixed, 1, True)["device"] == 16 * P  # 2 + 2 + 12 bytes/param
    assert bytes_per_rank(P, GroupConfig(zero_stage=0), 1, True)["device"] == 16 * P  # 4 + 4 + 8
    z1 = bytes_per_rank(P, mixed.model_copy(update={"zero_stage": 1}), 4, True)["device"]
    z2 = bytes_per_rank(P, mixed.model_copy(update={"zero_stage": 2}), 4, True)["device"]
    z3 = bytes_per_rank(P, mixed.model_copy(update={"zero_stage": 3}), 4, True)["device"]
    assert (z1, z2, z3) == (2 * P + 2 * P + 3 * P, 2 * P + 0.5 * P + 3 * P, 4 * P)
    off = bytes_per_rank(P, GroupConfig(zero_stage=3, offload_optimizer=True, offload_params=True,
                                        precision={"dtype": "bf16"}), 4, True)
    assert off == {"device": 0.5 * P, "host": 3.5 * P}
    assert bytes_per_rank(P, mixed, 1, trainable=False)["device"] == 2 * P


def test_deepspeed_config_reflects_group():
    cfg = GroupConfig(zero_stage=3, offload_optimizer=True, offload_params=True, micro_batch_size=2,
                      grad_clip=0.5, precision={"dtype": "fp16", "initial_scale_power": 12})
    ds = deepspeed_config(cfg, world_size=4, trainable=True, on_gpu=False)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 12, "loss_scale_window": 1000,
                          "hysteresis": 2, "min_loss_scale": 1.0}
    assert ds["train_batch_size"] == 8 and ds["gradient_clipping"] == 0.5
    assert ds["managed_gradient_accumulation"] is False
    # ZeRO-0 fp32: the rank clips with the norm it measures; DeepSpeed must not clip a second time.
    plain = GroupConfig(zero_stage=0, grad_clip=0.5)
    assert deepspeed_config(plain, world_size=2, trainable=True, on_gpu=False)["gradient_clipping"] == 0.0
    assert deepspeed_config(plain.model_copy(update={"zero_stage": 1}), 2, True, False)["gradient_clipping"] == 0.5
