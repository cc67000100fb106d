"""The `llama-vision` command's entry point: it takes over Ctrl-C before anything heavy is imported, then
runs `llama_vision.cli`.

Ctrl-C (SIGINT) ends the process at once, quietly, with exit code 130, whatever it is doing: importing
PyTorch, reading weights, generating. Python's default handler raises KeyboardInterrupt wherever the
interpreter happens to be, which printed tracebacks during imports and could be swallowed by code that
catches it (generation then ran on). The answer streams to stdout flushed piece by piece, so nothing
written is lost by not unwinding. This module imports only the standard library; `llama_vision`'s
package imports nothing until a name is used.
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted(signum: int, frame: object) -> None:
    os._exit(130)


def main() -> int:
    signal.signal(signal.SIGINT, _interrupted)
    from llama_vision.cli import main as cli_main  # PyTorch and the rest load here

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
