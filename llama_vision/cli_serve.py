"""`llama-vision serve --model DIR`: the OpenAI-compatible HTTP server (llama_vision/server/) under uvicorn.

Binds to 127.0.0.1 unless `--host` says otherwise, and warns when it listens beyond this machine
without an API key. Keys come from `--api-key` (repeatable), `--api-key-file` (one a line, `#`
comments) or the LLAMA_VISION_API_KEY environment variable, which keeps them out of `ps`. Everything is
checked before the weights load (flags, the key file, the checkpoint's config, the device).

SIGTERM (or Ctrl-C): /ready turns 503, uvicorn stops accepting connections and waits up to
`--grace-period` seconds for running requests to finish, then cancels what is left and exits.
The server's dependencies (the `serve` extra) are imported only when this command runs, so `ask`
works without them.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path
from typing import Any

from llama_vision.bundled import model_dir

ENV_KEY = "LLAMA_VISION_API_KEY"


def add_serve_parser(commands: Any) -> None:
    from llama_vision.cli import device, dtype
    from llama_vision.options import DEVICE_NAMES, DTYPE_NAMES

    serve = commands.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve the model over an OpenAI-compatible HTTP API (POST /v1/chat/completions).",
    )
    serve.add_argument(
        "--model",
        metavar="DIR",
        help="checkpoint directory (Hugging Face or Meta); default: the embedded model that ships with the package",
    )
    serve.add_argument(
        "--adapter", metavar="DIR", help="a PEFT LoRA adapter to run on the model (without merging)"
    )
    serve.add_argument(
        "--model-name", metavar="ID", help="the model id clients send (default: the folder's name)"
    )
    net = serve.add_argument_group("network and access")
    net.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    net.add_argument("--port", type=port, default=8000)
    net.add_argument(
        "--api-key", action="append", default=[], metavar="KEY", help="a key clients must send; repeatable"
    )
    net.add_argument(
        "--api-key-file", type=Path, metavar="FILE", help="keys, one a line ('#' starts a comment)"
    )
    net.add_argument(
        "--cors-origins",
        type=names,
        default=(),
        metavar="A,B",
        help="origins allowed by CORS (default: none)",
    )
    net.add_argument("--allowed-media-domains", type=names, default=(), metavar="A,B",
                     help="hosts remote image URLs may point to (default: none, data URLs only)")  # fmt: skip
    net.add_argument(
        "--allow-http-media", action="store_true", help="also fetch http:// image URLs (default: https only)"
    )
    limits = serve.add_argument_group("limits")
    limits.add_argument(
        "--max-batch", type=positive, default=8, metavar="N", help="requests decoded together"
    )
    limits.add_argument(
        "--max-queue", type=positive, default=256, metavar="N", help="waiting requests before 429"
    )
    limits.add_argument("--max-images-per-request", type=positive, default=2, metavar="N")
    limits.add_argument("--max-image-pixels", type=positive, default=40_000_000, metavar="N")
    limits.add_argument("--max-body-bytes", type=positive, default=32 << 20, metavar="N")
    limits.add_argument("--max-prompt-tokens", type=positive, default=32_768, metavar="N")
    limits.add_argument(
        "--max-tokens", type=positive, default=4096, metavar="N", help="most tokens a request may ask for"
    )
    limits.add_argument("--default-max-tokens", type=positive, default=512, metavar="N")
    limits.add_argument("--max-n", type=positive, default=8, metavar="N", help="most choices per request")
    limits.add_argument("--request-timeout", type=seconds, default=600.0, metavar="S")
    limits.add_argument("--grace-period", type=seconds, default=30.0, metavar="S", help="on SIGTERM")
    run = serve.add_argument_group("model")
    run.add_argument("--device", type=device, default="cpu", help=f"{DEVICE_NAMES} (default: cpu)")
    run.add_argument("--dtype", type=dtype, help=f"weight dtype: {DTYPE_NAMES} (default: as stored)")
    run.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    run.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(run=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    from llama_vision.cli import UsageError
    from llama_vision.options import usable_device
    from llama_vision.weights import read_config

    try:
        import uvicorn

        from llama_vision.server import Settings, create_app
    except ImportError as e:
        raise RuntimeError(
            f"serve needs the server's packages ({e.name} is missing): pip install 'llama-vision[serve]'"
        ) from None

    keys = list(args.api_key)
    if args.api_key_file is not None:
        keys += read_keys(args.api_key_file)
    if os.environ.get(ENV_KEY):
        keys.append(os.environ[ENV_KEY])
    args.model = model_dir(args.model)
    read_config(args.model)  # a missing or broken checkpoint fails here, before the weights load
    try:
        settings = Settings(
            model_name=args.model_name or Path(args.model).resolve().name,
            api_keys=tuple(keys),
            cors_origins=args.cors_origins,
            allowed_media_domains=args.allowed_media_domains,
            allow_http_media=args.allow_http_media,
            max_body_bytes=args.max_body_bytes,
            max_images_per_request=args.max_images_per_request,
            max_image_pixels=args.max_image_pixels,
            max_prompt_tokens=args.max_prompt_tokens,
            max_tokens=args.max_tokens,
            default_max_tokens=args.default_max_tokens,
            max_n=args.max_n,
            request_timeout=args.request_timeout,
            grace_period=args.grace_period,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    usable_device(args.device)
    if not keys and not _loopback(args.host):
        print(f"llama-vision: warning: listening on {args.host} without an API key", file=sys.stderr)

    from llama_vision.api import LlamaVision

    if args.adapter is not None and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise ValueError(f"{args.adapter}: not a PEFT adapter directory (no adapter_config.json)")
    lv = LlamaVision.from_pretrained(
        args.model,
        adapter=args.adapter,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        max_batch=args.max_batch,
        max_images=args.max_images_per_request,
        max_queue=args.max_queue,
    )
    app = create_app(lv, settings)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            app.state.server.draining = True  # /ready says 503 while running requests finish
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.grace_period,
        server_header=False,
        proxy_headers=False,
    )
    Server(config).run()
    return 0


def read_keys(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the API key file {str(path)!r}: {e.__class__.__name__}") from None
    keys = [line.split("#", 1)[0].strip() for line in lines]
    keys = [k for k in keys if k]
    if not keys:
        raise ValueError(f"the API key file {str(path)!r} holds no key")
    return keys


def port(text: str) -> int:
    n = int(text)
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535, got {n}")
    return n


def positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {n}")
    return n


def seconds(text: str) -> float:
    x = float(text)
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return x


def names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
