"""A faster CPU path for linear layers applied to a few rows (decoding, short prompts), as a transform
applied to a built model from outside.

Decoding multiplies one token per row by every weight matrix: a matrix-vector product whose speed is
the memory bandwidth. PyTorch's CPU `F.linear` for a few rows of float32 (MKL's sgemm/sgemv) reads the
weights at about 10 GB/s on the 2-core AMD EPYC machines we measure on, a third of what `torch.sum`
streams; the 128,256 x 512 output layer of the benchmark model took 26 ms where 8 ms suffice. Viewing
the weight as blocks of 256 rows and multiplying them with one batched `bmm` reads it at the full
bandwidth (32 to 40 GB/s measured, bench/generate.py), and is also faster up to about 64 rows. For
long inputs (the vision tower's 1,056 rows per image) `F.linear` is at the compute peak and is kept.

Sixteen-bit weights (bfloat16, float16) of one row take another route. PyTorch sends them to oneDNN,
whose product for one row streams 15 to 23 GB/s here; with oneDNN switched off for that one call,
PyTorch's own matrix-vector kernel (16-bit loads, float32 sums) streams 27 to 49 GB/s. Two rows and
more stay with oneDNN: PyTorch's own kernel is slower there (measured 1 to 64 rows). The switch is
process-wide (`torch._C._set_mkldnn_enabled`) and is set back at once, so another thread's product that
starts in those microseconds may miss oneDNN too: the same result, slower.

Weight-only int8 weights (torchao's `Int8Tensor`, one scale per output row, quantize.py) have the same
problem worse: torchao's CPU product converts the whole int8 matrix to the input's dtype on every call
and multiplies that copy, reading and writing 3 to 9 bytes per weight where 1 suffices. For them the
few-row forward calls PyTorch's `torch._weight_int8pack_mm` instead, which reads the int8 matrix as it
is and scales the sums per row: the same products, in any float dtype, the same stored weight.

torchao's int8 weights with dynamic int8 activations (quantize="w8a8") are multiplied here at every row
count on the CPU, where torchao's own product is slow (measured 45 to 190 ms for 8192 x 2048 at 1 to 512
rows): each input row is rounded to int8 as torchao defines it, then `torch._int_mm` (int8 x int8, int32
sums, VNNI) for a few rows, or, for long inputs where that kernel is slow, the integers as 16-bit floats
through `F.linear` (their sums rounded to the input dtype, as torchao rounds its sums).

`use_blocked_linears(model)` gives every plain `nn.Linear` below `model` this forward as an instance
attribute: the modules stay `nn.Linear` (their type, parameters and state_dict keys are unchanged), so
quantizers, LoRA and tensor parallelism that look for `nn.Linear` still find every layer, and
`restore_linears` takes the path off again. It skips layers whose weight is neither a plain tensor nor
a per-row int8 weight (int4 and distributed weights keep their own product) and, at run time, falls back
to `F.linear` for anything but CPU inputs of at most `MAX_ROWS` rows (float32 for the blocks, one row
for 16-bit weights, outside `torch.compile` for those), or for a weight that a later transform
replaced. Results equal `F.linear` up to rounding (the sums run in another order).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 64
BLOCKS = (256, 128, 64)  # rows per weight block, the first that divides out_features
_PLAIN = (torch.Tensor, nn.Parameter)
_HALF = (torch.bfloat16, torch.float16)
_F32_EPS = torch.finfo(torch.float32).eps


def blocked_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // self.in_features
    block = _block(self.out_features)
    weight = self.weight
    if x.device.type == "cpu" and is_int8_dynamic(weight):  # every row count: torchao's is slower
        return _w8a8_forward(self, x)
    if rows > MAX_ROWS or x.device.type != "cpu":
        return F.linear(x, weight, self.bias)
    if is_int8_rows(weight):
        return _int8_rows_forward(self, x)
    if rows == 1 and x.dtype in _HALF and weight.dtype == x.dtype and type(weight) in _PLAIN:
        return _native_row_forward(self, x)
    if (
        block is None
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


def _native_row_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():  # the compiled graph picks its own kernel
        return F.linear(x, self.weight, self.bias)
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.linear(x, self.weight, self.bias)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


def _int8_rows_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    weight = self.weight
    flat = x.reshape(-1, self.in_features).contiguous()
    out = torch._weight_int8pack_mm(flat, weight.qdata, weight.scale.view(-1).to(x.dtype))
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*x.shape[:-1], self.out_features)


def _w8a8_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """torchao's dynamic int8 product, computed as it defines it: each input row scaled by its largest
    magnitude over 127.5 (symmetric, the range -128..127), rounded to int8, multiplied by the int8
    weight with int32 sums, and the sums scaled by both scales in float32."""
    weight = self.weight
    flat = x.reshape(-1, self.in_features)
    scale = flat.abs().amax(-1, keepdim=True).float().clamp_(min=_F32_EPS) / 127.5
    q = (flat.float() / scale).round_().clamp_(-128, 127).to(torch.int8)
    if flat.shape[0] <= MAX_ROWS:
        sums = torch._int_mm(q, weight.qdata.t()).float()
    else:  # long inputs: the int8 product is slow here; integers in floats give the same sums, rounded
        sums = F.linear(q.to(x.dtype), weight.qdata.to(x.dtype)).float()
    out = (sums * scale * weight.scale.view(1, -1)).to(x.dtype)
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*x.shape[:-1], self.out_features)


def _torchao_int8(weight: torch.Tensor) -> bool:
    return (
        type(weight).__name__ == "Int8Tensor"
        and type(weight).__module__.startswith("torchao.")
        and weight.ndim == 2
        and weight.act_pre_scale is None
        and list(weight.block_size) == [1, weight.shape[1]]
        and weight.qdata.is_contiguous()
    )


def is_int8_rows(weight: torch.Tensor) -> bool:
    """Whether `weight` is torchao's weight-only int8 tensor with one scale per output row (symmetric:
    its zero points are all 0), the layout `torch._weight_int8pack_mm` multiplies."""
    return _torchao_int8(weight) and weight.act_quant_kwargs is None


def is_int8_dynamic(weight: torch.Tensor) -> bool:
    """Whether `weight` is torchao's int8 weight with dynamic int8 activations (quantize="w8a8"): one
    scale per output row, and per input row, both symmetric."""
    if not _torchao_int8(weight) or weight.act_quant_kwargs is None:
        return False
    kwargs = weight.act_quant_kwargs
    return (
        type(kwargs.granularity).__name__ == "PerRow"
        and kwargs.mapping_type.name == "SYMMETRIC"
        and not kwargs.reduce_range
        and weight.act_quant_scale is None
    )


def use_blocked_linears(model: nn.Module) -> nn.Module:
    """Give the `nn.Linear` layers below `model` with a plain or per-row int8 weight the small-batch
    path, in place."""
    for layer in model.modules():
        if type(layer) is not nn.Linear:
            continue
        if type(layer.weight) in _PLAIN or is_int8_rows(layer.weight) or is_int8_dynamic(layer.weight):
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
