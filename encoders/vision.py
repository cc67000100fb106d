"""The tiled ViT image encoder of Llama 3.2 Vision (ViT-H/14 in the official models).

Follows Meta's `VisionEncoder` (llama-models `llama3/multimodal/model.py`); module names equal the
Hugging Face checkpoint keys (`vision_model.patch_embedding`, `gated_positional_embedding`, ...).
Step by step, for each image of N tiles (aspect-ratio id selects the tile layout):

1. patch conv (no bias) -> P-1 patch tokens per tile; + gated pre-tile embedding (one vector per tile);
2. prepend the class token; + (1 - tanh g) * local position embedding + tanh g * tile-aware embedding;
3. LayerNorm (pre), pad each tile's tokens to a multiple of 8 (1601 -> 1608 at 560 px);
4. the local transformer runs over all tiles of an image jointly; the *inputs* of the layers listed in
   `intermediate_layers_indices` are kept (Meta, HF <= 4.54; HF >= 4.56 takes the outputs instead);
5. LayerNorm (post), + gated post-tile embedding, the gated global transformer;
6. drop the padding tokens, concatenate [final, intermediates interleaved per channel].

The attention mask is Meta's `build_encoder_attention_mask`: a token is "padding" when it is one of the
tokens added in step 3 or lies in a padding tile, and only padding-to-padding pairs are masked; real
tokens still see padding tokens. We reproduce it because the weights were trained with it. When every
image of a call has the same tile count, the mask is not built: the tokens are reordered real first
(attention does not depend on their order), the real ones attend to all tokens and the padding ones to
the real ones, in two unmasked products (`padding_layout`), and the order is undone after each stack.

The tile-aware position tables are stored precomputed per aspect-ratio id, as in the HF checkpoints:
(max_aspect_ratio_id + 1, N * P * D), row 0 (padding images) unused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from llama_vision.config import VisionConfig


class VisionAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | int) -> torch.Tensor:
        """`mask`: the additive padding mask (B, 1, L, L), or the number of real tokens when the tokens
        come real first and padding after (`padding_layout`): then the real ones attend to every token
        and the padding ones to the real ones only, the same function without a mask."""
        q, k, v = (
            rearrange(proj(x), "b l (h d) -> b h l d", h=self.n_heads)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        if isinstance(mask, int):
            out = F.scaled_dot_product_attention(q[:, :, :mask], k, v)
            if mask < q.shape[2]:
                pad = F.scaled_dot_product_attention(q[:, :, mask:], k[:, :, :mask], v[:, :, :mask])
                out = torch.cat([out, pad], dim=2)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(rearrange(out, "b h l d -> b l (h d)"))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as nn.GELU in Meta's reference


class VisionLayer(nn.Module):
    """Pre-norm transformer layer; the global layers scale both branches by tanh of a scalar gate."""

    def __init__(self, dim: int, n_heads: int, hidden_dim: int, eps: float, gated: bool) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(dim, eps=eps)
        self.self_attn = VisionAttention(dim, n_heads)
        self.post_attention_layernorm = nn.LayerNorm(dim, eps=eps)
        self.mlp = VisionMLP(dim, hidden_dim)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | int) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), mask)
        x = x + (self.gate_attn.tanh() * attn if self.gated else attn)
        mlp = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * mlp if self.gated else mlp)


class VisionTransformer(nn.Module):
    def __init__(self, n_layers: int, dim: int, n_heads: int, hidden_dim: int, eps: float, gated: bool):
        super().__init__()
        self.layers = nn.ModuleList(
            VisionLayer(dim, n_heads, hidden_dim, eps, gated) for _ in range(n_layers)
        )

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | int, keep: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run all layers; also return the inputs of the layers listed in `keep`."""
        kept = []
        for i, layer in enumerate(self.layers):
            if i in keep:
                kept.append(x)
            x = layer(x, mask)
        return x, kept


class TileEmbedding(nn.Module):
    """Gated per-tile vector chosen by the aspect-ratio id, added to every token of the tile."""

    def __init__(self, n_ids: int, max_num_tiles: int, dim: int) -> None:
        super().__init__()
        self.max_num_tiles, self.dim = max_num_tiles, dim
        self.embedding = nn.Embedding(n_ids, max_num_tiles * dim)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x (B*I, N, L, D), ids (B*I,)."""
        embed = self.embedding(aspect_ratio_ids).view(-1, self.max_num_tiles, 1, self.dim)
        return x + self.gate.tanh() * embed


class PositionEmbedding(nn.Module):
    """(1 - tanh g) * per-token embedding + tanh g * tile-aware per-token embedding."""

    def __init__(self, n_ids: int, max_num_tiles: int, num_patches: int, dim: int) -> None:
        super().__init__()
        self.shape = (max_num_tiles, num_patches, dim)
        self.embedding = nn.Parameter(torch.zeros(num_patches, dim))
        self.gate = nn.Parameter(torch.zeros(1))
        self.tile_embedding = nn.Embedding(n_ids, max_num_tiles * num_patches * dim)

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x (B*I, N, P, D), ids (B*I,)."""
        gate = self.gate.tanh()
        x = x + (1 - gate) * self.embedding
        return x + gate * self.tile_embedding(aspect_ratio_ids).view(-1, *self.shape)


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        n_ids = c.max_aspect_ratio_id + 1
        self.patch_embedding = nn.Conv2d(
            c.num_channels, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size, bias=False
        )
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.gated_positional_embedding = PositionEmbedding(
            n_ids, c.max_num_tiles, c.num_patches, c.hidden_size
        )
        self.pre_tile_positional_embedding = TileEmbedding(n_ids, c.max_num_tiles, c.hidden_size)
        self.post_tile_positional_embedding = TileEmbedding(n_ids, c.max_num_tiles, c.hidden_size)
        self.layernorm_pre = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.layernorm_post = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        args = (c.hidden_size, c.attention_heads, c.intermediate_size, c.norm_eps)
        self.transformer = VisionTransformer(c.num_hidden_layers, *args, gated=False)
        self.global_transformer = VisionTransformer(c.num_global_layers, *args, gated=True)

    def forward(
        self,
        pixel_values: torch.Tensor,
        aspect_ratio_ids: torch.Tensor,
        aspect_ratio_mask: torch.Tensor,
    ) -> torch.Tensor:
        """pixel_values (B, I, N, C, H, W), ids (B, I), tile mask (B, I, N) -> (B, I, N, P, D_out).

        Images of different tile counts run in one call per tile count (each image's features depend on
        it alone), so that each call can drop the padding mask (`padding_layout`)."""
        B, I, N = pixel_values.shape[:3]
        groups = _tile_groups(aspect_ratio_mask.reshape(B * I, N))
        if groups is not None:
            flat = (pixel_values.flatten(0, 1)[:, None], aspect_ratio_ids.reshape(B * I, 1),
                    aspect_ratio_mask.reshape(B * I, 1, N))  # fmt: skip
            outs = [self(*(t[rows] for t in flat)) for rows in groups]
            back = torch.argsort(torch.cat(groups))
            return torch.cat(outs)[back].view(B, I, *outs[0].shape[2:])
        ids = aspect_ratio_ids.reshape(B * I)
        x = self.patch_embedding(rearrange(pixel_values, "b i n c h w -> (b i n) c h w").to(self.dtype))
        x = rearrange(x, "(bi n) d gh gw -> bi n (gh gw) d", n=N)
        x = self.pre_tile_positional_embedding(x, ids)
        cls = self.class_embedding.to(x.dtype).expand(B * I, N, 1, -1)
        x = self.gated_positional_embedding(torch.cat([cls, x], dim=2), ids)  # BI N P D
        x = self.layernorm_pre(x)

        P = x.shape[2]
        n_pad = (8 - P % 8) % 8
        x = F.pad(x, (0, 0, 0, n_pad))  # BI N L D, L = P + n_pad
        is_pad = padding_tokens(aspect_ratio_mask.reshape(B * I, N), P, n_pad)  # BI N*L
        layout = padding_layout(is_pad)
        if layout is None:
            mask: torch.Tensor | int = padding_attention_bias(is_pad, x.dtype)
            order = inverse = None
        else:
            order, inverse, mask = layout
        x, kept = self.transformer(
            _tokens(x.flatten(1, 2), order), mask, keep=self.config.intermediate_layers_indices
        )
        x = self.layernorm_post(_tokens(x, inverse)).view(B * I, N, P + n_pad, -1)
        x = self.post_tile_positional_embedding(x, ids)
        x, _ = self.global_transformer(_tokens(x.flatten(1, 2), order), mask)

        features = torch.cat([x, torch.stack(kept, dim=-1).flatten(-2)], dim=-1)  # BI N*L D_out
        features = _tokens(features, inverse).view(B, I, N, P + n_pad, -1)
        return features[:, :, :, :P]

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype


def padding_tokens(tile_mask: torch.Tensor, num_patches: int, n_pad: int) -> torch.Tensor:
    """(B*I, N*L) True for padding tokens: those of padding tiles and the n_pad added to every tile."""
    is_pad = ~tile_mask.bool()[:, :, None].expand(-1, -1, num_patches + n_pad).clone()  # BI N L
    is_pad[:, :, num_patches:] = True
    return is_pad.flatten(1)


def padding_attention_bias(is_pad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive (B*I, 1, N*L, N*L) mask, -inf only between two padding tokens (Meta's quirk kept).

    Additive rather than boolean: SDPA's CPU kernel runs faster with it.
    """
    both = is_pad[:, :, None] & is_pad[:, None, :]
    return torch.zeros(both.shape, dtype=dtype, device=both.device).masked_fill_(both, float("-inf"))[:, None]


def padding_layout(is_pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """When every image has the same padding tokens (the same tile count): the token order that puts
    the real tokens first (`order`), its inverse, and the number of real tokens R. Attention is blind to
    token order, so with the tokens in that order Meta's mask becomes two unmasked products: R real
    queries over all keys, the padding queries over the first R keys. That skips the (N*L)^2 mask and,
    for images of fewer tiles than the maximum, most of the padding tiles' attention (a 1-tile image of
    4: 43% of the products). None (keep the mask) for images of different tile counts, on the meta
    device, and inside torch.compile (the choice reads the tile mask)."""
    if is_pad.device.type == "meta" or torch.compiler.is_compiling():
        return None
    first = is_pad[0]
    if not bool((is_pad == first).all()):
        return None
    order = torch.argsort(first.to(torch.int8), stable=True)
    return order, torch.argsort(order), int((~first).sum())


def _tile_groups(tile_mask: torch.Tensor) -> list[torch.Tensor] | None:
    """The rows (images) of each tile count, when a call holds more than one count (else None). Not in a
    process group of several: under FSDP every rank must run each layer as often as the others, and
    their images differ."""
    if tile_mask.device.type == "meta" or torch.compiler.is_compiling() or _distributed():
        return None
    counts = tile_mask.bool().sum(-1)
    values = counts.unique()
    if len(values) < 2:
        return None
    return [torch.nonzero(counts == n).flatten() for n in values]


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _tokens(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """x (B, L, ...) with its tokens taken in `index` order (None: as they are)."""
    return x if index is None else x.index_select(1, index)
