"""`llama-vision finetune`, `merge` and `eval`: the fine-tuning commands (llama_vision/finetune/).

    llama-vision finetune --config recipes/tiny-cpu.yaml data=train.jsonl lora_rank=16 --max-steps 100
    llama-vision finetune --config recipes/11b-lora.yaml --model DIR --data train.jsonl --dry-run
    llama-vision merge --model BASE --adapter runs/x/final --output merged/
    llama-vision eval --model DIR [--adapter DIR] --data eval.jsonl [--max-tiles N] [--json]

A recipe is a YAML mapping of TrainConfig keys; `key=value` arguments override it (values parsed as YAML)
and the flags override both. Nothing heavy is imported until a command runs, so `llama-vision ask`
starts as fast as before. Errors are ValueErrors that cli.main prints as one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

MODES = ("adapters", "lora", "full", "qlora", "vision")


def add_commands(commands: Any) -> None:
    """Add the finetune, merge and eval subcommands to cli.py's subparsers."""
    ft = commands.add_parser(
        "finetune",
        help="fine-tune a model (adapters, LoRA, QLoRA, full) or train one from a preset",
        description="Fine-tune on chat data. Settings: --config recipe.yaml, then key=value overrides, "
        "then the flags below.",
    )
    ft.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe settings, e.g. lora_rank=16")
    ft.add_argument("--config", metavar="YAML", help="a recipe (see recipes/)")
    ft.add_argument("--model", metavar="DIR", help="base checkpoint directory")
    ft.add_argument("--data", metavar="PATH", help="training data: JSONL, or a datasets directory")
    ft.add_argument("--eval-data", metavar="PATH", help="held-out data for evaluation")
    ft.add_argument("--mode", choices=MODES)
    ft.add_argument("--output", metavar="DIR", help="where checkpoint-N/ and final/ go")
    ft.add_argument("--max-steps", type=int, metavar="N")
    ft.add_argument("--epochs", type=int, metavar="N")
    ft.add_argument("--batch-size", type=int, metavar="N", help="rows per pass on each process")
    ft.add_argument("--lr", type=float, metavar="LR")
    ft.add_argument("--device", metavar="DEV", help="cpu, cuda, ... (default: cuda when available)")
    ft.add_argument("--resume", action="store_true", default=None, help="continue from output/latest")
    ft.add_argument(
        "--tensorboard", metavar="DIR", help="also log to TensorBoard, in DIR (needs the tensorboard package)"
    )
    ft.add_argument(
        "--dry-run",
        action="store_true",
        help="print one collated example, the trainable parameters and the memory plan, then exit",
    )
    ft.set_defaults(run=finetune_command)

    merge = commands.add_parser(
        "merge",
        help="merge a LoRA adapter into its base",
        description="Write base + adapter as one checkpoint.",
    )
    merge.add_argument("--model", required=True, metavar="DIR", help="base checkpoint directory")
    merge.add_argument("--adapter", required=True, metavar="DIR", help="PEFT adapter directory")
    merge.add_argument("--output", required=True, metavar="DIR")
    merge.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: as stored")
    merge.set_defaults(run=merge_command)

    ev = commands.add_parser(
        "eval",
        help="exact-match accuracy of greedy answers on a data set",
        description="Answer every example greedily; compare with its last assistant reply "
        "(whitespace and case normalised).",
    )
    ev.add_argument("--model", required=True, metavar="DIR")
    ev.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter to run on the model")
    ev.add_argument("--data", required=True, metavar="PATH", help="JSONL or a datasets directory")
    ev.add_argument("--max-tiles", type=int, metavar="N", help="most tiles per image")
    ev.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    ev.add_argument("--batch-size", type=int, default=8, metavar="N")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    ev.add_argument("--json", action="store_true", help="end stdout with one JSON line of the results")
    ev.set_defaults(run=eval_command)


def finetune_command(args: argparse.Namespace) -> int:
    from llama_vision.finetune.config import load_recipe
    from llama_vision.finetune.train import Trainer

    config = load_recipe(
        args.config,
        args.overrides,
        model=args.model,
        data=args.data,
        eval_data=args.eval_data,
        mode=args.mode,
        output=args.output,
        max_steps=args.max_steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        resume=args.resume,
        tensorboard=args.tensorboard,
    )
    trainer = Trainer(config)
    if trainer.d.main:
        print_setup(trainer, example=args.dry_run)
    if args.dry_run:
        return 0
    trainer.prepare()
    trainer.run()
    return 0


def print_setup(trainer: Any, *, example: bool) -> None:
    """The trainable parameters by part and the memory plan (stderr); with `example`, also one
    collated example with its trained spans marked (stdout)."""
    from llama_vision.finetune.collate import marked_text
    from llama_vision.finetune.memory import plan_for
    from llama_vision.finetune.train import count_parameters

    out = sys.stdout if example else sys.stderr
    if example and trainer.config.mode == "vision":
        first = trainer.examples[0]
        print(f"example {first.source}: {first.image}, tags {', '.join(first.tags)} "
              f"({len(trainer.tag_labels)} labels in all)", file=out)  # fmt: skip
        print(file=out)
    elif example:
        encoded = trainer.collator.encode(trainer.examples[0])
        print(f"example {trainer.examples[0].source} ({len(encoded.ids)} tokens, {len(encoded.images)} images; "
              "trained spans between [[ and ]]):", file=out)  # fmt: skip
        print(marked_text(encoded, trainer.tokenizer), file=out)
        print(file=out)
    print(f"mode {trainer.config.mode}: trainable parameters by part", file=out)
    for part, (trainable, total) in count_parameters(trainer.model).items():
        print(f"  {part:<24} {trainable:>15,} of {total:>15,}", file=out)
    print(plan_for(trainer).table(), file=out)


def merge_command(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    import torch

    from llama_vision.finetune.lora import load_adapter, merge_lora
    from llama_vision.finetune.train import TOKENIZER_FILES
    from llama_vision.weights import load_checkpoint, save_checkpoint

    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    model = load_checkpoint(args.model, dtype=dtype)
    merge_lora(load_adapter(model, args.adapter))
    save_checkpoint(model, args.output)
    for name in TOKENIZER_FILES:
        if (Path(args.model) / name).is_file():
            shutil.copy(Path(args.model) / name, Path(args.output) / name)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def eval_command(args: argparse.Namespace) -> int:
    import torch

    from llama_vision.api import LlamaVision
    from llama_vision.finetune.data import load_examples
    from llama_vision.finetune.evaluate import exact_match

    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    examples = load_examples(args.data)
    lv = LlamaVision.from_pretrained(
        args.model,
        device=args.device,
        dtype=None if args.dtype is None else getattr(torch, args.dtype),
        adapter=args.adapter,
    )
    progress = None
    if sys.stderr.isatty():

        def progress(done: int, total: int) -> None:
            print(f"\r{done}/{total} answered", end="" if done < total else "\n", file=sys.stderr, flush=True)

    result = exact_match(
        lv,
        examples,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        max_num_tiles=args.max_tiles,
        progress=progress,
    )
    print(f"exact match {result.accuracy:.4f} ({result.correct} of {result.n})")
    if args.json:
        print(json.dumps({"accuracy": result.accuracy, "n": result.n, "correct": result.correct}))
    return 0
