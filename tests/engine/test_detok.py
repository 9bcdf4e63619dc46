"""Detokenizer: released text equals tokenizer.decode of all tokens (whole characters only), stop strings
are found across token boundaries, their text is never released, and nothing that could still start
one is released early."""

from __future__ import annotations

import random

import pytest

from dsv2.engine.detok import Detokenizer, StopStringError, find_stop, held_suffix

TEXT = ("Exceptions are raised — ünïcödé “quotes”, 日本語のテキスト, emoji 🙂🚀 and plain ASCII.\n"
        "The for statement iterates; the while statement loops. ") * 3


@pytest.fixture(scope="module")
def tok():
    from dsv2.train.data import train_tokenizer

    return train_tokenizer([TEXT] * 4, 300)  # few merges: multi-byte characters span several tokens


def feed(detok: Detokenizer, ids: list[int]) -> list[str]:
    out = []
    for t in ids:
        out.append(detok.add(t))
        if detok.stopped:
            break
    if not detok.stopped:
        out.append(detok.flush())
    return out


def test_pieces_concatenate_to_decode_and_are_whole_characters(tok) -> None:
    ids = tok.encode(TEXT).ids
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # the test really splits characters
    pieces = feed(Detokenizer(tok), ids)
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert not any("\ufffd" in p for p in pieces)


def test_random_byte_soup_matches_decode(tok) -> None:
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tok.get_vocab_size()) for _ in range(rng.randrange(1, 40))]
        assert "".join(feed(Detokenizer(tok), ids)) == tok.decode(ids)


@pytest.mark.parametrize("stop", ["statement loops", "日本", "🚀 and", "s—", "\n", "ASCII.\nThe"])
def test_stop_string_cuts_before_first_occurrence(tok, stop: str) -> None:
    ids = tok.encode(TEXT).ids
    d = Detokenizer(tok, ["never-there", stop])
    pieces = feed(d, ids)
    text = "".join(pieces)
    if stop in TEXT:
        assert d.stopped and d.stop_string == stop and text == TEXT[: TEXT.index(stop)]
        assert all(stop not in p for p in pieces)
    else:
        assert not d.stopped and text == TEXT


def test_stop_spanning_tokens_is_held_back_until_decided(tok) -> None:
    ids = tok.encode("abc stat").ids
    d = Detokenizer(tok, ["statement"])
    released = "".join(d.add(t) for t in ids)
    assert released == "abc " and not d.stopped  # "stat" could still become "statement"
    assert d.flush() == "stat"  # generation ended otherwise: what was held comes out
    # a stop string whose start is split over many tokens
    stop = "ünïcödé “quo"
    ids = tok.encode(TEXT).ids
    d = Detokenizer(tok, [stop])
    seen = ""
    for t in ids:
        seen += d.add(t)
        if d.stopped:
            break
        assert TEXT[: TEXT.index(stop)].startswith(seen)  # never a character of the stop string, at any step
    assert d.stopped and seen == TEXT[: TEXT.index(stop)]


def test_after_stop_nothing_more(tok) -> None:
    d = Detokenizer(tok, ["for"])
    feed(d, tok.encode(TEXT).ids)
    assert d.stopped and d.add(tok.encode("x").ids[0]) == "" and d.flush() == ""


def test_helpers_and_errors() -> None:
    assert held_suffix("hello wo", ["world"]) == 2
    assert held_suffix("hello", ["world"]) == 0
    assert held_suffix("aab", ["aabx", "bq"]) == 3
    assert find_stop("xx ab abc", ["abc", "ab"]) == (3, "ab")
    assert find_stop("abc", ["ab", "abc"]) == (0, "abc")  # same start: the longer one
    with pytest.raises(StopStringError, match=r"stop\[1\]"):
        Detokenizer(object(), ["ok", ""])
