"""Llama 3.2 Vision assembled: vision encoder -> projector -> Llama 3 decoder with gated
cross-attention layers interleaved (11B: 32 self-attention + 8 cross-attention layers, 40 in all).

Follows Meta's `CrossAttentionTransformer` (llama-models `llama3/multimodal/model.py`). The module
tree equals the keys of the Hugging Face hub checkpoints, so they load without renaming:

    vision_model.*              encoders/vision.py
    multi_modal_projector.*     adapters/projector.py
    language_model.model.{embed_tokens, layers.N, norm}
    language_model.lm_head      (128,256 rows; embed_tokens has 8 more, row 128,256 is <|image|>)

`<|image|>` is only a position marker: it decides which text tokens see which image (adapters/masks.py)
and image features never enter the token stream. Without images the cross-attention layers are skipped
and the model is exactly the text-only Llama.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from llama_vision.adapters.cross_attention import CrossAttentionLayer
from llama_vision.adapters.masks import image_attention_mask
from llama_vision.adapters.projector import Projector
from llama_vision.cache import Cache, ImageContext, ImageKV, KVCache
from llama_vision.config import LlamaVisionConfig
from llama_vision.encoders.vision import VisionEncoder
from llama_vision.layers import RMSNorm, rope_cos_sin, rope_inv_freq
from llama_vision.memory import MemoryEstimate, request_cost
from llama_vision.text import DecoderLayer, self_attention_mask


class TextStack(nn.Module):
    """Embedding, the merged list of self- and cross-attention layers, final norm."""

    def __init__(self, config: LlamaVisionConfig) -> None:
        super().__init__()
        t = config.text
        self.embed_tokens = nn.Embedding(t.num_embeddings, t.hidden_size)
        args = (
            t.hidden_size,
            t.num_attention_heads,
            t.num_key_value_heads,
            t.intermediate_size,
            t.rms_norm_eps,
        )
        self.layers = nn.ModuleList(
            CrossAttentionLayer(*args) if i in t.cross_attention_layers else DecoderLayer(*args)
            for i in range(t.num_hidden_layers)
        )
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)


class TextDecoder(nn.Module):
    """The Llama 3 decoder with its cross-attention adapters, and the output layer. Text-only models and
    fine-tuning losses use it directly: `forward` gives hidden states, `logits` applies the head to the
    positions that need it."""

    def __init__(self, config: LlamaVisionConfig) -> None:
        super().__init__()
        self.config = config.text
        self.model = TextStack(config)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self._inv_freq: torch.Tensor | None = None  # RoPE frequencies, made on first use on the device

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None = None,
        images: ImageContext | None = None,
        cache: Sequence[KVCache | None] | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, D) of tokens (B, T) at RoPE `positions` (B, T).

        `mask` is the boolean self-attention mask (None: causal). With `cache` (one entry per layer, None
        for cross-attention layers) keys and values are written at `slots` and `mask` spans the cache.
        Without `images` the cross-attention layers are skipped: the model is the text-only Llama.
        """
        text = self.model
        h = text.embed_tokens(input_ids)  # B T D
        cos, sin = self.rope(positions)
        cross_index = 0
        for i, layer in enumerate(text.layers):
            if isinstance(layer, CrossAttentionLayer):
                if images is not None:
                    h = layer(h, images.kv[cross_index], images.mask, images.row_mask)
                cross_index += 1
            else:
                h = layer(h, cos, sin, mask, None if cache is None else cache[i], slots)
        return text.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits (..., vocab) of hidden states (..., D)."""
        return self.lm_head(h).float()

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos and sin (B, 1, T, Dh), float32, for positions (B, T)."""
        if self._inv_freq is None or self._inv_freq.device != positions.device:  # once, not every step
            t = self.config
            self._inv_freq = rope_inv_freq(t.head_dim, t.rope_theta, t.rope_scaling).to(positions.device)
        return rope_cos_sin(positions, self._inv_freq)


class DecoderGeneration:
    """Generation over a `TextDecoder` (`self.decoder`), for every model built around one: the engine asks
    for a cache, prefills waiting requests into rows (several at once), then steps every row. `LlamaVisionModel` (its
    `language_model`) and the text-only `LlamaForCausalLM` (llama.py, its own decoder) share it.

    The decoder runs as `TextDecoder.forward(self.decoder, ...)` (hidden states) rather than
    `self.decoder(...)`, because a text-only model is its own decoder and its `__call__` gives logits."""

    @property
    def decoder(self) -> TextDecoder:
        raise NotImplementedError

    def new_cache(self, batch: int, length: int, image_tokens: int) -> Cache:
        """A zeroed cache of `batch` rows of `length` tokens, with room for `image_tokens` image tokens
        (images x tiles x patches) per row. Sized from each layer's own head counts (a tensor-parallel
        layer holds its local heads)."""
        layers: list[KVCache | None] = []
        image_kv = []
        dtype, device = self.dtype, self.device
        for layer in self.decoder.model.layers:
            if isinstance(layer, CrossAttentionLayer):
                attn = layer.cross_attn
                if image_tokens:
                    image_kv.append(
                        KVCache.empty(batch, attn.n_kv_heads, image_tokens, attn.head_dim, dtype, device)
                    )
                layers.append(None)
            else:
                attn = layer.self_attn
                layers.append(KVCache.empty(batch, attn.n_kv_heads, length, attn.head_dim, dtype, device))
        return Cache(layers, [(c.k, c.v) for c in image_kv], dtype)

    def prefill(
        self,
        input_ids: torch.Tensor,
        cache: Cache,
        rows: list[int],
        starts: list[int],
        lengths: list[int],
        images: list[ImageContext | None] | None = None,
    ) -> torch.Tensor:
        """Run several requests' prompts at once, one per cache row, and give the float32 logits (B, vocab)
        of each one's last token. `input_ids` (B, T) are right-padded: row b's lengths[b] tokens go to
        cache row rows[b] at slots starts[b].. (slots before starts[b] hold a reused prefix). `images[b]`
        is request b's context for its whole prompt (positions 0..starts[b]+lengths[b]-1) or None; its
        last position is what the request's new tokens will see.

        When no prompt continues a prefix they attend to themselves alone, causally (right padding comes
        after every real token, so no real token sees it); otherwise over the rows' cache up to their own
        slots."""
        B, T = input_ids.shape
        images = images or [None] * B
        layers, positions = cache.rows(rows, starts, lengths)
        mask = None
        if any(starts):
            span = max(s + n for s, n in zip(starts, lengths))
            mask = (torch.arange(span, device=input_ids.device) <= positions[..., None])[:, None]  # B 1 T L
        for row, context in zip(rows, images):
            cache.set_images(row, context)
        news = [
            None if c is None else c.rows(s, s + n) for c, s, n in zip(images, starts, lengths)
        ]  # the new tokens' image context
        context = cache.prefill_images(rows, news, T)
        h = TextDecoder.forward(self.decoder, input_ids, positions, mask, context, layers, positions)
        last = torch.tensor(lengths, device=input_ids.device) - 1
        return self.decoder.logits(h[torch.arange(B, device=h.device), last])

    def decode_step(
        self, tokens: torch.Tensor, slots: torch.Tensor, cache: Cache, length: int, image_tokens: int
    ) -> torch.Tensor:
        """One token per row for the first n rows (tokens (n,), each written at its row's slot (n,)),
        attending over the first `length` slots and `image_tokens` image tokens (0: no row has images, the
        adapters are skipped). Returns float32 logits (n, vocab). Shapes depend only on n, `length` and
        `image_tokens`, so the step compiles once per such triple."""
        n = tokens.shape[0]
        layers, images = cache.view(n, length, image_tokens)
        # Additive masks, made once per step: SDPA would turn a boolean one into this in every layer.
        visible = torch.arange(length, device=tokens.device)[None, :] <= slots[:, None]  # n L
        mask = additive_mask(visible[:, None, None], self.dtype)  # n 1 1 L
        if images is not None:
            images = ImageContext(images.kv, additive_mask(images.mask, self.dtype), images.row_mask)
        h = TextDecoder.forward(self.decoder, tokens[:, None], slots[:, None], mask, images, layers, slots)
        return self.decoder.logits(h[:, 0])

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.model.embed_tokens.weight.device


class LlamaVisionModel(DecoderGeneration, nn.Module):
    def __init__(self, config: LlamaVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = VisionEncoder(config.vision)
        self.multi_modal_projector = Projector(config.vision.vision_output_dim, config.text.hidden_size)
        self.language_model = TextDecoder(config)

    @property
    def decoder(self) -> TextDecoder:
        return self.language_model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in float32 for token ids (B, T); image inputs as the processor makes them."""
        return self.language_model.logits(
            self.hidden_states(
                input_ids,
                attention_mask,
                pixel_values,
                aspect_ratio_ids,
                aspect_ratio_mask,
                cross_attention_mask,
            )
        )

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, D), the inputs of `forward`: what a training loss needs, which
        applies the head only at the positions it scores (finetune/train.py)."""
        images = self.prepare_images(pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask)
        mask = self_attention_mask(attention_mask, input_ids.shape[1])
        positions = token_positions(input_ids, attention_mask)
        return self.language_model(input_ids, positions, mask, images)

    def request_cost(self, prompt_tokens: int, max_new_tokens: int, images: int) -> MemoryEstimate:
        """What one request adds to the loaded weights, as the planner prices it (memory.request_cost): its
        keys/values, its image keys/values (every tile slot) and its prefill's largest transient, in this
        model's dtype, with the key/value heads its layers hold (a tensor-parallel shard holds 1/TP)."""
        layers = self.language_model.model.layers
        local = next(l.self_attn.n_kv_heads for l in layers if not isinstance(l, CrossAttentionLayer))
        return request_cost(
            self.config,
            prompt_tokens=prompt_tokens,
            max_new_tokens=max_new_tokens,
            images=images,
            dtype=self.dtype,
            tp=self.config.text.num_key_value_heads // local,
        )

    def prepare_images(
        self,
        pixel_values: torch.Tensor | None,
        aspect_ratio_ids: torch.Tensor | None,
        aspect_ratio_mask: torch.Tensor | None,
        cross_attention_mask: torch.Tensor | None,
    ) -> ImageContext | None:
        """Encode the images and project their keys/values once; None when there is no image."""
        if pixel_values is None or pixel_values.shape[1] == 0:
            return None
        if cross_attention_mask is None:
            raise ValueError("pixel_values given without cross_attention_mask")
        kv = self.image_kv(self.encode_images(pixel_values, aspect_ratio_ids, aspect_ratio_mask))
        return ImageContext(kv, *self.image_masks(cross_attention_mask))

    def image_masks(self, cross_attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (B, 1, T, S) attention mask and (B, 1, T, 1) row mask of the processor's tile mask."""
        return image_attention_mask(cross_attention_mask, self.config.vision.num_patches, self.dtype)

    def encode_images(
        self,
        pixel_values: torch.Tensor,
        aspect_ratio_ids: torch.Tensor,
        aspect_ratio_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Projected image tokens (B, S, D), S = I * N * P, padding tiles and images included."""
        features = self.vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask)  # B I N P Dv
        return self.multi_modal_projector(features).flatten(1, 3)

    def image_kv(self, image_states: torch.Tensor) -> ImageKV:
        """Keys and values of the image tokens for every cross-attention layer, computed once."""
        layers = self.language_model.model.layers
        return [
            layer.cross_attn.image_kv(image_states)
            for layer in layers
            if isinstance(layer, CrossAttentionLayer)
        ]


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `visible`, -inf elsewhere, in `dtype`: the float form of a boolean attention mask."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(
        ~visible, float("-inf")
    )


def token_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """RoPE positions (B, T); they count real tokens only, so a left-padded row equals the row alone."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
