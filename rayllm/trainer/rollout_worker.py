"""The rollout side of a PPO stage in a thread of its own (docs/async_ppo.md).

One thread owns the rollout pool and the frozen groups' forwards, so that the engines can
generate batch j+1 while the driver's main thread trains on batch j. It takes, in order of
priority: a weight push or a whole sync the trainer handed it (between batches: every sample of
a batch comes from one policy version), an evaluation, then the next batch once it may start
(`can_start(j)`: the engines hold a recent enough policy version). Every pool call happens on this thread; the
trainer's thread talks to it only through `submit` and `batch`.

A plain thread with a condition variable, not a concurrent.futures executor: the worker must
choose between queued jobs and the standing order of batches by priority and by the version
the engines hold, which a FIFO executor cannot.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable


class RolloutWorker:
    def __init__(self, make_batch: Callable[[int], dict], first: int, last: int,
                 can_start: Callable[[int], bool], poll_s: float = 0.2):
        """make_batch(j): batch j (generated and scored); can_start(j): whether batch j may start
        now (the engines hold a recent enough policy version, and the groups it uses are free)."""
        self._make, self._can_start = make_batch, can_start
        self._next, self._last, self._poll_s = first, last, poll_s
        self._cv = threading.Condition()
        self._jobs: deque[tuple[Callable[[], object], Future]] = deque()
        self._batches: dict[int, Future] = {}
        self._stop = False
        self.failed: BaseException | None = None
        self.generating: list[tuple[float, float]] = []  # (start, end) of every batch's generation
        self._thread = threading.Thread(target=self._run, name="rayllm-rollout-worker", daemon=True)
        self._thread.start()

    # ---- the trainer's side -------------------------------------------------------------------
    def submit(self, fn: Callable[[], object]) -> Future:
        """Run fn on the worker's thread before its next batch; its result or error in the future."""
        fut: Future = Future()
        with self._cv:
            if self.failed is not None:
                fut.set_exception(self.failed)
                return fut
            self._jobs.append((fn, fut))
            self._cv.notify_all()
        return fut

    def call(self, fn: Callable[[], object]):
        """submit(fn) and wait for it (its error is raised here)."""
        return self.wait(self.submit(fn))

    def wait(self, fut: Future, on_poll: Callable[[], None] | None = None):
        """The future's result; on_poll runs on the caller's thread every poll_s while waiting (the
        trainer answers the worker's requests there: a lost snapshot to take again)."""
        while True:
            try:
                return fut.result(timeout=self._poll_s)
            except TimeoutError:
                if on_poll is not None:
                    on_poll()
                if not self._thread.is_alive() and not fut.done():
                    raise RuntimeError("the rollout worker thread ended") from self.failed

    def batch(self, j: int, on_poll: Callable[[], None] | None = None) -> dict:
        """Batch j, waiting for it; a failure to make it (or an earlier one) is raised here."""
        with self._cv:
            while j not in self._batches and self.failed is None:
                self._cv.wait(self._poll_s)
                if on_poll is not None:
                    self._cv.release()
                    try:
                        on_poll()
                    finally:
                        self._cv.acquire()
            if j not in self._batches:
                raise self.failed
            fut = self._batches[j]
        out = self.wait(fut, on_poll)
        with self._cv:
            self._batches.pop(j, None)
        return out

    def stop(self, timeout_s: float = 60.0) -> None:
        """Finish the job or batch in hand, then end the thread (within timeout_s: a batch stuck
        on the engines is left to the pool's shutdown)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout_s)

    # ---- the worker's thread ------------------------------------------------------------------
    def _can_generate(self) -> bool:
        return self._next <= self._last and self._can_start(self._next)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._jobs and not self._can_generate():
                    self._cv.wait(self._poll_s)
                if self._stop:
                    return
                job = self._jobs.popleft() if self._jobs else None
                if job is None:
                    j, fut = self._next, Future()
                    self._batches[j] = fut
                    self._next += 1
                    self._cv.notify_all()
            if job is not None:
                fn, fut = job
            else:
                fn = lambda j=j: self._timed(j)  # noqa: E731
            try:
                fut.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the trainer's thread
                fut.set_exception(e)
                if job is None:  # a batch that cannot be made stops the worker: the trainer raises it
                    with self._cv:
                        self.failed = e
                        self._cv.notify_all()
                    return

    def _timed(self, j: int) -> dict:
        t0 = time.monotonic()
        out = self._make(j)
        self.generating.append((t0, t0 + out["generate_s"]))
        return out


def busy_seconds(intervals: list[tuple[float, float]], w0: float, w1: float) -> float:
    """Seconds of [w0, w1] covered by the union of the intervals."""
    cut = sorted((max(a, w0), min(b, w1)) for a, b in intervals if b > w0 and a < w1)
    total, end = 0.0, w0
    for a, b in cut:
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def overlap_seconds(x: list[tuple[float, float]], y: list[tuple[float, float]], w0: float, w1: float) -> float:
    """Seconds of [w0, w1] in which both an interval of x and one of y are running."""
    both = [(max(a, c), min(b, d)) for a, b in x for c, d in y if min(b, d) > max(a, c)]
    return busy_seconds(both, w0, w1)
