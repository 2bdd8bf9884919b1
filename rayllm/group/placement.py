"""Where a group's ranks run: one placement group for a fixed-size group (which other groups may
share), or one placement group per rank slot for a group sized as a range (docs/heterogeneous.md).

A range needs a placement group per slot so that each slot is placed, lost and asked for again on
its own: a single placement group of `max` bundles is placed whole or not at all, and with the
autoscaler it is a slot's pending bundle that makes it add a node.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class BelowMinimum(RuntimeError):
    """A group sized as a range has fewer than `min` ranks and the cluster did not give it room for
    more within the wait: the message names the group, its minimum, what is present and why."""


def _bundle(cpus: float, gpus: float, accelerator_type: str | None = None) -> dict:
    """A Ray bundle; an accelerator type is Ray's own `accelerator_type:<T>` node resource (each GPU
    node advertises its type, and a tiny amount of it pins a bundle to such a node)."""
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {}),
            **({f"accelerator_type:{accelerator_type}": 0.001} if accelerator_type else {})}


def _actor_options(bundle: dict, share: float) -> dict:
    """Ray actor options that take `share` of `bundle`."""
    extra = {k: v * share for k, v in bundle.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": bundle["CPU"] * share, "num_gpus": bundle.get("GPU", 0.0) * share,
            **({"resources": extra} if extra else {})}


@dataclass
class Placement:
    """Bundles ranks are placed on. Groups colocated on one Placement each take `share` of every
    bundle, so e.g. a policy and its reference model sit on the same devices."""

    pg: PlacementGroup
    cpus: float
    gpus: float
    share: float = 1.0

    @classmethod
    def create(cls, num_bundles: int, cpus: float, gpus: float = 0.0, share: float = 1.0,
               strategy: str = "PACK", timeout_s: float = 120.0) -> "Placement":
        bundle = _bundle(cpus, gpus)
        pg = placement_group([dict(bundle) for _ in range(num_bundles)], strategy=strategy)
        if not pg.wait(timeout_s):
            remove_placement_group(pg)
            raise RuntimeError(
                f"placement group of {num_bundles} x {bundle} not schedulable within {timeout_s:.0f} s; "
                f"cluster has {ray.cluster_resources()}"
            )
        return cls(pg, cpus, gpus, share)

    @property
    def num_bundles(self) -> int:
        return len(self.pg.bundle_specs)

    def strategy(self, slot: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=slot)

    def actor_options(self, slot: int) -> dict:
        return _actor_options(_bundle(self.cpus, self.gpus), self.share)

    def remove(self) -> None:
        remove_placement_group(self.pg)


@dataclass
class RankSlots:
    """One single-bundle placement group per rank slot, each of its own shape (`bundles`: the same
    for every slot of a range; a rank's own with GroupConfig.rank_resources), all asked for at once;
    those Ray has not placed yet stay pending, and are checked without blocking (`placed`)."""

    bundles: list[dict]
    pgs: list[PlacementGroup] = field(default_factory=list)
    _ready: list = field(default_factory=list)

    def __post_init__(self) -> None:
        for slot in range(len(self.bundles)):
            self._ask(slot)

    @classmethod
    def of(cls, size: int, cpus: float, gpus: float, shapes: list | None = None) -> "RankSlots":
        """`size` slots of one shape, or one per entry of `shapes` (RankResources)."""
        if shapes:
            return cls([_bundle(r.cpus, r.gpus, r.accelerator_type) for r in shapes])
        return cls([_bundle(cpus, gpus) for _ in range(size)])

    def _ask(self, slot: int) -> None:
        pg = placement_group([dict(self.bundles[slot])])
        if slot < len(self.pgs):
            self.pgs[slot], self._ready[slot] = pg, pg.ready()
        else:
            self.pgs.append(pg)
            self._ready.append(pg.ready())

    @property
    def size(self) -> int:
        return len(self.bundles)

    def strategy(self, slot: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.pgs[slot], placement_group_bundle_index=0)

    def actor_options(self, slot: int) -> dict:
        return _actor_options(self.bundles[slot], 1.0)

    def placed(self) -> list[int]:
        """Slots whose placement group Ray has placed, now (no wait)."""
        done, _ = ray.wait(self._ready, num_returns=len(self._ready), timeout=0)
        ids = {r.hex() for r in done}
        return [i for i, r in enumerate(self._ready) if r.hex() in ids]

    def wait_for(self, least: int, timeout_s: float, name: str, poll_s: float = 0.2) -> list[int]:
        """The slots placed once at least `least` are, or at `timeout_s` BelowMinimum (the slots
        are removed: nothing is left pending for a group that did not start)."""
        end = time.monotonic() + timeout_s
        while True:
            got = self.placed()
            if len(got) >= least:
                return got
            if time.monotonic() >= end:
                why = self.why(name, least, len(got), f"at start, after {timeout_s:g} s")
                self.remove()
                raise BelowMinimum(why)
            time.sleep(poll_s)

    def why(self, name: str, least: int, present: int, when: str) -> str:
        placed = set(self.placed())
        pending = [self.bundles[i] for i in range(self.size) if i not in placed]
        shapes = sorted({str(b) for b in pending})
        return (f"group {name!r}: {present} rank(s), fewer than its minimum of {least} ({when}); "
                f"{len(pending)} of {self.size} slots of {', '.join(shapes) or '-'} are still pending. "
                f"The cluster has {ray.available_resources()} free of {ray.cluster_resources()}: add nodes "
                "(or let the autoscaler), or lower the group's num_ranks")

    def renew(self, slot: int) -> None:
        """Give up slot's placement group (its rank left: the node may be going away) and ask for
        a new one, which Ray places wherever there is room, now or when a node is added."""
        remove_placement_group(self.pgs[slot])
        self._ask(slot)

    def remove(self) -> None:
        for pg in self.pgs:
            remove_placement_group(pg)
