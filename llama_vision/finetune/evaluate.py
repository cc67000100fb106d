"""Evaluation: exact-match accuracy of greedy answers, and the held-out loss.

Each example's last assistant reply is the reference; the messages before it are the prompt, answered
greedily through `LlamaVision.generate` (the engine, batched). Answers and references are compared after
normalising whitespace (runs collapsed, ends stripped) and case.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from llama_vision.api import LlamaVision
from llama_vision.finetune.data import Example, reply_and_prompt


def normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


@dataclass
class ExactMatch:
    accuracy: float
    n: int
    correct: int
    answers: list[str]


def exact_match(
    lv: LlamaVision,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    max_num_tiles: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ExactMatch:
    """Greedy answers to every example's prompt, scored against its last assistant reply."""
    answers, correct = [], 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        pairs = [reply_and_prompt(e.messages) for e in chunk]
        try:
            outputs = lv.generate(
                [prompt for prompt, _ in pairs],
                temperature=0.0,
                max_new_tokens=max_new_tokens,
                max_num_tiles=max_num_tiles,
            )
        except ValueError as e:
            raise ValueError(f"{chunk[0].source} (batch of {len(chunk)}): {e}") from None
        for output, (_, reference) in zip(outputs, pairs):
            correct += normalise(output) == normalise(reference)
        answers.extend(outputs)
        if progress is not None:
            progress(len(answers), len(examples))
    return ExactMatch(correct / len(examples), len(examples), correct, answers)


@torch.no_grad()
def held_out_loss(
    loss_fn: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    batches: Sequence[dict[str, torch.Tensor]],
) -> tuple[float, float]:
    """Mean token loss and token accuracy over `batches` (each a collated batch)."""
    total, tokens, correct = 0.0, 0, 0.0
    for batch in batches:
        loss_sum, n, hits = loss_fn(batch)
        total, tokens, correct = total + float(loss_sum), tokens + int(n), correct + float(hits)
    return total / max(tokens, 1), correct / max(tokens, 1)
