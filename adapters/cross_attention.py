"""Gated cross-attention adapter layers: text tokens (queries) attend to projected image tokens.

Follows Meta's `CrossAttention` / `CrossAttentionTransformerBlock` (llama-models
`llama3/multimodal/model.py`); module names equal the Hugging Face checkpoint keys
(`cross_attn.q_proj`, `cross_attn_attn_gate`, ...).

- q and k are RMS-normalised per head (`q_norm`, `k_norm`); there is no RoPE on either side.
- Both branches are scaled by tanh of a learned scalar gate (zero at initialisation, so a fresh
  adapter leaves the text model unchanged).
- Text rows that may see no image (`row_mask` 0: text before the first `<|image|>`, and rows of samples
  without images) get exactly zero from BOTH the attention and the MLP branch, as in Meta's reference.
  Hugging Face zeroes only the MLP branch and lets those rows attend uniformly to every image token
  (transformers issue #39379); we follow Meta, whose semantics the weights were trained with.
- Image keys/values are computed once per image by `image_kv` and reused for every text token.
"""

from __future__ import annotations

import torch
from torch import nn

from llama_vision.layers import MLP, RMSNorm, grouped_attention


class CrossAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, eps: float) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)

    def image_kv(self, image_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, Hkv, S, Dh) of the image tokens (B, S, D); k is already normalised."""
        B, S, _ = image_states.shape
        k = self.k_proj(image_states).view(B, S, self.n_kv_heads, self.head_dim)
        v = self.v_proj(image_states).view(B, S, self.n_kv_heads, self.head_dim)
        return self.k_norm(k).transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        row_mask: torch.Tensor,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        out = grouped_attention(q, *kv, mask)  # B T H*Dh
        out = out * row_mask[:, 0]  # rows that see no image contribute nothing (Meta: before o_proj)
        return self.o_proj(out)


class CrossAttentionLayer(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden_dim: int, eps: float) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.cross_attn = CrossAttention(dim, n_heads, n_kv_heads, eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = MLP(dim, hidden_dim)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self,
        h: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        row_mask: torch.Tensor,
    ) -> torch.Tensor:
        """h (B, T, D); mask bool (B, 1, T, S); row_mask (B, 1, T, 1) in h's dtype."""
        attn = self.cross_attn(self.input_layernorm(h), kv, mask, row_mask)
        h = h + self.cross_attn_attn_gate.tanh() * attn
        mlp = self.mlp(self.post_attention_layernorm(h)) * row_mask[:, 0]
        return h + self.cross_attn_mlp_gate.tanh() * mlp
