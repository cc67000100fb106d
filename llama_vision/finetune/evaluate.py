"""Evaluation: exact-match accuracy of greedy answers, and the held-out loss.

Each example's last assistant reply is the reference; the messages before it are the prompt, answered
greedily through `LlamaVision.generate` (the engine, batched). Answers and references are compared after
normalising whitespace (runs collapsed, ends stripped) and case.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llama_vision.api import LlamaVision
from llama_vision.finetune.data import Example, reply_and_prompt
from llama_vision.generation import answer_text
from llama_vision.processor import Processor


def normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


@dataclass
class ExactMatch:
    accuracy: float
    n: int
    correct: int
    answers: list[str]
    references: list[str]
    matches: list[bool]


def scored(answers: list[str], examples: Sequence[Example]) -> ExactMatch:
    """`answers` (one per example) against each example's last assistant reply."""
    references = [reply_and_prompt(e.messages)[1] for e in examples]
    matches = [normalise(a) == normalise(r) for a, r in zip(answers, references)]
    correct = sum(matches)
    return ExactMatch(correct / max(len(examples), 1), len(examples), correct, answers, references, matches)


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
    answers: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        try:
            outputs = lv.generate(
                [reply_and_prompt(e.messages)[0] for e in chunk],
                temperature=0.0,
                max_new_tokens=max_new_tokens,
                max_num_tiles=max_num_tiles,
            )
        except ValueError as e:
            raise ValueError(f"{chunk[0].source} (batch of {len(chunk)}): {e}") from None
        answers.extend(outputs)
        if progress is not None:
            progress(len(answers), len(examples))
    return scored(answers, examples)


@torch.no_grad()
def lockstep_exact_match(
    model: torch.nn.Module,
    processor: Processor,
    examples: Sequence[Example],
    *,
    rank: int,
    world: int,
    device: torch.device,
    stop_ids: Sequence[int],
    batch_size: int = 8,
    max_new_tokens: int = 64,
    max_num_tiles: int | None = None,
) -> ExactMatch:
    """`exact_match` for a model sharded by FSDP over `world` processes, called on every one of them.

    FSDP gathers a layer's weights from all processes when it runs, so every process must run the same
    layers as often as the others: each answers its share of the examples (every world-th one) greedily
    through the model's `hidden_states` (a full forward over the prompt and the tokens so far, no cache;
    the self-attention layers always run, the rest of the model is one FSDP unit, so batches with and
    without images make the same calls), and all make the same number of batches and of steps (a
    process out of examples repeats one; a step runs while any process has a row still answering). The
    answers are gathered on every process in the examples' order."""
    share = list(range(rank, len(examples), world))
    batches = -(-len(range(0, len(examples), world)) // batch_size)  # the largest share's batch count
    stop = frozenset(stop_ids)
    answers: dict[int, str] = {}
    for k in range(batches):
        chosen = share[k * batch_size : (k + 1) * batch_size]
        rows = chosen or [0]  # a process without examples left answers one it throws away
        error = None
        try:
            inputs = processor.chat_inputs(
                [reply_and_prompt(examples[i].messages)[0] for i in rows], max_num_tiles=max_num_tiles
            )
        except ValueError as e:
            error = f"{examples[rows[0]].source} (batch of {len(rows)}): {e}"
        if _total(float(error is not None), world):  # every process stops, not only the one that failed
            raise ValueError(error or "another process could not encode its evaluation batch")
        inputs = {key: value.to(device) for key, value in inputs.items()}
        ids, mask = inputs.pop("input_ids"), inputs.pop("attention_mask")
        cross = inputs.pop("cross_attention_mask", None)
        tokens: list[list[int]] = [[] for _ in rows]
        running = [True] * len(rows)
        for _ in range(max_new_tokens):
            if not _total(float(any(running)), world):
                break
            h = model.hidden_states(ids, mask, cross_attention_mask=cross, **inputs)[:, -1]
            chosen_ids = model.language_model.logits(h).argmax(-1)
            for b, token in enumerate(chosen_ids.tolist()):
                if running[b]:
                    running[b] = token not in stop
                    if running[b]:
                        tokens[b].append(token)
            ids = torch.cat([ids, chosen_ids[:, None]], 1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            if cross is not None:  # new tokens see the images the prompt's last token sees
                cross = torch.cat([cross, cross[:, -1:]], 1)
        for i, row in zip(chosen, tokens):
            answers[i] = answer_text(processor.tokenizer, row, ())
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, answers)
        answers = {i: text for part in gathered for i, text in part.items()}
    return scored([answers[i] for i in range(len(examples))], examples)


def _total(value: float, world: int) -> float:
    """`value` summed over the processes."""
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t)


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
