"""The chaos hook's environment variable: which faults it names, and a clear error for a bad entry."""
import pytest


def test_chaos_from_the_environment_names_group_rank_step_and_kind():
    from rayllm.chaos import faults_from_env

    got = faults_from_env("sft/policy", "sft/policy:1:3:kill:0.2;ppo/critic:0:2:hang;sft/policy:0:5:raise:0:logprobs")
    assert [(f.rank, f.step, f.kind, f.after_s, f.call) for f in got] == [
        (1, 3, "kill", 0.2, "train_step"), (0, 5, "raise", 0.0, "logprobs")]
    with pytest.raises(ValueError, match="RAYLLM_CHAOS.*'sft/policy:x:3:kill'"):
        faults_from_env("sft/policy", "sft/policy:x:3:kill")
    with pytest.raises(ValueError, match="group:rank:step:kind"):
        faults_from_env("sft/policy", "sft/policy:1")
