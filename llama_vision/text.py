"""The Llama 3 self-attention decoder layer: RMSNorm -> GQA attention with RoPE -> residual ->
RMSNorm -> SwiGLU -> residual. Follows Meta's `llama3/multimodal/model.py` `TransformerBlock`;
module names equal the Hugging Face checkpoint keys (`self_attn.q_proj`, `input_layernorm`, ...).

Attention runs through `scaled_dot_product_attention`. Under a mask, the query heads that share a
key/value head are folded into the query axis (`grouped_attention`), so keys and values are never copied
H/Hkv times; without one (a prompt alone) the fused causal kernel runs on keys repeated per head.

With a `KVCache` (generation, cache.py), the new keys and values are written into its preallocated
buffers at `slots`. What the queries attend to is what the mask spans: a (B, 1, T, L) mask over the
whole cache view (decoding, or a prompt that continues a reused prefix; it hides slots that are empty or
in the future), or None over the new keys alone (a prompt written into an empty row: the causal kernel).
Decoding shapes depend only on the rows and slots the step spans, so the step can be compiled and
graph-captured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llama_vision.cache import KVCache
from llama_vision.layers import MLP, RMSNorm, apply_rope, grouped_attention


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
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # B H T Dh
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # B Hkv T Dh
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cached_k, cached_v = cache.update(k, v, slots)  # B Hkv L Dh
            if mask is not None and mask.shape[-1] == cached_k.shape[2]:  # the mask spans the cache
                k, v = cached_k, cached_v
        if mask is None:  # the prompt alone, causal: the fused causal kernel needs every head's keys
            G = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # B H T Dh
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        return self.o_proj(grouped_attention(q, k, v, mask))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden_dim: int, eps: float) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.self_attn = SelfAttention(dim, n_heads, n_kv_heads)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = MLP(dim, hidden_dim)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache, slots)
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
