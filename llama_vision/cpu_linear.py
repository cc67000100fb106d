"""A faster CPU path for linear layers applied to a few rows (decoding, short prompts).

Decoding multiplies one token per row by every weight matrix: a matrix-vector product whose speed is
the memory bandwidth. PyTorch's CPU `F.linear` for a few rows of float32 (MKL's sgemm/sgemv) reads the
weights at about 10 GB/s on the 2-core AMD EPYC machines we measure on, a third of what `torch.sum`
streams; the 128,256 x 512 output layer of the benchmark model took 26 ms where 8 ms suffice. Viewing
the weight as blocks of 256 rows and multiplying them with one batched `bmm` reads it at the full
bandwidth (32 to 40 GB/s measured, bench/generate.py), and is also faster up to about 64 rows. For
long inputs (the vision tower's 1,056 rows per image) `F.linear` is at the compute peak and is kept.

`use_blocked_linears(module)` switches every `nn.Linear` below `module` to `BlockedLinear`, a subclass
with the same parameters and the same state_dict keys (checkpoints, LoRA targets and PEFT adapters see an
ordinary `nn.Linear`). It only acts on float32 CPU inputs of at most `MAX_ROWS` rows; everything else
(GPUs, bfloat16, where the batched path is slower) goes through `F.linear` unchanged. Results equal
`F.linear` up to float32 rounding (the sums run in another order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 64
BLOCKS = (256, 128, 64)  # rows per weight block, the first that divides out_features


class BlockedLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        block = _block(self.out_features)
        if rows > MAX_ROWS or block is None or x.device.type != "cpu" or x.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        w = self.weight.view(-1, block, self.in_features)  # nb block in
        cols = x.reshape(rows, self.in_features).t()  # in rows
        out = torch.bmm(w, cols.expand(w.shape[0], -1, -1)).view(self.out_features, rows).t()  # rows out
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def use_blocked_linears(module: nn.Module) -> nn.Module:
    """Switch the linear layers below `module` to the blocked small-batch path, in place."""
    for layer in module.modules():
        if type(layer) is nn.Linear and type(layer.weight.data) is torch.Tensor:  # not quantized/DTensor
            layer.__class__ = BlockedLinear
    return module


def _block(out_features: int) -> int | None:
    return next((b for b in BLOCKS if out_features % b == 0), None)
