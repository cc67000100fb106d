"""Checking the values a checkpoint's files hold before the code uses them: every field of config.json,
params.json and generation_config.json is read through `Fields`, which checks its JSON type and range
and names the file and the field in the error; `check_tokenizer` and `check_generation_ids` check the
files against each other.

    Fields(data, "ckpt/config.json").section("text_config").integer("hidden_size", 4096)
    -> ValueError: ckpt/config.json: text_config.hidden_size must be an integer >= 1, got '4096' (a string)

Non-obvious choices:
- JSON booleans are not integers here (Python's `True == 1` would let `"hidden_size": true` through);
  integers are numbers (`"rope_theta": 500000`); NaN and infinities (which Python's json reads) are not.
- A missing key or null takes the default, as transformers' config classes do; a null section
  (`"text_config": null`) is the section's defaults, as transformers reads it.
- Upper bounds are generous sanity limits (sizes up to 2**20, 100,000 layers...), there to turn a
  typo or a hostile file into an error instead of an allocation that never ends.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llama_vision.config import LlamaVisionConfig
    from llama_vision.tokenizer import Tokenizer

_MISSING = object()


def describe(value: Any) -> str:
    """`value` for an error message: its repr, shortened, and its JSON type."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    kinds = {bool: "a boolean", str: "a string", list: "a list", dict: "an object", type(None): "null"}
    kind = kinds.get(type(value))
    return f"{text} ({kind})" if kind else text


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _range(low: float | None, high: float | None, low_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}]"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    return f"<= {high}" if high is not None else ""


class Fields:
    """Typed reads from one JSON object of a file; `where` names the file, `prefix` the object in it."""

    def __init__(self, data: Any, where: str, prefix: str = "") -> None:
        if not isinstance(data, Mapping):
            name = prefix.rstrip(".") or "the file"
            raise ValueError(f"{where}: {name} must be a JSON object, got {describe(data)}")
        self.data, self.where, self.prefix = data, where, prefix

    def fail(self, key: str, expected: str, value: Any) -> None:
        raise ValueError(f"{self.where}: {self.prefix}{key} must be {expected}, got {describe(value)}")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def raw(self, key: str, default: Any = None) -> Any:
        value = self.data.get(key)
        return default if value is None else value

    def section(self, key: str) -> Fields:
        """A nested object; missing or null reads as an empty one (all defaults)."""
        return Fields(self.raw(key, {}), self.where, f"{self.prefix}{key}.")

    def integer(
        self, key: str, default: Any = _MISSING, *, low: int | None = 1, high: int | None = 2**20
    ) -> int:
        value = self._get(key, default)
        if not is_int(value) or (low is not None and value < low) or (high is not None and value > high):
            self.fail(key, f"an integer {_range(low, high)}".rstrip(), value)
        return value

    def number(
        self,
        key: str,
        default: Any = _MISSING,
        *,
        low: float | None = 0.0,
        high: float | None = None,
        low_open: bool = True,
    ) -> float:
        value = self._get(key, default)
        ok = is_number(value) and (high is None or value <= high)
        ok = ok and (low is None or value > low or (value == low and not low_open))
        if not ok:
            self.fail(key, f"a finite number {_range(low, high, low_open)}".rstrip(), value)
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            self.fail(key, "true or false", value)
        return value

    def integers(
        self,
        key: str,
        default: Any = _MISSING,
        *,
        low: int | None = 0,
        high: int | None = 2**20,
        scalar: bool = False,
        nonempty: bool = False,
    ) -> tuple[int, ...]:
        """A list of integers (or, with `scalar`, one integer, read as a list of one)."""
        value = self._get(key, default)
        items = [value] if scalar and is_int(value) else value
        expected = f"{'an integer or ' if scalar else ''}a list of integers {_range(low, high)}".rstrip()
        if not isinstance(items, (list, tuple)) or (nonempty and not items):
            self.fail(key, expected, value)
        for item in items:
            if not is_int(item) or (low is not None and item < low) or (high is not None and item > high):
                self.fail(key, expected, value)
        return tuple(items)

    def pairs(self, key: str, default: Any = _MISSING) -> tuple[tuple[int, int], ...]:
        """A non-empty list of [int, int] pairs of positive integers (aspect ratios)."""
        value = self._get(key, default)
        ok = isinstance(value, (list, tuple)) and bool(value)
        for pair in value if ok else ():
            ok = ok and isinstance(pair, (list, tuple)) and len(pair) == 2
            ok = ok and all(is_int(x) and 1 <= x <= 64 for x in pair)
        if not ok:
            self.fail(
                key, "a non-empty list of [tiles high, tiles wide] pairs of integers from 1 to 64", value
            )
        return tuple((int(h), int(w)) for h, w in value)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self._get(key, default)
        if value not in choices:
            self.fail(key, f"one of {list(choices)}", value)
        return value

    def _get(self, key: str, default: Any) -> Any:
        value = self.data.get(key)
        if value is not None:
            return value
        if default is _MISSING:
            raise ValueError(f"{self.where}: {self.prefix}{key} is missing")
        return default


def check_tokenizer(config: LlamaVisionConfig, tokenizer: Tokenizer) -> None:
    """The model's config and its tokenizer describe the same vocabulary: the image token has the same id,
    every id the tokenizer gives has an embedding row, and the special ids the config names exist."""
    if config.image_token_id != tokenizer.image_id:
        raise ValueError(
            f"the config's image_token_index is {config.image_token_id} but the tokenizer ({tokenizer.path}) "
            f"gives <|image|> the id {tokenizer.image_id}: the checkpoint's files disagree"
        )
    rows = config.text.num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(
            f"the tokenizer ({tokenizer.path}) has {len(tokenizer)} tokens but the model embeds only {rows} "
            f"(vocab_size {config.text.vocab_size} + 8 image rows): the checkpoint's files disagree"
        )
    t = config.text
    for name, ids in (("bos_token_id", (t.bos_token_id,)), ("eos_token_id", t.eos_token_id)):
        bad = [i for i in ids if i >= len(tokenizer)]
        if bad:
            raise ValueError(
                f"the config's {name} {bad} is outside the tokenizer's ids 0..{len(tokenizer) - 1} ({tokenizer.path})"
            )


def check_generation_ids(ids: tuple[int, ...] | None, vocab_size: int, where: str) -> None:
    """End-of-sequence ids must be ids the model can produce (rows of its output layer)."""
    bad = [i for i in ids or () if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"{where}: eos_token_id {bad} outside the model's output ids 0..{vocab_size - 1}")
