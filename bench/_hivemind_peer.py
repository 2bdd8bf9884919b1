"""One hivemind peer for the Hivemind baseline of heterogeneous peers (bench/_hivemind_arm.py).

Runs with the python of the hivemind 1.1.12 venv (bench/hivemind_env.py), never the project's: it
imports only torch, transformers and hivemind (no rayllm).

    python _hivemind_peer.py --rank 0 --peers 2 --model-dir DIR --run-id RUN --dht-file F --ready-dir D \
        --target 32 --seq 128 --micro 4 --throttle 1 --warmup 5 --seconds 30 --out peer0.json

What it does:
- DHT on 127.0.0.1: rank 0 starts one (`host_maddrs=["/ip4/127.0.0.1/tcp/0"]`) and writes its visible
  multiaddrs to `--dht-file` (atomically); the other ranks wait for that file and join with
  `initial_peers` from it.
- `hivemind.Optimizer(dht, run_id, target_batch_size=--target, batch_size_per_step=--micro,
  optimizer=torch.optim.AdamW(model.parameters(), lr), use_local_updates=False, matchmaking_time,
  averaging_timeout, verbose=False)`: gradients are accumulated locally until the swarm has
  `target` samples, then averaged between peers (weighted by each one's samples) and applied.
  The averagers' matchmaking `request_timeout` (hivemind's default 3 s) is set below matchmaking_time
  (default: half of it), as hivemind's own warning asks, for both averagers (1.1.12 passes
  `averager_opts` to the state averager only, so the gradient averager gets it through
  `grad_averager_factory`); everything else is hivemind's default.
- Model: `AutoModelForCausalLM.from_pretrained(--model-dir, local_files_only=True)` (HF_HUB_OFFLINE=1);
  data: rows of `--seq` random token ids in [10, vocab), `--micro` rows per step, labels = inputs.
- Throttle k: after each micro-batch the peer sleeps (k - 1) x that micro-batch's measured compute time
  (forward + backward), as a device k times slower would take; the rule rayllm's BusyTimer uses.
- `--socket-dir`: the unix sockets of p2pd and its clients go there instead of /tmp/hivemind-*
  (`P2P._UNIX_SOCKET_PREFIX`), so the arm removes those a killed peer leaves.
- Start: every peer writes `ready-<rank>` (with its time) into `--ready-dir` after building its
  optimizer and waits for all `--peers`; t0 = the latest of those times, the same on every peer. The
  first `--warmup` seconds after t0 are not measured; the window is [t0 + warmup, t0 + warmup + seconds].

Instrumentation (hivemind 1.1.12's own state, read in its source: hivemind/optim/optimizer.py,
progress_tracker.py, grad_averager.py). An epoch (global step) ends in `Optimizer._update_global_epoch`;
the method is wrapped on the instance to record, on entry:
- `local_samples`: `opt.grad_averager.local_samples_accumulated`, this peer's samples in the step; it is
  exactly this peer's weight in the gradient all-reduce (GradientAverager.step sets
  `control.weight = self.local_samples_accumulated`), so the sum over the members of one all-reduce
  round is the batch the swarm really applied in that step;
- `tracker_samples`: `opt.tracker.global_progress.samples_accumulated`, the swarm total as this peer's
  progress tracker saw it when it decided to step (its own fresh count + the others' last DHT reports);
- `num_peers` from the tracker, and, from the wrapped `_average_gradients_and_load_into_optimizer` /
  `_load_local_gradients_into_optimizer`, the all-reduce round's `group_id` and size (GroupInfo.group_id,
  passed back by a GradientAverager subclass given as `grad_averager_factory` that only tags the round's
  result with it; the same id on every member, which is how the arm joins the peers' records of one global step: peers
  whose epoch counters differ by one do average together) and whether it fell back to local
  gradients (no averaging: a failed or lone round).
Samples thrown away when hivemind finds the peer out of sync (`load_state_from_peers`, which resets the
accumulators) are recorded too (`discarded`).

Output JSON (`--out`): the epochs (with times), samples processed in the window, wall seconds, epochs
completed in the window and, per epoch, the samples accumulated. A watchdog writes the JSON and exits
if the peer is still stuck in a hivemind call `--grace` seconds after the window ends.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import threading
import time
from pathlib import Path


class _Gathered(dict):
    """The all-reduce round's gathered metadata (what StepControl.result() returns), tagged with the
    round's group_id: pickled from the averager's process to the peer's with its attribute."""

    group_id: str | None = None


def _tagged_gradient_averager(base):
    """GradientAverager whose rounds report their GroupInfo.group_id (module-level name: pickling)."""
    global TaggedGradientAverager

    class TaggedGradientAverager(base):
        async def _aggregate_with_group(self, group_info, *args, **kwargs):
            out = _Gathered(await super()._aggregate_with_group(group_info, *args, **kwargs))
            out.group_id = group_info.group_id.hex()
            return out

    TaggedGradientAverager.__qualname__ = "TaggedGradientAverager"
    return TaggedGradientAverager


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--peers", type=int, default=2)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--dht-file", required=True, help="rank 0 writes its DHT multiaddrs here; others read")
    p.add_argument("--ready-dir", required=True)
    p.add_argument("--target", type=int, default=32, help="target_batch_size (rows per global step)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro", type=int, default=4, help="batch_size_per_step (rows per micro-batch)")
    p.add_argument("--throttle", type=float, default=1.0)
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--matchmaking-time", type=float, default=1.0)
    p.add_argument("--averaging-timeout", type=float, default=10.0)
    p.add_argument("--request-timeout", type=float, default=None,
                   help="matchmaking request_timeout of both averagers (default min(3, matchmaking-time / 2): "
                        "hivemind warns that one above min_matchmaking_time can deadlock matchmaking)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--join-timeout", type=float, default=120.0, help="for the DHT file and the ready barrier")
    p.add_argument("--grace", type=float, default=None,
                   help="seconds past the window before the watchdog gives up (default 2 x averaging-timeout + 10)")
    p.add_argument("--socket-dir", default=None,
                   help="where p2pd and its clients put their unix sockets (hivemind's default: /tmp/hivemind-*; "
                        "killed peers leave them behind); keep the path short (108-byte limit)")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def _wait_for(pred, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while not pred():
        if time.time() > end:
            raise TimeoutError(f"peer waited {timeout:.0f} s for {what}")
        time.sleep(0.05)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    import hivemind
    from hivemind.optim.grad_averager import GradientAverager
    from transformers import AutoModelForCausalLM

    if a.socket_dir:  # a class attribute read when each P2P (DHT, averagers) is created; forks inherit it
        from hivemind.p2p import P2P

        P2P._UNIX_SOCKET_PREFIX = f"/unix{os.path.abspath(a.socket_dir)}/hivemind-"

    torch.manual_seed(a.seed)  # same init everywhere (from_pretrained is deterministic anyway)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, local_files_only=True)
    model.train()
    vocab = int(model.config.vocab_size)

    dht_file = Path(a.dht_file)
    if a.rank == 0:
        dht = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True)
        _write_atomic(dht_file, json.dumps([str(m) for m in dht.get_visible_maddrs()]))
    else:
        _wait_for(dht_file.exists, a.join_timeout, f"the DHT address file {dht_file}")
        initial = json.loads(dht_file.read_text())
        dht = hivemind.DHT(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial, start=True)

    request_timeout = a.request_timeout if a.request_timeout is not None else min(3.0, a.matchmaking_time / 2)
    opt = hivemind.Optimizer(
        dht=dht, run_id=a.run_id, target_batch_size=a.target, batch_size_per_step=a.micro,
        optimizer=torch.optim.AdamW(model.parameters(), lr=a.lr), use_local_updates=False,
        matchmaking_time=a.matchmaking_time, averaging_timeout=a.averaging_timeout,
        load_state_timeout=max(a.averaging_timeout, 10.0), verbose=False,
        # 1.1.12 forwards averager_opts to the state averager only (despite its docstring): the gradient
        # averager gets the same request_timeout through its factory, a GradientAverager subclass that
        # only tags each round's result with its group id.
        averager_opts={"request_timeout": request_timeout},
        grad_averager_factory=functools.partial(_tagged_gradient_averager(GradientAverager),
                                                request_timeout=request_timeout))

    # --- instrumentation: wrap the instance's methods (hivemind calls them through self) -------------
    epochs: list[dict] = []
    discarded: list[dict] = []
    cur: dict = {}
    orig_update, orig_avg = opt._update_global_epoch, opt._average_gradients_and_load_into_optimizer
    orig_local, orig_load_state = opt._load_local_gradients_into_optimizer, opt.load_state_from_peers

    def update_global_epoch(*args, **kwargs):
        cur.clear()
        cur.update(epoch=int(opt.local_epoch), t_begin=time.time(),
                   local_samples=int(opt.grad_averager.local_samples_accumulated),
                   tracker_samples=int(opt.tracker.global_progress.samples_accumulated),
                   num_peers=int(opt.tracker.global_progress.num_peers), group_id=None, group_size=None,
                   fallback=False)
        orig_update(*args, **kwargs)
        cur.update(t_end=time.time(), new_epoch=int(opt.local_epoch))
        epochs.append(dict(cur))

    def average_gradients(control, *args, **kwargs):
        orig_avg(control, *args, **kwargs)
        try:
            if control is not None and control.done() and control.exception() is None:
                gathered = control.result(0)  # {peer_id: metadata} of the round, tagged with its group_id
                cur["group_id"], cur["group_size"] = getattr(gathered, "group_id", None), len(gathered)
        except BaseException:  # a failed round: recorded as the fallback below
            pass

    def load_local(*args, **kwargs):
        cur["fallback"] = True
        return orig_local(*args, **kwargs)

    def load_state(*args, **kwargs):
        lost = int(opt.grad_averager.local_samples_accumulated) if opt.grad_averager is not None else 0
        e0, t = int(opt.local_epoch), time.time()
        out = orig_load_state(*args, **kwargs)
        discarded.append({"t": t, "epoch": e0, "new_epoch": int(opt.local_epoch), "samples": lost})
        return out

    opt._update_global_epoch = update_global_epoch
    opt._average_gradients_and_load_into_optimizer = average_gradients
    opt._load_local_gradients_into_optimizer = load_local
    opt.load_state_from_peers = load_state

    # --- start barrier: t0 is the same on every peer --------------------------------------------------
    ready = Path(a.ready_dir)
    _write_atomic(ready / f"ready-{a.rank}", repr(time.time()))
    files = [ready / f"ready-{r}" for r in range(a.peers)]
    _wait_for(lambda: all(f.exists() for f in files), a.join_timeout, f"{a.peers} peers at the start barrier")
    t0 = max(float(f.read_text()) for f in files)
    while time.time() < t0:
        time.sleep(0.01)
    w0, w1 = t0 + a.warmup, t0 + a.warmup + a.seconds
    grace = a.grace if a.grace is not None else 2 * a.averaging_timeout + 10.0

    micro_log: list[tuple[float, float, float]] = []  # (end time, compute s, sleep s)
    written = threading.Lock()
    state = {"done": False}

    def write_result(reason: str) -> None:
        with written:
            if state["done"]:
                return
            state["done"] = True
            in_win = [e for e in epochs if w0 < e["t_end"] <= w1]
            mb = [m for m in micro_log if w0 < m[0] <= w1]
            res = {
                "rank": a.rank, "throttle": a.throttle, "target": a.target, "micro": a.micro, "seq": a.seq,
                "t0": t0, "window": [w0, w1], "wall_s": w1 - w0, "end_reason": reason,
                "samples_processed": len(mb) * a.micro,
                "samples_processed_total": len(micro_log) * a.micro,
                "compute_s": sum(m[1] for m in mb), "throttle_sleep_s": sum(m[2] for m in mb),
                "epochs_completed": len(in_win),
                "batch_per_epoch_tracker": [e["tracker_samples"] for e in in_win],
                "local_samples_per_epoch": [e["local_samples"] for e in in_win],
                "epochs": epochs, "discarded": discarded,
                "final_local_epoch": int(opt.local_epoch),
                "versions": {"hivemind": hivemind.__version__, "torch": torch.__version__},
            }
            _write_atomic(Path(a.out), json.dumps(res))

    def watchdog() -> None:
        while time.time() < w1 + grace:
            if state["done"]:
                return
            time.sleep(0.2)
        write_result("watchdog: stuck in a hivemind call past the window")
        print(f"[peer {a.rank}] still inside a hivemind call {grace:.0f} s after the window; exiting",
              file=sys.stderr, flush=True)
        os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()

    # --- training loop --------------------------------------------------------------------------------
    gen = torch.Generator().manual_seed(1000 + a.seed * 7919 + a.rank)
    while time.time() < w1:
        x = torch.randint(10, vocab, (a.micro, a.seq), generator=gen)
        c0 = time.perf_counter()
        opt.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        busy = time.perf_counter() - c0
        slept = 0.0
        if a.throttle > 1.0:
            slept = (a.throttle - 1.0) * busy
            time.sleep(slept)
        micro_log.append((time.time(), busy, slept))
        opt.step()  # accumulates; at the end of an epoch, averages with peers and applies
    write_result("window ended")

    # --- shutdown, bounded: the arm kills the process group anyway ----------------------------------------
    threading.Timer(15.0, lambda: os._exit(0)).start()
    try:
        opt.shutdown()
        dht.shutdown()
    finally:
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
