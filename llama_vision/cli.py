"""The command line: `llama-vision ask --model DIR --image photo.jpg "What is in this picture?"`.

Without `--model`, the embedded model that ships with the package answers; `--image` takes a file or
the name of an example picture (llama_vision/bundled.py): `llama-vision ask --image shapes "How many
shapes are there?"`.

The prompt is the argument, or comes from standard input (`-`) or a file (`--prompt-file PATH`), for
prompts longer than the system's argument limit. Text arguments and prompt files must be UTF-8; that
is checked first, with the other options. Ctrl-C is handled by `llama_vision.entry`, the installed
command's entry point (exit code 130 at any moment); `main` here, called in-process, returns 130 on a
KeyboardInterrupt.

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
from pathlib import Path
from typing import Any, NoReturn

from llama_vision import cli_demo, cli_estimate
from llama_vision.api import LlamaVision
from llama_vision.bundled import EXAMPLES, model_dir, resolve_image
from llama_vision.cli_finetune import add_commands as add_finetune_commands
from llama_vision.cli_serve import add_serve_parser
from llama_vision.encoders.image_transform import MAX_TILES_LIMIT, load_image
from llama_vision.llama import is_text_checkpoint, read_llama_config
from llama_vision.options import DEVICE_NAMES, DTYPE_NAMES, parse_device, parse_dtype, usable_device
from llama_vision.quantize import SCHEMES
from llama_vision.sampling import GenerationConfig
from llama_vision.weights import read_config

PROG = "llama-vision"
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
    ask.add_argument(
        "prompt",
        nargs="?",
        help="the question (the text of the user message); - reads it from standard input",
    )
    ask.add_argument(
        "--prompt-file", metavar="PATH", help="read the question from a UTF-8 file (- for stdin)"
    )
    ask.add_argument(
        "--model",
        metavar="DIR",
        help="checkpoint directory (Hugging Face or Meta); default: the embedded model that ships with the package",
    )
    ask.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="PATH",
        help=f"an image file, or an example picture by name ({', '.join(EXAMPLES)}); repeat for several, in order",
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
    run.add_argument("--device", type=device, default="cpu", help=f"{DEVICE_NAMES} (default: cpu)")
    run.add_argument("--dtype", type=dtype, help=f"weight dtype: {DTYPE_NAMES} (default: as stored)")
    run.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    run.add_argument(
        "--quantize", choices=SCHEMES, help="int8 or int4 weights, or w8a8 (int8 weights and activations)"
    )
    run.add_argument("-q", "--quiet", action="store_true", help="no loading progress on stderr")
    run.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter to run on the model")
    ask.set_defaults(run=ask_command)
    add_serve_parser(commands)
    cli_estimate.add_parser(commands)
    add_finetune_commands(commands)
    cli_demo.add_parser(commands)
    return parser


def tiles(text: str) -> int:
    n = int(text)  # argparse turns the ValueError into "invalid tiles value"
    if not 1 <= n <= MAX_TILES_LIMIT:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to {MAX_TILES_LIMIT}, got {n}")
    return n


def device(text: str) -> str:
    try:
        parse_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def dtype(text: str) -> Any:
    try:
        return parse_dtype(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def read_prompt(args: argparse.Namespace) -> str:
    """The question from the argument, standard input (-) or --prompt-file; UTF-8 checked."""
    if (args.prompt is None) == (args.prompt_file is None):
        raise UsageError(
            "give the question either as an argument (- for standard input) or with --prompt-file"
        )
    for flag, value in [
        ("prompt", args.prompt),
        ("--system", args.system),
        *(("--stop", s) for s in args.stop or []),
    ]:
        check_utf8(flag, value)
    source = args.prompt_file if args.prompt is None else args.prompt if args.prompt == "-" else None
    if source is None:
        return args.prompt
    if source == "-":
        data, name = sys.stdin.buffer.read(), "standard input"
    else:
        try:
            data, name = Path(source).read_bytes(), source
        except OSError as e:
            raise OSError(f"cannot read the prompt file {source}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(
            f"the prompt in {name} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})"
        ) from None


def check_utf8(flag: str, value: str | None) -> None:
    """Arguments reach Python with undecodable bytes as lone surrogates (surrogateescape)."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = value[e.start].encode("utf-8", "surrogateescape")
        shown = f"byte {byte[0]:#04x}" if len(byte) == 1 else f"character {value[e.start]!r}"
        raise UsageError(f"argument {flag}: not UTF-8 text ({shown} at position {e.start})") from None


def ask_command(args: argparse.Namespace) -> int:
    prompt = read_prompt(args)
    options = {name: getattr(args, name) for name in SAMPLING}
    for name, value in options.items():  # one at a time, to name the flag; defaults come from the checkpoint
        try:
            GenerationConfig().replace(**{name: value})
        except ValueError as e:
            raise UsageError(f"argument --{name.replace('_', '-')}: {e}") from None

    args.model = model_dir(args.model)
    if is_text_checkpoint(args.model):  # a text-only Llama (llama.py): no images, no tiles
        read_llama_config(args.model)  # a broken config fails here
        if args.image or args.max_tiles is not None:
            raise ValueError(f"{args.model} is a text-only model: it takes no --image or --max-tiles")
        limit = None
    else:
        limit = read_config(args.model).vision.max_num_tiles  # a missing or broken checkpoint fails here
    if args.max_tiles is not None and args.max_tiles > limit:
        raise UsageError(
            f"argument --max-tiles: this model takes at most {limit} tiles, got {args.max_tiles}"
        )
    images = [load_image(resolve_image(path)) for path in args.image]
    usable_device(args.device)

    lv = LlamaVision.from_pretrained(
        args.model,
        device=args.device,
        dtype=args.dtype,
        progress=not args.quiet and sys.stderr.isatty(),
        compile=args.compile,
        quantize=args.quantize,
        **({"adapter": args.adapter} if args.adapter else {}),  # a LoRA adapter (finetune/lora.py)
    )
    for piece in lv.stream(
        conversation(prompt, images, args.system), max_num_tiles=args.max_tiles, **options
    ):
        print(piece, end="", flush=True)
    print(flush=True)
    return 0


def conversation(prompt: str, images: Sequence[Any], system: str | None = None) -> list[dict[str, Any]]:
    """Chat messages: the optional system prompt, then one user message with the images before the text."""
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": prompt}]
    system_message = [] if system is None else [{"role": "system", "content": system}]
    return [*system_message, {"role": "user", "content": content}]


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
