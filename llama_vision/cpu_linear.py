"""A faster CPU path for linear layers applied to a few rows (decoding, short prompts), as a transform
applied to a built model from outside.

Decoding multiplies one token per row by every weight matrix: a matrix-vector product whose speed is
the memory bandwidth. PyTorch's CPU `F.linear` for a few rows of float32 (MKL's sgemm/sgemv) reads the
weights at about 10 GB/s on the 2-core AMD EPYC machines we measure on, a third of what `torch.sum`
streams; the 128,256 x 512 output layer of the benchmark model took 26 ms where 8 ms suffice. Viewing
the weight as blocks of 256 rows and multiplying them with one batched `bmm` reads it at the full
bandwidth (32 to 40 GB/s measured, bench/generate.py), and is also faster up to about 64 rows. For
long inputs (the vision tower's 1,056 rows per image) `F.linear` is at the compute peak and is kept.

`use_blocked_linears(model)` gives every plain `nn.Linear` below `model` this forward as an instance
attribute: the modules stay `nn.Linear` (their type, parameters and state_dict keys are unchanged), so
quantizers, LoRA and tensor parallelism that look for `nn.Linear` still find every layer, and
`restore_linears` takes the path off again. It skips layers whose weight is not a plain tensor
(quantized or distributed weights) and, at run time, falls back to `F.linear` for anything but float32
CPU inputs of at most `MAX_ROWS` rows, or a weight that a later transform replaced. Results equal
`F.linear` up to float32 rounding (the sums run in another order).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 64
BLOCKS = (256, 128, 64)  # rows per weight block, the first that divides out_features
_PLAIN = (torch.Tensor, nn.Parameter)


def blocked_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // self.in_features
    block = _block(self.out_features)
    weight = self.weight
    if (
        rows > MAX_ROWS
        or block is None
        or x.device.type != "cpu"
        or x.dtype != torch.float32
        or type(weight) not in _PLAIN
        or weight.dtype != torch.float32
    ):
        return F.linear(x, weight, self.bias)
    w = weight.view(-1, block, self.in_features)  # nb block in
    cols = x.reshape(rows, self.in_features).t()  # in rows
    out = torch.bmm(w, cols.expand(w.shape[0], -1, -1)).view(self.out_features, rows)  # out rows
    # Back to rows x out in row-major order: a transposed view would make every later op strided and
    # push attention off SDPA's fused kernel (it needs the head dimension contiguous).
    out = out.t().contiguous()
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*x.shape[:-1], self.out_features)


def use_blocked_linears(model: nn.Module) -> nn.Module:
    """Give the plain-weight `nn.Linear` layers below `model` the blocked small-batch path, in place."""
    for layer in model.modules():
        if type(layer) is nn.Linear and type(layer.weight) in _PLAIN and _block(layer.out_features):
            layer.forward = types.MethodType(blocked_forward, layer)
    return model


def restore_linears(model: nn.Module) -> nn.Module:
    """Take the blocked path off again: every layer runs `nn.Linear.forward`."""
    for layer in model.modules():
        if isinstance(layer, nn.Linear) and "forward" in layer.__dict__:
            del layer.forward
    return model


def _block(out_features: int) -> int | None:
    return next((b for b in BLOCKS if out_features % b == 0), None)
