from rayllm.report import plot_metrics


def test_per_rank_lists_in_step_metrics_become_one_series_per_rank(tmp_path):
    records = [{"stage": "sft", "step": s, "loss": 1.0 / s, "rank_shares": [0.7, 0.3], "sample_ids": [1, 2]}
               for s in (1, 2, 3)]
    names = sorted(p.name for p in plot_metrics(records, tmp_path))
    assert names == ["sft_loss.png", "sft_rank_shares_0.png", "sft_rank_shares_1.png"]
