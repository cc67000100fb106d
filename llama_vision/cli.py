"""The command line: `llama-vision ask --model DIR --image photo.jpg "What is in this picture?"`.

`ask` streams the answer to stdout, a piece at a time, and ends it with a newline; stdout holds nothing
else, so it can be piped. Loading progress goes to stderr, and only when stderr is a terminal (the
progress line redraws itself with carriage returns, which would litter a log file); `--quiet` turns it
off there too. Generation options left out fall back to the checkpoint's generation_config.json.

Everything that can be checked cheaply is checked before the weights are loaded: the option values
(by building a `GenerationConfig`), the checkpoint directory and its config, the tile limit against the
model's, the images (decoded once here and handed to the model as images), and the device. A failure
prints one line, `llama-vision: error: <message>`, never a traceback: exit code 2 for a bad command
line (as argparse), 1 for anything else (a missing file, a broken checkpoint, a prompt too long for the
context, an unavailable device), 130 for Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import torch

from llama_vision.api import LlamaVision
from llama_vision.cli_finetune import add_commands as add_finetune_commands
from llama_vision.encoders.image_transform import MAX_TILES_LIMIT, load_image
from llama_vision.sampling import GenerationConfig
from llama_vision.weights import read_config

PROG = "llama-vision"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop")


class UsageError(Exception):
    """A bad command line: exit code 2."""


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line and come back to `main` instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Llama 3.2 Vision in plain PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ask = commands.add_parser(
        "ask",
        help="answer a question about images",
        description="Answer a question about images; the answer streams to stdout.",
    )
    ask.add_argument("prompt", help="the question (the text of the user message)")
    ask.add_argument(
        "--model", required=True, metavar="DIR", help="checkpoint directory (Hugging Face or Meta)"
    )
    ask.add_argument(
        "--image", action="append", default=[], metavar="PATH", help="an image; repeat for several, in order"
    )
    ask.add_argument("--system", metavar="TEXT", help="system prompt")

    sampling = ask.add_argument_group("generation (default: the checkpoint's generation_config.json)")
    sampling.add_argument("--max-new-tokens", type=int, metavar="N")
    sampling.add_argument("--temperature", type=float, metavar="T", help="0 is greedy")
    sampling.add_argument("--top-k", type=int, metavar="K", help="0 is off")
    sampling.add_argument("--top-p", type=float, metavar="P", help="1 is off")
    sampling.add_argument("--min-p", type=float, metavar="P", help="0 is off")
    sampling.add_argument("--repetition-penalty", type=float, metavar="R", help="1 is off")
    sampling.add_argument("--seed", type=int, metavar="N", help="for reproducible sampling")
    sampling.add_argument("--stop", action="append", metavar="TEXT", help="a stop string; repeatable")

    run = ask.add_argument_group("model")
    run.add_argument(
        "--max-tiles", type=tiles, metavar="N", help="most tiles per image (default: the model's)"
    )
    run.add_argument("--device", type=device, default="cpu", help="cpu (default), cuda, cuda:1, mps, ...")
    run.add_argument("--dtype", choices=DTYPES, help="weight dtype (default: as stored)")
    run.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    run.add_argument("-q", "--quiet", action="store_true", help="no loading progress on stderr")
    run.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter to run on the model")
    ask.set_defaults(run=ask_command)
    add_finetune_commands(commands)
    return parser


def tiles(text: str) -> int:
    n = int(text)  # argparse turns the ValueError into "invalid tiles value"
    if not 1 <= n <= MAX_TILES_LIMIT:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to {MAX_TILES_LIMIT}, got {n}")
    return n


def device(text: str) -> str:
    try:
        kind = torch.device(text).type
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (cpu, cuda, cuda:1, mps, ...)") from None
    if kind == "meta":
        raise argparse.ArgumentTypeError("the meta device holds no weights; pick one that computes")
    return text


def ask_command(args: argparse.Namespace) -> int:
    options = {name: getattr(args, name) for name in SAMPLING}
    for name, value in options.items():  # one at a time, to name the flag; defaults come from the checkpoint
        try:
            GenerationConfig().replace(**{name: value})
        except ValueError as e:
            raise UsageError(f"argument --{name.replace('_', '-')}: {e}") from None

    limit = read_config(args.model).vision.max_num_tiles  # a missing or broken checkpoint fails here
    if args.max_tiles is not None and args.max_tiles > limit:
        raise UsageError(
            f"argument --max-tiles: this model takes at most {limit} tiles, got {args.max_tiles}"
        )
    images = [load_image(path) for path in args.image]
    check_device(args.device)

    lv = LlamaVision.from_pretrained(
        args.model,
        device=args.device,
        dtype=None if args.dtype is None else DTYPES[args.dtype],
        progress=not args.quiet and sys.stderr.isatty(),
        compile=args.compile,
        **({"adapter": args.adapter} if args.adapter else {}),  # a LoRA adapter (finetune/lora.py)
    )
    for piece in lv.stream(
        conversation(args.prompt, images, args.system), max_num_tiles=args.max_tiles, **options
    ):
        print(piece, end="", flush=True)
    print(flush=True)
    return 0


def conversation(prompt: str, images: Sequence[Any], system: str | None = None) -> list[dict[str, Any]]:
    """Chat messages: the optional system prompt, then one user message with the images before the text."""
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": prompt}]
    system_message = [] if system is None else [{"role": "system", "content": system}]
    return [*system_message, {"role": "user", "content": content}]


def check_device(name: str) -> None:
    """Fail before loading when the device type exists but this machine cannot use it (no CUDA here)."""
    try:
        torch.empty(0, device=name)
    except NotImplementedError:  # its message lists every dispatch key
        raise RuntimeError(f"device {name!r}: this PyTorch build cannot run on it") from None
    except RuntimeError as e:
        raise RuntimeError(f"device {name!r} is not usable here: {first_line(e)}") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.run(args)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except UsageError as e:
        return fail(str(e), 2)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, and quietly at exit too
        _silence_stdout()
        return 1
    except (ValueError, OSError, RuntimeError) as e:
        return fail(first_line(e), 1)


def fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return code


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _silence_stdout() -> None:
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (tests capture it)
        pass


if __name__ == "__main__":
    sys.exit(main())
