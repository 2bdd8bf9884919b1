"""The Hivemind baseline of heterogeneous data-parallel peers: two `hivemind.Optimizer` peers, one
throttled k times, accumulating a global batch of `rows` rows between them.

    python bench/_hivemind_arm.py --model-dir DIR [--seconds 60] [--throttles 1,2,4] [--json out.json]

Usable from another bench script in the project's venv: `hivemind_arm(model_dir, rows, seq, micro)`
returns flat keys. It imports no hivemind itself: the peers (bench/_hivemind_peer.py) run with the
python of the separate hivemind 1.1.12 venv (bench/hivemind_env.py, built on first use), each in its own
session (process group), so the DHT process and the `p2pd` daemon it starts are killed with the peer's
group when the run ends, whatever happened.

For each throttle k: peer 0 unthrottled, peer 1 sleeping (k - 1) x each micro-batch's compute time;
target_batch_size = rows, batch_size_per_step = micro, seq tokens per row, AdamW, no local updates
(gradients averaged once per global step). Both peers start together (a file barrier), skip `warmup`
seconds and measure `seconds`. A global step is one gradient all-reduce round, the peers' records of it
joined by the round's group id (hivemind's epoch counters of two peers can differ by one and still
average together), or one peer's lone step on local gradients (a fallback). A step counts in the window
when the later of its peers finished it there; samples/s is taken between the first and the last of
those step ends, so only whole steps count. The batch a step applied is the sum, over the peers in the
round, of their local samples (each one's weight in the gradient all-reduce); hivemind triggers a step
on its progress tracker's swarm estimate, which lags, so steps can overshoot (or undershoot) the target.

Keys per k (`k` printed with %g: 1, 2, 4):
- hivemind_k{k}_samples_per_s: samples the swarm applied per second (both peers' samples in steps,
  between step ends; `_rate_span_s` is that span)
- hivemind_k{k}_mean_batch_per_step / _max_batch_per_step: rows applied per global step
- hivemind_k{k}_batch_overshoot_ratio: mean batch per step / target (1.0 = exact)
- hivemind_k{k}_steps: global steps completed in the window
and, to read them by: _processed_samples_per_s (micro-batches computed, applied or not),
_tracker_mean_batch_per_step (what the trackers believed when stepping), _fallback_steps (a peer used
its local gradients only), _discarded_samples (thrown away on an out-of-sync reload), _slow_peer_share
(peer 1's share of the applied samples), _batch_per_step (the list), _log_partial_allreduce and
_log_failed_rounds (hivemind's warnings "Reducer/Averaging: received N% ..." and "could not find a
group"/"Unable to run All-Reduce" in the peers' logs, whole run incl. warm-up and shutdown) and,
when k = 1 is run, _vs_ideal (samples/s over k1 / 2 x (1 + 1/k), the sum of the two peers' speeds).

Under CPU contention hivemind's rounds degrade: its next_chunk_timeout defaults to matchmaking_time, so
a late part is dropped ("Reducer: received 50% of input tensors") and that part is averaged over fewer
peers; the log counters above say how often. Compare runs only on a quiet machine, and in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEER = HERE / "_hivemind_peer.py"


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-n:])
    except OSError as e:
        return f"<unreadable: {e}>"


def _kill_group(p: subprocess.Popen) -> None:
    """SIGKILL the peer's whole process group: the peer, its hivemind child processes and p2pd."""
    try:
        os.killpg(p.pid, signal.SIGKILL)  # start_new_session: pgid == pid, valid while any member lives
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _fmt(k: float) -> str:
    return f"{k:g}"


def _run_pair(py: Path, model_dir: str, rows: int, seq: int, micro: int, k: float, seconds: float,
              warmup: float, matchmaking_time: float, averaging_timeout: float, lr: float, work: Path,
              join_timeout: float) -> list[dict]:
    """Two peers (0 unthrottled, 1 throttled k); returns their JSON results. Never waits forever."""
    run_id = f"rayllm_bench_k{_fmt(k).replace('.', '_')}_{os.getpid()}_{int(time.time())}"
    ready = work / "ready"
    ready.mkdir(parents=True, exist_ok=True)
    env = {key: v for key, v in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    grace = 2 * averaging_timeout + 10.0
    procs: list[tuple[subprocess.Popen, Path, Path]] = []
    sockets = tempfile.mkdtemp(prefix="hm-sock-")  # short: unix socket paths are limited to 108 bytes
    try:
        for rank, throttle in ((0, 1.0), (1, k)):
            out, log = work / f"peer{rank}.json", work / f"peer{rank}.log"
            cmd = [str(py), str(PEER), "--rank", str(rank), "--peers", "2", "--model-dir", model_dir,
                   "--run-id", run_id, "--dht-file", str(work / "dht.json"), "--ready-dir", str(ready),
                   "--target", str(rows), "--seq", str(seq), "--micro", str(micro), "--throttle", str(throttle),
                   "--warmup", str(warmup), "--seconds", str(seconds), "--matchmaking-time", str(matchmaking_time),
                   "--averaging-timeout", str(averaging_timeout), "--lr", str(lr), "--seed", "0",
                   "--join-timeout", str(join_timeout), "--grace", str(grace), "--socket-dir", sockets,
                   "--out", str(out)]
            with open(log, "w") as f:
                p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env,
                                     cwd=str(work), start_new_session=True)
            procs.append((p, out, log))
        # start-up (imports, model, DHT, barrier) + warm-up + window + the watchdog's grace + shutdown
        limit = join_timeout + warmup + seconds + grace + 30.0
        deadline = time.time() + limit
        while any(p.poll() is None for p, _, _ in procs):
            if time.time() > deadline:
                tails = "\n".join(f"--- peer {r} ({log}) ---\n{_tail(log)}" for r, (_, _, log) in enumerate(procs))
                raise RuntimeError(f"[hivemind] k={_fmt(k)}: peers still running after "
                                   f"{limit:.0f} s; killed their process groups.\n{tails}")
            time.sleep(0.2)
        results = []
        for r, (p, out, log) in enumerate(procs):
            text = log.read_text(errors="replace") if log.exists() else ""
            if p.returncode != 0 or not out.exists():
                raise RuntimeError(f"[hivemind] k={_fmt(k)}: peer {r} exited with rc={p.returncode}"
                                   f"{'' if out.exists() else ' and wrote no result'}\n"
                                   f"--- peer {r} ({log}) ---\n{_tail(log)}")
            res = json.loads(out.read_text())
            # hivemind's own complaints (its averagers log from their own processes, so from the logs):
            # an all-reduce that lost parts (a part then holds fewer peers' gradients) or that failed
            res["log_partial_allreduce"] = sum(text.count(m) for m in ("Reducer: received", "Averaging: received"))
            res["log_failed_rounds"] = sum(text.count(m) for m in ("could not find a group",
                                                                   "Unable to run All-Reduce"))
            results.append(res)
        return results
    finally:
        for p, _, _ in procs:
            _kill_group(p)
        shutil.rmtree(sockets, ignore_errors=True)


def _summarise(peers: list[dict], target: int) -> dict:
    """One global step = one gradient all-reduce round (the peers' records joined by its group_id: their
    epoch counters can differ by one and still average together), or a peer's lone step on its local
    gradients (a fallback). Steps count when the last of their peers finished them inside the window;
    the rate is taken between the first and the last such step ends (whole steps only)."""
    w0, w1 = peers[0]["window"]
    rounds: dict[str, list[tuple[int, dict]]] = {}
    lone: list[list[tuple[int, dict]]] = []
    for r, res in enumerate(peers):
        for e in res["epochs"]:
            if e.get("group_id") and not e["fallback"]:
                rounds.setdefault(e["group_id"], []).append((r, e))
            else:
                lone.append([(r, e)])
    steps = []
    for recs in [*rounds.values(), *lone]:
        t = max(e["t_end"] for _, e in recs)
        if w0 < t <= w1:
            steps.append({"t": t, "batch": sum(e["local_samples"] for _, e in recs),
                          "slow": sum(e["local_samples"] for r, e in recs if r == 1),
                          "tracker": [e["tracker_samples"] for _, e in recs],
                          "fallback": any(e["fallback"] or not e.get("group_id") for _, e in recs)})
    steps.sort(key=lambda st: st["t"])
    applied = sum(st["batch"] for st in steps)
    if len(steps) >= 2:
        span = steps[-1]["t"] - steps[0]["t"]
        rate = sum(st["batch"] for st in steps[1:]) / span
    else:
        span, rate = w1 - w0, applied / (w1 - w0)
    batches = [st["batch"] for st in steps] or [0]
    tracker = [x for st in steps for x in st["tracker"]] or [0]
    return {
        "samples_per_s": rate,
        "mean_batch_per_step": statistics.mean(batches),
        "max_batch_per_step": max(batches),
        "batch_overshoot_ratio": statistics.mean(batches) / target,
        "steps": len(steps),
        "rate_span_s": span,
        "processed_samples_per_s": sum(p["samples_processed"] for p in peers) / (w1 - w0),
        "tracker_mean_batch_per_step": statistics.mean(tracker),
        "fallback_steps": sum(st["fallback"] for st in steps),
        "discarded_samples": sum(d["samples"] for p in peers for d in p["discarded"] if w0 < d["t"] <= w1),
        "slow_peer_share": (sum(st["slow"] for st in steps) / applied) if applied else 0.0,
        "batch_per_step": [st["batch"] for st in steps],
        "log_partial_allreduce": sum(p.get("log_partial_allreduce", 0) for p in peers),
        "log_failed_rounds": sum(p.get("log_failed_rounds", 0) for p in peers),
    }


def hivemind_arm(model_dir: str, rows: int, seq: int, micro: int, throttles=(1.0, 2.0, 4.0),
                 seconds: float = 60.0, *, warmup: float = 5.0, matchmaking_time: float = 1.0,
                 averaging_timeout: float = 10.0, lr: float = 1e-3, join_timeout: float = 180.0,
                 work_dir: str | None = None) -> dict:
    """Run the two-peer hivemind swarm for each throttle k; flat `hivemind_k{k}_*` keys (see the module doc).
    `work_dir` keeps the peers' logs and JSON (a temporary directory, removed, when None)."""
    sys.path.insert(0, str(HERE))
    from hivemind_env import ensure_hivemind_venv

    py = ensure_hivemind_venv()
    res: dict = {"hivemind_target_batch": rows, "hivemind_seq": seq, "hivemind_micro_batch": micro,
                 "hivemind_seconds": seconds, "hivemind_warmup_s": warmup,
                 "hivemind_matchmaking_time": matchmaking_time, "hivemind_averaging_timeout": averaging_timeout}
    with tempfile.TemporaryDirectory(prefix="hivemind-arm-") as tmp:
        base = Path(work_dir) if work_dir else Path(tmp)
        for k in throttles:
            work = base / f"k{_fmt(k)}"
            work.mkdir(parents=True, exist_ok=True)
            for old in work.glob("*.json"):
                old.unlink()
            peers = _run_pair(py, str(model_dir), rows, seq, micro, float(k), seconds, warmup, matchmaking_time,
                              averaging_timeout, lr, work, join_timeout)
            for name, v in _summarise(peers, rows).items():
                res[f"hivemind_k{_fmt(k)}_{name}"] = v
            res.setdefault("hivemind_versions", peers[0].get("versions"))
    if "hivemind_k1_samples_per_s" in res:
        one = res["hivemind_k1_samples_per_s"]
        for k in throttles:
            ideal = one / 2 * (1 + 1 / float(k))
            res[f"hivemind_k{_fmt(k)}_vs_ideal"] = res[f"hivemind_k{_fmt(k)}_samples_per_s"] / ideal if ideal else 0.0
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", required=True, help="a local HF causal-LM dir (e.g. rayllm's tiny_model_path)")
    ap.add_argument("--rows", type=int, default=32, help="target_batch_size: rows per global step")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--throttles", default="1,2,4", help="comma-separated k of peer 1")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--matchmaking-time", type=float, default=1.0)
    ap.add_argument("--averaging-timeout", type=float, default=10.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--work-dir", default=None, help="keep the peers' logs and JSON here")
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args(argv)
    ks = [float(x) for x in a.throttles.split(",") if x.strip()]
    res = hivemind_arm(a.model_dir, a.rows, a.seq, a.micro, ks, a.seconds, warmup=a.warmup,
                       matchmaking_time=a.matchmaking_time, averaging_timeout=a.averaging_timeout, lr=a.lr,
                       work_dir=a.work_dir)
    print(f"hivemind {res.get('hivemind_versions')}: 2 peers, target {a.rows} rows x {a.seq} tokens, micro-batch "
          f"{a.micro}, peer 1 throttled k x, {a.seconds:g} s after {a.warmup:g} s warm-up, "
          f"matchmaking_time {a.matchmaking_time:g} s")
    cols = ("samples_per_s", "processed_samples_per_s", "steps", "mean_batch_per_step", "max_batch_per_step",
            "batch_overshoot_ratio", "tracker_mean_batch_per_step", "fallback_steps", "slow_peer_share", "vs_ideal")
    heads = ("applied/s", "computed/s", "steps", "mean batch", "max batch", "overshoot", "tracker batch",
             "fallback", "slow share", "vs ideal")
    print(f"{'k':>4} " + " ".join(f"{h:>13}" for h in heads))
    for k in ks:
        cells = []
        for c in cols:
            v = res.get(f"hivemind_k{_fmt(k)}_{c}")
            cells.append(f"{'-':>13}" if v is None else f"{v:>13d}" if isinstance(v, int) else f"{v:>13.3f}")
        print(f"{_fmt(k):>4} " + " ".join(cells))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
