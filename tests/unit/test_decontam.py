from rayllm.data.decontam import EvalIndex

EVAL = {
    "gsm8k/17": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether in April and May?",
}


def test_shared_13_gram_is_caught_and_named():
    idx = EvalIndex(EVAL, n=13)
    leaked = "Homework help: natalia sold clips to 48 of her friends in april, and then she sold half as many clips!"
    assert idx.match(leaked) == "gsm8k/17"
    assert idx.match("Natalia sold clips to friends. A different problem about apples and pears entirely.") is None


def test_twelve_shared_words_are_not_enough():
    idx = EvalIndex(EVAL, n=13)
    assert idx.match("x natalia sold clips to 48 of her friends in april and then y") is None


def test_short_documents_match_only_an_identical_short_eval_text():
    idx = EvalIndex({"arith/3": "What is 12 + 34?\n12 + 34 = 46"}, n=13)
    assert idx.match("what is 12 + 34? 12 + 34 = 46") == "arith/3"  # case and punctuation folded
    assert idx.match("What is 12 + 35?\n12 + 35 = 47") is None
    assert idx.match("") is None
