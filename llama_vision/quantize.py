"""Int8 and int4 weight quantization through torchao, applied while the checkpoint loads.

    model = load_checkpoint(path, dtype=torch.bfloat16, quantize="int8")
    lv = LlamaVision.from_pretrained(path, quantize="int4")          # the same, with tokenizer and engine
    quantize_model(model, "int8")                                    # or on a model already built

Each linear weight of the chosen parts is quantized as soon as it is read (`quantize_hooks`, a
`weights.LoadHooks` transform), so the unquantized model is never held whole. The layers stay
`nn.Linear`; their weight becomes one of torchao's tensor subclasses, which dispatches `F.linear` to
its kernels. Module names and state_dict keys do not change, and code that walks the model (the CPU
blocked-matmul path, LoRA) can tell a quantized layer by its weight not being a plain tensor.

Parts (`targets`): "text" (the self-attention layers' q/k/v/o and MLPs), "cross" (the cross-attention
layers' q/k/v/o and MLPs), "vision" (the ViT's projections and MLPs), "projector", "head" (the output
layer, lm_head). The default is text + cross: GPTQ-style tools leave the cross-attention layers
unquantized, we do not. Text-only Llamas (llama.py) use text + head (`TEXT_MODEL_TARGETS`): their head
is a large share of a decode step's reads (Llama 3.2 1B: 263 M of 1.24 B weights, half the bytes of an
int4 model if kept in bfloat16), and llama.cpp quantizes it too. The head is int8 under int4
(its rounding moves every logit; llama.cpp keeps it at 6 bits, q6_K, under q4_0). A tied head becomes
its own quantized copy; the embedding table stays in the load dtype for the lookups. Always kept in the
load dtype: embeddings, norms, gates and the patch convolution (not an `nn.Linear`).

Schemes (torchao 0.18, checked on this CPU and for CUDA):
- "int8": `Int8WeightOnlyConfig`, one float32 scale per output row: 1 byte a weight, any device/dtype.
  torchao's own CPU product converts the whole matrix to the input dtype on each call; the CPU few-row
  path (cpu_linear.py) multiplies these weights with `torch._weight_int8pack_mm` instead.
- "w8a8": `Int8DynamicActivationInt8WeightConfig()`, the same int8 weights, and each input row rounded
  to int8 too (one scale per row, symmetric) so the product is int8 by int8 with int32 sums, as
  llama.cpp's q8_0 does (in blocks of 32 there). A second rounding, so it strays further from the
  unquantized model than "int8" (bench/quantize.py); on the CPU it decodes faster, as
  `torch._int_mm` streams the weights faster than `_weight_int8pack_mm` (cpu_linear.py, which runs
  this product on the CPU: torchao's own is slower there at every row count). The head is w8a8 too.
- "int4" on CUDA: `Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")`,
  tinygemm's packed layout, half a byte a weight plus a bfloat16 scale and zero per 128; needs bfloat16.
- "int4" on the CPU: `PrototypeInt4WeightOnlyConfig(group_size=128)` (torchao's `Int4OpaqueTensor`,
  a prototype API in 0.18): the weight packed two per byte for PyTorch's CPU tinygemm kernel
  (`torch._weight_int4pack_mm_for_cpu`), a scale and zero per 128 in the load dtype: 0.53 bytes a
  weight in bfloat16. Its kernel is fast with bfloat16 inputs only (measured: 8192 x 2048, one row,
  0.26 ms in bfloat16, 15 ms in float32), so load int4 models in bfloat16 on the CPU.
Group sizes fall back to 64 or 32 where a layer's input width is not a multiple of the default.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from llama_vision.config import LlamaVisionConfig

SCHEMES = ("int8", "w8a8", "int4")
TARGETS = ("text", "cross", "vision", "projector", "head")
DEFAULT_TARGETS = ("text", "cross")
TEXT_MODEL_TARGETS = ("text", "head")  # text-only Llamas (llama.py), see the module docstring
CPU_INT4_GROUP = 128

_TEXT_LINEAR = re.compile(  # a vision model's decoder, or a text-only Llama's (no prefix)
    r"(?:language_model\.)?model\.layers\.(\d+)\.(self_attn|cross_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight"
)
_VISION_LINEAR = re.compile(r"vision_model\..*\.(self_attn\.[qkvo]_proj|mlp\.fc[12])\.weight")


def part_of(name: str, config: LlamaVisionConfig) -> str | None:
    """Which quantizable part the parameter `name` is a linear weight of, or None (kept as it is)."""
    if m := _TEXT_LINEAR.fullmatch(name):
        return "cross" if int(m[1]) in config.text.cross_attention_layers else "text"
    if _VISION_LINEAR.fullmatch(name):
        return "vision"
    if name == "multi_modal_projector.weight":
        return "projector"
    if name in ("lm_head.weight", "language_model.lm_head.weight"):
        return "head"
    return None


def check(scheme: str | None, targets: Iterable[str] = DEFAULT_TARGETS) -> tuple[str, ...]:
    """Validate the options; returns the targets as a tuple."""
    if scheme is not None and scheme not in SCHEMES:
        raise ValueError(f"quantize must be one of {', '.join(SCHEMES)} (or None), got {scheme!r}")
    targets = tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown quantization targets {unknown}; choose from {list(TARGETS)}")
    return targets


def group_size(in_features: int, preferred: int) -> int:
    for size in (preferred, 64, 32):
        if size <= preferred and in_features % size == 0:
            return size
    raise ValueError(f"int4 needs a layer input width divisible by 32, got {in_features}")


def torchao_config(scheme: str, weight: torch.Tensor):  # -> torchao AOBaseConfig
    """The torchao config for one weight (out, in) on its device (see the module docstring)."""
    try:
        from torchao.quantization import (
            Int4WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
        )
    except ImportError:  # a RuntimeError, so the command line prints it as one line
        raise RuntimeError(
            "quantization needs torchao: pip install 'llama-vision[quant]' (or pip install torchao)"
        ) from None
    if scheme == "int8":
        return Int8WeightOnlyConfig()
    if scheme == "w8a8":
        return Int8DynamicActivationInt8WeightConfig()
    if weight.device.type == "cuda":
        if weight.dtype != torch.bfloat16:
            raise ValueError(f"int4 on CUDA needs dtype=torch.bfloat16, got {weight.dtype}")
        size = group_size(weight.shape[1], 128)
        return Int4WeightOnlyConfig(group_size=size, int4_packing_format="tile_packed_to_4d")
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

    return PrototypeInt4WeightOnlyConfig(group_size=group_size(weight.shape[1], CPU_INT4_GROUP))


def quantize_weight(weight: torch.Tensor, scheme: str) -> nn.Parameter:
    """A linear weight (out, in) quantized with torchao: a Parameter holding torchao's tensor subclass."""
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    from torchao.quantization import quantize_

    quantize_(linear, torchao_config(scheme, weight))
    return linear.weight


def quantize_hooks(config: LlamaVisionConfig, scheme: str, targets: Iterable[str] = DEFAULT_TARGETS):
    """Loader hooks (`weights.LoadHooks`) that quantize each chosen weight as soon as it is read."""
    from llama_vision.weights import LoadHooks

    targets = check(scheme, targets)
    torchao_config(scheme, torch.empty(1, 32, device="meta"))  # a missing torchao fails before any read

    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if part_of(name, config) not in targets:
            return tensor
        if type(tensor.data) is not torch.Tensor:
            raise ValueError(
                f"cannot quantize {name}: it is already a {type(tensor.data).__name__} (quantization together "
                "with tensor parallelism is not supported)"
            )
        return quantize_weight(tensor, scheme_for(name, scheme, config))

    return LoadHooks(transform=transform)


def quantize_model(model: nn.Module, scheme: str, targets: Iterable[str] = DEFAULT_TARGETS) -> nn.Module:
    """Quantize the chosen linear weights of a built model in place (the loader hooks do it while loading)."""
    targets = check(scheme, targets)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and part_of(f"{name}.weight", model.config) in targets:
            module.weight = quantize_weight(
                module.weight.detach(), scheme_for(f"{name}.weight", scheme, model.config)
            )
    return model  # a tied head quantized here is a new parameter: the embedding keeps its table


def scheme_for(name: str, scheme: str, config: LlamaVisionConfig) -> str:
    """The scheme for the weight `name`: the output layer's is int8 under int4 (its rounding moves
    every logit; llama.cpp also keeps its output layer at 6 to 8 bits under q4_0)."""
    return "int8" if scheme == "int4" and part_of(name, config) == "head" else scheme


def is_quantized(weight: torch.Tensor) -> bool:
    return type(weight.data) is not torch.Tensor


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, a torchao subclass's inner tensors (data, scales, zero points) included."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None:
        return t.numel() * t.element_size()
    names, _ = flatten()
    return sum(tensor_bytes(getattr(t, n)) for n in names)
