"""Incremental detokenization with stop strings, for streaming text out of the engine.

    detok = Detokenizer(tokenizer, stop=["\\n\\n", "###"])
    for tok in tokens:
        piece = detok.add(tok)      # new visible text ('' while a character or a stop string is incomplete)
        if detok.stopped:           # a stop string was completed: stop generating; its text is never shown
            break
    rest = detok.flush()            # at the end of generation (length / stop id): what was held back

Two things are held back from what `add` returns:
- bytes of an unfinished UTF-8 character: byte-level BPE splits characters across tokens, so the text of
  the pending tokens is only released once it no longer ends in U+FFFD (the replacement character);
- text that could still become a stop string: the longest suffix of the unreleased text that is a
  prefix of some stop string waits for the next token.

So the released pieces concatenate to `tokenizer.decode(all_tokens)` (cut just before the first stop
string when one is hit). `tokenizer` is anything with `decode(list[int]) -> str` (a `tokenizers.Tokenizer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class StopStringError(ValueError):
    """An invalid stop string (empty, or not a str); the message names it."""


def check_stop(stop: Sequence[str]) -> tuple[str, ...]:
    """Validated stop strings as a tuple (duplicates dropped, order kept)."""
    out: list[str] = []
    for i, s in enumerate(stop):
        if not isinstance(s, str) or not s:
            raise StopStringError(f"stop[{i}] must be a non-empty string, got {s!r}")
        if s not in out:
            out.append(s)
    return tuple(out)


def held_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `stops` (0 if none)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def find_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """(position, stop string) of the earliest stop string in `text` (the longest one on a tie), or None."""
    hit: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (hit is None or i < hit[0] or (i == hit[0] and len(s) > len(hit[1]))):
            hit = (i, s)
    return hit


class Detokenizer:
    """Token ids in, visible text deltas out, with stop-string detection across token boundaries."""

    def __init__(self, tokenizer: _Decoder, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = check_stop(stop)
        self.stopped = False
        self.stop_string: str | None = None  # which stop string ended the text
        self.text = ""  # everything released so far
        self._pending: list[int] = []  # tokens whose text is not decoded yet (unfinished UTF-8)
        self._held = ""  # decoded text held back because it may start a stop string

    def add(self, token: int) -> str:
        """Feed one generated token; returns the newly visible text ('' when nothing is released yet)."""
        if self.stopped:
            return ""
        self._pending.append(int(token))
        piece = self.tokenizer.decode(self._pending)
        if piece.endswith(REPLACEMENT):
            return ""  # the last character is still incomplete (or invalid: flush() releases it)
        self._pending.clear()
        return self._release(self._held + piece, final=False)

    def flush(self) -> str:
        """Release everything held back (call once generation ended for another reason than a stop string)."""
        if self.stopped:
            return ""
        piece = self.tokenizer.decode(self._pending) if self._pending else ""
        self._pending.clear()
        return self._release(self._held + piece, final=True)

    def _release(self, text: str, final: bool) -> str:
        hit = find_stop(text, self.stop)
        if hit is not None:
            self.stopped, self.stop_string = True, hit[1]
            out, self._held = text[: hit[0]], ""
        else:
            keep = 0 if final else held_suffix(text, self.stop)
            out, self._held = text[: len(text) - keep], text[len(text) - keep:]
        self.text += out
        return out
