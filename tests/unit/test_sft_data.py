import json

import pytest

from rayllm.config import SFTDataConfig
from rayllm.datasets.sft import DataError, load_records, split, tokenize_chat, to_messages
from rayllm.datasets.tasks import arithmetic, arithmetic_correct


def _masked_text(tok, row):
    return tok.decode([t for t, m in zip(row["input_ids"], row["loss_mask"]) if m])


def test_loss_mask_covers_only_the_response(tokenizer):
    cfg = SFTDataConfig()
    row = tokenize_chat(tokenizer, to_messages({"prompt": "What is 2 + 3?", "response": "2 + 3 = 5"}, cfg), 128)
    assert _masked_text(tokenizer, row).startswith("2 + 3 = 5<|end|>")
    assert "What is" not in _masked_text(tokenizer, row)
    assert len(row["input_ids"]) == len(row["loss_mask"])


def test_multi_turn_masks_every_assistant_turn(tokenizer):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    row = tokenize_chat(tokenizer, to_messages({"messages": msgs}, SFTDataConfig()), 256)
    masked = _masked_text(tokenizer, row)
    assert "hello<|end|>" in masked and "4<|end|>" in masked
    assert "hi" not in masked.replace("hello", "") and "Be brief" not in masked


def test_truncation(tokenizer):
    row = tokenize_chat(tokenizer, to_messages({"prompt": "x " * 100, "response": "y"}, SFTDataConfig()), 16)
    assert len(row["input_ids"]) == 16 and sum(row["loss_mask"]) == 0


def test_bad_records_are_named(tmp_path):
    cfg = SFTDataConfig()
    with pytest.raises(DataError, match=r"record 7: missing field\(s\) \['response'\]"):
        to_messages({"prompt": "p"}, cfg, where="record 7")
    with pytest.raises(DataError, match="no assistant turn"):
        to_messages({"messages": [{"role": "user", "content": "x"}]}, cfg)
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        load_records(SFTDataConfig(source=str(f)))
    f.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8"):
        load_records(SFTDataConfig(source=str(f)))


@pytest.mark.parametrize("line, got", [("[1, 2]", "an array"), ("3", "a number"), ('"x"', "a string"),
                                       ("null", "null")])
def test_jsonl_line_that_is_not_an_object_names_file_line_and_expected_fields(tmp_path, line, got):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"q": "a", "a": "b"}) + "\n" + line + "\n")
    cfg = SFTDataConfig(source=str(f), prompt_field="q", response_field="a")
    with pytest.raises(DataError, match=rf"d.jsonl:2: expected a JSON object with field 'messages' or fields "
                                        rf"'q' and 'a', got {got}$"):
        load_records(cfg)


def test_jsonl_source_and_split(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) for i in range(50)) + "\n")
    recs = load_records(SFTDataConfig(source=str(f)))
    assert len(recs) == 50
    tr, ev = split(recs, 0.2, seed=3)
    assert len(ev) == 10 and len(tr) == 40
    assert split(recs, 0.2, seed=3) == (tr, ev)
    assert {r["prompt"] for r in tr}.isdisjoint(r["prompt"] for r in ev)


def test_arithmetic_ground_truth():
    for r in arithmetic(200, seed=1):
        assert arithmetic_correct(r["response"], r["answer"])
        assert not arithmetic_correct(r["response"] + " or 1000000", r["answer"])
    assert arithmetic(5, seed=2) == arithmetic(5, seed=2)
