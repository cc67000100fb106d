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
from dataclasses import dataclass

import torch
from torch import nn

from llama_vision.adapters.cross_attention import CrossAttentionLayer
from llama_vision.adapters.masks import image_attention_mask
from llama_vision.adapters.projector import Projector
from llama_vision.config import LlamaVisionConfig
from llama_vision.encoders.vision import VisionEncoder
from llama_vision.layers import RMSNorm, rope_cos_sin, rope_inv_freq
from llama_vision.text import DecoderLayer, KVCache, self_attention_mask

ImageKV = list[tuple[torch.Tensor, torch.Tensor]]  # per cross-attention layer: k, v (B, Hkv, S, Dh)


@dataclass
class ImageContext:
    """What the cross-attention layers need, computed once per request: image keys/values of every
    cross-attention layer, the boolean (B, 1, T, S) mask of which image tokens each text row may see,
    and the (B, 1, T, 1) row mask that zeroes rows seeing no image."""

    kv: ImageKV
    mask: torch.Tensor
    row_mask: torch.Tensor

    def last_row(self) -> ImageContext:
        """The context of a token appended after the last one: it sees what the last token saw."""
        return ImageContext(self.kv, self.mask[:, :, -1:], self.row_mask[:, :, -1:])


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
    def __init__(self, config: LlamaVisionConfig) -> None:
        super().__init__()
        self.model = TextStack(config)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)


class LlamaVisionModel(nn.Module):
    def __init__(self, config: LlamaVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = VisionEncoder(config.vision)
        self.multi_modal_projector = Projector(config.vision.vision_output_dim, config.text.hidden_size)
        self.language_model = TextDecoder(config)
        self._inv_freq: torch.Tensor | None = None  # RoPE frequencies, made on first use on the device

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
        images = self.prepare_images(pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask)
        mask = self_attention_mask(attention_mask, input_ids.shape[1])
        return self.decode(input_ids, token_positions(input_ids, attention_mask), mask, images)

    def decode(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        images: ImageContext | None,
        cache: Sequence[KVCache | None] | None = None,
        slots: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """The text decoder over tokens (B, T) at RoPE `positions` (B, T), float32 logits (B, T or 1, vocab).

        `mask` is the boolean self-attention mask (None: causal). With `cache` (one entry per layer, None
        for cross-attention layers) keys and values are written at `slots` (T,) and `mask` spans the cache.
        """
        text = self.language_model.model
        h = text.embed_tokens(input_ids)  # B T D
        cos, sin = self.rope(positions)
        cross_index = 0
        for i, layer in enumerate(text.layers):
            if isinstance(layer, CrossAttentionLayer):
                if images is not None:  # text-only inputs skip the adapters entirely
                    h = layer(h, images.kv[cross_index], images.mask, images.row_mask)
                cross_index += 1
            else:
                h = layer(h, cos, sin, mask, None if cache is None else cache[i], slots)
        if last_only:
            h = h[:, -1:]
        return self.language_model.lm_head(text.norm(h)).float()

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
        mask, row_mask = image_attention_mask(
            cross_attention_mask, self.config.vision.num_patches, self.dtype
        )
        return ImageContext(kv, mask, row_mask)

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

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos and sin (B, 1, T, Dh), float32, for positions (B, T)."""
        if self._inv_freq is None or self._inv_freq.device != positions.device:  # once, not every step
            t = self.config.text
            self._inv_freq = rope_inv_freq(t.head_dim, t.rope_theta, t.rope_scaling).to(positions.device)
        return rope_cos_sin(positions, self._inv_freq)

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.lm_head.weight.device


def token_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """RoPE positions (B, T); they count real tokens only, so a left-padded row equals the row alone."""
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
