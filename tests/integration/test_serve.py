"""`rayllm serve` on Ray Serve, on 127.0.0.1: the OpenAI-compatible policy endpoint gives what
offline vLLM generation gives with the same seed; the reward server scores as the reward group
does; a PPO stage reading its reward from the server gets the in-process reward model's rewards;
bad requests get HTTP 4xx with a reason, and the server keeps serving."""
import json
import os
import socket
import urllib.error
import urllib.request

import numpy as np
import pytest

from rayllm.config import PPOAlgoConfig

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def serve_port():
    from ray import serve

    port = _port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_path):
    from rayllm.models.tiny import value_model_from

    return value_model_from(tiny_path, tmp_path_factory.mktemp("rm") / "model", seed=3)


@pytest.fixture(scope="module")
def reward_url(serve_port, reward_model):
    from ray import serve

    from rayllm.serve import reward_app

    serve.run(reward_app(str(reward_model), cpus=0.5), name="reward", route_prefix="/reward", blocking=False)
    yield f"http://127.0.0.1:{serve_port}/reward/score"
    serve.delete("reward")


def test_openai_endpoint_completions_equal_offline_vllm_generation_with_the_same_seed(serve_port, tiny_path):
    import ray
    from ray import serve

    from rayllm.serve import policy_app

    serve.run(policy_app(str(tiny_path), "tiny", cpus=0.5, max_model_len=256), name="policy", route_prefix="/",
              blocking=False)

    @ray.remote(num_cpus=0.5)
    class Offline:
        def __init__(self, path):
            os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
            from vllm import LLM

            self.llm = LLM(model=path, tokenizer=path, dtype="float32", max_model_len=256, enforce_eager=True,
                           load_format="safetensors")

        def generate(self, prompt, **sampling):
            from vllm import SamplingParams

            return self.llm.generate([prompt], SamplingParams(**sampling), use_tqdm=False)[0].outputs[0].text

    offline = Offline.remote(str(tiny_path))
    url = f"http://127.0.0.1:{serve_port}/v1/completions"
    try:
        cases = [("Sort: 3 1 2", dict(temperature=0.0, max_tokens=12, seed=0)),
                 ("Sort: 9 4 7 1", dict(temperature=1.0, max_tokens=12, seed=11)),
                 ("Sort: 9 4 7 1", dict(temperature=1.0, max_tokens=12, seed=12))]
        served = []
        for prompt, s in cases:
            code, body = _post(url, {"model": "tiny", "prompt": prompt, **s})
            assert code == 200, body
            served.append(body["choices"][0]["text"])
            assert served[-1] == ray.get(offline.generate.remote(prompt, **s)), (prompt, s)
        assert served[1] != served[2]  # the seed is what decides a sampled completion
        # Bad requests: 4xx with a reason, and the endpoint keeps serving.
        code, body = _post(url, {"model": "tiny", "prompt": "x", "max_tokens": -1})
        assert 400 <= code < 500 and "max_tokens" in json.dumps(body), body
        code, body = _post(url, {"model": "no-such-model", "prompt": "x"})
        assert 400 <= code < 500 and "no-such-model" in json.dumps(body), body
        code, body = _post(url, {"model": "tiny", "prompt": cases[0][0], **cases[0][1]})
        assert code == 200 and body["choices"][0]["text"] == served[0]
    finally:
        ray.kill(offline)
        serve.delete("policy")


def test_reward_server_scores_as_the_reward_group_and_answers_bad_requests_with_400(reward_url, reward_model, tokenizer):
    from rayllm.config import GroupConfig
    from rayllm.group import ModelGroup
    from rayllm.reward_client import RemoteReward, RewardServerError

    rng = np.random.default_rng(0)
    rows = [{"input_ids": [int(t) for t in rng.integers(10, 900, n)]} for n in (5, 17, 9, 30, 12, 3)]
    group = ModelGroup("rm", GroupConfig(num_ranks=1, zero_stage=0, micro_batch_size=4, cpus_per_rank=0.5),
                       reward_model, "reward", trainable=False, pad_id=tokenizer.pad_token_id)
    try:
        want = group.scores(rows)
    finally:
        group.shutdown()
    client = RemoteReward(reward_url)
    assert client.scores(rows) == pytest.approx(want, abs=1e-5)
    for body, reason in [(b"{not json", "not JSON"), ({"input_ids": [[1, 2], []]}, "non-empty lists"),
                         ({"input_ids": [[10**9]]}, "token ids must be <"), ({"texts": ["a"]}, "expected")]:
        code, got = _post(reward_url, body)
        assert code == 400 and reason in got["error"], (body, got)
    with pytest.raises(RewardServerError, match=r"refused the request \(HTTP 400\).*token ids must be <"):
        client.scores([{"input_ids": [10**9]}])
    assert client.scores(rows[:2]) == pytest.approx(want[:2], abs=1e-5)  # still serving


# 62 s, the suite's budget: make test keeps the server's scores against the reward group's (above)
# and reward_url's checks (tests/unit/test_serve_requests.py).
@pytest.mark.slow
def test_ppo_with_the_served_reward_model_gets_the_in_process_reward_models_rewards(reward_url, reward_model,
                                                                                   tmp_path, tiny_path, tokenizer):
    """Two PPO iterations (GRPO: no critic) scored by the server: every sample's reward is what
    the in-process reward model gives the same tokens, and the iteration's reward is their mean."""
    from test_ppo import _stage

    from rayllm.config import GroupConfig
    from rayllm.group import ModelGroup
    from rayllm.trainer.ppo import PPOTrainer

    algo = PPOAlgoConfig(advantage="grpo", mini_batch_size=8, kl_estimator="k3")
    t = PPOTrainer(_stage(algo=algo, reward_url=reward_url), tmp_path, seed=0, artifacts={"sft": str(tiny_path)})
    served, scored = t.remote_reward.scores, []
    t.remote_reward.scores = lambda rows: scored.append(([r["input_ids"] for r in rows], served(rows))) or scored[-1][1]
    try:
        assert "reward" not in t.groups
        rewards = []
        for it in (1, 2):
            exp = t.make_experience(t.next_prompts(), it)
            rewards.append(exp["metrics"]["reward"])
            t.train(exp)
            if it == 1:
                t.sync(version=1)
    finally:
        t.shutdown()
    assert len(scored) == 2 and scored[0][0] != scored[1][0]
    group = ModelGroup("rm", GroupConfig(num_ranks=1, zero_stage=0, micro_batch_size=8, cpus_per_rank=0.5),
                       reward_model, "reward", trainable=False, pad_id=tokenizer.pad_token_id)
    try:
        for (ids, got), reward in zip(scored, rewards):
            want = group.scores([{"input_ids": x} for x in ids])
            assert got == pytest.approx(want, abs=1e-5) and reward == pytest.approx(float(np.mean(want)), abs=1e-5)
    finally:
        group.shutdown()
