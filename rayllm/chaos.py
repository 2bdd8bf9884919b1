"""Fault injection for tests and game days: fault a chosen rank of a chosen group at a chosen step.

Faults come from a group's config (`GroupConfig.chaos`) and from the environment:

    RAYLLM_CHAOS="sft/policy:1:3:kill:0.2;ppo/critic:0:2:hang"   # group:rank:step:kind[:after_s[:call]]

A kill (SIGKILL) or a hang (SIGSTOP) is a real signal sent to the rank's process from outside it,
by a Ray task on the rank's node; a raise makes the rank raise InjectedFault inside the call.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rayllm.config import ChaosFault

ENV = "RAYLLM_CHAOS"


class InjectedFault(RuntimeError):
    """Raised inside a rank by a chaos fault of kind "raise"."""


def faults_from_env(group: str, value: str | None = None) -> list[ChaosFault]:
    """The faults RAYLLM_CHAOS names for `group`; a malformed entry raises ValueError naming it."""
    value = os.environ.get(ENV, "") if value is None else value
    out = []
    for entry in filter(None, (e.strip() for e in value.split(";"))):
        parts = entry.split(":")
        # group names contain "/" but no ":"; the fields after it are positional
        if len(parts) < 4:
            raise ValueError(f"{ENV}: {entry!r} is not group:rank:step:kind[:after_s[:call]]")
        name, rank, step, kind, *rest = parts
        if name != group:
            continue
        try:
            out.append(ChaosFault(rank=int(rank), step=int(step), kind=kind,
                                  after_s=float(rest[0]) if rest else 0.0,
                                  **({"call": rest[1]} if len(rest) > 1 else {})))
        except Exception as e:  # noqa: BLE001 - pydantic's or int()'s message, with the entry named
            raise ValueError(f"{ENV}: bad entry {entry!r}: {e}") from None
    return out


@ray.remote(num_cpus=0)
def _send(pid: int, signum: int) -> float:
    os.kill(pid, signum)
    return time.time()


def send_signal(node_id: str, pid: int, signum: int, timeout_s: float = 30.0) -> float:
    """Send `signum` to process `pid` on Ray node `node_id`: from this process when it runs on
    that node, else from a task there (either way from outside the target); returns the wall time
    it was sent."""
    if node_id == ray.get_runtime_context().get_node_id():
        os.kill(pid, signum)
        return time.time()
    ref = _send.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote(pid, signum)
    return ray.get(ref, timeout=timeout_s)


SIGNALS = {"kill": signal.SIGKILL, "hang": signal.SIGSTOP, "term": signal.SIGTERM}  # term: a preemption notice


class Chaos:
    """The faults of one group, each fired once: `due(call, n)` gives those for the n-th
    attempt-free count of `call` (optimizer steps for train_step), and `fire` sends a signal
    fault after its delay on a background thread, recording when it was sent."""

    def __init__(self, group: str, faults: list[ChaosFault]):
        self.group = group
        self.pending = list(faults) + faults_from_env(group)
        self.fired: list[dict] = []

    def due(self, call: str, n: int) -> list[ChaosFault]:
        out = [f for f in self.pending if f.call == call and f.step == n]
        self.pending = [f for f in self.pending if f not in out]
        return out

    def fire(self, fault: ChaosFault, node_id: str, pid: int) -> None:
        record = {"kind": fault.kind, "rank": fault.rank, "step": fault.step, "call": fault.call, "pid": pid,
                  "sent_at": None}
        self.fired.append(record)

        def go():
            time.sleep(fault.after_s)
            record["sent_at"] = send_signal(node_id, pid, SIGNALS[fault.kind])

        threading.Thread(target=go, daemon=True, name=f"chaos-{self.group}-{fault.rank}").start()

    def sent_at(self, pid: int) -> float | None:
        """When a fault was sent to `pid` (None if none was)."""
        times = [r["sent_at"] for r in self.fired if r["pid"] == pid and r["sent_at"] is not None]
        return max(times) if times else None
