"""The public entry point: `LlamaVision.from_pretrained(path)` gives the model, its tokenizer, its
processor and a generation engine, for either checkpoint layout (Hugging Face or Meta).

    lv = LlamaVision.from_pretrained(path, device="cpu", dtype=torch.bfloat16)
    messages = [{"role": "user", "content": [{"type": "image", "image": "photo.jpg"},
                                             {"type": "text", "text": "What is in this picture?"}]}]
    lv.chat(messages, max_new_tokens=128)               # -> str
    for piece in lv.stream(messages): print(piece, end="")
    lv.generate([messages, other_messages])             # -> list[str], one batch
    logits = lv.model(**lv.processor(text=prompt, images=[image]))  # (B, T, vocab)

Generation options are the fields of `GenerationConfig`; those not given come from the checkpoint's
generation_config.json (`lv.generation_config`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llama_vision.config import LlamaVisionConfig
from llama_vision.generation import Engine, TextStream, answer_text, stream_rows
from llama_vision.model import LlamaVisionModel
from llama_vision.processor import Processor
from llama_vision.sampling import GenerationConfig
from llama_vision.tokenizer import Tokenizer
from llama_vision.weights import load_checkpoint, read_config


@dataclass
class LlamaVision:
    model: LlamaVisionModel
    processor: Processor
    generation_config: GenerationConfig = field(default_factory=GenerationConfig)
    compile: bool = False
    engine: Engine = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.engine = Engine(self.model, compile=self.compile)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        progress: bool = False,
        compile: bool = False,
        adapter: str | Path | None = None,
    ) -> LlamaVision:
        """Load a checkpoint directory. `dtype` None keeps the stored dtype; `compile` compiles the decode
        step with torch.compile (the first answer then takes longer); `adapter` runs a PEFT LoRA adapter
        directory on the model without merging it (llama_vision.finetune.lora)."""
        processor = Processor.from_dir(path, read_config(path))  # a missing tokenizer fails before loading
        generation_config = GenerationConfig.from_dir(path)
        model = load_checkpoint(path, device=device, dtype=dtype, progress=progress).eval()
        if adapter is not None:
            from llama_vision.finetune.lora import load_adapter

            load_adapter(model, adapter)
        return cls(model=model, processor=processor, generation_config=generation_config, compile=compile)

    def chat(
        self, messages: Sequence[dict[str, Any]], *, max_num_tiles: int | None = None, **options: Any
    ) -> str:
        """The assistant's answer to one conversation (chat messages, images inside them)."""
        return self.generate([messages], max_num_tiles=max_num_tiles, **options)[0]

    def stream(
        self, messages: Sequence[dict[str, Any]], *, max_num_tiles: int | None = None, **options: Any
    ) -> Iterator[str]:
        """The answer as it is generated, in pieces of whole characters; stops early when closed.

        Options, messages and images are checked here, before the first piece is asked for."""
        config = self.generation_config.replace(**options)
        inputs = self.processor.chat_inputs([messages], max_num_tiles=max_num_tiles)
        rows = stream_rows(self.engine, self._streams(config, 1), inputs, config)
        return (piece for (piece,) in rows if piece)

    def generate(
        self,
        conversations: Sequence[Sequence[dict[str, Any]]],
        *,
        max_num_tiles: int | None = None,
        **options: Any,
    ) -> list[str]:
        """Answers to several conversations, run as one left-padded batch; each row stops on its own."""
        config = self.generation_config.replace(**options)
        if isinstance(conversations, (str, dict)) or not conversations:
            raise ValueError("generate takes a non-empty list of conversations (each a list of messages)")
        if isinstance(conversations[0], dict):
            raise ValueError(
                "generate takes a list of conversations, got a list of messages: "
                "use chat() for one conversation, or wrap it in a list"
            )
        inputs = self.processor.chat_inputs(conversations, max_num_tiles=max_num_tiles)
        streams = self._streams(config, len(conversations))
        for _ in stream_rows(self.engine, streams, inputs, config):
            pass
        return [answer_text(self.tokenizer, s.ids, config.stop) for s in streams]

    def _streams(self, config: GenerationConfig, n: int) -> list[TextStream]:
        return [TextStream(self.tokenizer, config.stop, self.engine.eos_ids(config)) for _ in range(n)]

    @property
    def config(self) -> LlamaVisionConfig:
        return self.model.config

    @property
    def tokenizer(self) -> Tokenizer:
        return self.processor.tokenizer
