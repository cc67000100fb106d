"""`llama-vision estimate`: the memory planner (memory.py) on the command line.

    llama-vision estimate --model llama-3.2-11b-vision-instruct --dtype bfloat16 --max-tiles 4 --images 1 \
        --context 8192 --batch 1 [--quant int8|w8a8|int4] [--tp N] [--mode lora|qlora|full|adapters]

`--model` is a preset name (config.py) or a checkpoint directory, of which only the config is read.
Prints each part per device in GiB and which GPU sizes hold it. With `--mode` the figures are
fine-tuning's (finetune/memory.py `training_estimate`: the trainer's own parameter arithmetic, FSDP
over `--tp` processes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llama_vision import quantize
from llama_vision.config import PRESETS, LlamaVisionConfig
from llama_vision.memory import GPU_SIZES_GB, RUNTIME_RESERVE, GiB, estimate

MODES = ("lora", "qlora", "full", "adapters")  # finetune/config.py's, without importing it here

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
LABELS = {
    "weights": "weights",
    "kv_cache": "kv cache (self-attention)",
    "image_kv": "image keys/values",
    "activations": "activations (peak)",
    "gradients": "gradients",
    "optimizer": "optimizer state (AdamW)",
    "packed_weights": "packed weights (CPU)",
    "total": "total",
}


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "estimate",
        help="how much memory a model needs, per device",
        description="Estimate the memory a model needs for inference or fine-tuning, per device.",
    )
    p.add_argument(
        "--model",
        required=True,
        metavar="NAME_OR_DIR",
        help=f"a preset ({', '.join(PRESETS)}) or a checkpoint directory",
    )
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weight and activation dtype")
    p.add_argument("--max-tiles", type=int, metavar="N", help="tiles per image (default: the model's)")
    p.add_argument("--images", type=int, default=1, metavar="N", help="images per sequence (default 1)")
    p.add_argument(
        "--context", type=int, default=8192, metavar="T", help="prompt + new tokens (default 8192)"
    )
    p.add_argument("--batch", type=int, default=1, metavar="B", help="sequences at once (default 1)")
    p.add_argument("--quant", choices=quantize.SCHEMES, help="quantized weights (w8a8: as int8)")
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        metavar="N",
        help="devices (default 1): tensor parallel for inference, FSDP processes with --mode",
    )
    p.add_argument("--mode", choices=MODES, help="fine-tuning instead of inference")
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="where it runs (int4's layout, CPU packing)"
    )
    p.add_argument(
        "--cpu-pack",
        action=argparse.BooleanOptionalAction,
        help="count the packed copy of the float32 decoder weights for batched CPU decoding "
        "(default: on the CPU without --tp, as from_pretrained packs by default)",
    )
    p.set_defaults(run=run)


def model_config(name: str) -> LlamaVisionConfig:
    if name in PRESETS:
        return PRESETS[name]
    if Path(name).is_dir():
        from llama_vision.weights import read_config

        return read_config(name)
    raise ValueError(f"--model {name!r} is neither a preset ({', '.join(PRESETS)}) nor a directory")


def run(args: argparse.Namespace) -> int:
    config = model_config(args.model)
    shape = dict(max_tiles=args.max_tiles, images=args.images, context=args.context, batch=args.batch)
    if args.mode:
        from llama_vision.finetune.memory import training_estimate

        if args.quant:
            raise ValueError("--quant is for inference; with --mode, qlora is the 4-bit base")
        e = training_estimate(config, args.mode, dtype=DTYPES[args.dtype], world=args.tp, **shape)
    else:
        e = estimate(
            config,
            dtype=DTYPES[args.dtype],
            quant=args.quant,
            tp=args.tp,
            device=args.device,
            cpu_pack=args.cpu_pack,
            **shape,
        )
    tiles = args.max_tiles or config.vision.max_num_tiles
    what = f"fine-tuning ({args.mode})" if args.mode else "inference"
    quant = f", {args.quant} weights" if args.quant else ", NF4 base" if args.mode == "qlora" else ""
    print(
        f"{args.model}: {what}, {args.dtype}{quant}, {args.images} image(s) x {tiles} tiles, "
        f"context {args.context}, batch {args.batch}, per device of {args.tp}{' (FSDP)' if args.mode else ''}:"
    )
    for name, value in e.parts().items():
        if (name in ("gradients", "optimizer") and not args.mode) or (name == "packed_weights" and not value):
            continue
        if name in ("kv_cache", "image_kv") and args.mode:
            continue  # no cache in training; the image keys/values are among the activations
        print(f"  {LABELS[name]:<28}{value / GiB:9.2f} GiB")
    fits = ", ".join(f"{gb} GB: {'yes' if e.fits(gb * GiB) else 'no'}" for gb in GPU_SIZES_GB)
    print(f"fits (total + {RUNTIME_RESERVE / GiB:.0f} GiB for the CUDA runtime): {fits}")
    return 0
