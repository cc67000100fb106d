"""The demo launched for its tests: a random-weight model of the embedded preset with the embedded
tokenizer, written to a temporary folder, served by `build_demo` on a free port of 127.0.0.1."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from llama_vision import LlamaVision, LlamaVisionModel, save_checkpoint
from llama_vision.bundled import EMBEDDED_DIR, EXAMPLES_DIR
from llama_vision.config import get_preset
from llama_vision.demo import build_demo, bundled_examples, launch


def random_checkpoint(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    save_checkpoint(LlamaVisionModel(get_preset("embedded")), path)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(EMBEDDED_DIR / name, path / name)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(lv: LlamaVision, examples_dir: Path) -> Iterator[str]:
    """The demo of `lv` running in this process; yields its URL."""
    demo = build_demo(lv, model_name="test-model", examples=bundled_examples())
    port = free_port()
    launch(demo, port=port, prevent_thread_lock=True, quiet=True, allowed_paths=[str(EXAMPLES_DIR)])
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
