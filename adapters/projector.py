"""The multi-modal projector: one linear map from the vision features to the text width.

Its input (B, I, N, P, D_v * (1 + K)) holds the final vision features followed by the K intermediate
layers' features interleaved per channel (index d * K + k), the order Meta's `torch.stack(..., dim=-1)`
produces and the checkpoints' projector weight expects.
"""

from __future__ import annotations

from torch import nn


class Projector(nn.Linear):
    def __init__(self, vision_output_dim: int, text_dim: int) -> None:
        super().__init__(vision_output_dim, text_dim, bias=True)
