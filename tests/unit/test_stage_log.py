"""A resumed stage's metrics lines appear once, and the ledger round-trips through a checkpoint's
client state."""
import json

from rayllm.trainer.loop import Ledger, StageLog


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_truncate_after_drops_this_stages_lines_past_the_checkpoint_and_keeps_other_stages(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = StageLog("rm", path)
    path.write_text(json.dumps({"stage": "sft", "step": 9}) + "\n")
    for step in range(0, 6):
        log({"step": step, "loss": 1.0})
    log({"step": 5, "event": "fault"})
    with path.open("a") as f:
        f.write('{"stage": "rm", "step": 6, "lo')  # a line cut by a crash mid-write
    log.truncate_after(3)  # resumed from the checkpoint of step 3
    assert [(r["stage"], r["step"]) for r in _lines(path)] == [("sft", 9), ("rm", 0), ("rm", 1), ("rm", 2), ("rm", 3),
                                                              ("rm", 5)]  # the fault event happened: kept
    log.truncate_after(0)  # no checkpoint: the stage starts over, its step-0 line too
    assert [(r["stage"], r["step"]) for r in _lines(path)] == [("sft", 9), ("rm", 5)]


def test_the_report_lists_fault_events_in_a_table_and_plots_no_series_of_them(tmp_path):
    from rayllm.report import write_report

    lines = [{"stage": "sft", "step": s, "loss": 2.0 - s / 10} for s in range(1, 4)]
    lines += [{"stage": "ppo", "event": "fault", "kind": "death", "group": "ppo/rollout", "rank": 0, "call": "push",
               "detect_s": None},  # an engine's event: no step
              {"stage": "sft", "event": "fault", "kind": "hang", "group": "sft/policy", "rank": 1, "step": 2,
               "detect_s": 4.91, "recover_s": 3.08, "world_size_after": 1}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    text = write_report(tmp_path, {"stages": []}).read_text()
    assert "## Faults and recoveries" in text
    assert "| sft | fault | hang | sft/policy | 1 |  | 2 | 4.91 | 3.08 | 1 |" in text
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["sft_loss.png"]


def test_ledger_records_each_step_and_round_trips_through_the_client_state():
    ledger = Ledger()
    ledger.add([3, 1])
    ledger.add((2, 0))
    state = json.loads(json.dumps({"ledger": ledger.steps}))
    again = Ledger.from_state(state)
    assert again.steps == [[3, 1], [2, 0]] and again.consumed() == [3, 1, 2, 0]
    assert Ledger.from_state({}).steps == []
