"""Who is in a group, and what happened to each member's call: the driver's view of health.

A member is one rank's actor for as long as it lives; its id never changes, while its rank
index is only meaningful within one membership epoch (docs/elasticity.md).
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict, deque
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from rayllm.chaos import send_signal


@dataclass
class Member:
    id: int
    actor: ray.actor.ActorHandle
    bundle: int
    node_id: str = ""
    pid: int = 0


PENDING = object()

_gcs = None


def draining_nodes(timeout_s: float) -> set[str]:
    """Ids (hex) of the nodes Ray is draining: `ray drain-node`, or the autoscaler taking a node
    away (idle or preempted). Read from the GCS, as Ray Serve's controller does (Ray has no public
    call for it); empty when the GCS does not answer in time, so a boundary never waits on it."""
    global _gcs
    try:
        address = ray.get_runtime_context().gcs_address
        if _gcs is None or _gcs[0] != address:  # one client per cluster (a driver may connect to another)
            from ray._raylet import GcsClient

            _gcs = (address, GcsClient(address=address))
        return set(_gcs[1].get_draining_nodes(timeout=timeout_s))
    except Exception:  # noqa: BLE001 - a GCS hiccup must not stop training; the next boundary asks again
        return set()

# Errors that say the input (a batch, a loss argument, a config) is wrong: the same on any rank
# set, so a retry cannot help and they are raised to the caller at once.
INPUT_ERRORS = (ValueError, TypeError, KeyError, IndexError, NotImplementedError, AssertionError)
# A collective that failed because a peer went away (gloo, NCCL, the store): a consequence of a
# fault elsewhere, not a fault of this rank.
_COMM_MARKERS = ("connection closed", "connection reset", "broken pipe", "gloo", "nccl", "socket", "store",
                 "peer", "timed out", "has no engine", "process group", "processgroup")


def is_comm_error(err: BaseException) -> bool:
    text = str(err).lower()
    return any(m in text for m in _COMM_MARKERS)


def cause(err: BaseException) -> BaseException:
    """The exception the rank raised (Ray wraps it in a RayTaskError subclass of both)."""
    if isinstance(err, RayTaskError):
        return err.cause if getattr(err, "cause", None) is not None else err
    return err


def settle(refs: list, deadline_s: float | None, after_first_failure_s: float) -> list:
    """Every ref's outcome: its value, its exception, or PENDING. Returns when all are done,
    when `after_first_failure_s` has passed since the first failure (survivors of a dead peer
    then have that long to give up their collectives), or at the deadline."""
    out = [PENDING] * len(refs)
    index = {r: i for i, r in enumerate(refs)}
    pending = list(refs)
    start = time.monotonic()
    end = None if deadline_s is None else start + deadline_s
    while pending:
        now = time.monotonic()
        left = None if end is None else max(0.0, end - now)
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not done and end is not None and time.monotonic() < end:
            continue  # ray.wait may return a little before its timeout
        if not done:
            break
        for r in done:
            try:
                out[index[r]] = ray.get(r)
            except Exception as e:  # noqa: BLE001 - the outcome is the exception
                out[index[r]] = e
                if end is None or end > time.monotonic() + after_first_failure_s:
                    end = time.monotonic() + after_first_failure_s
    return out


def is_dead(outcome) -> bool:
    return isinstance(outcome, RayActorError)


def unresponsive(members: list[Member], timeout_s: float) -> list[Member]:
    """Members that do not answer a ping (on their control thread) within timeout_s."""
    refs = [m.actor.ping.remote() for m in members]
    res = settle(refs, timeout_s, timeout_s)
    return [m for m, r in zip(members, res) if r is PENDING or isinstance(r, Exception)]


def evict(members: list[Member], timeout_s: float = 30.0) -> None:
    """Kill each member's process (SIGKILL on its node: this ends a frozen process too), then its
    actor, and wait until Ray reports it dead."""
    import signal

    for m in members:
        try:
            send_signal(m.node_id, m.pid, signal.SIGKILL)
        except Exception:  # noqa: BLE001 - already gone
            pass
        ray.kill(m.actor, no_restart=True)
    for m in members:
        try:
            ray.get(m.actor.ping.remote(), timeout=timeout_s)
        except (RayActorError, GetTimeoutError, Exception):  # noqa: BLE001 - dead is what we wait for
            pass


class Timings:
    """Recent wall times of each call kind, and the deadline they imply (docs/elasticity.md)."""

    def __init__(self, factor: float, grace_s: float, min_samples: int, fallback_s: float):
        self.factor, self.grace_s, self.min_samples, self.fallback_s = factor, grace_s, min_samples, fallback_s
        self._times: dict[str, deque] = defaultdict(lambda: deque(maxlen=50))

    def add(self, call: str, seconds: float) -> None:
        self._times[call].append(seconds)

    def deadline(self, call: str) -> float:
        t = self._times[call]
        if len(t) < self.min_samples:
            return self.fallback_s
        return min(self.fallback_s, self.factor * statistics.median(t) + self.grace_s)
