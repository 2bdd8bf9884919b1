"""Driver-side helpers for waiting on Ray calls, shared by rayllm.group and rayllm.rollout.

Every driver-side wait has a deadline: a hung rank or engine otherwise hangs the driver
silently, with nothing in the log to say who stopped answering."""
from __future__ import annotations

import time

import ray


class CallTimeout(TimeoutError):
    """A driver-side wait ran past its deadline; the message names who and what."""


DEFAULT_CALL_TIMEOUT_S: float = 3600.0  # generous: a real step or push takes seconds to minutes


def gather(refs: list, timeout_s: float | None = DEFAULT_CALL_TIMEOUT_S, what: str = "call",
           names: list[str] | None = None) -> list:
    """ray.get of every ref that fails as soon as any of them fails (re-raising its error),
    instead of waiting on peers that may now hang in a collective with the dead one.

    Past `timeout_s` (None: no deadline, an explicit opt-out) it raises CallTimeout naming
    `what` and, through `names` (names[i] describes refs[i], e.g. "ppo/policy rank 1"), every
    call still pending."""
    names = names if names is not None else [f"#{i}" for i in range(len(refs))]
    if len(names) != len(refs):
        raise ValueError(f"gather: {len(names)} names for {len(refs)} refs")
    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not done and deadline is not None and time.monotonic() < deadline:
            continue  # ray.wait may return a little before its timeout
        if not done:
            late = ", ".join(names[index[r]] for r in pending)
            raise CallTimeout(f"{what}: no answer within {timeout_s:g} s from {late} "
                              f"({len(pending)} of {len(refs)} pending)")
        ray.get(done)  # raises at once if this one failed
    return ray.get(refs)
