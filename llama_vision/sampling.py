"""Generation options and next-token selection.

`GenerationConfig` holds every option of a generation call; its defaults come from the checkpoint's
`generation_config.json` (`GenerationConfig.from_dir`), which for the Instruct checkpoints means sampling
at temperature 0.6 and top-p 0.9, stopping on 128001, 128008 and 128009.

`select` turns the float32 logits of the last position into the next token of every row, in the order
Hugging Face applies its processors: repetition penalty, temperature, top-k, top-p, min-p. Temperature 0
(or `do_sample: false` in generation_config.json) is greedy decoding: the argmax, with no randomness;
so is any temperature below 1e-6 (`MIN_TEMPERATURE`), whose division would overflow float32 logits.
Top-p keeps the most probable tokens whose probability mass before them is at most p (Meta's
`sample_top_p`), so the most probable token always survives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from llama_vision.validate import Fields
from llama_vision.weights import read_json

MIN_TEMPERATURE = 1e-6  # smaller temperatures decode greedily (see GenerationConfig.greedy)


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages tokens of the prompt and the output
    seed: int | None = None  # None: torch's global generator
    stop: tuple[str, ...] = ()  # strings that end a row; they are not part of the answer
    eos_token_ids: tuple[int, ...] | None = None  # None: the model's end-of-turn ids

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _strings(self.stop))
        if self.eos_token_ids is not None:
            ids = (self.eos_token_ids,) if isinstance(self.eos_token_ids, int) else tuple(self.eos_token_ids)
            if not all(_is_int(i) for i in ids):
                raise ValueError(f"eos_token_ids must be integers, got {self.eos_token_ids!r}")
            object.__setattr__(self, "eos_token_ids", ids)
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {self.top_k!r}")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be None or an integer from 0 to 2**64 - 1, got {self.seed!r}")
        _check_number("temperature", self.temperature, 0.0, math.inf)
        _check_number("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_number("min_p", self.min_p, 0.0, 1.0)
        _check_number("repetition_penalty", self.repetition_penalty, 0.0, math.inf, low_open=True)

    @property
    def greedy(self) -> bool:
        # Below MIN_TEMPERATURE the sampling distribution is one-hot in all but near-ties, and logits
        # divided by it can overflow float32 (inf/nan probabilities): decode greedily there.
        return self.temperature < MIN_TEMPERATURE

    def replace(self, **options: Any) -> GenerationConfig:
        """A copy with `options` changed; None values are ignored, unknown names are an error."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"unknown generation option(s) {unknown}; known: {sorted(names)}")
        return replace(self, **{k: v for k, v in options.items() if v is not None})

    @classmethod
    def from_hf(cls, data: dict[str, Any], source: str = "generation_config.json") -> GenerationConfig:
        """From a Hugging Face generation_config.json dict (do_sample false means greedy); errors name
        `source` and the field."""
        f = Fields(data, source)
        options: dict[str, Any] = {}
        if f.flag("do_sample", False):
            options["temperature"] = f.number("temperature", 1.0, low_open=False)
            # transformers adds top_k=50 when the file lists none; Meta's reference samples with top-p only
            options["top_k"] = f.integer("top_k", 0, low=0, high=None)
            options["top_p"] = f.number("top_p", 1.0, high=1.0)
            options["min_p"] = f.number("min_p", 0.0, high=1.0, low_open=False)
        if f.has("max_new_tokens"):
            options["max_new_tokens"] = f.integer("max_new_tokens", high=None)
        if f.has("repetition_penalty"):
            options["repetition_penalty"] = f.number("repetition_penalty")
        if f.has("eos_token_id"):
            options["eos_token_ids"] = f.integers("eos_token_id", low=0, high=None, scalar=True)
        try:
            return cls(**options)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e

    @classmethod
    def from_dir(cls, directory: str | Path) -> GenerationConfig:
        """The checkpoint's generation_config.json, or the defaults (greedy) when there is none."""
        path = Path(directory) / "generation_config.json"
        if not path.is_file():
            return cls()
        return cls.from_hf(read_json(path), str(path))


def select(
    logits: torch.Tensor,
    config: GenerationConfig,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from float32 logits (B, V); `seen` (B, V) bool marks tokens to penalise."""
    if config.repetition_penalty != 1.0 and seen is not None:
        p = config.repetition_penalty
        logits = torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)
    if config.greedy:
        return logits.argmax(dim=-1)
    # Shift the best logit to 0 before dividing: any temperature, however small, then gives finite
    # values (the best stays 0, the others go to -inf at worst), never inf - inf.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / config.temperature
    if config.top_k:
        kth = logits.topk(min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if config.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > config.top_p  # mass before the token already exceeds p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    if config.min_p > 0.0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < config.min_p * probs.amax(dim=-1, keepdim=True), -math.inf)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _strings(stop: Any) -> tuple[str, ...]:
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be a string or a list of non-empty strings, got {stop!r}")
    return stop


def _check_number(name: str, value: Any, low: float, high: float, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or value < low or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ValueError(f"{name} must be a number in {bound}, got {value!r}")
