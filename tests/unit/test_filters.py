import pytest

from rayllm.data.filters import FilterError, alpha_words, apply_filters, load_filter, repeated_lines


def test_builtin_gopher_rules():
    assert alpha_words("plain words here", {}) is None
    assert "alphabetic" in alpha_words("1 2 3 4 x", {})
    assert repeated_lines("a\nb\nc", {}) is None
    assert "repeated" in repeated_lines("same\nsame\nsame\nother", {})


def test_filter_from_file_and_reasons(tmp_path):
    f = tmp_path / "myfilters.py"
    f.write_text("def no_spam(text, record):\n    return 'spam' if 'buy now' in text else None\n"
                 "def boom(text, record):\n    raise KeyError('title')\n"
                 "def nope(text, record):\n    return False\n")
    spec = f"{f}:no_spam"
    assert apply_filters([spec], "hello", {}) is None
    assert apply_filters([spec], "buy now!", {}) == f"filter {spec}: spam"
    assert apply_filters([f"{f}:nope"], "x", {}) == f"filter {f}:nope: rejected"
    # A filter that raises rejects the record with the error as its reason; the job goes on.
    assert "raised KeyError" in apply_filters([f"{f}:boom"], "x", {})
    # The first rejecting filter gives the reason.
    assert apply_filters(["rayllm.data.filters:alpha_words", spec], "buy now", {}) == f"filter {spec}: spam"


@pytest.mark.parametrize("spec, msg", [
    ("no_colon", "expected 'module:function'"),
    ("not_a_module_xyz:f", "cannot import not_a_module_xyz"),
    ("rayllm.data.filters:missing", "no function 'missing'"),
    ("/nonexistent/f.py:g", "no file /nonexistent/f.py"),
])
def test_bad_filter_specs_are_named(spec, msg):
    with pytest.raises(FilterError, match=msg):
        load_filter(spec)
