import os

import pytest
import torch

from rayllm.config import ModelConfig
from rayllm.models import (SIZES, bundled_tokenizer_path, count_parameters, load_tokenizer, resolve_model,
                           tiny_model_path, value_model_from)


def test_tokenizer_round_trips_and_has_chat_template(tokenizer):
    text = "What is 12 + 7? ünïcode ✓ 日本"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer.eos_token == "<|end|>" and tokenizer.pad_token == "<|pad|>"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.endswith("<|assistant|>\n")


def test_builds_are_cached_by_content_hash():
    p1 = tiny_model_path("tiny-1m")
    mtime = os.path.getmtime(p1 / "model.safetensors")
    assert tiny_model_path("tiny-1m") == p1
    assert os.path.getmtime(p1 / "model.safetensors") == mtime
    assert tiny_model_path("tiny-1m", seed=1) != p1
    assert bundled_tokenizer_path() == bundled_tokenizer_path()


@pytest.mark.parametrize("size, lo, hi", [("tiny-1m", 0.5e6, 2e6), ("tiny-8m", 4e6, 12e6), ("tiny-30m", 20e6, 40e6)])
def test_sizes(size, lo, hi):
    assert size in SIZES
    assert lo < count_parameters(tiny_model_path(size)) < hi


def test_reward_and_critic_share_trunk(tmp_path, tiny_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    rm_path = value_model_from(tiny_path, tmp_path / "rm")
    lm = AutoModelForCausalLM.from_pretrained(tiny_path)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_path)
    assert rm.score.out_features == 1
    assert torch.equal(lm.model.layers[0].mlp.up_proj.weight, rm.model.layers[0].mlp.up_proj.weight)
    out = rm(input_ids=torch.tensor([[5, 6, 7]])).logits
    assert out.shape == (1, 1)
    critic = tiny_model_path("tiny-1m", kind="critic")
    assert AutoModelForSequenceClassification.from_pretrained(critic).config.num_labels == 1


def test_any_local_hf_directory_is_accepted(tmp_path, tiny_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_path).save_pretrained(tmp_path / "mine")
    load_tokenizer(tiny_path).save_pretrained(tmp_path / "mine")
    path, tok = resolve_model(ModelConfig(path=str(tmp_path / "mine")))
    assert path == tmp_path / "mine" and tok == path
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        ModelConfig(path=str(tmp_path / "nothing"))
