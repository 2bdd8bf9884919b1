"""Reward-model stage on a local Ray cluster: the pairwise loss trains a scalar head in the right
direction, is the same on 1 rank and 2, and the stage's saved model scores rows as the group did."""
import json

import pytest
import torch

from rayllm.config import GroupConfig, PreferenceDataConfig, RewardModel, TrainConfig
from rayllm.datasets.preference import flatten_pairs, load_pairs, split_pairs, tokenize_pair
from rayllm.group import ModelGroup
from rayllm.models import value_model_from
from rayllm.trainer.reward import run_reward

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _rows(tok, n_pairs, seed=0):
    pairs = load_pairs(PreferenceDataConfig(num_examples=n_pairs), seed)
    return flatten_pairs([tokenize_pair(tok, p, 128) for p in pairs])


def _hf_scores(model, rows):
    """Scores with transformers, one unpadded row at a time: the head at the last token."""
    with torch.no_grad():
        return [float(model(torch.tensor([r["input_ids"]])).logits[0, 0]) for r in rows]


@pytest.fixture(scope="module")
def reward_init(tiny_path, tmp_path_factory):
    """The tiny causal LM with a fresh scalar head, as a reward stage builds from an SFT model."""
    return value_model_from(tiny_path, tmp_path_factory.mktemp("rm") / "init", seed=0)


def test_pairwise_loss_direction_memorizes_four_pairs(reward_init, tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    rows = _rows(tokenizer, 4, seed=3)  # [c0, r0, c1, r1, ...]: right answer vs near miss
    cfg = GroupConfig(num_ranks=2, zero_stage=2, micro_batch_size=4, cpus_per_rank=0.5,
                      optimizer={"lr": 1e-3, "scheduler": "constant"})
    g = ModelGroup("rm/reward", cfg, reward_init, kind="reward", pad_id=tokenizer.pad_token_id)
    try:
        steps = [g.train_step(rows, loss="pairwise", global_count=4) for _ in range(19)]
        before_last = torch.tensor(g.scores(rows))
        steps.append(g.train_step(rows, loss="pairwise", global_count=4))
        scores = g.scores(rows)
        g.save_hf(tmp_path / "rm")
    finally:
        g.shutdown()
    assert all(m["tokens"] == 4 for m in steps)  # the pairwise loss counts pairs
    assert steps[-1]["accuracy"] == 1.0 and steps[-1]["loss"] < 0.5 * steps[0]["loss"], steps[-1]
    # A step reports the mean margin of the scores it starts from: here those taken before step 20.
    assert steps[-1]["margin"] == pytest.approx(float((before_last[0::2] - before_last[1::2]).mean()), abs=1e-4)
    assert all(c > r for c, r in zip(scores[0::2], scores[1::2])), scores  # chosen above rejected
    # The saved model scores as the group did: the head at each row's last non-pad token.
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert _hf_scores(model, rows) == pytest.approx(scores, abs=1e-4)


def _pairwise_losses(path, cfg, rows, pad_id, steps=3):
    g = ModelGroup("rm/reward", cfg, path, kind="reward", pad_id=pad_id)
    try:
        return [g.train_step(rows, loss="pairwise", global_count=len(rows) // 2) for _ in range(steps)]
    finally:
        g.shutdown()


def test_pairwise_loss_is_world_size_invariant(reward_init, tokenizer):
    # 6 pairs in micro-batches of 4 rows: 3 micro-batches, so on 2 ranks one gets a filler.
    rows = _rows(tokenizer, 6, seed=5)
    base = dict(zero_stage=2, micro_batch_size=4, cpus_per_rank=0.5)
    one = _pairwise_losses(reward_init, GroupConfig(num_ranks=1, **base), rows, tokenizer.pad_token_id)
    two = _pairwise_losses(reward_init, GroupConfig(num_ranks=2, **base), rows, tokenizer.pad_token_id)
    assert one[0]["loss"] > one[-1]["loss"]  # it trains
    for key in ("loss", "accuracy", "margin"):
        assert [m[key] for m in one] == pytest.approx([m[key] for m in two], abs=1e-5, rel=0), key
    assert [m["tokens"] for m in one] == [m["tokens"] for m in two] == [6] * 3  # filler pairs not counted


# Slow tier (budget): the e2e pipeline trains, evaluates and saves a reward stage (tests/e2e/test_rlhf_pipeline.py).
@pytest.mark.slow
def test_reward_stage_trains_evaluates_and_saves(tiny_path, tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    stage = RewardModel(
        name="rm",
        group=GroupConfig(num_ranks=2, zero_stage=2, micro_batch_size=8, cpus_per_rank=0.5,
                          optimizer={"lr": 1e-3}),
        data=PreferenceDataConfig(num_examples=256, eval_fraction=0.125),
        train=TrainConfig(global_batch_size=16, epochs=3, eval_every=15),
    )
    s = run_reward(stage, tmp_path / "rm", seed=0, artifacts={"sft": str(tiny_path)}, progress=False)
    assert s["stage"] == "rm" and s["num_ranks"] == 2 and s["zero_stage"] == 2
    assert s["train_pairs"] + s["eval_pairs"] == 256 and s["eval_pairs"] > 10
    assert s["steps"] == 3 * (s["train_pairs"] // 16)

    metrics = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["stage"] == "rm" for m in metrics)
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, s["steps"] + 1))
    # A step's accuracy is the share of its 16 pairs ranked right: a whole number of sixteenths.
    assert all(m["pairs"] == 16 and (m["accuracy"] * 16).is_integer() for m in steps), [m["accuracy"] for m in steps]
    first, last = steps[:5], steps[-5:]
    assert sum(m["loss"] for m in last) < sum(m["loss"] for m in first), [m["loss"] for m in steps]
    evals = [m for m in metrics if "eval_accuracy" in m]
    assert [m["step"] for m in evals] == [0, 15, 30, s["steps"]]
    assert evals[0]["eval_accuracy"] == s["eval_accuracy_initial"]
    assert evals[-1]["eval_accuracy"] == s["eval_accuracy_final"]

    # The saved model, loaded by transformers, reproduces the stage's held-out numbers.
    _, held = split_pairs(load_pairs(stage.data, 0), stage.data.eval_fraction, 0)
    rows = flatten_pairs([tokenize_pair(tokenizer, p, stage.data.max_length) for p in held])
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model").eval()
    scores = torch.tensor(_hf_scores(model, rows))
    chosen, rejected = scores[0::2], scores[1::2]
    assert len(chosen) == s["eval_pairs"]
    assert float((chosen - rejected).mean()) == pytest.approx(s["eval_margin_final"], abs=1e-4)
    assert float((chosen > rejected).float().mean()) == pytest.approx(s["eval_accuracy_final"], abs=1e-9)
    # The initial accuracy is that of the model the stage started from (the SFT trunk with a fresh
    # head, written to rm/init) on the same held-out pairs.
    init = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "init").eval()
    init_scores = torch.tensor(_hf_scores(init, rows))
    assert float((init_scores[0::2] > init_scores[1::2]).float().mean()) == pytest.approx(
        s["eval_accuracy_initial"], abs=1e-9)
    # Batched with right padding, transformers pools at each row's last non-pad token too.
    few = rows[:6]
    T = max(len(r["input_ids"]) for r in few)
    ids = torch.tensor([r["input_ids"] + [tokenizer.pad_token_id] * (T - len(r["input_ids"])) for r in few])
    mask = (torch.arange(T)[None] < torch.tensor([len(r["input_ids"]) for r in few])[:, None]).long()
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()
    assert batched == pytest.approx(scores[:6].tolist(), abs=1e-4)


def test_reward_stage_needs_a_model(tmp_path):
    with pytest.raises(ValueError, match=r"reward stage 'rm'.*earlier SFT stage.*model.path"):
        run_reward(RewardModel(name="rm"), tmp_path, seed=0, artifacts={}, progress=False)


def test_driver_crash_mid_stage_resumes_at_its_checkpoint(tiny_path, tmp_path, monkeypatch):
    """The driver raises at step 5 (in its call to ModelGroup.train_step; no rank process dies)
    with a checkpoint at step 3: the rerun does steps 4-6 once more, with the losses an uncrashed
    run has, and keeps the accuracy of the model the stage started from."""
    stage = RewardModel(
        name="rm", group=GroupConfig(num_ranks=2, zero_stage=2, micro_batch_size=4, cpus_per_rank=0.5),
        data=PreferenceDataConfig(num_examples=64, eval_fraction=0.25),
        train=TrainConfig(global_batch_size=8, max_steps=6, checkpoint_every=3),
    )
    real, calls = ModelGroup.train_step, {"n": 0}

    def driver_raises_at_step_5(self, rows, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("driver crash (injected)")
        return real(self, rows, **kw)

    monkeypatch.setattr(ModelGroup, "train_step", driver_raises_at_step_5)
    out = tmp_path / "rm"
    with pytest.raises(RuntimeError, match=r"driver crash \(injected\)"):
        run_reward(stage, out, seed=0, artifacts={"sft": str(tiny_path)}, progress=False)
    assert (out / "checkpoints" / "latest").read_text() == "step3"
    first = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    s = run_reward(stage, out, seed=0, artifacts={"sft": str(tiny_path)}, progress=False)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics if "loss" in m]
    # Step 4 ran before the crash; its line is dropped on resume and written again: each step once.
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [m["step"] for m in first if "loss" in m] == [1, 2, 3, 4]
    resumed_4 = next(m for m in metrics if m.get("step") == 4 and "loss" in m)
    assert resumed_4["loss"] == pytest.approx(first[-1]["loss"], abs=1e-6)  # same pairs, same state
    assert s["eval_accuracy_initial"] == first[0]["eval_accuracy"]
    assert (out / "model" / "config.json").is_file()


# The fast tier checks policy samples in tests/e2e/test_rlhf_pipeline.py (their pairs and file).
@pytest.mark.slow
def test_policy_samples_add_the_policys_own_mistakes(tiny_path, tokenizer, tmp_path, monkeypatch):
    """policy_samples: the starting policy (here the untrained tiny model, so every sample is
    wrong) answers the pairs' prompts; its wrong answers, labelled by the task's checker,
    join the pairs as rejected responses (held-out accuracy reported on them alone), and a
    rerun reuses the written pairs without sampling again."""
    from rayllm.config import PolicySamplesConfig, RolloutConfig, SamplingConfig
    from rayllm.datasets.tasks import sort_score
    from rayllm.io import read_jsonl
    from rayllm.trainer import reward as reward_mod

    stage = RewardModel(
        name="rm", group=GroupConfig(num_ranks=1, zero_stage=2, micro_batch_size=8, cpus_per_rank=0.5),
        data=PreferenceDataConfig(source="bundled:sort", num_examples=64, eval_fraction=0.25),
        policy_samples=PolicySamplesConfig(num_prompts=24, max_pairs_per_prompt=2, rollout=RolloutConfig(
            cpus_per_engine=0.5, chunk_size=8, sampling=SamplingConfig(n=3, temperature=1.0, max_tokens=8))),
        train=TrainConfig(global_batch_size=8, max_steps=2),
    )
    out = tmp_path / "rm"
    s = run_reward(stage, out, seed=0, artifacts={"sft": str(tiny_path)}, progress=False)
    pairs = read_jsonl(out / "policy_pairs.jsonl")
    # An untrained model never sorts right: all 3 samples of each of the 24 prompts are wrong (and
    # distinct, drawn at temperature 1), so each prompt gives max_pairs_per_prompt = 2 pairs.
    assert s["policy_sample_accuracy"] == 0.0
    assert s["policy_pairs"] == len(pairs) == 24 * 2
    by_prompt = {}
    for p in pairs:
        assert p["origin"] == "policy" and sort_score(p["chosen"], p) == 1.0 and sort_score(p["rejected"], p) == 0.0
        by_prompt.setdefault(p["prompt"], []).append(p["rejected"])
    assert len(by_prompt) == 24 and all(len(v) == len(set(v)) == 2 for v in by_prompt.values())
    assert s["train_pairs"] + s["eval_pairs"] == 64 + len(pairs)
    # The on-policy accuracy is the saved model's, on the held-out pairs that came from the policy.
    from transformers import AutoModelForSequenceClassification

    _, held = split_pairs(load_pairs(stage.data, 0) + pairs, stage.data.eval_fraction, 0)
    rows = flatten_pairs([tokenize_pair(tokenizer, p, stage.data.max_length) for p in held
                          if p.get("origin") == "policy"])
    assert rows
    scores = torch.tensor(_hf_scores(AutoModelForSequenceClassification.from_pretrained(out / "model").eval(), rows))
    assert float((scores[0::2] > scores[1::2]).float().mean()) == pytest.approx(
        s["eval_accuracy_policy_pairs_final"], abs=1e-9)

    class NoSampling:
        def __init__(self, *a, **k):
            raise AssertionError("the rerun sampled again")

    monkeypatch.setattr("rayllm.rollout.RolloutPool", NoSampling)
    (out / "model").rename(out / "model.first")
    s2 = reward_mod.run_reward(stage, out, seed=0, artifacts={"sft": str(tiny_path)}, progress=False)
    assert s2["policy_pairs"] == len(pairs) and s2["train_pairs"] == s["train_pairs"]
