"""The Llama 3 self-attention decoder layer: RMSNorm -> GQA attention with RoPE -> residual ->
RMSNorm -> SwiGLU -> residual. Follows Meta's `llama3/multimodal/model.py` `TransformerBlock`;
module names equal the Hugging Face checkpoint keys (`self_attn.q_proj`, `input_layernorm`, ...).

Attention runs through `scaled_dot_product_attention` with `enable_gqa`, so key/value heads are never
copied H/Hkv times. With no mask and no cache the causal kernel path is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llama_vision.layers import MLP, RMSNorm, apply_rope


class SelfAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # B H T Dh
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # B Hkv T Dh
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=True
        )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden_dim: int, eps: float) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.self_attn = SelfAttention(dim, n_heads, n_kv_heads)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = MLP(dim, hidden_dim)

    def forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


def self_attention_mask(attention_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """Boolean (B, 1, T, T) causal mask that also hides padding keys, or None when nothing is padded.

    Each position may always see itself, so a left-padding row attends to something and gives no NaN.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    device = attention_mask.device
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    keep = causal & attention_mask.bool()[:, None, None, :]
    return keep | torch.eye(T, dtype=torch.bool, device=device)
