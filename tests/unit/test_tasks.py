"""Bundled tasks: ground-truth scorers, near-miss wrong responses for preference pairs, and PPO
prompt splits that keep evaluation prompts out of training."""
import json
import random

import pytest

from rayllm.config import PromptDataConfig
from rayllm.datasets.prompts import encode_prompt, encode_response, load_prompts
from rayllm.datasets.sft import DataError
from rayllm.datasets.tasks import SCORERS, WRONG, bundled


@pytest.mark.parametrize("task", ["arithmetic", "sort", "sort_unique"])
def test_correct_responses_score_one_and_near_misses_zero(task):
    rng = random.Random(0)
    for rec in bundled(task, 300, seed=1):
        assert SCORERS[task](rec["response"], rec) == 1.0
        wrong = WRONG[task](rec, rng)
        assert wrong != rec["response"] and SCORERS[task](wrong, rec) == 0.0


def test_sort_task_and_scorer():
    rec = {"prompt": "Sort: 3 1 2 1", "response": "1 1 2 3", "answer": [1, 1, 2, 3]}
    assert SCORERS["sort"]("1 1 2 3", rec) == 1.0
    assert SCORERS["sort"]("1 2 3", rec) == 0.0  # a dropped duplicate is wrong
    assert SCORERS["sort"]("1 1 3 2", rec) == 0.0
    ex = bundled("sort", 200, seed=0)
    assert all(4 <= len(r["answer"]) <= 8 and r["answer"] == sorted(r["answer"]) for r in ex)
    assert all(sorted(map(int, r["prompt"].removeprefix("Sort: ").split())) == r["answer"] for r in ex)
    unique = bundled("sort_unique", 200, seed=0)
    assert all(len(set(r["answer"])) == len(r["answer"]) and max(r["answer"]) <= 9 for r in unique)
    noisy = bundled("sort_unique_noisy", 400, seed=0)
    wrong = [r for r in noisy if SCORERS["sort_unique_noisy"](r["response"], r) == 0.0]
    assert 0.25 < len(wrong) / len(noisy) < 0.45  # the 35% near misses
    assert all(0 <= int(x) <= 9 for r in wrong for x in r["response"].split())


def test_sort_near_misses_include_miscounts():
    # The mistake a tiny reward model missed until its data had it: one copy of a repeated
    # number changed to a neighbouring value, re-sorted (same length, sorted, plausible).
    from collections import Counter

    rng = random.Random(0)
    recs = [r for r in bundled("sort", 600, seed=2) if len(set(r["answer"])) < len(r["answer"])]
    miscounts = 0
    for rec in recs:
        ys, wrong = rec["answer"], [int(x) for x in WRONG["sort"](rec, rng).split()]
        lost, gained = Counter(ys) - Counter(wrong), Counter(wrong) - Counter(ys)
        if wrong == sorted(wrong) and len(lost) == len(gained) == 1:
            (v, n), (w, m) = *lost.items(), *gained.items()
            miscounts += n == m == 1 and ys.count(v) > 1 and abs(v - w) == 1
    assert len(recs) > 300 and 0.15 < miscounts / len(recs) < 0.4


def test_arithmetic_scorer_reads_the_last_number():
    rec = {"answer": 12}
    assert SCORERS["arithmetic"]("5 + 7 = 12", rec) == 1.0
    assert SCORERS["arithmetic"]("5 + 7 = 13", rec) == 0.0
    assert SCORERS["arithmetic"]("no idea", rec) == 0.0


def test_eval_prompts_never_among_training_prompts(tmp_path):
    train, held = load_prompts(PromptDataConfig(source="bundled:sort", num_prompts=500, eval_prompts=64), seed=3)
    assert len(train) == 500 and len(held) == 64
    assert not {r["prompt"] for r in held} & {r["prompt"] for r in train}
    again = load_prompts(PromptDataConfig(source="bundled:sort", num_prompts=500, eval_prompts=64), seed=3)
    assert again == (train, held)  # deterministic
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps({"q": f"question {i}", "gold": i}) for i in range(20)) + "\n")
    train, held = load_prompts(PromptDataConfig(source=str(f), prompt_field="q", eval_prompts=5))
    assert len(held) == 5 and len(train) == 15 and all("gold" in r and "prompt" in r for r in train + held)
    f.write_text('{"q": "fine"}\n{"nope": 1}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: no string field 'q'"):
        load_prompts(PromptDataConfig(source=str(f), prompt_field="q", eval_prompts=0))


@pytest.mark.parametrize("line, got", [("[1, 2]", "an array"), ("3", "a number"), ('"x"', "a string"),
                                       ("null", "null")])
def test_prompt_line_that_is_not_an_object_names_file_line_and_expected_field(tmp_path, line, got):
    f = tmp_path / "p.jsonl"
    f.write_text('{"q": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"p.jsonl:2: expected a JSON object with string field 'q', got {got}$"):
        load_prompts(PromptDataConfig(source=str(f), prompt_field="q", eval_prompts=0))


def test_reward_model_and_policy_see_one_token_layout(tokenizer):
    # A response the policy generates (ending in EOS) is what the reward model was trained on.
    p, r = encode_prompt(tokenizer, "Sort: 3 1 2"), encode_response(tokenizer, "1 2 3")
    assert tokenizer.decode(p).endswith("<|assistant|>\n") and r[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(p + r, skip_special_tokens=False).count("<|end|>") == 2


def test_scorer_is_the_hook_else_the_bundled_tasks_checker():
    from rayllm.datasets.tasks import arithmetic_score, scorer, sort_score

    assert scorer("bundled:sort") is sort_score and scorer("bundled:sort_noisy") is sort_score
    assert scorer("data/prompts.jsonl") is None  # no checker for other sources unless named
    assert scorer("bundled:sort", "rayllm.datasets.tasks:arithmetic_score") is arithmetic_score
