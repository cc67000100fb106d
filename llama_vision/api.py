"""The public entry point: `LlamaVision.from_pretrained(path)` gives the model, its tokenizer, its
processor and a serving engine, for either checkpoint layout (Hugging Face or Meta).

    lv = LlamaVision.from_pretrained(path, device="cpu", dtype=torch.bfloat16)
    messages = [{"role": "user", "content": [{"type": "image", "image": "photo.jpg"},
                                             {"type": "text", "text": "What is in this picture?"}]}]
    lv.chat(messages, max_new_tokens=128)               # -> str
    for piece in lv.stream(messages): print(piece, end="")
    lv.generate([messages, other_messages])             # -> list[str], decoded together
    answer = lv.submit(messages, logprobs=5)            # -> Answer: pieces, finish reason, usage
    logits = lv.model(**lv.processor(text=prompt, images=[image]))  # (B, T, vocab)

Every call is a request of one engine (engine.py): calls from many threads at once share its decode
steps (continuous batching), and a follow-up turn about the same images reuses the earlier turn's work.
Generation options are the fields of `GenerationConfig`; those not given come from the checkpoint's
generation_config.json (`lv.generation_config`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from llama_vision.bundled import model_dir
from llama_vision.chat_formats import TextProcessor
from llama_vision.config import LlamaVisionConfig
from llama_vision.cpu_linear import pack_linears, packed_bytes, use_blocked_linears
from llama_vision.engine import Engine, LogitsProcessor
from llama_vision.generation import Answer
from llama_vision.llama import (
    LlamaConfig,
    LlamaForCausalLM,
    is_text_checkpoint,
    load_llama,
    read_llama_config,
)
from llama_vision.model import LlamaVisionModel
from llama_vision.options import parse_dtype, usable_device
from llama_vision.processor import Processor
from llama_vision.sampling import GenerationConfig
from llama_vision.tokenizer import Tokenizer
from llama_vision.validate import check_generation_ids
from llama_vision.weights import load_checkpoint, read_config


@dataclass
class LlamaVision:
    """The model with its processor and engine. `engine_options` go to `Engine` (max_batch, max_length,
    max_images, max_cache_tokens, max_queue, queue_timeout, prefix_cache_bytes, prefill_tokens_per_step,
    max_request_bytes)."""

    model: LlamaVisionModel | LlamaForCausalLM  # the latter for text-only Llama checkpoints (llama.py)
    processor: Processor | TextProcessor
    generation_config: GenerationConfig = field(default_factory=GenerationConfig)
    compile: bool = False
    engine_options: dict[str, Any] = field(default_factory=dict)
    engine: Engine = field(init=False, repr=False)

    def __post_init__(self) -> None:
        stop_ids = sorted({*self.model.config.text.eos_token_id, *self.tokenizer.stop_ids})
        self.engine = Engine(self.model, stop_ids=stop_ids, compile=self.compile, **self.engine_options)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        progress: bool = False,
        compile: bool = False,
        quantize: str | None = None,
        adapter: str | Path | None = None,
        cpu_pack: bool | None = None,
        **engine_options: Any,
    ) -> LlamaVision:
        """Load a checkpoint directory: Llama 3.2 Vision, or a text-only Llama (1 to 3.3) through the same
        decoder. No path (or "embedded") loads the small model that ships with the package
        (llama_vision/embedded/: pictures of shapes and printed words, see llama_vision.domain).

        `device` "cpu", "cuda", "cuda:1", "mps" or a torch device; `dtype` a torch dtype or a name
        ("bfloat16", "bf16", "float16", "float32"), None keeps the stored dtype; `compile` compiles the
        decode step with torch.compile (each new batch and length bucket compiles once, the first answers
        take longer); `quantize` "int8", "w8a8" or "int4" quantizes the text and cross-attention weights
        (a text-only Llama's decoder layers and output layer) while loading (torchao, quantize.py);
        `adapter` runs a PEFT LoRA adapter directory on the model without merging it
        (llama_vision.finetune.lora). On the CPU the linear layers get the few-row path (cpu_linear.py:
        blocked products for float32 weights, PyTorch's own kernel for one row of 16-bit ones,
        `torch._weight_int8pack_mm` for int8, `torch._int_mm` for w8a8; int4 keeps torchao's). `cpu_pack`
        also gives the decoder's float32 linear layers a copy of their weights in oneDNN's layout, which
        makes a decode step of several requests 2 to 3 times faster on the CPU and costs those weights'
        bytes again; None (the default) packs when the engine batches (`max_batch` above 1) and the copies
        take at most a quarter of the memory available after loading. Other keywords are engine options
        (see the class)."""
        if cpu_pack is not None and not isinstance(cpu_pack, bool):
            raise ValueError(f"cpu_pack must be True, False or None, got {cpu_pack!r}")
        path = model_dir(path)
        device, dtype = usable_device(device), parse_dtype(dtype)
        if cpu_pack and device.type != "cpu":  # before loading: a bad option loses no time
            raise ValueError(f"cpu_pack=True packs weights for the CPU; this model is on {device}")
        if is_text_checkpoint(path):  # Llama 1 to 3.3 text models: the same decoder without adapters
            processor = TextProcessor.from_dir(path, read_llama_config(path))
            load = partial(load_llama, quantize=quantize)
        else:  # a missing tokenizer fails before loading
            processor = Processor.from_dir(path, read_config(path))
            load = partial(load_checkpoint, quantize=quantize)
        generation_config = GenerationConfig.from_dir(path)
        vocab, where = processor.config.text.vocab_size, str(Path(path) / "generation_config.json")
        check_generation_ids(generation_config.eos_token_ids, vocab, where)
        model = load(path, device=device, dtype=dtype, progress=progress).eval()
        if adapter is not None:
            from llama_vision.finetune.lora import load_adapter  # peft is optional

            load_adapter(model, adapter)
        if model.device.type == "cpu":
            use_blocked_linears(model)
            if _pack_wanted(cpu_pack, model, engine_options.get("max_batch", 8)):
                pack_linears(model.decoder)
        return cls(model, processor, generation_config, compile, engine_options)

    def submit(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        max_num_tiles: int | None = None,
        logprobs: int | None = None,
        logits_processor: LogitsProcessor | None = None,
        **options: Any,
    ) -> Answer:
        """Start answering one conversation; iterate the `Answer` for its pieces. Options, messages and
        images are checked here. `logprobs` records each token's log-probability and that many of the
        most probable tokens; `logits_processor(tokens, logits)` may change the logits (V,) before each
        choice (constrained decoding)."""
        config = self.generation_config.replace(**options)
        inputs = self.processor.chat_inputs([messages], max_num_tiles=max_num_tiles)
        request = self.engine.add_request(
            inputs, config, logprobs=logprobs, logits_processor=logits_processor
        )
        return Answer(request, self.tokenizer, config.stop)

    def chat(
        self, messages: Sequence[dict[str, Any]], *, max_num_tiles: int | None = None, **options: Any
    ) -> str:
        """The assistant's answer to one conversation (chat messages, images inside them)."""
        return self.submit(messages, max_num_tiles=max_num_tiles, **options).result()

    def stream(
        self, messages: Sequence[dict[str, Any]], *, max_num_tiles: int | None = None, **options: Any
    ) -> Iterator[str]:
        """The answer as it is generated, in pieces of whole characters; closing it cancels the request.

        Options, messages and images are checked here, before the first piece is asked for."""
        return iter(self.submit(messages, max_num_tiles=max_num_tiles, **options))

    def generate(
        self,
        conversations: Sequence[Sequence[dict[str, Any]]],
        *,
        max_num_tiles: int | None = None,
        **options: Any,
    ) -> list[str]:
        """Answers to several conversations, decoded together; each ends on its own."""
        if isinstance(conversations, (str, dict)) or not conversations:
            raise ValueError("generate takes a non-empty list of conversations (each a list of messages)")
        if isinstance(conversations[0], dict):
            raise ValueError(
                "generate takes a list of conversations, got a list of messages: "
                "use chat() for one conversation, or wrap it in a list"
            )
        answers: list[Answer] = []
        try:
            for conversation in conversations:
                answers.append(self.submit(conversation, max_num_tiles=max_num_tiles, **options))
            return [answer.result() for answer in answers]
        finally:  # a bad conversation, or an interrupt, ends the ones already running
            for answer in answers:
                answer.cancel()

    @property
    def config(self) -> LlamaVisionConfig | LlamaConfig:
        return self.model.config

    @property
    def tokenizer(self) -> Tokenizer:
        return self.processor.tokenizer


def _pack_wanted(cpu_pack: bool | None, model: torch.nn.Module, max_batch: Any) -> bool:
    """`cpu_pack` as given, or by default: the engine batches and the copies fit a quarter of the memory
    available now (unknown: no)."""
    if cpu_pack is not None:
        return cpu_pack
    if not (isinstance(max_batch, int) and max_batch > 1):
        return False
    available = available_memory()
    return available is not None and packed_bytes(model.decoder) <= available / 4


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
