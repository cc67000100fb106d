"""Llama 3.2 Vision (Mllama) in plain PyTorch, numerically faithful to Meta's reference.

The names below are imported on first use (PEP 562), so that `import llama_vision` is cheap and the
command line (`llama_vision.entry`) can take over Ctrl-C before PyTorch loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "LlamaVision": "llama_vision.api",
    "PRESETS": "llama_vision.config",
    "LlamaVisionConfig": "llama_vision.config",
    "TextConfig": "llama_vision.config",
    "VisionConfig": "llama_vision.config",
    "get_preset": "llama_vision.config",
    "LlamaVisionModel": "llama_vision.model",
    "Processor": "llama_vision.processor",
    "GenerationConfig": "llama_vision.sampling",
    "Tokenizer": "llama_vision.tokenizer",
    "load_checkpoint": "llama_vision.weights",
    "read_config": "llama_vision.weights",
    "save_checkpoint": "llama_vision.weights",
}
__all__ = [
    "PRESETS",
    "GenerationConfig",
    "LlamaVision",
    "LlamaVisionConfig",
    "LlamaVisionModel",
    "Processor",
    "TextConfig",
    "Tokenizer",
    "VisionConfig",
    "get_preset",
    "load_checkpoint",
    "read_config",
    "save_checkpoint",
]

if TYPE_CHECKING:
    from llama_vision.api import LlamaVision
    from llama_vision.config import PRESETS, LlamaVisionConfig, TextConfig, VisionConfig, get_preset
    from llama_vision.model import LlamaVisionModel
    from llama_vision.processor import Processor
    from llama_vision.sampling import GenerationConfig
    from llama_vision.tokenizer import Tokenizer
    from llama_vision.weights import load_checkpoint, read_config, save_checkpoint


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llama_vision' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
