"""The text deltas of a stream: what a request's tokens say so far, minus what may still change.

Decoding a growing token list is not append-only at its end: the last token may be the first
bytes of a character (decoded as U+FFFD until the rest comes), and the text may be the start of
a stop string, which the final text cuts off. A delta therefore stops before a trailing U+FFFD,
before any stop string that has appeared and before the longest end of the text that begins a
stop string; the final delta is the rest of the completion's own text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, detokenize: Callable[[Sequence[int]], str], stops: Sequence[str] = ()):
        self.detokenize = detokenize
        self.stops = tuple(stops)
        self.sent = ""  # the text handed out so far

    def update(self, token_ids: Sequence[int]) -> str:
        """The new text that is safe to send after the tokens so far ('' if none)."""
        text = self.detokenize(token_ids)
        end = len(text.rstrip(REPLACEMENT))
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                end = min(end, at)
        end -= _stop_prefix_at_end(text[:end], self.stops)
        return self._advance(text[:end])

    def finish(self, final_text: str) -> str:
        """The rest of the completion's final text (stop string already cut off)."""
        return self._advance(final_text)

    def _advance(self, text: str) -> str:
        # Text already sent is never taken back: should the tokenizer decode earlier text
        # otherwise once more tokens follow (it does not for byte-level BPE), the stream goes
        # on from the same length.
        if len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


def _stop_prefix_at_end(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest
