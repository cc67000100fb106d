"""Token generation with a static KV cache, and the text streams that turn tokens back into text.

The engine (after gpt-fast, with Meta's `generation.py` semantics):
- Prefill runs the prompt once: the images are encoded and every cross-attention layer's image keys and
  values are projected once (`ImageContext`), held apart from the text cache and reused at every step;
  the prompt's self-attention keys and values fill slots 0..T-1 of a `KVCache` preallocated for the
  prompt plus `max_new_tokens` (rounded up to a multiple of 128 when compiled, so later calls reuse the
  compiled step). A text-only batch never touches the vision encoder or the cross-attention layers.
- Each decode step feeds one token per row at one cache slot. Its shapes never change: the mask spans
  the whole cache and hides padding and future slots, the slot is a tensor. So the step can be
  wrapped in `torch.compile` (`compile=True`; CUDA graphs on a GPU).
- A new token sees the images the last prompt token saw: the last image's interval runs to the end of
  the sequence, as in training (where the answer is part of the sequence), in HF's generation (it
  repeats the mask's last row) and in Meta's with one image. With two or more images Meta's
  `create_vision_mask` ends the last interval at the prompt's length, so its generated tokens after
  the first see no image; we do not reproduce that (tests/test_generation_parity.py pins it).
- On the CPU the model's linear layers are switched to a blocked matrix-vector path for few-row inputs
  (cpu_linear.py: same weights and keys; 3x faster decoding in float32 where MKL's small-batch path is
  slow).
- Rows are left-padded; RoPE positions count real tokens only, so a row decodes the same alone or in a
  batch. A row stops at its first end-of-turn id; the loop ends when every row has stopped or after
  `max_new_tokens`.

`TextStream` decodes one row incrementally: it holds back a piece until its bytes form whole UTF-8
characters and until it can no longer be the start of a stop string, so the concatenated pieces equal
the text of the whole answer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from llama_vision.adapters.cross_attention import CrossAttentionLayer
from llama_vision.cpu_linear import use_blocked_linears
from llama_vision.model import ImageContext, LlamaVisionModel, token_positions
from llama_vision.sampling import GenerationConfig, select
from llama_vision.text import KVCache, cache_attention_mask, self_attention_mask
from llama_vision.tokenizer import Tokenizer

FINISHED = -1  # the token a finished row yields from the step after its end-of-turn id on


class Engine:
    """Generates token ids for processor outputs with `model`; `compile=True` compiles the decode step."""

    def __init__(self, model: LlamaVisionModel, *, compile: bool = False) -> None:
        self.model = use_blocked_linears(model)  # full memory bandwidth for few-row products on the CPU
        self.compiled = compile
        self._graphs = compile and model.device.type == "cuda"  # CUDA graphs on a GPU
        self._spare_cache: list[KVCache | None] | None = None  # compiled: the last request's, for reuse
        self._step = self.decode_step
        if compile:
            mode = "reduce-overhead" if self._graphs else None
            self._step = torch.compile(self.decode_step, fullgraph=True, dynamic=False, mode=mode)

    @torch.no_grad()
    def tokens(self, inputs: dict[str, torch.Tensor], config: GenerationConfig) -> Iterator[torch.Tensor]:
        """Yield the next token of every row (B,) per step; a finished row yields FINISHED (-1).

        A row's end-of-turn id is yielded, then the row has finished. Closing the iterator stops the work.
        """
        model, device = self.model, self.model.device
        ids = inputs["input_ids"].to(device)
        B, T = ids.shape
        attention_mask = inputs.get("attention_mask")
        attention_mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device)
        new_tokens = self._budget(T, config.max_new_tokens)
        eos = torch.tensor(self.eos_ids(config), device=device)

        images = model.prepare_images(
            *(_to(inputs.get(k), device) for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")),
            _to(inputs.get("cross_attention_mask"), device),
        )
        cache = self.new_cache(B, T + new_tokens)
        valid = torch.ones(B, cache_length(cache), dtype=torch.bool, device=device)
        valid[:, :T] = attention_mask.bool()  # B L: slots a query may see (generated slots are all real)
        slots = torch.arange(T, device=device)
        positions = token_positions(ids, attention_mask)
        mask = self_attention_mask(attention_mask, T)  # the prompt attends to itself only
        logits = model.decode(ids, positions, mask, images, cache, slots, last_only=True)[:, -1]

        seen = _seen(ids, attention_mask, logits.shape[-1]) if config.repetition_penalty != 1.0 else None
        generator = None
        if config.seed is not None:
            generator = torch.Generator(device=device).manual_seed(config.seed)
        decode_images = None if images is None else images.last_row()
        position = positions[:, -1:] + 1  # B 1
        slot = torch.tensor([T], device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        try:
            for step in range(new_tokens):
                token = select(logits, config, seen, generator)
                yield token.masked_fill(finished, FINISHED)
                finished |= torch.isin(token, eos)
                if step == new_tokens - 1 or bool(finished.all()):
                    return
                if seen is not None:
                    seen[torch.arange(B, device=device), token] = True
                if self._graphs:  # the graphs may now reuse the last step's output buffers
                    torch.compiler.cudagraph_mark_step_begin()
                logits = self._step(token[:, None], position, slot, valid, cache, decode_images)
                position += 1
                slot += 1
        finally:
            if self.compiled:
                self._spare_cache = cache

    def decode_step(
        self,
        token: torch.Tensor,
        position: torch.Tensor,
        slot: torch.Tensor,
        valid: torch.Tensor,
        cache: list[KVCache | None],
        images: ImageContext | None,
    ) -> torch.Tensor:
        """Logits (B, V) of the next token after `token` (B, 1) written at cache `slot` (1,)."""
        mask = cache_attention_mask(valid, slot)
        return self.model.decode(token, position, mask, images, cache, slot)[:, -1]

    def new_cache(self, batch: int, length: int) -> list[KVCache | None]:
        """A zeroed cache for `length` tokens: one KVCache per self-attention layer, None for the others.

        Compiled, the length is rounded up to a multiple of 128 and the last request's cache is reused
        (zeroed) when it fits exactly, so the compiled step, and its CUDA graphs, see the same buffers;
        a request running alongside another gets a cache of its own."""
        model = self.model
        if self.compiled:
            length = -(-length // 128) * 128
            spare, self._spare_cache = self._spare_cache, None
            if spare is not None and self._fits(spare, batch, length):
                for layer_cache in filter(None, spare):
                    layer_cache.k.zero_()
                    layer_cache.v.zero_()
                return spare
        cache: list[KVCache | None] = []
        for layer in model.language_model.model.layers:
            if isinstance(layer, CrossAttentionLayer):
                cache.append(None)
                continue
            attn = layer.self_attn  # its own head counts: a tensor-parallel rank holds Hkv / TP heads
            layer_cache = KVCache(batch, attn.n_kv_heads, length, attn.head_dim, model.dtype, model.device)
            if self.compiled and model.device.type == "cuda":  # the graph reads the buffers in place
                torch._dynamo.mark_static_address(layer_cache.k)
                torch._dynamo.mark_static_address(layer_cache.v)
            cache.append(layer_cache)
        return cache

    def _fits(self, cache: list[KVCache | None], batch: int, length: int) -> bool:
        k = next(c for c in cache if c is not None).k
        model = self.model
        return (k.shape[0], k.shape[2], k.dtype, k.device) == (batch, length, model.dtype, model.device)

    def eos_ids(self, config: GenerationConfig) -> tuple[int, ...]:
        """The ids that end a row: the option, else the model's end-of-text and end-of-turn ids."""
        if config.eos_token_ids is not None:
            return config.eos_token_ids
        return tuple(sorted({*self.model.config.text.eos_token_id, *END_OF_TURN}))

    def _budget(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """New tokens that fit in the context after the prompt; a prompt that fills it is an error."""
        context = self.model.config.text.max_position_embeddings
        if prompt_tokens >= context:
            raise ValueError(
                f"the prompt has {prompt_tokens} tokens and the model's context is {context}: "
                "no room for an answer; shorten the conversation or use fewer images"
            )
        return min(max_new_tokens, context - prompt_tokens)


END_OF_TURN = (128001, 128008, 128009)  # <|end_of_text|>, <|eom_id|>, <|eot_id|>: Meta's stop tokens


class TextStream:
    """Incremental text of one row: `push` a token, get the new text that is safe to show."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), eos_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.eos_ids = frozenset(eos_ids)
        self.ids: list[int] = []  # the answer's tokens, end-of-turn id excluded
        self.text = ""  # decoded text of the tokens before `pending`
        self.pending: list[int] = []  # tokens whose bytes do not yet end on a character boundary
        self.shown = 0  # characters of `text` already returned
        self.done = False

    def push(self, token: int) -> str:
        if self.done or token == FINISHED:
            return ""
        if token in self.eos_ids:
            self.done = True
            return self.flush()
        self.ids.append(token)
        if self.tokenizer.is_special(token):
            return ""
        self.pending.append(token)
        piece = self.tokenizer.decode(self.pending)
        if piece.endswith("\ufffd"):
            return ""  # a multi-byte character continues in the next token
        self.text += piece
        self.pending = []
        return self._release(final=False)

    def flush(self) -> str:
        """All remaining text: at the end of the answer."""
        if self.pending:
            self.text += self.tokenizer.decode(self.pending)
            self.pending = []
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        stop_at = _first_stop(self.text, self.stop, max(0, self.shown - max(map(len, self.stop), default=0)))
        if stop_at is not None:
            self.text, self.done = self.text[:stop_at], True
            final = True
        end = len(self.text) if final else len(self.text) - _held_back(self.text, self.stop)
        end = max(end, self.shown)
        out, self.shown = self.text[self.shown : end], end
        return out


def answer_text(tokenizer: Tokenizer, ids: Sequence[int], stop: Sequence[str]) -> str:
    """The whole answer of a row at once: its text, cut before the first stop string."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    stop_at = _first_stop(text, stop, 0)
    return text if stop_at is None else text[:stop_at]


def stream_rows(
    engine: Engine, streams: Sequence[TextStream], inputs: dict[str, torch.Tensor], config: GenerationConfig
) -> Iterator[list[str]]:
    """Per step, the new text of every row (one stream per row); ends when every row has stopped."""
    tokens = engine.tokens(inputs, config)
    try:
        for step in tokens:
            yield [s.push(t) for s, t in zip(streams, step.tolist())]
            if all(s.done for s in streams):  # stop strings end rows the engine cannot see
                return
        yield [s.flush() for s in streams]  # rows cut by max_new_tokens
    finally:
        tokens.close()


def _first_stop(text: str, stop: Sequence[str], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _held_back(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of `text` that could be the beginning of a stop string."""
    return max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def _seen(ids: torch.Tensor, attention_mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, V) bool: the prompt's tokens, for the repetition penalty (padding and <|image|> excluded)."""
    seen = torch.zeros(ids.shape[0], vocab, dtype=torch.bool, device=ids.device)
    keep = attention_mask.bool() & (ids < vocab)
    seen[torch.nonzero(keep, as_tuple=True)[0], ids[keep]] = True
    return seen


def _to(x: Any, device: torch.device) -> Any:
    return None if x is None else x.to(device)


def cache_length(cache: list[KVCache | None]) -> int:
    return next(c for c in cache if c is not None).k.shape[2]
