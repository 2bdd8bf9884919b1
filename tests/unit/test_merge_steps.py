"""How a group folds its ranks' train_step results into one step's record."""
import pytest

from rayllm.group.model_group import _merge_steps


def _rank(loss_sum, tokens, compute_s, **extra):
    return {"loss_sum": loss_sum, "tokens": tokens, "grad_norm": 2.0, "lr": 1e-3, "skipped": False,
            "compute_s": compute_s, "stats": {"entropy_sum": 0.5 * tokens}, **extra}


def test_the_loss_is_per_token_over_all_ranks_and_the_times_are_the_slowest_ranks():
    out = _merge_steps([_rank(30.0, 10, 0.2, snapshot_s=0.01), _rank(10.0, 30, 0.5, snapshot_s=0.03)])
    assert out["loss"] == pytest.approx(40.0 / 40) and out["tokens"] == 40
    assert out["compute_s"] == 0.5 and out["snapshot_s"] == 0.03  # the step waits for the slowest
    assert out["entropy"] == pytest.approx(0.5)


def test_a_group_without_peer_snapshots_reports_no_snapshot_time():
    assert "snapshot_s" not in _merge_steps([_rank(1.0, 1, 0.1), _rank(1.0, 1, 0.1)])
