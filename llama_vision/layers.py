"""Leaf layers shared by the text decoder and the cross-attention adapters: RMSNorm, the SwiGLU MLP,
and Llama 3 rotary position embeddings.

Follows Meta's llama-models `llama3/model.py`. RoPE uses the rotate-half layout of the Hugging Face
checkpoints (Meta's interleaved q/k rows are permuted once at load time, see meta_checkpoint.py), and
is computed in float32 whatever the activation dtype, as Meta does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llama_vision.config import RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, scale in the input dtype (Meta and HF agree on this order).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies (Dh/2,), float32, with Llama 3 scaling of the long wavelengths."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    mid = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    return torch.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), mid, scaled)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (B, 1, T, Dh), float32, for positions (B, T)."""
    angles = position_ids.to(torch.float32)[..., None] * inv_freq.to(position_ids.device)  # B T Dh/2
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, Dh) by the position angles, rotate-half layout, in float32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).type_as(x)


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Grouped-query attention of q (B, H, T, Dh) over k, v (B, Hkv, S, Dh) under a boolean mask
    (B, 1, T, S) or none (everything visible). Returns (B, T, H * Dh).

    The H / Hkv query heads that share a key/value head are folded into the query axis, so one SDPA call
    over Hkv heads runs the fused kernel and keys and values are never copied; SDPA's own `enable_gqa`
    with a mask falls back to a path that repeats them and materialises every attention weight.
    """
    B, H, T, Dh = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    q = q.reshape(B, Hkv, G * T, Dh)  # rows (g, t) of each key/value head
    if mask is not None:
        mask = mask.expand(B, 1, G, mask.shape[-1]) if T == 1 else mask.repeat(1, 1, G, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # B Hkv G*T Dh
    return out.view(B, Hkv, G, T, Dh).permute(0, 3, 1, 2, 4).reshape(B, T, H * Dh)
