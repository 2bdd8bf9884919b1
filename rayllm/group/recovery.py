"""The fault protocol of a ModelGroup: every call is resolved by commit or discard, a faulty
rank is evicted, the survivors re-form with state from each other's RAM, and replacements join at
step boundaries (docs/elasticity.md has the protocol and its guarantees).

`Recovery` is mixed into ModelGroup, which owns the state it works on: `members`, `epoch`, `step`,
`events`, `_joining`, `_epoch_members`, `_chaos`, `_timings`, and `setup(restore)`, `_spawn(bundle)`,
`_wait(...)`, `_share`. What a group computes and stores stays in model_group.py; how it survives
faults is here.
"""
from __future__ import annotations

import logging
import time

import ray

from rayllm.group.membership import (INPUT_ERRORS, PENDING, Member, cause, draining_nodes, evict, is_comm_error,
                                      is_dead, settle, unresponsive)
from rayllm.group.placement import BelowMinimum
from rayllm.remote import CallTimeout

log = logging.getLogger(__name__)


class StateLost(RuntimeError):
    """The ranks lost held state no survivor has a copy of (e.g. two neighbours at ZeRO-1/2/3
    before one commit): the stage must resume from its last disk checkpoint."""


class Recovery:
    """Commit or discard, eviction, re-formation and joins, for ModelGroup (see the module docstring)."""

    def admit(self) -> bool:
        """At a step boundary: replacements that are ready join, with state from their peers; a
        group sized as a range first starts a rank on each slot Ray has placed since (it warms up
        in the background and joins at a later boundary, as a replacement does)."""
        self._grow()
        if not self._joining:
            return False
        ready = [(m, r) for m, r in self._joining if ray.wait([r], timeout=0)[0]]
        joined = []
        for m, r in ready:
            try:
                ray.get(r)
                joined.append(m)
            except Exception:  # noqa: BLE001 - a replacement that failed to start is dropped
                ray.kill(m.actor, no_restart=True)
        self._joining = [(m, r) for m, r in self._joining if all(m is not x for x, _ in ready)]
        if not joined:
            return False
        t0 = time.time()
        restore = self._sources() if self._trainable else None
        self.members = self.members + joined
        self.setup(restore)
        self.events.append({"event": "join", "group": self.name, "members": [m.id for m in joined],
                            "epoch": self.epoch, "step": self.step, "world_size": self.world_size,
                            "join_s": round(time.time() - t0, 3), "rank_setup_s": round(self.last_setup_s, 3)})
        return True

    def _grow(self) -> None:
        least, most = self.cfg.size_range
        used = {m.bundle for m in self.members} | {m.bundle for m, _ in self._joining}
        if least == most or len(used) >= most:  # a fixed size grows only by replacements
            return
        for slot in self.placement.placed():
            if slot not in used:
                new = self._spawn(slot)
                self._joining.append((new, new.actor.ready.remote(self.model_path, self.kind)))

    def _wait_for_minimum(self) -> None:
        """Below a range's min at a step boundary: wait for ranks to be placed and join, up to
        elastic.min_wait_s, saying what it waits for; then BelowMinimum, naming why. Nothing
        committed is lost: the group is as the last committed step left it."""
        least, wait_s = self.cfg.min_ranks, self.cfg.elastic.min_wait_s
        if self.world_size >= least:
            return
        t0 = time.monotonic()
        self.events.append({"event": "below_min", "group": self.name, "world_size": self.world_size, "min": least,
                            "step": self.step, "epoch": self.epoch, "wait_s": wait_s})
        log.warning("%s; waiting up to %g s", self.placement.why(self.name, least, self.world_size, "at a step boundary"),
                    wait_s)
        while self.world_size < least:
            if time.monotonic() - t0 > wait_s:
                raise BelowMinimum(self.placement.why(self.name, least, self.world_size,
                                                      f"after waiting {wait_s:g} s at step {self.step}"))
            if not self.admit():
                time.sleep(0.2)
        self.events.append({"event": "min_reached", "group": self.name, "world_size": self.world_size,
                            "step": self.step, "epoch": self.epoch, "waited_s": round(time.monotonic() - t0, 3)})

    def wait_for_replacements(self, timeout_s: float = 300.0) -> None:
        """Block until every replacement started so far has joined (tests, and a stage's end)."""
        end = time.monotonic() + timeout_s
        while self._joining and time.monotonic() < end:
            if not self.admit():
                time.sleep(0.2)
        if self._joining:
            raise CallTimeout(f"group {self.name!r}: replacements did not become ready within {timeout_s:g} s")

    def heal(self) -> None:
        """After a call outside the group's own calls failed (the weight channel to the rollout
        engines): evict members that died or hang, and re-form over the rest with their state."""
        t = time.time()
        gone = unresponsive(self.members, self.cfg.elastic.ping_timeout_s)
        if not gone:
            self.reform()
            return
        evict(gone)
        for m in gone:
            self.events.append({"event": "fault", "kind": "death", "group": self.name, "rank": self.members.index(m),
                                "member": m.id, "pid": m.pid, "call": "weight push", "step": self.step + 1,
                                "epoch": self.epoch, "detect_s": None})
        self._recover([m for m in self.members if m not in gone], gone, t)

    def reform(self) -> None:
        """Re-form the process group over the current members, what recovery does without a
        fault: a trainable group keeps its state (from the ranks' snapshots), a frozen one
        rebuilds from its files."""
        self.setup(self._sources() if self._share is not None else None)

    def take_events(self) -> list[dict]:
        # Popped one at a time, not swapped for a new list: in async PPO another thread may
        # append while the stage log drains (list.pop and append are atomic), and none is lost.
        out = []
        while self.events:
            out.append(self.events.pop(0))
        return out

    def _before_call(self) -> None:
        """A step boundary: members told to leave go; re-form a group an input error broke; admit
        ready replacements."""
        self._let_leave()
        if self._broken:
            self.setup(self._sources() if self._trainable else None)
        self.admit()
        self._wait_for_minimum()

    def leave(self, rank: int) -> None:
        """Tell rank `rank` (of the current membership) to leave: it goes at the next step boundary,
        after the step in flight is committed (docs/heterogeneous.md)."""
        if not 0 <= rank < len(self.members):
            raise ValueError(f"group {self.name!r}: no rank {rank} (world size {len(self.members)})")
        self._leave_ids[self.members[rank].id] = "driver"

    def _let_leave(self) -> None:
        """Members told to leave (by leave(), a SIGTERM to their process, read from their control
        thread, or their node being drained, read from the GCS) are dropped: the rest re-form with the committed state from the snapshots, the
        leavers' own included (they are alive until it is read), then the leavers are ended. Nothing
        is retried: the last step was committed. A member that does not answer is left to the fault
        path of the next call."""
        flags = settle([m.actor.leaving.remote() for m in self.members], self.cfg.elastic.ping_timeout_s, 0.0)
        for m, told in zip(self.members, flags):
            if told is True:
                self._leave_ids.setdefault(m.id, "sigterm")
        drained = draining_nodes(self.cfg.elastic.ping_timeout_s)
        for m in self.members:
            if m.node_id in drained:
                self._leave_ids.setdefault(m.id, "drained")
        going = [m for m in self.members if m.id in self._leave_ids]
        if not going:
            return
        if len(going) == len(self.members):
            raise RuntimeError(f"group {self.name!r}: every rank was told to leave (members "
                               f"{[m.id for m in going]}); the stage cannot go on without one")
        t0 = time.time()
        ranks = {m.id: r for r, m in enumerate(self.members)}
        restore = self._sources() if self._share is not None else None  # read while the leavers live
        self.members = [m for m in self.members if m.id not in self._leave_ids]
        self.setup(restore)
        for m in going:
            settle([m.actor.close.remote()], self.cfg.elastic.ping_timeout_s, 0.0)
            ray.kill(m.actor, no_restart=True)
            if self.cfg.size_range[0] != self.cfg.size_range[1]:
                self.placement.renew(m.bundle)  # a range asks for the slot again, wherever there is room
            self.speeds.forget(m.id)
            self.events.append({"event": "leave", "group": self.name, "member": m.id, "rank": ranks[m.id],
                                "pid": m.pid, "reason": self._leave_ids.pop(m.id), "step": self.step,
                                "epoch": self.epoch, "world_size": self.world_size,
                                "leave_s": round(time.time() - t0, 3)})

    def _call(self, method: str, launch, finish) -> "Pending":
        """A call on every rank, retried after a fault; `launch(attempt)` dispatches it over the
        members present (re-planning its batch)."""
        self._before_call()
        self._calls[method] += 1
        faults = {f.rank: f for f in self._chaos.due(method, self._calls[method])}

        def go(attempt: int) -> list:
            refs = launch(attempt)
            if attempt == 0:
                self._fire(faults)
            return refs

        return Pending(self, method, go, finish)

    def _fire(self, faults: dict) -> None:
        for rank, f in faults.items():
            if f.kind in ("kill", "hang", "term") and rank < len(self.members):
                m = self.members[rank]
                self._chaos.fire(f, m.node_id, m.pid)

    def _resolve(self, p: "Pending"):
        e = self.cfg.elastic
        for attempt in range(e.max_retries + 1):
            if attempt > 0:
                p.refs = p.launch(attempt)
            t = time.monotonic()
            deadline = self._timings.deadline(p.method)
            # After a first failure the others get a second to fail too; those still running are
            # then told apart by a ping (blocked in a collective, or frozen), in _handle_fault.
            out = settle(p.refs, deadline, min(1.0, e.abort_timeout_s))
            if all(o is not PENDING and not isinstance(o, Exception) for o in out):
                self._timings.add(p.method, time.monotonic() - t)
                value = p.finish(out)
                if p.commit_step is not None:
                    # Every rank returned, so every rank holds its own snapshot of the step and
                    # its neighbour's (swapped inside the step): the step is committed.
                    self.step = p.commit_step
                return value
            if not e.enabled:
                self._raise_first(p.method, out, deadline)
            self._handle_fault(p.method, p.refs, out, deadline, time.monotonic() - t)
        raise RuntimeError(f"group {self.name!r}: {p.method} failed {e.max_retries + 1} times; see the events "
                           f"({self.events[-3:]})")

    def _raise_first(self, method: str, out: list, deadline: float):
        for o in out:
            if isinstance(o, Exception):
                raise o
        late = [f"rank {r}" for r, o in enumerate(out) if o is PENDING]
        raise CallTimeout(f"group {self.name!r}: {method}: no answer within {deadline:g} s from "
                          f"{', '.join(late)} ({len(late)} of {len(out)} pending)")

    def _peer(self, r: int) -> int | None:
        """The member whose snapshot rank r keeps: rank r+1's (None over one rank)."""
        n = len(self.members)
        return self.members[(r + 1) % n].id if n > 1 else None

    def _snapshot_all(self) -> None:
        """Every rank snapshots its current state and swaps it with its neighbours: redundancy for
        a layout just formed or loaded, before its first step."""
        self._wait([m.actor.snapshot_now.remote(self.epoch, self._peer(r)) for r, m in enumerate(self.members)],
                   "snapshot")

    def _handle_fault(self, method: str, refs: list, out: list, deadline: float, waited_s: float | None = None) -> None:
        """Classify what happened to each rank's call, evict the faulty, re-form over the rest."""
        e = self.cfg.elastic
        t_detect = time.time()
        members = list(self.members)
        dead = [m for m, o in zip(members, out) if is_dead(o)]
        pending = [m for m, o in zip(members, out) if o is PENDING]
        errors = [(m, cause(o)) for m, o in zip(members, out) if isinstance(o, Exception) and not is_dead(o)]
        hung = unresponsive(pending, e.ping_timeout_s) if pending else []
        raised = []
        if not dead and not hung:
            if pending and not errors:  # every rank alive and answering, just late
                self._raise_first(method, out, deadline)
            own = [(m, err) for m, err in errors if not is_comm_error(err)]
            bad_input = [err for _, err in errors if isinstance(err, INPUT_ERRORS)]
            if bad_input or (own and len(own) == len(members)):
                # Wrong input, or every rank failing alike: the call's own error, which a retry on
                # other ranks would only repeat. The ranks tore their group down: the next call re-forms.
                self._broken = True
                raise (bad_input or [err for _, err in own])[0]
            raised = [m for m, _ in own]
        kinds = {**{m.id: "death" for m in dead}, **{m.id: "hang" for m in hung}, **{m.id: "raise" for m in raised}}
        evict(hung + raised)
        # Survivors blocked on an evicted peer now fail out of their collectives; one that still
        # has not answered after abort_timeout_s is evicted as well.
        rest = [(m, r) for m, r, o in zip(members, refs, out) if o is PENDING and m not in hung]
        if rest:
            late = settle([r for _, r in rest], e.abort_timeout_s, e.abort_timeout_s)
            stuck = [m for (m, _), o in zip(rest, late) if o is PENDING]
            kinds.update({m.id: "stuck" for m in stuck})
            evict(stuck)
        lost = [m for m in members if m.id in kinds]
        ranks = {m.id: r for r, m in enumerate(members)}
        why = {m.id: f"{type(err).__name__}: {' '.join(str(err).split())[:600]}" for m, err in errors}
        for m in lost:
            sent = self._chaos.sent_at(m.pid)
            self.events.append({
                "event": "fault", "kind": kinds[m.id], "group": self.name, "rank": ranks[m.id], "member": m.id,
                "pid": m.pid, "call": method, "step": self.step + 1, "epoch": self.epoch,
                "detect_s": round(t_detect - sent, 3) if sent else None,
                "waited_s": None if waited_s is None else round(waited_s, 3), **({"error": why[m.id]} if m.id in why else {}),
            })
        self._recover([m for m in members if m.id not in kinds], lost, t_detect)

    def _recover(self, survivors: list[Member], lost: list[Member], t_detect: float) -> None:
        """Re-form over the survivors with state from their snapshots; start replacements."""
        t0 = time.time()
        if self.cfg.elastic.replace:
            for m in lost:
                new = self._spawn(m.bundle)
                self._joining.append((new, new.actor.ready.remote(self.model_path, self.kind)))
        for attempt in range(self.cfg.elastic.max_retries + 1):
            if not survivors and not self._trainable and self._joining:
                # A frozen group keeps no state: its replacements rebuild from the weights files.
                refs = [r for _, r in self._joining]
                settle(refs, self._timeout_s, self._timeout_s)
                survivors = [m for m, _ in self._joining]
                self._joining = []
            if not survivors:
                raise StateLost(f"group {self.name!r}: every rank was lost; resume from the last disk checkpoint")
            self.members = survivors
            try:
                restore = self._sources() if self._trainable else None
                self.setup(restore)
                break
            except StateLost:
                raise
            except Exception as err:  # noqa: BLE001 - a fault during recovery: find who, and go again
                gone = unresponsive(survivors, self.cfg.elastic.ping_timeout_s)
                if not gone:
                    raise
                # The others give up waiting for the lost rank within the rendezvous timeout.
                settle([m.actor.ready.remote() for m in survivors if m not in gone],
                       self.cfg.elastic.rendezvous_timeout_s + 30, 0)
                evict(gone)
                for m in gone:
                    self.events.append({"event": "fault", "kind": "death", "group": self.name, "member": m.id,
                                        "pid": m.pid, "call": "recovery", "step": self.step + 1,
                                        "epoch": self.epoch, "detect_s": None, "error": str(err)[:200]})
                    if self.cfg.elastic.replace:
                        new = self._spawn(m.bundle)
                        self._joining.append((new, new.actor.ready.remote(self.model_path, self.kind)))
                survivors = [m for m in survivors if m not in gone]
        for ev in self.events:
            if ev["event"] == "fault" and "recover_s" not in ev:
                ev["recover_s"] = round(time.time() - t_detect, 3)
                ev["world_size_after"] = self.world_size
        self.events.append({"event": "recovered", "group": self.name, "epoch": self.epoch, "step": self.step,
                            "world_size": self.world_size, "reform_s": round(time.time() - t0, 3)})

    def _sources(self) -> list:
        """References to the snapshots of every member of one epoch at one step, held by the
        members now present: the latest complete set at or before the committed step (a step some
        ranks finished before a fault elsewhere is not committed, and is retried from this one)
        (docs/elasticity.md). When each rank holds the whole state (ZeRO-0 in fp32), one snapshot
        is enough. Raises StateLost."""
        upto = self.step
        holdings = self._wait([m.actor.holdings.remote() for m in self.members], "holdings")
        held: dict[tuple[int, int, int], Member] = {}
        for m, keys in zip(self.members, holdings):
            for key in keys:
                held.setdefault(tuple(key), m)
        candidates = sorted({(ep, st) for ep, _, st in held if st <= upto}, reverse=True)
        for ep, st in candidates:
            need = self._epoch_members.get(ep, [])
            if getattr(self, "_replicated", False):
                need = [next(mid for e, mid, s in held if (e, s) == (ep, st))]
            if need and all((ep, mid, st) in held for mid in need):
                by_holder: dict[int, list] = {}
                for mid in need:
                    by_holder.setdefault(held[(ep, mid, st)].id, []).append((ep, mid, st))
                holders = {m.id: m for m in self.members}
                refs_of = {}
                for hid, keys in by_holder.items():
                    got = self._wait([holders[hid].actor.share.remote(keys)], "share")[0]
                    refs_of.update(zip(keys, got))
                return [refs_of[(ep, mid, st)] for mid in need]
        ep = max((e for e, _, _ in held), default=self.epoch)
        lost = sorted(set(self._epoch_members.get(ep, [])) - {m.id for m in self.members})
        orphans = [mid for mid in self._epoch_members.get(ep, []) if not any(k[:2] == (ep, mid) for k in held)]
        raise StateLost(f"group {self.name!r}: no survivor holds the state of member(s) {orphans or lost} at any "
                        f"committed step (members {lost} were lost together); resume from the last disk checkpoint")


class Pending:
    """A call started on every rank: `.result()` waits, past a deadline derived from the call's
    measured times, and after a fault re-forms the group and runs the call again over the ranks
    then present (a train_step also commits), then post-processes the per-rank results."""

    def __init__(self, group: "Recovery", method: str, launch, finish, commit_step: int | None = None):
        self.group, self.method, self.launch, self.finish, self.commit_step = group, method, launch, finish, commit_step
        self.refs = launch(0)

    def result(self):
        return self.group._resolve(self)
