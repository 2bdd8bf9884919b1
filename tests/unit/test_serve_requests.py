"""The reward server's request parsing (rayllm/serve.py) and the PPO stage's reward_url checks."""
import pytest

from rayllm.config import PPO, ModelConfig
from rayllm.serve import BadRequest, parse_score_request


def test_score_requests_take_token_ids_or_prompt_response_texts():
    assert parse_score_request(b'{"input_ids": [[1, 2, 3], [4]]}') == {"input_ids": [[1, 2, 3], [4]]}
    got = parse_score_request(b'{"prompts": ["a"], "responses": ["b"]}')
    assert got == {"prompts": ["a"], "responses": ["b"], "records": [{}]}


@pytest.mark.parametrize("body, reason", [
    (b"", 'expected a JSON object'), (b"[1]", "expected a JSON object"), (b"{x", "not JSON"),
    (b'{"input_ids": []}', "non-empty list"), (b'{"input_ids": [[1, -2]]}', "ints >= 0"),
    (b'{"input_ids": [[true]]}', "ints >= 0"), (b'{"prompts": ["a"], "responses": []}', "same length"),
    (b'{"prompts": ["a"], "responses": ["b"], "records": [1, 2]}', "one object per prompt"),
    (b'{"text": "a"}', 'expected "input_ids"'),
])
def test_a_bad_score_request_is_refused_with_its_reason(body, reason):
    with pytest.raises(BadRequest, match=reason):
        parse_score_request(body)


def test_reward_url_must_be_http_and_the_only_source_of_the_reward():
    assert PPO(reward_url="http://127.0.0.1:8000/score").reward_url.endswith("/score")
    with pytest.raises(ValueError, match="reward_url must be an http"):
        PPO(reward_url="127.0.0.1:8000")
    with pytest.raises(ValueError, match="three sources of the reward: set one"):
        PPO(reward_url="http://h/score", reward_model=ModelConfig())


def test_a_served_rule_based_verifier_scores_prompt_response_texts_and_refuses_token_ids(tmp_path):
    from rayllm.serve import RewardServer

    (tmp_path / "rule.py").write_text("def reward(response, record):\n    return float(response == record['answer'])\n")
    server = RewardServer.func_or_class(None, reward_fn=f"{tmp_path / 'rule.py'}:reward")  # the class Serve runs
    req = parse_score_request(b'{"prompts": ["Sort: 2 1", "Sort: 3 1"], "responses": ["1 2", "3 1"], '
                              b'"records": [{"answer": "1 2"}, {"answer": "1 3"}]}')
    assert server.score(req) == [1.0, 0.0]
    with pytest.raises(BadRequest, match="scores with a rule"):
        server.score({"input_ids": [[1, 2]]})
