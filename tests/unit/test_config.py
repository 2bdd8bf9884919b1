import subprocess
import sys
from pathlib import Path

import pytest

from rayllm import PPO, SFT, GroupConfig, Pipeline, TrainConfig
from rayllm.config import PPOAlgoConfig
from rayllm.cli import main
from rayllm.pipeline_file import ConfigError, load_pipeline, parse_overrides

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_validate():
    p = Pipeline(name="x", stages=[SFT()])
    assert p.stage("sft").group.zero_stage == 2
    assert p.out_dir == Path("runs/x")


def test_unknown_stage_name_raises_key_error_listing_the_stage_names():
    p = Pipeline(name="x", stages=[SFT(), PPO(name="ppo")])
    with pytest.raises(KeyError, match=r"pipeline 'x' has no stage 'rm'; its stages: \['sft', 'ppo'\]"):
        p.stage("rm")


@pytest.mark.parametrize(
    "override, field",
    [
        ("sft.group.zero_stage=5", "sft.group.zero_stage"),
        ("sft.group.num_ranks=0", "sft.group.num_ranks"),
        ("sft.group.precision.dtype=fp8", "sft.group.precision.dtype"),
        ("sft.group.optimizer.lr=-1", "sft.group.optimizer.lr"),
        ("sft.train.bogus=1", "sft.train.bogus"),
        ("sft.model.path=/nonexistent/model", "sft.model"),
        ("sft.data.source=/nonexistent.jsonl", "sft.data"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_pipeline(ROOT / "pipelines/sft_tiny.py", [override])
    assert field in str(e.value)


def test_cross_field_rules():
    with pytest.raises(ValueError, match="offload_params needs zero_stage 3"):
        GroupConfig(zero_stage=2, offload_params=True)
    with pytest.raises(ValueError, match="offload_optimizer needs zero_stage"):
        GroupConfig(zero_stage=0, offload_optimizer=True)
    with pytest.raises(ValueError, match="multiple of group.micro_batch_size"):
        SFT(group=GroupConfig(num_ranks=2, micro_batch_size=4), train=TrainConfig(global_batch_size=12))
    with pytest.raises(ValueError, match="unique"):
        Pipeline(name="x", stages=[SFT(), SFT()])
    with pytest.raises(ValueError, match="set algo.tis_cap to None"):
        PPO(algo=PPOAlgoConfig(behavior_logprobs="engine"))
    PPO(algo=PPOAlgoConfig(behavior_logprobs="engine", tis_cap=None))


def test_num_ranks_takes_a_range_and_refuses_bad_ones_and_colocation():
    g = GroupConfig(num_ranks=[1, 3])
    assert g.size_range == (1, 3) and g.min_ranks == 1 and g.max_ranks == 3
    fixed = GroupConfig(num_ranks=4)
    assert fixed.size_range == (4, 4) and fixed.min_ranks == 1  # a fixed group goes on with any survivors
    for bad in ([3, 2], [0, 2], 0):
        with pytest.raises(ValueError, match="num_ranks must be N >= 1 or \\[min, max\\]"):
            GroupConfig(num_ranks=bad)
    with pytest.raises(ValueError, match="is a range, which needs the group's own placement"):
        GroupConfig(num_ranks=[1, 2], colocate_with="policy")
    with pytest.raises(ValueError, match="multiple of group.micro_batch_size \\(4\\) x the group's \\(most\\) ranks \\(3\\)"):
        SFT(group=GroupConfig(num_ranks=[1, 3], micro_batch_size=4), train=TrainConfig(global_batch_size=16))


def test_rank_resources_need_one_shape_per_slot_and_their_own_placement():
    g = GroupConfig(num_ranks=[1, 2], rank_resources=[{"gpus": 1, "accelerator_type": "A100"}, {"cpus": 2}])
    assert g.per_slot_placement and g.rank_resources[1].cpus == 2
    with pytest.raises(ValueError, match="rank_resources has 1 shapes for up to 2 ranks"):
        GroupConfig(num_ranks=2, rank_resources=[{"cpus": 1}])
    with pytest.raises(ValueError, match="cannot be colocated"):
        GroupConfig(num_ranks=1, rank_resources=[{"cpus": 1}], colocate_with="policy")


def test_num_ranks_range_from_the_command_line():
    p = load_pipeline(ROOT / "pipelines/sft_tiny.py", ["sft.group.num_ranks=[1,2]"])
    assert p.stage("sft").group.size_range == (1, 2)


def test_sft_data_sources_are_checked(tmp_path):
    from rayllm import PrepSettings, SFTDataConfig

    assert SFTDataConfig(prepared=str(tmp_path)).prepared == str(tmp_path)
    with pytest.raises(ValueError, match="is not a directory"):
        SFTDataConfig(prepared=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="needs data.packing true"):
        SFTDataConfig(prepared=str(tmp_path), packing=False)
    with pytest.raises(ValueError, match="does not exist"):
        SFTDataConfig(source=str(tmp_path / "none.jsonl"))
    with pytest.raises(ValueError, match="overlap"):
        PrepSettings(seq_len=64, overlap=64)


def test_overrides_are_typed_and_address_stages_by_name():
    assert parse_overrides(["a=3", "b=true", "c=1e-4", "d=[q_proj, v_proj]", "e=abc"]) == {
        "a": 3, "b": True, "c": 1e-4, "d": ["q_proj", "v_proj"], "e": "abc"}
    p = load_pipeline(ROOT / "pipelines/sft_tiny.py",
                      ["sft.group.zero_stage=3", "run_dir=/tmp/r", "ray.num_cpus=8",
                       "sft.group.lora.target_modules=[q_proj]"])
    s = p.stage("sft")
    assert (s.group.zero_stage, p.run_dir, p.ray.num_cpus, s.group.lora.target_modules) == (3, "/tmp/r", 8, ["q_proj"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_pipeline(ROOT / "pipelines/sft_tiny.py", ["sft.group.zero_stage"])


def test_yaml_round_trip(tmp_path):
    import yaml

    p = load_pipeline(ROOT / "pipelines/sft_tiny.py")
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(p.model_dump(mode="json")))
    assert load_pipeline(f) == p
    f.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_pipeline(f)
    f.write_text("name: x\nstages: []\n")
    with pytest.raises(ConfigError, match="stages"):
        load_pipeline(f)


def test_python_file_without_pipeline(tmp_path):
    f = tmp_path / "p.py"
    f.write_text("X = 1\n")
    with pytest.raises(ConfigError, match="defines no PIPELINE"):
        load_pipeline(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_pipeline(tmp_path / "missing.py")


def test_cli_rejects_bad_config_before_starting_ray(capsys, monkeypatch):
    import ray

    def no_ray(*a, **k):
        raise AssertionError("Ray was started for an invalid config")

    monkeypatch.setattr(ray, "init", no_ray)
    assert main(["run", str(ROOT / "pipelines/sft_tiny.py"), "--set", "sft.group.zero_stage=7"]) == 2
    assert "sft.group.zero_stage" in capsys.readouterr().err


def test_cli_config_prints_resolved_yaml():
    out = subprocess.run([sys.executable, "-m", "rayllm.cli", "config", str(ROOT / "pipelines/sft_tiny.py"),
                          "--set", "sft.group.zero_stage=1"], capture_output=True, text=True, check=True).stdout
    assert "zero_stage: 1" in out


def test_data_prepare_cli_errors_before_starting_ray(tmp_path, capsys, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray started")))
    cfg = tmp_path / "d.yaml"
    cfg.write_text(f"sources: [{tmp_path}/nothing/*.jsonl]\noutput: {tmp_path}/out\n")
    assert main(["data", "prepare", str(cfg)]) == 2
    assert "matches no readable file" in capsys.readouterr().err
    assert main(["data", "prepare", str(cfg), "--set", "seq_len=16", "--set", "overlap=16"]) == 2
    assert "overlap (16) must be smaller than seq_len (16)" in capsys.readouterr().err
    assert main(["data", "prepare", str(cfg), "--set", "kind=audio"]) == 2
    assert "kind" in capsys.readouterr().err
