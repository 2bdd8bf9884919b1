"""Turn the policy's gathered state dict into the checkpoint-format weights an engine loads.

A LoRA policy is pushed merged: W = W_base + (alpha / r) * B @ A for every adapted module, under
the base model's parameter names. Engines then need no adapter support, and the verification
probe compares them with the trainer's adapted model, so an adapter that did not arrive shows
up as a log-prob gap.
"""
from __future__ import annotations

import torch

_PEFT_PREFIX = "base_model.model."


def prepare_state(state: dict[str, torch.Tensor], lora_scaling: float | None = None,
                  tied: bool = False) -> dict[str, torch.Tensor]:
    """What an engine reloads from a pushed state dict, whichever transport brought it: LoRA
    merged, and for a model with tied embeddings the output head handed over explicitly (vLLM's
    reload re-creates the embedding but left the tied head on the old tensor: the verification
    probe caught a 2.1-nat gap)."""
    state = to_checkpoint_format(state, lora_scaling)
    if tied and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    return state


def to_checkpoint_format(state: dict[str, torch.Tensor], lora_scaling: float | None = None) -> dict[str, torch.Tensor]:
    if not any(k.startswith(_PEFT_PREFIX) for k in state):
        return state
    if lora_scaling is None:
        raise ValueError("a LoRA state dict needs its scaling (alpha / r) to be merged")
    out = {}
    for name, w in state.items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        if ".base_layer." in name and name.endswith(".weight"):
            a = state[name.replace(".base_layer.", ".lora_A.default.")]
            b = state[name.replace(".base_layer.", ".lora_B.default.")]
            w = w + lora_scaling * (b.float() @ a.float()).to(w.dtype)
        name = name.replace(".base_layer.", ".")
        out[name.removeprefix(_PEFT_PREFIX)] = w
    return out
