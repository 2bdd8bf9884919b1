import json

import pytest

from rayllm.config import PreferenceDataConfig
from rayllm.datasets.preference import (
    DataError,
    flatten_pairs,
    load_pairs,
    pair_is_informative,
    split_pairs,
    tokenize_pair,
)
from rayllm.datasets.prompts import encode_prompt, encode_response
from rayllm.datasets.tasks import arithmetic_score


def test_bundled_pairs_are_right_against_near_miss_wrong():
    pairs = load_pairs(PreferenceDataConfig(num_examples=300), seed=1)
    assert len(pairs) == 300
    for p in pairs:
        assert arithmetic_score(p["chosen"], p) == 1.0, p
        assert arithmetic_score(p["rejected"], p) == 0.0, p
        # A near miss: the same expression, only the result differs.
        assert p["chosen"].split(" = ")[0] == p["rejected"].split(" = ")[0]
    assert load_pairs(PreferenceDataConfig(num_examples=300), seed=1) == pairs  # deterministic
    assert load_pairs(PreferenceDataConfig(num_examples=300), seed=2) != pairs


def test_tokenized_layout_is_what_ppo_scores(tokenizer):
    pair = {"prompt": "What is 12 + 30?", "chosen": "12 + 30 = 42", "rejected": "12 + 30 = 43"}
    chosen, rejected = tokenize_pair(tokenizer, pair, 128)
    prompt = encode_prompt(tokenizer, pair["prompt"])
    assert chosen["input_ids"] == prompt + encode_response(tokenizer, pair["chosen"])
    assert rejected["input_ids"] == prompt + encode_response(tokenizer, pair["rejected"])
    assert chosen["input_ids"][-1] == tokenizer.eos_token_id
    assert chosen["loss_mask"] == [1] * len(chosen["input_ids"])
    assert rejected["loss_mask"] == [1] * len(rejected["input_ids"])
    assert pair_is_informative(chosen, rejected)
    assert flatten_pairs([(chosen, rejected), (rejected, chosen)]) == [chosen, rejected, rejected, chosen]


def test_truncation_keeps_the_prompt_and_cuts_the_response_end(tokenizer):
    pair = {"prompt": "What is 12 + 30?", "chosen": "12 + 30 = 42 " * 5, "rejected": "no"}
    prompt = encode_prompt(tokenizer, pair["prompt"])
    n = len(prompt) + 3
    chosen, rejected = tokenize_pair(tokenizer, pair, n)
    assert chosen["input_ids"] == (prompt + encode_response(tokenizer, pair["chosen"]))[:n]
    assert len(chosen["input_ids"]) == len(chosen["loss_mask"]) == n
    assert rejected["input_ids"] == prompt + encode_response(tokenizer, "no")  # short: untouched
    # Truncated before the responses differ: nothing to rank.
    same = tokenize_pair(tokenizer, {"prompt": "x " * 50, "chosen": "a", "rejected": "b"}, 16)
    assert same[0]["input_ids"] == same[1]["input_ids"] and not pair_is_informative(*same)


def test_split_is_deterministic_and_disjoint_by_prompt():
    pairs = load_pairs(PreferenceDataConfig(num_examples=1000), seed=0)
    prompts = {p["prompt"] for p in pairs}
    assert len(prompts) < len(pairs)  # the bundled task repeats prompts: the split must group them
    train, held = split_pairs(pairs, 0.1, seed=0)
    assert len(train) + len(held) == len(pairs)
    held_prompts = {p["prompt"] for p in held}
    assert held_prompts.isdisjoint(p["prompt"] for p in train)
    assert len(held_prompts) == round(0.1 * len(prompts))
    assert split_pairs(pairs, 0.1, seed=0) == (train, held)
    assert split_pairs(list(reversed(pairs)), 0.1, seed=0)[1] == list(reversed(held))  # order-free
    assert {p["prompt"] for p in split_pairs(pairs, 0.1, seed=1)[1]} != held_prompts
    # Tiny inputs still give both sides.
    two = [{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "b", "chosen": "x", "rejected": "y"}]
    tr, ev = split_pairs(two, 0.9, seed=0)
    assert len(tr) == len(ev) == 1
    with pytest.raises(DataError, match="at least 2 distinct prompts"):
        split_pairs(two[:1] * 3, 0.5, seed=0)


def test_jsonl_source_maps_fields_and_keeps_extras(tmp_path):
    f = tmp_path / "prefs.jsonl"
    f.write_text("".join(json.dumps({"q": f"q{i}", "good": f"g{i}", "bad": f"b{i}", "id": i}) + "\n"
                         for i in range(5)) + "\n")
    cfg = PreferenceDataConfig(source=str(f), prompt_field="q", chosen_field="good", rejected_field="bad")
    pairs = load_pairs(cfg)
    assert pairs[3] == {"prompt": "q3", "chosen": "g3", "rejected": "b3", "id": 3}
    assert len(pairs) == 5


@pytest.mark.parametrize("line, match", [
    ("{not json", r"prefs.jsonl:2: not valid JSON"),
    (json.dumps({"prompt": "p", "chosen": "c"}), r"prefs.jsonl:2: missing field 'rejected'"),
    (json.dumps({"prompt": "p", "chosen": 3, "rejected": "r"}), r"prefs.jsonl:2: field 'chosen' \(chosen\) must be a string, got int"),
    (json.dumps(["p", "c", "r"]), r"prefs.jsonl:2: expected a JSON object with string fields 'prompt', "
                                  r"'chosen', 'rejected', got an array$"),
    ("3", r"prefs.jsonl:2: expected a JSON object with .*, got a number$"),
    ('"x"', r"prefs.jsonl:2: expected a JSON object with .*, got a string$"),
    ("null", r"prefs.jsonl:2: expected a JSON object with .*, got null$"),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, line, match):
    f = tmp_path / "prefs.jsonl"
    f.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=match):
        load_pairs(PreferenceDataConfig(source=str(f)))


def test_jsonl_renamed_field_is_named(tmp_path):
    f = tmp_path / "prefs.jsonl"
    f.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    with pytest.raises(DataError, match=r"prefs.jsonl:1: missing field 'better' \(chosen\)"):
        load_pairs(PreferenceDataConfig(source=str(f), chosen_field="better"))
    f.write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"prefs.jsonl:1: not UTF-8"):
        load_pairs(PreferenceDataConfig(source=str(f)))
    f.write_text("\n")
    with pytest.raises(DataError, match="no records"):
        load_pairs(PreferenceDataConfig(source=str(f)))


def test_policy_samples_become_pairs_against_the_chosen_response():
    from rayllm.datasets.preference import pairs_from_samples
    from rayllm.datasets.tasks import sort_score

    recs = [{"prompt": "Sort: 3 1 2", "chosen": "1 2 3", "answer": [1, 2, 3]},
            {"prompt": "Sort: 2 2", "chosen": "2 2", "answer": [2, 2]}]
    samples = [["1 2 3", "1 3 2", "1 3 2 ", "3 2 1", "1 2"],  # right, wrong, same wrong, wrong, wrong
               ["2 2", "2 2"]]  # all right: no pair
    pairs, stats = pairs_from_samples(recs, samples, sort_score, max_per_prompt=2)
    # distinct wrong answers in sampling order, at most 2 per prompt, each against the chosen one
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("1 2 3", "1 3 2"), ("1 2 3", "3 2 1")]
    assert all(p["origin"] == "policy" and p["answer"] == [1, 2, 3] for p in pairs)
    assert stats == {"policy_sample_accuracy": 3 / 7, "policy_pairs": 2}
