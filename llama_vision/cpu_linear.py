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

Several rows of float32 (batched decoding: one token for each of up to `max_batch` requests) are slow
on every route above: MKL's products and the blocked `bmm` run at 13 to 35 GFLOP/s for 8 rows, where this
CPU does 100 (2,048-square products), so a step of 8 rows costs 2.5 to 3 times a step of one.
`pack_linears(module)` gives each float32 layer a copy of its weight in oneDNN's own blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`), and 2 to `MAX_ROWS` rows then go through oneDNN's product
with it (`mkldnn._linear_pointwise`, the kernel inductor's CPU freezing uses): the 128,256 x 512 output
layer takes 11 to 13 ms for 8 rows instead of 21 to 35, about what one row takes. The copy costs the
weight's bytes again, so it is a choice (`from_pretrained(cpu_pack=...)`); it is used only without
autograd, outside `torch.compile`, and only while the layer still holds the very weight it was made
from, unchanged (its version counter), so training, LoRA merges and weight swaps never read a stale
copy. One row keeps the blocked `bmm`, which is as fast or faster there.

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
import weakref

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
    packed = self.__dict__.get("packed_weight")
    # Outside torch.compile only (checked first: dynamo cannot trace the version check).
    if packed is not None and not torch.compiler.is_compiling() and packed.usable(self.weight, x, rows):
        return _packed_forward(self, x, packed)
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


def _packed_forward(self: nn.Linear, x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed.tensor, self.bias, "none", [], "")


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
    """Take the blocked path off again: every layer runs `nn.Linear.forward`, and packed copies go."""
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            layer.__dict__.pop("forward", None)
            layer.__dict__.pop("packed_weight", None)
    return model


class PackedWeight:
    """A layer's weight in oneDNN's blocked layout, with the weight and version it was made from."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.source, self.version = weakref.ref(weight), weight._version
        self.tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8)

    def usable(self, weight: torch.Tensor, x: torch.Tensor, rows: int) -> bool:
        return (
            2 <= rows <= MAX_ROWS
            and weight is self.source()
            and weight._version == self.version
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and not torch.is_grad_enabled()
        )

    def __deepcopy__(self, memo: dict) -> None:  # oneDNN tensors cannot be copied; a copy goes without
        return None

    def __reduce__(self) -> tuple:
        return (type(None), ())


def pack_linears(module: nn.Module) -> int:
    """Give the float32 `nn.Linear` layers below `module` that have the few-row path a packed copy of
    their weight for products of 2 to `MAX_ROWS` rows, in place; returns the bytes added."""
    layers = _packable(module)
    for layer in layers:
        layer.packed_weight = PackedWeight(layer.weight)
    return _bytes(layers)


def packed_bytes(module: nn.Module) -> int:
    """What `pack_linears(module)` would add: the bytes of the weights it would copy."""
    return _bytes(_packable(module))


def packed_layers(module: nn.Module) -> int:
    """How many layers below `module` hold a packed copy."""
    return sum(1 for layer in module.modules() if layer.__dict__.get("packed_weight") is not None)


def _packable(module: nn.Module) -> list[nn.Linear]:
    if not torch.backends.mkldnn.is_available():
        return []
    return [
        layer
        for layer in module.modules()
        if type(layer) is nn.Linear
        and "forward" in layer.__dict__  # the few-row path (use_blocked_linears)
        and type(layer.weight) in _PLAIN
        and layer.weight.dtype == torch.float32
        and layer.weight.device.type == "cpu"
    ]


def _bytes(layers: list[nn.Linear]) -> int:
    return sum(layer.weight.numel() * layer.weight.element_size() for layer in layers)


def _block(out_features: int) -> int | None:
    return next((b for b in BLOCKS if out_features % b == 0), None)
