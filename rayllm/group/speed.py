"""Each rank's speed, and the shares of a batch that follow it (docs/heterogeneous.md).

A rank measures its *busy* seconds: the wall time of its micro-batches less the time it spent
inside collectives, where a fast rank waits for a slow one (so a step's wall time, the same on
every rank, says nothing of who is slow). The time in collectives is read from DeepSpeed's own
comms logger (`deepspeed.comm`'s `timed_op` around every collective), switched on for the call;
rayllm adds only the sum over its timers, which DeepSpeed has no call for.
The driver keeps an exponential moving average of each member's tokens per busy second and hands
out shares in proportion to it.
"""
from __future__ import annotations

import time
from contextlib import contextmanager


@contextmanager
def no_clock():
    """comm_clock's stand-in where speeds are not used (balance off, or one rank): no logger."""
    yield lambda: 0.0


@contextmanager
def comm_clock():
    """Yields a function giving the seconds spent in DeepSpeed collectives since entry. The comms
    logger times each collective with a timer per op name (deepspeed.comm.comm.timers) whose
    elapsed time is cumulative: they are reset on entry and exit (and the logger's own records
    cleared), so nothing grows across steps. On GPU the logger synchronises the device after each
    collective, which is what makes its times true; that cost is paid only while the clock runs."""
    from deepspeed.comm import comm

    log = comm.comms_logger
    saved = (log.enabled, log.prof_all, log.verbose)

    def reset() -> None:
        log.comms_dict.clear()
        for t in comm.timers.timers.values():
            t.reset()

    def seconds() -> float:
        return sum(t.elapsed(reset=False) for t in comm.timers.timers.values()) / 1000.0

    reset()
    log.enabled, log.prof_all, log.verbose = True, True, False
    try:
        yield seconds
    finally:
        log.enabled, log.prof_all, log.verbose = saved
        reset()


class BusyTimer:
    """Busy seconds of one call's micro-batches on a rank, with the throttle of tests and
    benchmarks: a rank throttled k times sleeps (k - 1) x each micro-batch's busy time after it, as
    a device k times slower would take (the sleep counts as busy: it is the emulated compute)."""

    def __init__(self, comm_seconds, throttle: float = 1.0):
        self._comm, self.throttle = comm_seconds, throttle
        self.busy_s = 0.0

    @contextmanager
    def micro_batch(self):
        t, c = time.perf_counter(), self._comm()
        yield
        busy = max(0.0, time.perf_counter() - t - (self._comm() - c))
        if self.throttle > 1.0:
            time.sleep((self.throttle - 1.0) * busy)
            busy *= self.throttle
        self.busy_s += busy


class SpeedBook:
    """The driver's view: each member's tokens per busy second per call kind, as an EMA, and the
    shares of the next call. Shares are even (None) until every member has been measured, and while
    the fastest is within `deadband` of the slowest: noise between alike ranks must not re-cut the
    batch (below ZeRO-2 an uneven cut is exact, above it equal only to rounding)."""

    def __init__(self, ema: float, deadband: float):
        self.ema, self.deadband = ema, deadband
        self.speed: dict[str, dict[int, float]] = {}

    def add(self, kind: str, member: int, tokens: float, busy_s: float) -> None:
        if busy_s <= 0 or tokens <= 0:
            return
        book = self.speed.setdefault(kind, {})
        v = tokens / busy_s
        book[member] = v if member not in book else (1 - self.ema) * book[member] + self.ema * v

    def forget(self, member: int) -> None:
        for book in self.speed.values():
            book.pop(member, None)

    def shares(self, kind: str, members: list[int]) -> list[float] | None:
        """Each member's share of the next `kind` call (train_step's speeds stand in for a kind not
        yet measured), or None for an even split."""
        book = self.speed.get(kind) or self.speed.get("train_step") or {}
        if len(members) < 2 or any(m not in book for m in members):
            return None
        v = [book[m] for m in members]
        if max(v) <= self.deadband * min(v):
            return None
        total = sum(v)
        return [x / total for x in v]
