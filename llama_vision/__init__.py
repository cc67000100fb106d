"""Llama 3.2 Vision (Mllama) in plain PyTorch, numerically faithful to Meta's reference."""

from llama_vision.api import LlamaVision
from llama_vision.config import PRESETS, LlamaVisionConfig, TextConfig, VisionConfig, get_preset
from llama_vision.model import LlamaVisionModel
from llama_vision.processor import Processor
from llama_vision.sampling import GenerationConfig
from llama_vision.tokenizer import Tokenizer
from llama_vision.weights import load_checkpoint, read_config, save_checkpoint

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
