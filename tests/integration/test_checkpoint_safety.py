"""A checkpoint is checked before anything in it is unpickled, and unpickled with
weights_only=True: a directory rayllm did not write, or one taken on other data, is refused, and
a booby-trapped pickle (one that would create a marker file when loaded) never runs."""
import json
import shutil

import pytest
import torch

from rayllm.config import PPO, GroupConfig
from rayllm.group import ModelGroup
from rayllm.group.model_group import CHECKPOINT_META, CheckpointRefused
from rayllm.trainer.checkpoints import resume_state
from rayllm.trainer.ppo import checkpoint_state

pytestmark = pytest.mark.usefixtures("ray_cluster")


class _Trap:
    """Unpickling this calls open(marker, "w"): the file appears iff the pickle was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _plant(path, marker):
    """A DeepSpeed-looking checkpoint file whose unpickling creates `marker`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": _Trap(marker), "optimizer": None}, path)


def test_the_trap_is_armed(tmp_path):
    """The control: loaded the way DeepSpeed's own checkpoint engine loads (weights_only=False),
    the planted file does create its marker."""
    marker = tmp_path / "pwned"
    _plant(tmp_path / "x.pt", marker)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


@pytest.fixture(scope="module")
def group(tiny_path):
    g = ModelGroup("safety/policy", GroupConfig(num_ranks=1, zero_stage=0), tiny_path)
    yield g
    g.shutdown()


def _foreign_checkpoint(ckpt, marker, meta: dict | None):
    """<ckpt>/step5 with a booby-trapped model-states file, `latest` naming it, and rayllm.json
    holding `meta` (None: no rayllm.json, as in a directory rayllm did not write)."""
    _plant(ckpt / "step5" / "mp_rank_00_model_states.pt", marker)
    if meta is not None:
        (ckpt / "step5" / CHECKPOINT_META).write_text(json.dumps(meta))
    (ckpt / "latest").write_text("step5")


def test_resume_refuses_a_foreign_fingerprint_before_unpickling(group, tmp_path):
    ckpt, marker = tmp_path / "checkpoints", tmp_path / "pwned"
    _foreign_checkpoint(ckpt, marker, {"data": "other-data", "step": 5})
    with pytest.raises(CheckpointRefused) as e:
        resume_state(group, ckpt, "my-data", "sft")
    msg = str(e.value)
    assert str(ckpt) in msg and "other-data" in msg and "my-data" in msg and "remove it to start over" in msg
    assert not marker.exists()


def test_a_checkpoint_without_rayllm_json_is_refused_as_not_written_by_rayllm(group, tmp_path):
    ckpt, marker = tmp_path / "checkpoints", tmp_path / "pwned"
    _foreign_checkpoint(ckpt, marker, None)
    for load in (lambda: resume_state(group, ckpt, "my-data", "sft"),
                 lambda: group.load_checkpoint(ckpt),
                 lambda: group.load_checkpoint(ckpt, "step5")):
        with pytest.raises(CheckpointRefused, match="not a checkpoint rayllm wrote"):
            load()
    assert not marker.exists()


def test_load_checkpoint_refuses_other_data_and_tags_outside_the_directory(group, tmp_path):
    ckpt, marker = tmp_path / "checkpoints", tmp_path / "pwned"
    _foreign_checkpoint(ckpt, marker, {"data": "other-data", "step": 5})
    with pytest.raises(CheckpointRefused, match="other-data != my-data"):
        group.load_checkpoint(ckpt, data="my-data")
    _foreign_checkpoint(tmp_path / "elsewhere", marker, {"data": "my-data", "step": 5})
    (ckpt / "latest").write_text("../elsewhere/step5")
    with pytest.raises(CheckpointRefused, match="not a directory name"):
        group.load_checkpoint(ckpt, data="my-data")
    assert not marker.exists()


def test_a_checkpoint_holds_no_pickle_and_one_planted_in_it_is_never_read(group, tmp_path, random_rows):
    """A checkpoint rayllm wrote is safetensors and JSON only (rayllm.group.checkpoint_files);
    a pickle planted in it afterwards, under the name DeepSpeed would load, is never opened."""
    ckpt, marker = tmp_path / "checkpoints", tmp_path / "pwned"
    group.train_step(random_rows(4))
    tag = group.save_checkpoint(ckpt, 1, {"data": "my-data"})
    meta = json.loads((ckpt / tag / CHECKPOINT_META).read_text())
    assert {k: meta[k] for k in ("data", "step", "world_size")} == {"data": "my-data", "step": 1, "world_size": 1}
    assert sorted(p.suffix for p in (ckpt / tag).iterdir()) == [".json", ".json", ".safetensors"]
    _plant(ckpt / tag / "mp_rank_00_model_states.pt", marker)
    assert group.load_checkpoint(ckpt, data="my-data")["step"] == 1
    assert not marker.exists()


def test_ppo_refuses_group_checkpoints_without_rayllm_json_or_of_other_data(tmp_path):
    """PPO reads trainer.json first; the policy and critic tags it names must carry rayllm's JSON
    with the same fingerprint, all checked (as JSON) before any group starts."""
    stage, ckpt, marker = PPO(), tmp_path / "checkpoints", tmp_path / "pwned"
    (ckpt).mkdir()
    (ckpt / "trainer.json").write_text(json.dumps({"data": "fp", "tag": "step5", "iteration": 5}))
    _plant(ckpt / "policy" / "step5" / "mp_rank_00_model_states.pt", marker)
    with pytest.raises(CheckpointRefused, match="not a checkpoint rayllm wrote"):
        checkpoint_state(stage, ckpt, "fp")
    (ckpt / "policy" / "step5" / CHECKPOINT_META).write_text(json.dumps({"data": "fp", "step": 5}))
    assert checkpoint_state(stage, ckpt, "fp")["tag"] == "step5"
    _plant(ckpt / "critic" / "step5" / "mp_rank_00_model_states.pt", marker)
    (ckpt / "critic" / "step5" / CHECKPOINT_META).write_text(json.dumps({"data": "other", "step": 5}))
    with pytest.raises(CheckpointRefused, match=r"critic checkpoint .* \(other != fp\)"):
        checkpoint_state(stage, ckpt, "fp")
    shutil.rmtree(ckpt / "critic")
    (ckpt / "trainer.json").write_text(json.dumps({"data": "fp", "tag": "../../x", "iteration": 5}))
    with pytest.raises(CheckpointRefused, match="not a directory name"):
        checkpoint_state(stage, ckpt, "fp")
    assert not marker.exists()


def _pickled_weights_only(src, dest):
    """`src` (a safetensors model dir) with its weights as pytorch_model.bin (a pickle) instead."""
    from transformers import AutoModelForCausalLM

    dest.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dest / f.name)
    torch.save(AutoModelForCausalLM.from_pretrained(src).state_dict(), dest / "pytorch_model.bin")
    return dest


def test_model_weights_are_loaded_only_from_safetensors(tiny_path, tmp_path):
    """transformers falls back to pytorch_model.bin when there is no model.safetensors; rayllm's
    ranks and its value-model builder refuse to."""
    from rayllm.models.tiny import value_model_from

    binary = _pickled_weights_only(tiny_path, tmp_path / "bin-model")
    with pytest.raises(Exception, match="no file named model.safetensors"):
        ModelGroup("safety/bin", GroupConfig(num_ranks=1, zero_stage=0), binary)
    with pytest.raises(OSError, match="no file named model.safetensors"):
        value_model_from(binary, tmp_path / "critic")
