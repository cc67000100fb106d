"""The fine-tuning memory table for the 11B and 90B models, from the planner (llama_vision/finetune/memory.py).

    python bench/finetune_memory_table.py                       # both models, batch 1, 2048 tokens, 1/2/4 tiles
    python bench/finetune_memory_table.py --models 11b --batch 1 2 --seq-len 4096

Per process, bf16 frozen weights, float32 trained parameters and AdamW state, activation checkpointing,
one image per row at the full sequence length; full fine-tuning sharded with FSDP over 8 processes.
"""

from __future__ import annotations

import argparse

import torch

from llama_vision.config import get_preset
from llama_vision.finetune.config import TrainConfig
from llama_vision.finetune.memory import GiB, plan_memory

MODELS = {"11b": "llama-3.2-11b-vision-instruct", "90b": "llama-3.2-90b-vision-instruct"}
MODES = ("adapters", "lora", "qlora", "full")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--tiles", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--fsdp-world", type=int, default=8, help="processes for full fine-tuning")
    args = parser.parse_args()
    print("| model | mode | processes | batch | tiles | weights GiB | trainable params | grads + AdamW GiB "
          "| activations GiB | peak GiB per process |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        config = get_preset(MODELS[model])
        for mode in args.modes:
            world = args.fsdp_world if mode == "full" else 1
            for batch in args.batch:
                for tiles in args.tiles:
                    train = TrainConfig(model="x", mode=mode, activation_checkpointing=True, distributed="fsdp",
                                        batch_size=batch, max_length=args.seq_len, max_tiles=tiles)  # fmt: skip
                    plan = plan_memory(config, train, dtype=torch.bfloat16, world=world)
                    print(
                        f"| {model.upper()} | {mode} | {world} | {batch} | {tiles} | {plan.weight_bytes / GiB:.1f} "
                        f"| {plan.trainable:,} | {(plan.gradient_bytes + plan.optimizer_bytes) / GiB:.1f} "
                        f"| {plan.activation_bytes / GiB:.1f} | {plan.peak_bytes / GiB:.1f} |",
                        flush=True,
                    )  # fmt: skip


if __name__ == "__main__":
    main()
