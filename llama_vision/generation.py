"""Text from generated tokens: `TextStream` turns one request's tokens back into text as they come, and
`Answer` is a request of the serving engine (engine.py) seen as text, with what a front end reports
(finish reason, token counts, log-probabilities).

`TextStream` holds back a piece until its bytes form whole UTF-8 characters and until it can no longer
be the start of a stop string, so the concatenated pieces equal the text of the whole answer. Stop
strings are found here, in the text; the engine only sees token ids, so a stop string cancels the
request and ends its row at the next step boundary.

A new token sees the images the last prompt token saw: the last image's interval runs to the end of the
sequence, as in training (where the answer is part of the sequence), in HF's generation (it repeats the
mask's last row) and in Meta's with one image. With two or more images Meta's `create_vision_mask` ends
the last interval at the prompt's length, so its generated tokens after the first see no image; we do
not reproduce that (tests/test_generation_parity.py pins it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from llama_vision.engine import FINISHED, Engine, Request, TokenLogprob
from llama_vision.tokenizer import Tokenizer

__all__ = ["FINISHED", "Answer", "Engine", "TextStream", "answer_text"]


class Answer:
    """One engine request as text. Iterate for the pieces of the answer as they are generated; closing
    the iteration early (or `cancel()`) cancels the request and frees its row.

    After the end: `text`, `token_ids` (end-of-turn id excluded), `finish_reason` ("stop": an end-of-turn
    id or a stop string, "length": the token limit, "cancelled"), `prompt_tokens`, `image_tokens` (image
    tokens the cross-attention layers attend to, padding tiles included), `completion_tokens`, and
    `logprobs` (one `TokenLogprob` per token of `token_ids`, when asked for)."""

    def __init__(self, request: Request, tokenizer: Tokenizer, stop: Sequence[str]) -> None:
        self.request = request
        self.stream = TextStream(tokenizer, stop, request.stop_ids)
        self._pieces: list[str] = []
        self._stopped_by_text = False

    def __iter__(self) -> Iterator[str]:
        try:
            for token in self.request:
                piece = self.stream.push(token)
                if piece:
                    self._pieces.append(piece)
                    yield piece
                if self.stream.done:
                    if not self.request.finished:  # a stop string: the engine cannot see it
                        self._stopped_by_text = True
                        self.request.cancel()
                    break
            piece = self.stream.flush()
            if piece:
                self._pieces.append(piece)
                yield piece
        finally:
            if not self.request.finished:
                self.request.cancel()

    def result(self) -> str:
        """Wait for the whole answer."""
        for _ in self:
            pass
        return self.text

    def cancel(self) -> None:
        self.request.cancel()

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    @property
    def token_ids(self) -> list[int]:
        return self.stream.ids

    @property
    def finish_reason(self) -> str | None:
        if self._stopped_by_text:
            return "stop"
        return self.request.finish_reason

    @property
    def prompt_tokens(self) -> int:
        return self.request.prompt_tokens

    @property
    def image_tokens(self) -> int:
        return self.request.image_tokens

    @property
    def completion_tokens(self) -> int:
        return len(self.request.tokens)

    @property
    def logprobs(self) -> list[TokenLogprob]:
        return self.request.logprobs[: len(self.stream.ids)]


class TextStream:
    """Incremental text of one row: `push` a token, get the new text that is safe to show."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), eos_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.eos_ids = frozenset(eos_ids)
        self.ids: list[int] = []  # the answer's tokens, end-of-turn id excluded
        self.text = ""  # decoded text of the tokens before `pending`
        self.pending: list[int] = []  # tokens whose bytes do not yet end on a character boundary
        self.shown = 0  # characters of `text` already returned
        self.done = False

    def push(self, token: int) -> str:
        if self.done or token == FINISHED:
            return ""
        if token in self.eos_ids:
            self.done = True
            return self.flush()
        self.ids.append(token)
        if self.tokenizer.is_special(token):
            return ""
        self.pending.append(token)
        piece = self.tokenizer.decode(self.pending)
        if not self.text and getattr(self.tokenizer, "sentencepiece", False):
            piece = piece.removeprefix(
                " "
            )  # SentencePiece spells an answer's first word with its prefix space
        if piece.endswith("\ufffd"):
            return ""  # a multi-byte character continues in the next token
        self.text += piece
        self.pending = []
        return self._release(final=False)

    def flush(self) -> str:
        """All remaining text: at the end of the answer."""
        if self.pending:
            self.text += self.tokenizer.decode(self.pending)
            self.pending = []
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        stop_at = _first_stop(self.text, self.stop, max(0, self.shown - max(map(len, self.stop), default=0)))
        if stop_at is not None:
            self.text, self.done = self.text[:stop_at], True
            final = True
        end = len(self.text) if final else len(self.text) - _held_back(self.text, self.stop)
        end = max(end, self.shown)
        out, self.shown = self.text[self.shown : end], end
        return out


def answer_text(tokenizer: Tokenizer, ids: Sequence[int], stop: Sequence[str]) -> str:
    """The whole answer of a row at once: its text, cut before the first stop string."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    stop_at = _first_stop(text, stop, 0)
    return text if stop_at is None else text[:stop_at]


def _first_stop(text: str, stop: Sequence[str], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that could be the beginning of a stop string."""
    return max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
