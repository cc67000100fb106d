"""`llama-vision demo`: the Gradio demo (llama_vision/demo.py) on a checkpoint, in the browser.

Binds to 127.0.0.1 unless `--host` says otherwise; `--share` (off by default) asks Gradio for a public
link. The page has no login, so either of those prints a warning. Without `--model` it runs the
embedded model that ships with the package, with its example pictures. Flags, the checkpoint's config and the device are checked before the weights load; gradio (the `demo` extra) is
imported only when this command runs, with a clear message when it is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from llama_vision.bundled import EXAMPLES_DIR, model_dir


def add_parser(commands: Any) -> None:
    from llama_vision.cli import device, dtype
    from llama_vision.cli_serve import port, positive
    from llama_vision.options import DEVICE_NAMES, DTYPE_NAMES

    demo = commands.add_parser(
        "demo",
        help="chat about images in the browser (Gradio)",
        description="Chat about images with the model in the browser (a Gradio app).",
    )
    demo.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the embedded model)")
    demo.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter to run on the model")
    demo.add_argument("--device", type=device, default="cpu", help=f"{DEVICE_NAMES} (default: cpu)")
    demo.add_argument("--dtype", type=dtype, help=f"weight dtype: {DTYPE_NAMES} (default: as stored)")
    demo.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    demo.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    demo.add_argument("--port", type=port, default=7860, help="(default 7860)")
    demo.add_argument("--share", action="store_true", help="also serve through a public Gradio link")
    demo.add_argument(
        "--max-batch", type=positive, default=8, metavar="N", help="answers decoded together (default 8)"
    )
    demo.add_argument(
        "--max-images", type=positive, default=2, metavar="N", help="images per conversation (default 2)"
    )
    demo.add_argument(
        "--queue-size", type=positive, default=64, metavar="N", help="turns waiting before refusal"
    )
    demo.set_defaults(run=demo_command)


def demo_command(args: argparse.Namespace) -> int:
    from llama_vision.cli_serve import _loopback
    from llama_vision.options import usable_device
    from llama_vision.weights import read_config

    try:
        import gradio  # noqa: F401
    except ImportError:
        raise RuntimeError("the demo needs gradio: pip install 'llama-vision[demo]'") from None
    model = model_dir(args.model)
    read_config(model)  # a missing or broken checkpoint fails here, before the weights load
    if args.adapter is not None and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise ValueError(f"{args.adapter}: not a PEFT adapter directory (no adapter_config.json)")
    usable_device(args.device)
    if not _loopback(args.host) or args.share:
        where = "a public Gradio link" if args.share else args.host
        message = f"the demo on {where} has no login: anyone who reaches it can use the model"
        print(f"llama-vision: warning: {message}", file=sys.stderr)

    from llama_vision.api import LlamaVision
    from llama_vision.demo import build_demo, bundled_examples, launch

    lv = LlamaVision.from_pretrained(
        model,
        adapter=args.adapter,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        progress=sys.stderr.isatty(),
        max_batch=args.max_batch,
        max_images=args.max_images,
    )
    name = Path(model).resolve().name
    demo = build_demo(lv, model_name=name, examples=bundled_examples(), queue_size=args.queue_size)
    launch(demo, host=args.host, port=args.port, share=args.share, allowed_paths=[str(EXAMPLES_DIR)])
    return 0
