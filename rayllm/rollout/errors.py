"""What can go wrong between the driver and its rollout engines, and how it is told."""
from __future__ import annotations

import logging
import re

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

log = logging.getLogger("rayllm.rollout")

DEAD = (RayActorError, ActorDiedError, ActorUnavailableError)


class SyncMismatch(RuntimeError):
    """An engine's log-probs disagree with the trainer's after a weight push; `report` holds the
    push's statistics (per engine under "per_engine")."""

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


class PushInterrupted(RuntimeError):
    """A weight push stopped by a death: `engines` to check, and whether the policy group's ranks
    were in a collective with them (the channel), so the group must heal before the next push."""

    def __init__(self, message: str, engines: list[int], group_hit: bool = False):
        super().__init__(message)
        self.engines, self.group_hit = engines, group_hit


class SnapshotLost(RuntimeError):
    """A snapshot's weights died with the policy rank that held them before every engine had
    loaded them (async PPO): the trainer takes a new snapshot of the weights it has now."""


class EngineStartError(RuntimeError):
    """An engine could not start; the message gives the cause."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_FRAME = re.compile(r",?\s*ray::[\w.]+\(\)\s*\(pid=[^)]*\)")  # Ray's "ray::Actor.method() (pid=..)"
_CHAINING = ("During handling of the above exception", "The above exception was the direct cause")


def cause(e: BaseException, max_lines: int = 3) -> str:
    """The error type, the first meaningful lines and the final one of an engine's error
    (vLLM's last line alone is often only "See root cause above"; a Ray actor's error starts
    with Ray's own words). Traceback frames and Ray's process tags are left out; the full text
    goes to the log."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip()
    log.error("%s: %s", type(cause).__name__, text)
    meaningful, frame = [], False
    for ln in (_RAY_FRAME.sub("", _ANSI.sub("", x)).strip() for x in text.splitlines()):
        if frame or ln.startswith('File "'):  # a traceback frame and its source line
            frame = ln.startswith('File "')
            continue
        if ln and not ln.startswith(("Traceback",) + _CHAINING) and not set(ln) <= set("^~ -="):
            meaningful.append(ln[:300])
    keep = meaningful[:max_lines] + [ln for ln in meaningful[-1:] if ln not in meaningful[:max_lines]]
    more = "" if len(keep) >= len(meaningful) else " [... full error in the log]"
    return f"{type(cause).__name__}: {' | '.join(keep)}{more}"
