"""A snapshot's object-store form (rayllm.group.state.to_wire / from_wire) round-trips exactly
and the copy it comes back as is the receiver's own, not a view of the sender's memory."""
import numpy as np
import torch

from rayllm.group.state import from_wire, to_wire


def _snap():
    g = torch.Generator().manual_seed(0)
    return {"params": {"a": {"start": 0, "numel": 3, "full": 5, "value": torch.randn(3, generator=g),
                             "exp_avg": torch.randn(3, generator=g)},
                       "b": {"start": 2, "numel": 4, "full": 6, "value": torch.randn(4, generator=g)}},
            "scalars": {"step_count": 7, "optimizer_step": 7.0}}


def test_a_snapshot_round_trips_through_one_flat_array():
    snap = _snap()
    wire = to_wire(snap)
    assert isinstance(wire["flat"], np.ndarray) and wire["flat"].shape == (10,)
    back = from_wire(wire)
    assert back["scalars"] == snap["scalars"]
    for name, frag in snap["params"].items():
        assert set(back["params"][name]) == set(frag)
        for k, v in frag.items():
            assert torch.equal(back["params"][name][k], v) if torch.is_tensor(v) else back["params"][name][k] == v


def test_the_received_copy_does_not_share_the_senders_buffer():
    wire = to_wire(_snap())
    wire["flat"].setflags(write=False)  # as Ray hands it back: a read-only view of shared memory
    back = from_wire(wire)
    back["params"]["a"]["value"][0] = 123.0  # writable, and the wire's array is untouched
    assert wire["flat"][0] != 123.0
