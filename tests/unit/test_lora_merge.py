"""The merged LoRA weights a push hands the engines (rayllm.rollout.weights) are peft's own
merge_and_unload() weights, whatever the scaling rule (rsLoRA), the per-module rank and alpha,
the adapter's name or the layout of the adapted layers (Conv1D stores its weight transposed)."""
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rayllm.rollout.weights import lora_merge_spec, to_checkpoint_format


def _llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32))


def _peft(base, **lora):
    model = get_peft_model(base, LoraConfig(**lora), adapter_name="mine")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero: make every adapter change its layer
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


CASES = {
    "llama-rslora-patterns": (_llama, dict(r=4, lora_alpha=8, use_rslora=True,
                                           target_modules=["q_proj", "v_proj", "o_proj"],
                                           rank_pattern={"o_proj": 2}, alpha_pattern={"o_proj": 3})),
    "gpt2-conv1d": (_gpt2, dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pushed_lora_merge_equals_peft_merge_and_unload(case):
    torch.manual_seed(0)
    make, lora = CASES[case]
    model = _peft(make(), **lora)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # what the trainer pushes
    spec = lora_merge_spec(model)
    merged = to_checkpoint_format(state, spec)
    want = model.merge_and_unload().state_dict()
    assert sorted(merged) == sorted(want)
    for k in want:
        assert torch.allclose(merged[k], want[k], rtol=0, atol=1e-6), k
    # The adapters changed exactly the weights of the adapted modules (the deltas are not zero).
    base = {k.replace(".base_layer.", ".").removeprefix("base_model.model."): v
            for k, v in state.items() if "lora_" not in k}
    assert {k for k in want if not torch.equal(merged[k], base[k])} == {
        m.removeprefix("base_model.model.") + ".weight" for m in spec["scaling"]}


def test_merge_spec_carries_peft_scaling_per_module():
    """rsLoRA scales by alpha / sqrt(r), not alpha / r, and rank/alpha patterns differ per module."""
    _, lora = CASES["llama-rslora-patterns"]
    spec = lora_merge_spec(_peft(_llama(), **lora))
    assert spec["adapter"] == "mine" and spec["fan_in_fan_out"] == []
    s = spec["scaling"]
    assert len(s) == 2 * 3
    assert s["base_model.model.model.layers.0.self_attn.q_proj"] == pytest.approx(8 / math.sqrt(4))
    assert s["base_model.model.model.layers.1.self_attn.o_proj"] == pytest.approx(3 / math.sqrt(2))


def test_merge_refuses_a_spec_for_other_modules():
    _, lora = CASES["llama-rslora-patterns"]
    model = _peft(_llama(), **lora)
    spec = lora_merge_spec(model)
    spec["scaling"].pop("base_model.model.model.layers.0.self_attn.q_proj")
    with pytest.raises(ValueError, match="different modules"):
        to_checkpoint_format(model.state_dict(), spec)
    with pytest.raises(ValueError, match="lora_merge_spec"):
        to_checkpoint_format(model.state_dict(), None)
