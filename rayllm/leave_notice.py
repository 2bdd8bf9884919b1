"""SIGTERM as a notice to leave, for the actors of rayllm's elastic roles (a group's ranks, rollout
engines): a spot preemption notice, or a node being drained, arrives as SIGTERM to the process.

Ray's own handler would exit the process at once, losing the call in flight. This one only
records the notice: the call runs on, and the driver ends the actor at the next boundary
(docs/heterogeneous.md). A second SIGTERM ends the process as Ray's handler would. Python runs
signal handlers in the main thread, which is where Ray builds an actor, so `LeaveNotice()` must
be made in the actor's `__init__`.
"""
from __future__ import annotations

import os
import signal
import threading


class LeaveNotice:
    def __init__(self) -> None:
        self.given = False
        if threading.current_thread() is not threading.main_thread():
            return  # nowhere to install it (not an actor's main thread): SIGTERM keeps Ray's meaning
        ray_handler = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum, frame):
            if self.given:
                ray_handler(signum, frame) if callable(ray_handler) else os._exit(128 + signum)
            self.given = True

        signal.signal(signal.SIGTERM, on_sigterm)
