"""The training loss's memory: the planner's peak (finetune/memory.py, a simulated step) with the loss
as `token_loss` computes it (the head on trained positions only, in checkpointed chunks) against the
loss of the whole (B, T, vocab) float32 logits, as it was computed before. Same model, mode and batch.

    python bench/finetune_loss_memory.py [--preset bench-small] [--batch 2] [--tokens 1024]

A plan, not a measurement: tests/test_finetune_train.py checks plans against measured CPU peaks.
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch
import torch.nn.functional as F

from llama_vision.config import get_preset
from llama_vision.finetune import train
from llama_vision.finetune.collate import IGNORE
from llama_vision.finetune.config import TrainConfig
from llama_vision.finetune.memory import plan_memory

MiB = 2**20


def full_logits_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss as it was before: every position through the head at once."""
    labels = batch["labels"][:, 1:]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"})[:, :-1]
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    keep = labels != IGNORE
    return loss, keep.sum(), ((logits.detach().argmax(-1) == labels) & keep).sum()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bench-small")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args()
    config = get_preset(args.preset)
    print(f"{args.preset}, batch {args.batch} x {args.tokens} tokens, one image per row, float32, "
          "activation checkpointing; planned peak per process")  # fmt: skip
    print("| mode | full logits (MiB) | chunked, trained positions (MiB) | ratio |")
    print("|---|---|---|---|")
    for mode in ("lora", "full"):
        c = TrainConfig(model="x", mode=mode, batch_size=args.batch, max_length=args.tokens,
                        activation_checkpointing=True)  # fmt: skip
        new = plan_memory(config, c, dtype=torch.float32).peak_bytes
        with mock.patch.object(train, "token_loss", full_logits_loss):
            old = plan_memory(config, c, dtype=torch.float32).peak_bytes
        print(f"| {mode} | {old / MiB:,.0f} | {new / MiB:,.0f} | {new / old:.2f}x |")


if __name__ == "__main__":
    main()
