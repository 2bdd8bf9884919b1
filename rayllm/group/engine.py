"""One DeepSpeed rank: its model, optimizer and the operations a ModelGroup calls on it.

This module knows nothing of Ray, so the same code runs inside a Ray actor (rayllm.group.worker)
and under torchrun (bench/train_step.py), and the two can be compared like for like.
"""
from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from typing import Any

from rayllm.env import apply_worker_env

apply_worker_env()  # before torch/DeepSpeed pick an accelerator

import deepspeed  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from rayllm.algorithms import sft_loss  # noqa: E402
from rayllm.group.losses import LOSSES  # noqa: E402
from rayllm.config import GroupConfig  # noqa: E402
from rayllm.group.batching import materialize  # noqa: E402
from rayllm.group.ds_config import bytes_per_rank, deepspeed_config, owns_gradients  # noqa: E402
from rayllm.group.shm import release_shm  # noqa: E402
from rayllm.group.speed import BusyTimer, comm_clock, no_clock  # noqa: E402


def _buckets(named: list, limit: int) -> list[list]:
    """Consecutive (name, param) runs of at most `limit` bytes (full, unpartitioned sizes)."""
    out, cur, size = [], [], 0
    for name, p in named:
        n = (p.ds_numel if hasattr(p, "ds_numel") else p.numel()) * 4
        if cur and size + n > limit:
            out.append(cur)
            cur, size = [], 0
        cur.append((name, p))
        size += n
    return out + ([cur] if cur else [])


_BUCKET_BYTES = 256 * 2**20  # per gathered bucket of a weight push


def _work_tokens(micro_batches: list[dict]) -> int:
    """Tokens a rank computed for real (fillers excluded): the work its speed is measured in."""
    return sum(int(mb["attention_mask"].sum()) for mb in micro_batches if not mb.get("filler"))


class ModelDoesNotFit(RuntimeError):
    """The model's states exceed a rank's memory in the given configuration."""


def init_process_group(rank: int, world_size: int, master_addr: str, master_port: int, local_rank: int,
                       local_size: int, timeout_s: float = 300.0, rendezvous_timeout_s: float | None = None) -> None:
    """Join (or re-join) the group. Re-runnable: an existing group is torn down first, so a
    later elastic resize can call this again with a new world size and master.

    `rendezvous_timeout_s` bounds the wait for the other ranks to join (a rank that dies while
    the group forms would otherwise hold the rest for the whole collective timeout); collectives
    then get `timeout_s`."""
    on_gpu = torch.cuda.is_available()
    if dist.is_initialized():  # the old group's master names its shm files: read it before it is replaced
        old = (os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""))
        _forget_process_groups()
        release_shm(*old)
    # LOCAL_SIZE=1 keeps DeepSpeed's CPU shared-memory all-reduce off: it is set up once per process
    # (shm_initialize returns early after that), so after a re-formation a new rank would spin
    # forever waiting for files its surviving peers never create. Only DeepSpeed's
    # inference_all_reduce uses it; training's collectives run on gloo. rayllm's own count of
    # ranks per node is RAYLLM_LOCAL_SIZE (docs/elasticity.md).
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
        LOCAL_RANK=str(0 if on_gpu else local_rank), LOCAL_SIZE=str(local_size if on_gpu else 1),
        RAYLLM_LOCAL_SIZE=str(local_size),
    )
    if on_gpu:
        torch.cuda.set_device(0)  # Ray shows each rank only its own GPU
    deepspeed.init_distributed(
        dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False, rank=rank, world_size=world_size,
        init_method=f"tcp://{master_addr}:{master_port}",
        timeout=timedelta(seconds=rendezvous_timeout_s or timeout_s),
    )
    if rendezvous_timeout_s and rendezvous_timeout_s != timeout_s:
        from torch.distributed.distributed_c10d import _set_pg_timeout  # no public setter in torch 2.13

        _set_pg_timeout(timedelta(seconds=timeout_s))


def close_process_group() -> None:
    """Leave the group and free its shared memory (CPU); used when a rank shuts down."""
    if dist.is_initialized():
        addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
        _forget_process_groups()
        release_shm(addr, port)


def _forget_process_groups() -> None:
    """Tear down torch.distributed and every group DeepSpeed cached from it (module globals of
    deepspeed.utils.groups and the comm backend), so the next init starts clean."""
    import gc

    import deepspeed.comm.comm as ds_comm
    from deepspeed.utils import groups

    gc.collect()  # drop engines still referencing the old groups
    dist.destroy_process_group()
    ds_comm.cdb = None
    for name, value in list(vars(groups).items()):
        if name.startswith("_") and name.isupper() and not isinstance(value, str) and not callable(value):
            setattr(groups, name, {} if isinstance(value, dict) else None)
    groups.mesh_device = None
    groups.mpu = None


def _reset_zero3_counters() -> None:
    """ZeRO-3 numbers parameters (ds_id) and counts persisted ones in class attributes of
    zero.Init, and numbers modules in the mutable default argument of
    DeepSpeedZeRoOffload._register_deepspeed_module: per process, never reset. A rank that rebuilds
    its engine after a re-formation would number them on from its last engine while a fresh
    replacement starts at 0, and ZeRO-3's cross-rank check of which parameters and modules to
    fetch fails ("disagreement on list contents")."""
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.runtime.zero.partition_parameters import Init

    Init.param_id = 0
    Init.num_persisted_parameters = 0
    Init.num_persisted_elements = 0
    (module_count,) = DeepSpeedZeRoOffload._register_deepspeed_module.__defaults__
    module_count[0] = 0


def lr_scheduler(optimizer, opt_cfg, total_steps: int):
    """The LR schedule, torch's schedulers in sequence: a warm-up from lr / (warmup_steps + 1) to
    lr, then constant, or a linear or cosine decay to min_lr_ratio * lr over the remaining steps
    (at least one), held at that floor after them. DeepSpeed checkpoints the schedulers' state,
    their sizes included, so a resumed run continues the schedule it was saved with.

    Not transformers' `get_scheduler`: its warm-up starts at 0 (a first step that does nothing),
    its "linear" decays to 0 rather than to a floor, and its "cosine_with_min_lr" rises again past
    the end. LinearLR with start_factor 1 / (w + 1) gives rayllm's warm-up, (step + 1) / (w + 1)."""
    from torch.optim import lr_scheduler as lrs

    w, lo = opt_cfg.warmup_steps, opt_cfg.min_lr_ratio
    decay = max(1, total_steps - w)
    phases = [lrs.LinearLR(optimizer, start_factor=1 / (w + 1), end_factor=1.0, total_iters=w)] if w else []
    if opt_cfg.scheduler == "constant":
        phases.append(lrs.ConstantLR(optimizer, factor=1.0, total_iters=0))
    elif opt_cfg.scheduler == "linear":  # LinearLR holds end_factor after total_iters by itself
        phases.append(lrs.LinearLR(optimizer, start_factor=1.0, end_factor=lo, total_iters=decay))
    else:  # CosineAnnealingLR is periodic: a ConstantLR holds the floor after its half period
        phases += [lrs.CosineAnnealingLR(optimizer, T_max=decay, eta_min=lo * opt_cfg.lr),
                   lrs.ConstantLR(optimizer, factor=lo, total_iters=sys.maxsize)]
    ends = ([w] if w else []) + [w + decay]  # the step at which each phase hands over to the next
    return lrs.SequentialLR(optimizer, phases, milestones=ends[: len(phases) - 1])


def _allow_cpu_fp16() -> None:
    """DeepSpeed's CPU accelerator refuses fp16 unless oneDNN has native fp16 kernels, although
    torch computes fp16 on any CPU (slowly). Let it through, so fp16 with dynamic loss scaling
    runs DeepSpeed's real fp16 path on CPU too; on GPU nothing changes."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu" and not acc.is_fp16_supported():
        type(acc).is_fp16_supported = lambda self: True
        type(acc).supported_dtypes = lambda self: [torch.float, torch.bfloat16, torch.float16]


class RankEngine:
    """A model wrapped by deepspeed.initialize, with rayllm's step semantics:

    - `train_step` takes this rank's micro-batches and the token count of the *global* batch,
      so the loss is a global token mean whatever the world size or micro-batch split;
    - forward-only methods (`logprobs`, `eval_loss`) run under no_grad and work for frozen
      groups, whose DeepSpeed engine has no optimizer.
    """

    def __init__(self, name: str, model_path: str, kind: str, cfg: GroupConfig, trainable: bool,
                 total_steps: int = 1000, restore: list | None = None):
        self.name, self.kind, self.cfg, self.trainable = name, kind, cfg, trainable
        self.model_path = str(model_path)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.on_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda", 0) if self.on_gpu else torch.device("cpu")
        if not trainable and cfg.zero_stage in (1, 2):
            raise ValueError(f"group {name!r}: a frozen model needs zero_stage 0 or 3 (got {cfg.zero_stage})")
        if cfg.precision.dtype == "fp16":
            _allow_cpu_fp16()
        self._check_fits()
        _reset_zero3_counters()
        # Restoring trainable state from peers' snapshots (rayllm.group.state): every trainable
        # weight is overwritten, so without LoRA the model is built from its config, reading no weights.
        self.model = self._build_model(from_config=bool(restore) and trainable and not cfg.lora.enabled)
        self.ds_config = deepspeed_config(cfg, self.world_size, trainable, self.on_gpu)
        self._own_grads = owns_gradients(cfg, trainable)
        optimizer = scheduler = None
        params = [p for p in self.model.parameters() if p.requires_grad]
        if trainable:
            optimizer = self._optimizer(params)
            scheduler = lr_scheduler(optimizer, cfg.optimizer, total_steps)
        self.engine, *_ = deepspeed.initialize(
            model=self.model, model_parameters=params if trainable else None, optimizer=optimizer,
            lr_scheduler=scheduler, config=self.ds_config,
        )
        # Over one rank at ZeRO-0 there is nothing to reduce, but DeepSpeed would still flatten
        # every gradient into buckets, all-reduce them with itself and copy them back each step.
        if self._own_grads or (cfg.zero_stage == 0 and self.world_size == 1):
            self.engine.enable_backward_allreduce = False
        self.step_count = 0
        self._throttle = float(cfg.elastic.throttle.get(self.rank, 1.0))
        self.last_work = {"busy_s": 0.0, "work_tokens": 0, "samples": []}  # of the last forward call (speed.py)
        if restore and trainable:
            from rayllm.group.state import restore as restore_state

            self.step_count = restore_state(self.engine, restore)

    def _clock(self):
        """Times collectives (speed.py) only where the driver shares work by speed (on GPU the comms
        logger synchronises the device after every collective), or where a throttle needs busy time."""
        used = (self.cfg.elastic.balance and self.world_size > 1) or self._throttle > 1
        return comm_clock() if used else no_clock()

    # ---- construction -------------------------------------------------------------------------
    def _check_fits(self) -> None:
        from rayllm.models import count_parameters

        n = count_parameters(self.model_path, self.kind)
        need = bytes_per_rank(n, self.cfg, self.world_size, self.trainable)
        local_size = int(os.environ.get("RAYLLM_LOCAL_SIZE", "1"))
        host_avail = psutil.virtual_memory().available / max(1, local_size)
        if self.on_gpu:
            dev_avail = torch.cuda.mem_get_info()[0]
            checks = [("GPU", need["device"], dev_avail), ("host", need["host"], host_avail)]
        else:
            checks = [("host", need["device"] + need["host"], host_avail)]
        for where, b, avail in checks:
            if b > 0.9 * avail:
                c = self.cfg
                raise ModelDoesNotFit(
                    f"group {self.name!r}: {n / 1e6:.1f}M parameters need ~{b / 2**30:.2f} GiB of {where} memory "
                    f"per rank for model states alone with zero_stage={c.zero_stage}, dtype={c.precision.dtype}, "
                    f"offload_optimizer={c.offload_optimizer}, offload_params={c.offload_params} on "
                    f"{self.world_size} rank(s); rank {self.rank} has {avail / 2**30:.2f} GiB. Raise zero_stage, "
                    "add ranks, enable offload, or use a smaller model."
                )

    def _build_model(self, from_config: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        cls = AutoModelForCausalLM if self.kind == "causal_lm" else AutoModelForSequenceClassification
        if from_config:
            config = AutoConfig.from_pretrained(self.model_path, local_files_only=True)
            model = cls.from_config(config, dtype=torch.float32)
        else:
            # safetensors only: a pytorch_model.bin is a pickle (docs/security.md).
            model = cls.from_pretrained(self.model_path, dtype=torch.float32, local_files_only=True,
                                        use_safetensors=True)
        if self.cfg.gradient_checkpointing and self.trainable:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if self.cfg.lora.enabled:
            from peft import LoraConfig, TaskType, get_peft_model

            lc = self.cfg.lora
            task = TaskType.CAUSAL_LM if self.kind == "causal_lm" else TaskType.SEQ_CLS
            model = get_peft_model(model, LoraConfig(
                task_type=task, r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                target_modules=lc.target_modules, use_rslora=lc.use_rslora,
            ))
            if self.cfg.gradient_checkpointing:
                model.enable_input_require_grads()
        if not self.trainable:
            model.requires_grad_(False)
        return model

    def _optimizer(self, params):
        o = self.cfg.optimizer
        kw = dict(lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
        if self.cfg.offload_optimizer:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, adamw_mode=True, **kw)
        if self.on_gpu:
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(params, adam_w_mode=True, **kw)
        # The fused kernel is one pass over all parameters (CPU too, since torch 2.4): here it
        # takes a third of the for-each-parameter loop's time per step.
        return torch.optim.AdamW(params, fused=True, **kw)

    # ---- compute ------------------------------------------------------------------------------
    def _to_device(self, batch: dict) -> dict:
        batch = materialize(batch)
        return {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def _logits(self, mb: dict) -> torch.Tensor:
        if "position_ids" in mb:
            # Packed rows: no attention mask, so transformers builds the per-document causal
            # mask from the restarting position_ids (it does so only without a KV cache).
            return self.engine(input_ids=mb["input_ids"], position_ids=mb["position_ids"], use_cache=False).logits
        return self.engine(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False).logits

    def _values(self, mb: dict) -> torch.Tensor:
        """Per-token values of a critic (a sequence-classification model): its scalar head on
        every position, [B, T-1], the value of the state before each target token. The head's
        per-token output is caught by a hook during the ordinary forward, before the model pools
        it to the last token, so ZeRO-3 and LoRA wrap the forward as usual."""
        head = self._base_model().score
        caught = []
        handle = head.register_forward_hook(lambda _m, _i, out: caught.append(out))
        try:
            self._logits(mb)
        finally:
            handle.remove()
        return caught[0][:, :-1, 0].float()

    def train_step(self, micro_batches: list[dict], global_tokens: int | None, loss: str = "sft",
                   **loss_kwargs) -> dict[str, Any]:
        """One optimizer step over this rank's micro-batches.

        DeepSpeed averages gradients over ranks (divides by world size), so each micro-batch's
        summed loss is scaled by world_size / global_tokens: the update is then exactly that of
        the mean loss over every counted unit (target token, or pair) of the global batch. Rows
        sent by reference reach the driver unread, so then global_tokens is None and the ranks
        sum their counts of target tokens.
        """
        if not self.trainable:
            raise RuntimeError(f"group {self.name!r} is frozen and cannot train")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; known: {sorted(LOSSES)}")
        fn = LOSSES[loss]
        t0 = time.perf_counter()
        self.engine.train()
        micro_batches = [self._to_device(mb) for mb in micro_batches]
        if global_tokens is None:
            n = torch.tensor([sum(int(mb["loss_mask"][:, 1:].sum()) for mb in micro_batches)], device=self.device)
            if dist.is_initialized():
                dist.all_reduce(n)
            global_tokens = int(n.item())
        loss_sum, tokens, stats = 0.0, 0, {}
        scale = self.world_size / max(1, global_tokens)
        with self._clock() as comm:
            timer = BusyTimer(comm, self._throttle)
            for mb in micro_batches:
                with timer.micro_batch(int(mb["attention_mask"].sum())):
                    s, n, extra = fn(self, mb, **loss_kwargs)
                    self.engine.backward(s * scale, scale_wrt_gas=False)
                loss_sum, tokens = loss_sum + s.item(), tokens + n
                for k, v in extra.items():
                    stats[k] = stats.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
        grad_norm = None
        if self._own_grads:
            if self.world_size > 1:
                self.engine.buffered_allreduce_fallback()  # what DeepSpeed's own reduction calls
            params = [p for p in self.engine.module.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grads_with_norm_(params, self.cfg.grad_clip, norm, foreach=True)
            grad_norm = norm.item()
        self.engine.step()
        self.step_count += 1
        overflow = bool(getattr(self.engine.optimizer, "overflow", False))
        grad_norm = self.engine.get_global_grad_norm() if grad_norm is None else grad_norm
        out = {
            "loss_sum": loss_sum, "tokens": tokens, "skipped": overflow, "stats": stats,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": self.engine.get_lr()[0],
            "compute_s": time.perf_counter() - t0,
            "busy_s": timer.busy_s, "work_tokens": _work_tokens(micro_batches), "samples": timer.samples,
        }
        if self.cfg.precision.dtype == "fp16":
            out["loss_scale"] = float(self.engine.optimizer.cur_scale if hasattr(self.engine.optimizer, "cur_scale")
                                      else self.engine.optimizer.loss_scale)
        return out

    @torch.no_grad()
    def _each(self, micro_batches: list[dict], fn) -> list:
        """fn(micro-batch on the device) for each micro-batch, in eval mode, timed as busy seconds
        (speed.py) into `last_work`."""
        self.engine.eval()
        out, tokens = [], 0
        with self._clock() as comm:
            timer = BusyTimer(comm, self._throttle)
            for mb in micro_batches:
                mb = self._to_device(mb)
                tokens += _work_tokens([mb])
                with timer.micro_batch(int(mb["attention_mask"].sum())):
                    out.append(fn(mb))
        self.last_work = {"busy_s": timer.busy_s, "work_tokens": tokens, "samples": timer.samples}
        return out

    def eval_loss(self, micro_batches: list[dict]) -> dict[str, float]:
        res = self._each(micro_batches, lambda mb: sft_loss(self._logits(mb), mb["input_ids"], mb["loss_mask"]))
        return {"loss_sum": sum(s.item() for s, _ in res), "tokens": sum(n for _, n in res)}

    def logprobs(self, micro_batches: list[dict], temperature: float = 1.0) -> list[torch.Tensor]:
        """Per-token log-probs of each next token, [B, T-1] per micro-batch, on CPU, under the
        sampling distribution softmax(logits / temperature) (temperature 0, greedy, counts as 1)."""
        from rayllm.algorithms import token_logprobs

        t = temperature if temperature > 0 else 1.0

        def one(mb):
            logits = self._logits(mb)[:, :-1].float()
            return token_logprobs(logits / t if t != 1.0 else logits, mb["input_ids"][:, 1:]).cpu()

        return self._each(micro_batches, one)

    def values(self, micro_batches: list[dict]) -> list[torch.Tensor]:
        """Critic values per micro-batch, [B, T-1] each (see _values)."""
        return self._each(micro_batches, lambda mb: self._values(mb).cpu())

    def scores(self, micro_batches: list[dict]) -> list[torch.Tensor]:
        """Reward-model scores per micro-batch, [B] each: the scalar head at each row's last
        non-padding token (the model's own pooling)."""
        return self._each(micro_batches, lambda mb: self._logits(mb).float().squeeze(-1).cpu())

    # ---- state --------------------------------------------------------------------------------
    def snapshot(self):
        """This rank's trainable state in host RAM (rayllm.group.state); None for a frozen model."""
        from rayllm.group.state import snapshot

        return snapshot(self.engine, self.step_count) if self.trainable else None

    def _base_model(self):
        m = self.engine.module
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def _layout(self, adapter_only: bool = False) -> list[list[tuple[str, torch.Tensor]]]:
        """What a weight push sends, in order: buckets of (name, parameter), then the persistent
        buffers as one last bucket. `_gathered` and `weight_meta` both follow it, so the sender's
        buckets and the layout the receivers expect cannot drift apart."""
        module = self.engine.module
        named = [(n, p) for n, p in module.named_parameters() if not adapter_only or "lora_" in n]
        out = _buckets(named, _BUCKET_BYTES)
        if not adapter_only:
            persistent = module.state_dict().keys()
            buffers = [(n, b) for n, b in module.named_buffers() if n in persistent]
            out += [buffers] if buffers else []
        return out

    def _gathered(self, adapter_only: bool = False):
        """Yield the full weights a bucket at a time, gathered from every rank (ZeRO-3 shards
        included): [(name, tensor)] on rank 0, None elsewhere (layout: `_layout`). Peak memory
        stays one bucket above the shard. Every rank must iterate it to the end."""
        for bucket in self._layout(adapter_only):
            sharded = [p for _, p in bucket if hasattr(p, "ds_id")]
            # One gather per bucket of parameters (not per parameter): far fewer collectives.
            with deepspeed.zero.GatheredParameters(sharded, modifier_rank=None, enabled=bool(sharded)):
                yield [(name, p.detach()) for name, p in bucket] if self.rank == 0 else None

    def full_state_dict(self, adapter_only: bool = False) -> dict[str, torch.Tensor] | None:
        """The whole state dict, fp32 on CPU, on rank 0 (others get None); every rank must call it."""
        out: dict[str, torch.Tensor] = {}
        for bucket in self._gathered(adapter_only):
            for name, t in bucket or ():
                out[name] = t.to("cpu", torch.float32 if t.is_floating_point() else t.dtype).clone()
        return out if self.rank == 0 else None

    def weight_meta(self) -> list[list[tuple[str, tuple[int, ...]]]]:
        """The bucket layout `broadcast_weights` sends: names and full (unpartitioned) shapes."""
        shape = lambda p: tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)  # noqa: E731
        return [[(n, shape(p)) for n, p in bucket] for bucket in self._layout()]

    def lora_merge_spec(self) -> dict | None:
        """How the engines merge this model's pushed LoRA weights, read from peft's layers
        (rayllm.rollout.weights.lora_merge_spec); None without LoRA."""
        from rayllm.rollout.weights import lora_merge_spec

        return lora_merge_spec(self.engine.module) if self.cfg.lora.enabled else None

    def open_channel(self, spec_json: str) -> None:
        """Rank 0 joins the weight channel to the rollout engines as its sender."""
        import json

        from rayllm.rollout.transport import Channel, ChannelSpec

        self.close_channel()
        self._channel = Channel(ChannelSpec(**json.loads(spec_json)), rank=0)

    def close_channel(self) -> None:
        if getattr(self, "_channel", None) is not None:
            self._channel.close()
        self._channel = None

    def broadcast_weights(self) -> dict[str, float]:
        """Gather the weights bucket by bucket (every rank) and broadcast each bucket from rank 0
        over the weight channel as soon as it is gathered."""
        t, sent = time.perf_counter(), 0
        for bucket in self._gathered():
            if bucket is not None:
                sent += self._channel.send([x for _, x in bucket])
        return {"bytes": sent, "seconds": time.perf_counter() - t}

    def save_hf(self, path: str) -> None:
        """Hugging Face format: the full model, or only the adapter when LoRA is on. Rank 0
        writes into a temporary sibling that replaces `path` in one rename."""
        from rayllm.io import atomic_dir
        from rayllm.models import load_tokenizer

        lora = self.cfg.lora.enabled
        sd = self.full_state_dict(adapter_only=lora)
        if self.rank == 0:
            with atomic_dir(path) as tmp:
                module = self.engine.module
                if lora:
                    from peft.utils import get_peft_model_state_dict

                    module.save_pretrained(tmp, state_dict=get_peft_model_state_dict(module, state_dict=sd))
                else:
                    # The engine may have cast the module to bf16/fp16; save fp32 weights.
                    module.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
                load_tokenizer(self.model_path).save_pretrained(tmp)
        dist.barrier()

    def param_stats(self) -> dict[str, int]:
        """Parameters this rank holds against the model's total (ZeRO-3 partitions them)."""
        local = full = trainable_full = 0
        for p in self.engine.module.parameters():
            n = getattr(p, "ds_numel", p.numel())
            full += n
            local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
            trainable_full += n if p.requires_grad else 0
        return {"local": local, "full": full, "trainable": trainable_full, "rank": self.rank}
