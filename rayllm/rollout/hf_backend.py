"""The fallback engine: Hugging Face `generate` with a KV cache, behind the same interface as
vLLM, for environments without vLLM, and the baseline of bench/rollout.py."""
from __future__ import annotations

import torch

from rayllm.config import RolloutConfig, SamplingConfig
from rayllm.rollout.sample import Sample, stream_seed

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class HFBackend:
    def __init__(self, model_path: str, tokenizer_path: str, cfg: RolloutConfig, on_gpu: bool):
        from transformers import AutoModelForCausalLM

        from rayllm.models import load_tokenizer

        self.device = torch.device("cuda" if on_gpu else "cpu")
        # Weights only from safetensors (docs/security.md): a .bin checkpoint is a pickle.
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_DTYPES[cfg.dtype], use_safetensors=True,
                                                          local_files_only=True).to(self.device).eval()
        self.tok = load_tokenizer(tokenizer_path)
        self.eos = self.tok.eos_token_id
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos
        self.num_workers = 1

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], first_index: int, s: SamplingConfig,
                 key: tuple[int, ...] = ()) -> list[Sample]:
        T = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), T), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: generation continues every row at the end
            ids[i, T - len(p):] = torch.as_tensor(p)
            mask[i, T - len(p):] = 1
        # One stream per chunk, from the batch's key and the chunk's first prompt: a requeued
        # chunk (same prompts, same first index) draws the same samples again.
        torch.manual_seed(stream_seed(s.seed, key, first_index))
        greedy = s.temperature == 0
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), do_sample=not greedy,
            temperature=None if greedy else s.temperature, top_p=None if greedy else s.top_p, top_k=0,
            max_new_tokens=s.max_tokens, num_return_sequences=s.n, pad_token_id=self.pad,
            eos_token_id=None if s.ignore_eos else self.eos,
            stop_strings=s.stop or None, tokenizer=self.tok if s.stop else None,
            output_logits=True, return_dict_in_generate=True)
        new = out.sequences[:, T:].cpu()
        logits = torch.stack(out.logits, dim=1).float().cpu()  # raw logits of each generated step
        logp = torch.log_softmax(logits / (s.temperature if not greedy else 1.0), dim=-1)
        token_lp = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        samples = []
        for k in range(new.shape[0]):
            i, j = divmod(k, s.n)
            toks = new[k].tolist()
            n, stopped = self._end(toks, s)
            samples.append(Sample(first_index + i, j, list(prompts[i]), toks[:n], token_lp[k, :n].tolist(),
                                  "stop" if stopped else "length"))
        return samples

    def _end(self, toks: list[int], s: SamplingConfig) -> tuple[int, bool]:
        """Length of the response (through EOS or the first stop string) and whether it stopped
        rather than ran out of tokens; what follows is padding of a finished row."""
        if s.ignore_eos:
            return len(toks), False
        n = toks.index(self.eos) + 1 if self.eos in toks else len(toks)
        for m in range(1, n + 1) if s.stop else ():
            if any(self.tok.decode(toks[:m]).endswith(x) for x in s.stop):
                return m, True
        return n, self.eos in toks[:n]

    @torch.no_grad()
    def prompt_logprobs(self, rows: list[list[int]]) -> list[list[float]]:
        out = []
        for r in rows:
            ids = torch.as_tensor([r], device=self.device)
            logp = torch.log_softmax(self.model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            out.append(logp.gather(-1, ids[0, 1:, None]).squeeze(-1).cpu().tolist())
        return out

    def load_weights(self, state: dict, lora: dict | None = None) -> None:
        from rayllm.rollout.weights import prepare_state

        missing, unexpected = self.model.load_state_dict(prepare_state(state, lora), strict=False)
        if unexpected:
            raise ValueError(f"weights not in the model: {unexpected[:5]}")

    def open_channel(self, spec: dict, first_rank: int) -> list[int]:
        from rayllm.rollout.transport import Channel, ChannelSpec

        self.close_channel()
        self.channel = Channel(ChannelSpec(**spec), first_rank)
        return [first_rank]

    def receive(self, meta: list, lora: dict | None = None) -> None:
        self.load_weights(self.channel.recv_all(meta), lora)

    def close_channel(self) -> None:
        if getattr(self, "channel", None) is not None:
            self.channel.close()
        self.channel = None
