"""Record parsing and cleaning on synthetic data and on real text that exists on this machine
and was not written by us: the Python standard library's own source files."""
import json
import sysconfig
from pathlib import Path

import pytest

from rayllm.data.clean import content_hash, length_ok, normalize
from rayllm.data.records import Fields, parse_file, parse_jsonl


def test_every_bad_line_is_quarantined_with_file_line_and_reason():
    lines = [
        json.dumps({"text": "a fine document"}),
        "{not json",
        json.dumps({"other": 1}),
        json.dumps({"text": "   "}),
        json.dumps({"text": "x" * 200}),
        json.dumps(["a", "list"]),
    ]
    data = ("\n".join(lines) + "\n").encode() + b'{"text": "\xff\xfe bad bytes"}\n'
    out = parse_jsonl("corpus.jsonl", data, Fields(kind="text", max_chars=100))
    assert [r["text"] for r in out.records] == ["a fine document"]
    reasons = {q["_line"]: q["reason"] for q in out.quarantined}
    assert reasons[2].startswith("malformed JSON")
    assert reasons[3] == "missing field(s) ['text']"
    assert reasons[4] == "empty document"
    assert reasons[5].startswith("over-long record")
    assert reasons[6] == "expected a JSON object with field(s) 'text', got an array"
    assert reasons[7].startswith("not UTF-8")
    assert all(q["_source"] == "corpus.jsonl" for q in out.quarantined)
    assert len(out.records) + len(out.quarantined) == 7  # nothing silently dropped


@pytest.mark.parametrize("kind, fields, expected", [
    ("text", {}, "field(s) 'text'"),
    ("sft", {"prompt": "q", "response": "a"}, "field 'messages' or fields 'q' and 'a'"),
    ("preference", {}, "field(s) 'prompt', 'chosen', 'rejected'"),
    ("prompt", {"prompt": "q"}, "field(s) 'q'"),
])
def test_json_lines_that_are_not_objects_are_quarantined_naming_the_expected_fields(kind, fields, expected):
    out = parse_jsonl("c.jsonl", b'[1, 2]\n3\n"x"\nnull\n', Fields(kind=kind, **fields))
    assert out.records == []
    assert [(q["_line"], q["reason"]) for q in out.quarantined] == [
        (i, f"expected a JSON object with {expected}, got {got}")
        for i, got in enumerate(["an array", "a number", "a string", "null"], 1)]


def test_record_kinds_map_their_fields():
    pref = parse_jsonl("p.jsonl", json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "x": 1}).encode(),
                       Fields(kind="preference"))
    assert pref.records[0]["chosen"] == "a" and "x" not in pref.records[0]
    chat = parse_jsonl("c.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(),
                       Fields(kind="sft"))
    assert chat.records[0]["messages"][0]["content"] == "hi"
    sft = parse_jsonl("s.jsonl", json.dumps({"prompt": "q"}).encode(), Fields(kind="sft"))
    assert sft.quarantined[0]["reason"] == "missing field(s) ['response']"
    prompts = parse_jsonl("q.jsonl", json.dumps({"prompt": "q"}).encode(), Fields(kind="prompt"))
    assert prompts.records[0]["prompt"] == "q"


def test_unreadable_parquet_is_quarantined_whole():
    out = parse_file("broken.parquet", b"PAR1 not really", Fields())
    assert not out.records and out.quarantined[0]["_line"] == 0
    assert out.quarantined[0]["reason"].startswith("unreadable file")


def test_normalize_and_exact_hash():
    assert normalize("Cafe\u0301  au\t lait\r\n\n\n\nok\x00") == "Café au lait\n\nok"
    assert content_hash("Hello   World") == content_hash("hello world\n")
    assert content_hash("hello world") != content_hash("hello world!")
    assert length_ok("abc", 5, 10).startswith("too short") and length_ok("abcdef", 5, 10) is None


def test_real_stdlib_sources_parse_and_share_licence_headers():
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(lib.glob("*.py"))[:150]
    parsed = [parse_file(str(f), f.read_bytes(), Fields(kind="text")) for f in files]
    records = [r for p in parsed for r in p.records]
    quarantined = [q for p in parsed for q in p.quarantined]
    assert len(records) + len(quarantined) == len(files)
    assert all(q["reason"] == "empty document" for q in quarantined)  # e.g. empty __init__-like files
    # Real repeated text: many stdlib modules open with the same lines (licence/copyright
    # headers, shebangs); normalisation keeps them byte-identical so dedup can find them.
    firsts = [normalize(r["text"]).split("\n", 1)[0] for r in records]
    assert max(firsts.count(f) for f in set(firsts)) >= 2


def test_mapped_fields_leave_under_canonical_names():
    from rayllm.data.records import Fields, parse_jsonl

    out = parse_jsonl("chat.jsonl", b'{"q": "2+2?", "a": "4", "extra": 1}\n{"q": "no answer"}\n',
                      Fields(kind="sft", prompt="q", response="a"))
    assert [{k: v for k, v in r.items() if not k.startswith("_")} for r in out.records] == [
        {"prompt": "2+2?", "response": "4"}]
    assert out.quarantined[0]["reason"] == "missing field(s) ['a']" and out.quarantined[0]["_line"] == 2


def test_auto_shuffle_is_the_task_based_sort_below_1_gib_of_local_input_and_the_hash_shuffle_otherwise(
        tmp_path, monkeypatch):
    from ray.data.context import ShuffleStrategy

    from rayllm.data import prepare as prep

    small = tmp_path / "a.jsonl"
    small.write_text('{"text": "x"}\n')
    assert prep.shuffle_strategy("auto", [str(small)]) == ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    assert prep.shuffle_strategy("auto", [str(small), "s3://bucket/b.jsonl"]) == ShuffleStrategy.HASH_SHUFFLE
    monkeypatch.setattr(prep, "SMALL_INPUT_BYTES", small.stat().st_size)  # now it is as large as the limit
    assert prep.shuffle_strategy("auto", [str(small)]) == ShuffleStrategy.HASH_SHUFFLE
    assert prep.shuffle_strategy("hash", [str(small)]) == ShuffleStrategy.HASH_SHUFFLE
    assert prep.shuffle_strategy("sort", ["s3://bucket/b.jsonl"]) == ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
