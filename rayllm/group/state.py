"""A rank's training state as world-size-free fragments, and an engine rebuilt from them.

A *snapshot* of a rank holds, for every trainable parameter, the contiguous range of its
flattened fp32 master weights that this rank owns, the same range of each optimizer state
(Adam's exp_avg, exp_avg_sq), and the scalars every rank shares (optimizer step, LR schedule,
loss scale, counters). Ranges are read from DeepSpeed's own partitioning, so the snapshots of
all ranks of one world size assemble into the full tensors, which an engine of another world
size cuts into its own partitions (`restore`). Elastic recovery uses this to rebuild a group over
the ranks still alive from the copies in their RAM (docs/elasticity.md).

DeepSpeed's universal checkpoints solve the same problem through files on disk; its
`safe_get_full_*` helpers all-reduce (a collective, impossible with a peer dead) and its
`safe_set_full_*` do not pad ZeRO-3's last partition, so the reads and writes are done here on
the same structures those helpers use.
"""
from __future__ import annotations

from typing import Any

import torch

Snapshot = dict[str, Any]  # {"params": {name: {"start", "numel", "full", "value", <state key>...}}, "scalars": {...}}


def _base_optimizer(engine):
    """The torch optimizer holding the Adam states (inside DeepSpeed's ZeRO / bf16 wrappers)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _zero3(engine) -> bool:
    return engine.zero_optimization_stage() == 3


def _trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _full_numel(p) -> int:
    return int(p.ds_numel) if hasattr(p, "ds_numel") else p.numel()


def _fragment_views(engine, p) -> tuple[int, int, dict[str, torch.Tensor]] | None:
    """(start, numel, {"value": master weights, key: optimizer state}) of this rank's range of p,
    as views into the live tensors (None when the rank owns no part of p)."""
    base = _base_optimizer(engine)
    if hasattr(p, "ds_id"):  # ZeRO-3: the rank's partition of every parameter, the last one padded
        opt = engine.optimizer
        part = p.ds_tensor.numel()
        start = opt._get_param_partition_rank(p) * part
        numel = max(0, min(part, _full_numel(p) - start))
        if numel == 0:
            return None
        group_idx, offset, n = opt.grad_position[opt.get_param_id(p)]
        flat = opt.fp32_partitioned_groups_flat[group_idx]
        views = {"value": flat.narrow(0, offset, n)[:numel]}
        for key, t in base.state.get(flat, {}).items():
            if torch.is_tensor(t) and t.shape == flat.shape:
                views[key] = t.narrow(0, offset, n)[:numel]
        return start, numel, views
    if hasattr(p, "_hp_mapping"):  # ZeRO-1/2 and DeepSpeed's bf16 optimizer
        m = p._hp_mapping
        if m is None:
            return None
        views = {"value": m.get_hp_fragment()}
        if m.optim_fragment is not None:  # linked by DeepSpeed at the first optimizer step
            views.update({key: m.get_hp_fragment(key) for key in m.get_optim_state_keys()})
        return m.lp_fragment_address.start, m.lp_fragment_address.numel, views
    # ZeRO-0 in fp32: the torch optimizer steps the model's own parameters
    views = {"value": p.data.view(-1)}
    views.update({k: t.view(-1) for k, t in base.state.get(p, {}).items() if torch.is_tensor(t) and t.shape == p.shape})
    return 0, p.numel(), views


def is_replicated(engine) -> bool:
    """Whether every rank holds the whole trainable state (ZeRO-0 in fp32): one rank's snapshot
    is then enough to rebuild any layout."""
    return not any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for _, p in _trainable(engine))


def _scalars(engine, step_count: int) -> dict:
    base = _base_optimizer(engine)
    steps = [st["step"] for st in base.state.values() if "step" in st]
    out = {
        "step_count": step_count,
        "optimizer_step": (float(steps[0]) if steps else None),
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups],
        "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "engine": {k: getattr(engine, k) for k in ("global_steps", "global_samples", "skipped_steps")},
    }
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is not None:
        out["loss_scaler"] = {k: v for k, v in vars(scaler).items() if isinstance(v, (int, float, bool, type(None)))}
    return out


def snapshot(engine, step_count: int) -> Snapshot:
    """This rank's fragments and the shared scalars, copied (the live tensors change next step)."""
    params = {}
    for name, p in _trainable(engine):
        got = _fragment_views(engine, p)
        if got is None:
            continue
        start, numel, views = got
        params[name] = {"start": start, "numel": numel, "full": _full_numel(p),
                        **{k: v.detach().to("cpu", torch.float32, copy=True) for k, v in views.items()}}
    return {"params": params, "scalars": _scalars(engine, step_count)}


def to_wire(snap: Snapshot) -> dict:
    """The snapshot packed for the object store: every fragment in one flat fp32 numpy array, plus
    the layout to cut it again. Ray pickles a torch tensor, and stores a numpy array with one copy
    into shared memory, per array: one flat array instead of a dict of tensors took a 6 MB put
    from 15 ms to a few here, against 2-3 ms for the copy the snapshot itself takes."""
    import numpy as np

    layout, parts, offset = [], [], 0
    for name, frag in snap["params"].items():
        meta = {k: v for k, v in frag.items() if not torch.is_tensor(v)}
        keys = []
        for k, v in frag.items():
            if torch.is_tensor(v):
                keys.append((k, offset, v.numel()))
                parts.append(v.reshape(-1))
                offset += v.numel()
        layout.append((name, meta, keys))
    flat = torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.float32)
    return {"flat": flat, "layout": layout, "scalars": snap["scalars"]}


def from_wire(wire: dict) -> Snapshot:
    """A snapshot fetched from the object store, in this process's own memory (one copy out of the
    read-only shared-memory view, so it outlives the rank that put it); fragments are views of it."""
    import numpy as np

    flat = torch.from_numpy(np.array(wire["flat"]))
    params = {name: {**meta, **{k: flat[o: o + n] for k, o, n in keys}} for name, meta, keys in wire["layout"]}
    return {"params": params, "scalars": wire["scalars"]}


class Exchange:
    """Rank r hands its snapshot to rank r-1 and takes rank r+1's, rank to rank over a gloo group
    of the ranks (host memory on every device), inside the step: no object store, and no second
    round trip from the driver. The layout (names, ranges, keys) is sent only when it changed,
    e.g. when ZeRO-1/2 link Adam's states at the first step; the shared scalars are the
    receiver's own (every rank has the same step, schedule and loss scale)."""

    def __init__(self, group, rank: int, world_size: int):
        self.group, self.rank, self.world_size = group, rank, world_size
        self._sent: bytes | None = None  # the layout last sent to rank r-1
        self._peer_layout: list | None = None  # the layout rank r+1 last sent

    def _sendrecv(self, send: list, recv: list) -> None:
        """The i-th tensor sent pairs with the neighbour's i-th received (by tag, not by order)."""
        import torch.distributed as dist

        dst, src = (self.rank - 1) % self.world_size, (self.rank + 1) % self.world_size
        reqs = ([dist.isend(t, dst, group=self.group, tag=i) for i, t in enumerate(send)]
                + [dist.irecv(t, src, group=self.group, tag=i) for i, t in enumerate(recv)])
        for r in reqs:
            r.wait()

    def swap(self, snap: Snapshot) -> Snapshot:
        """Send `snap` to rank r-1; returns rank r+1's snapshot of the same step, in this process's memory."""
        import json

        wire = to_wire(snap)
        layout = json.dumps(wire["layout"]).encode()
        changed = layout != self._sent
        header, peer_header = torch.tensor([wire["flat"].size, len(layout) if changed else 0]), torch.empty(2, dtype=torch.int64)
        self._sendrecv([header], [peer_header])
        n, m = (int(x) for x in peer_header)
        peer_flat = torch.empty(n, dtype=torch.float32)
        send = [torch.from_numpy(wire["flat"])] + ([torch.frombuffer(bytearray(layout), dtype=torch.uint8)] if changed else [])
        recv = [peer_flat] + ([peer_layout := torch.empty(m, dtype=torch.uint8)] if m else [])
        self._sendrecv(send, recv)
        self._sent = layout
        if m:
            self._peer_layout = json.loads(bytes(peer_layout.numpy()))
        if self._peer_layout is None:
            raise RuntimeError("snapshot exchange: no layout from the neighbour")
        return {"params": {name: {**meta, **{k: peer_flat[o: o + c] for k, o, c in keys}}
                           for name, meta, keys in self._peer_layout},
                "scalars": snap["scalars"]}


def assemble(snapshots: list[Snapshot], name: str) -> dict[str, torch.Tensor]:
    """The full flat tensors of one parameter ({"value", <state key>...}) from the fragments of
    every rank of one world size. Raises KeyError naming the parameter if some range is missing."""
    frags = [s["params"][name] for s in snapshots if name in s["params"]]
    if not frags:
        raise KeyError(f"no snapshot holds parameter {name!r}")
    full, covered = frags[0]["full"], 0
    keys = [k for k in frags[0] if k not in ("start", "numel", "full")]
    out = {k: torch.zeros(full, dtype=torch.float32) for k in keys}
    seen = set()
    for f in frags:
        if f["start"] in seen:  # ZeRO-0: every rank holds the whole tensor
            continue
        seen.add(f["start"])
        covered += f["numel"]
        for k in keys:
            out[k][f["start"]: f["start"] + f["numel"]] = f[k]
    if covered != full:
        raise KeyError(f"snapshots cover {covered} of {full} elements of {name!r}")
    return out


@torch.no_grad()
def restore(engine, snapshots: list[Snapshot]) -> int:
    """Load the state the snapshots hold (all ranks of the world size they were taken at) into a
    freshly built engine of any world size; returns the step count they were taken at."""
    scalars = snapshots[0]["scalars"]
    base = _base_optimizer(engine)
    if scalars["optimizer_step"] is not None:
        _materialize_optimizer_state(engine, base, scalars["optimizer_step"], snapshots)
    for name, p in _trainable(engine):
        full = assemble(snapshots, name)
        got = _fragment_views(engine, p)
        if got is not None:
            start, numel, views = got
            for key, view in views.items():
                view.copy_(full[key][start: start + numel].view_as(view))
        _set_model_weight(p, full["value"], got)
    for g, saved in zip(base.param_groups, scalars["param_groups"]):
        g.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})  # JSON made tuples lists
    if scalars["scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(scalars["scheduler"])
    for k, v in scalars["engine"].items():
        setattr(engine, k, v)
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is not None and "loss_scaler" in scalars:
        for k, v in scalars["loss_scaler"].items():
            setattr(scaler, k, v)
    return scalars["step_count"]


def _materialize_optimizer_state(engine, base, step: float, snapshots: list[Snapshot]) -> None:
    """A fresh engine's Adam states do not exist until its first step: create them (zeros, the
    saved step) so restore can fill this rank's ranges, and let DeepSpeed link its fragments."""
    some = next((f for snap in snapshots for f in snap["params"].values()), {})
    keys = [k for k in some if k not in ("start", "numel", "full", "value")]
    # ZeRO-3 puts its fp32 partitions into the optimizer's param groups only while it steps them
    flats = (engine.optimizer.fp32_partitioned_groups_flat if _zero3(engine)
             else [p for g in base.param_groups for p in g["params"]])
    for flat in flats:
        st = base.state[flat]
        for k in keys:
            if k not in st:
                st[k] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        old = st.get("step")
        st["step"] = (torch.tensor(step, dtype=torch.float32, device=flat.device)
                      if old is None or torch.is_tensor(old) else type(old)(step))
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


@torch.no_grad()
def _set_model_weight(p, full: torch.Tensor, views) -> None:
    """The weights the forward uses (bf16/fp16 or fp32) from the restored master weights."""
    if hasattr(p, "ds_id"):  # ZeRO-3: this rank's partition of the module's parameter
        part = p.ds_tensor.numel()
        padded = torch.zeros(part * (len(full) // part + 2), dtype=torch.float32)
        padded[: len(full)] = full
        r = views[0] // part if views is not None else None
        if r is not None:
            p.ds_tensor.data.copy_(padded[r * part: (r + 1) * part].to(p.ds_tensor.dtype))
        return
    if p.data.data_ptr() != (views[2]["value"].data_ptr() if views else -1):
        p.data.copy_(full.view_as(p).to(p.dtype))
