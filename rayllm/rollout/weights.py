"""Turn the policy's gathered state dict into the checkpoint-format weights an engine loads.

A LoRA policy is pushed merged, under the base model's parameter names: for every adapted module
W = W_base + scaling * B @ A, as peft's own merge computes it, with the adapter name and each
module's scaling read from peft's layers on the trainer (`lora_merge_spec`), so rsLoRA
(alpha / sqrt(r)), per-module rank and alpha patterns and any adapter name merge as peft merges
them. Engines then need no adapter support, and the verification probe compares them with the
trainer's adapted model, so an adapter that did not arrive shows up as a log-prob gap.
"""
from __future__ import annotations

import torch

_PEFT_PREFIX = "base_model.model."


def lora_merge_spec(model) -> dict:
    """How `to_checkpoint_format` merges a peft model's state dict: {"adapter": the active
    adapter's name, "scaling": {module name: peft's scaling of it}, "fan_in_fan_out": [names of
    modules whose weight is stored transposed (Conv1D)]}. Module names are those of
    `model.named_modules()`, the prefixes of its state-dict keys. Only what this merge can
    reproduce is accepted: one active adapter, plain LoRA on linear layers."""
    from peft.tuners.lora import Linear, LoraLayer

    adapters = model.active_adapters
    if len(adapters) != 1:
        raise NotImplementedError(f"a weight push merges one active LoRA adapter; {adapters} are active")
    (adapter,) = adapters
    scaling, transposed = {}, []
    for name, m in model.named_modules():
        if not isinstance(m, LoraLayer) or adapter not in m.scaling:
            continue
        if type(m) is not Linear or adapter in m.lora_variant or m.lora_bias.get(adapter):
            raise NotImplementedError(f"{name}: a weight push merges plain LoRA on linear layers only, not "
                                      f"{type(m).__name__} with {m.lora_variant.get(adapter)} and "
                                      f"lora_bias={m.lora_bias.get(adapter)}")
        scaling[name] = float(m.scaling[adapter])
        if m.fan_in_fan_out:
            transposed.append(name)
    return {"adapter": adapter, "scaling": scaling, "fan_in_fan_out": transposed}


def prepare_state(state: dict[str, torch.Tensor], lora: dict | None = None,
                  tied: bool = False) -> dict[str, torch.Tensor]:
    """What an engine reloads from a pushed state dict, whichever transport brought it: LoRA
    merged (`lora` is the policy's `lora_merge_spec`), and for a model with tied embeddings the
    output head handed over explicitly (vLLM's reload re-creates the embedding but left the tied
    head on the old tensor: the verification probe caught a 2.1-nat gap)."""
    state = to_checkpoint_format(state, lora)
    if tied and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    return state


def to_checkpoint_format(state: dict[str, torch.Tensor], lora: dict | None = None) -> dict[str, torch.Tensor]:
    """A peft model's state dict merged into its base model's (see lora_merge_spec); any other
    state dict as it is."""
    if not any(k.startswith(_PEFT_PREFIX) for k in state):
        return state
    if lora is None:
        raise ValueError("a LoRA state dict needs the policy's lora_merge_spec to be merged")
    adapter, scaling, transposed = lora["adapter"], lora["scaling"], set(lora.get("fan_in_fan_out", ()))
    adapted = {k.split(".lora_A.")[0] for k in state if ".lora_A." in k}
    if adapted != set(scaling):
        raise ValueError(f"the LoRA merge spec and the pushed state name different modules: "
                         f"{sorted(adapted ^ set(scaling))[:3]}")
    out = {}
    for name, w in state.items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        module = name.removesuffix(".base_layer.weight") if name.endswith(".base_layer.weight") else None
        if module in scaling:  # peft's get_delta_weight: transpose(B @ A, fan_in_fan_out) * scaling
            a, b = state[f"{module}.lora_A.{adapter}.weight"], state[f"{module}.lora_B.{adapter}.weight"]
            delta = b.float() @ a.float()
            w = w + ((delta.T if module in transposed else delta) * scaling[module]).to(w.dtype)
        out[name.replace(".base_layer.", ".").removeprefix(_PEFT_PREFIX)] = w
    return out
