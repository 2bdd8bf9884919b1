"""Each rank's speed, and the shares of a batch that follow it (docs/heterogeneous.md).

A rank measures its *busy* seconds: the wall time of its micro-batches less the time it spent
inside collectives, where a fast rank waits for a slow one (so a step's wall time, the same on
every rank, says nothing of who is slow). The time in collectives is read from DeepSpeed's own
comms logger (`deepspeed.comm`'s `timed_op` around every collective), switched on for the call;
rayllm adds only the sum over its timers, which DeepSpeed has no call for.
The driver fits each member's cost, seconds per micro-batch plus seconds per token, to a moving
average of its micro-batches, and cuts the next call's batch so that every rank's predicted time
is as equal as the micro-batches allow (batching.plan).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import NamedTuple


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


class RankCost(NamedTuple):
    """What a call costs one rank: seconds per micro-batch it runs (launches, hooks, the Python
    around them: paid even by a two-token filler) plus seconds per token, plus what the call's
    first micro-batch costs over the others (measured: after an optimizer step the first forward
    and backward of a step run well above the rest, whatever the split). A tokens-only rate
    cannot plan lockstep steps, where every rank runs as many micro-batches as the busiest: a
    slow rank's fixed cost per micro-batch is what bounds how far a fast one's share may grow."""

    per_micro_batch_s: float
    per_token_s: float
    per_call_s: float = 0.0

    def seconds(self, micro_batches: float, tokens: float) -> float:
        return self.per_call_s + micro_batches * self.per_micro_batch_s + tokens * self.per_token_s


class BusyTimer:
    """Busy seconds of one call's micro-batches on a rank, with the throttle of tests and
    benchmarks: a rank throttled k times sleeps (k - 1) x each micro-batch's busy time after it, as
    a device k times slower would take (the sleep counts as busy: it is the emulated compute).
    `samples` keeps (tokens, busy seconds) per micro-batch, fillers included: the points the
    driver fits a RankCost to."""

    def __init__(self, comm_seconds, throttle: float = 1.0):
        self._comm, self.throttle = comm_seconds, throttle
        self.busy_s = 0.0
        self.samples: list[tuple[int, float]] = []

    @contextmanager
    def micro_batch(self, tokens: int):
        t, c = time.perf_counter(), self._comm()
        yield
        busy = max(0.0, time.perf_counter() - t - (self._comm() - c))
        if self.throttle > 1.0:
            time.sleep((self.throttle - 1.0) * busy)
            busy *= self.throttle
        self.busy_s += busy
        self.samples.append((int(tokens), busy))


class _Moments(NamedTuple):
    """Means of x (tokens), y (busy seconds), x*x and x*y over a call's micro-batches after its
    first, and x0, y0: the first's."""

    x: float
    y: float
    xx: float
    xy: float
    x0: float
    y0: float

    @classmethod
    def of(cls, samples: list[tuple[int, float]]) -> _Moments:
        rest = samples[1:] or samples
        n = len(rest)
        return cls(sum(x for x, _ in rest) / n, sum(y for _, y in rest) / n,
                   sum(x * x for x, _ in rest) / n, sum(x * y for x, y in rest) / n, *samples[0])

    def blend(self, new: _Moments, ema: float) -> _Moments:
        return _Moments(*((1 - ema) * a + ema * b for a, b in zip(self, new)))

    def fit(self) -> RankCost:
        """Least squares busy = a + b * tokens per micro-batch, and the first micro-batch's excess
        over it. The intercept is only trusted where the micro-batches' sizes spread over a
        quarter of their mean (an even split's do not: its a would be noise, and a noisy a makes
        a wrong micro-batch count in lockstep), and where it comes out >= 0; otherwise a = 0, the
        tokens-only rate, the safe assumption."""
        var, cov = self.xx - self.x * self.x, self.xy - self.x * self.y
        a, b = 0.0, self.xy / self.xx if self.xx > 0 else 0.0
        if var > (0.25 * self.x) ** 2 and cov > 0 and self.y - cov / var * self.x >= 0:
            b = cov / var
            a = self.y - b * self.x
        return RankCost(a, b, max(0.0, self.y0 - a - b * self.x0))


class SpeedBook:
    """The driver's view: each member's RankCost per call kind, fitted to an exponential moving
    average of its micro-batches' (tokens, busy seconds), and the costs the next call is planned
    with. The split stays even (None) until every member has been measured, and while the slowest
    takes within `deadband` of the fastest's time for a typical micro-batch: noise between alike
    ranks must not re-cut the batch (below ZeRO-2 an uneven cut is exact, above it equal only to
    rounding)."""

    def __init__(self, ema: float, deadband: float):
        self.ema, self.deadband = ema, deadband
        self.moments: dict[str, dict[int, _Moments]] = {}

    def add(self, kind: str, member: int, samples: list[tuple[int, float]]) -> None:
        samples = [(x, y) for x, y in samples if x > 0 and y > 0]
        if not samples:
            return
        book, new = self.moments.setdefault(kind, {}), _Moments.of(samples)
        book[member] = new if member not in book else book[member].blend(new, self.ema)

    def forget(self, member: int) -> None:
        for book in self.moments.values():
            book.pop(member, None)

    def costs(self, kind: str, members: list[int]) -> list[RankCost] | None:
        """Each member's cost for the next `kind` call (train_step's stand in for a kind not yet
        measured: only the ratios between ranks matter to a split), or None for an even split."""
        book = self.moments.get(kind) or self.moments.get("train_step") or {}
        if len(members) < 2 or any(m not in book for m in members):
            return None
        fits = [book[m].fit() for m in members]
        typical = sum(book[m].x for m in members) / len(members)  # tokens of a micro-batch
        t = [f.seconds(1, typical) for f in fits]
        if min(t) <= 0 or max(t) <= self.deadband * min(t):
            return None
        return fits
