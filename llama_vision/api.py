"""The public entry point: `LlamaVision.from_pretrained(path)` gives the model, its tokenizer and its
processor, for either checkpoint layout (Hugging Face or Meta).

    lv = LlamaVision.from_pretrained(path, device="cpu", dtype=torch.float32)
    logits = lv.model(**lv.processor(text=prompt, images=[image]))  # (B, T, vocab)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llama_vision.config import LlamaVisionConfig
from llama_vision.model import LlamaVisionModel
from llama_vision.processor import Processor
from llama_vision.tokenizer import Tokenizer
from llama_vision.weights import load_checkpoint, read_config


@dataclass
class LlamaVision:
    model: LlamaVisionModel
    processor: Processor

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        progress: bool = False,
    ) -> LlamaVision:
        """Load a checkpoint directory. `dtype` None keeps the stored dtype."""
        processor = Processor.from_dir(path, read_config(path))  # a missing tokenizer fails before loading
        model = load_checkpoint(path, device=device, dtype=dtype, progress=progress)
        return cls(model=model, processor=processor)

    @property
    def config(self) -> LlamaVisionConfig:
        return self.model.config

    @property
    def tokenizer(self) -> Tokenizer:
        return self.processor.tokenizer
