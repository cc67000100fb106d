"""The memory planner: what a model, a request shape and a way of running it need, per device, before
anything is loaded. `estimate(config, ...)` gives the parts (`MemoryEstimate`); `llama-vision estimate`
prints them (cli_estimate.py); `request_cost` and `check_request` price one request for an engine that
refuses what cannot fit. Fine-tuning is priced by finetune/memory.py, which simulates a training step
and shares this file's arithmetic: parameter bytes by part (`parameter_bytes`, `quantized_bytes`),
the parts of the model (`part_of`) and `MemoryEstimate`.

The parts, in bytes per device (TP = tensor-parallel degree):
- weights: every parameter in the weight dtype; with `quant` the linear weights that quantize.py
  quantizes take its bytes (int8: 1 byte + 5 per row; int4: 0.5 + a scale and a zero per group of
  128, bfloat16 on CUDA, the load dtype on the CPU, see quantize.py). Under TP the decoder's, the
  cross-attention layers' and the vision encoder's projections and the output layer are split TP ways
  (parallel.py); embeddings, norms, gates and the projector are replicated.
- kv_cache: self-attention keys and values for `context` tokens (prompt + new tokens): self-attention
  layers x 2 x batch x context x KV heads / TP x head width, in the activation dtype.
- image_kv: the cross-attention keys and values held for the request: cross-attention layers x 2 x batch
  x (images x tiles x tokens per tile) x KV heads / TP x head width. Tokens per tile: 1601 at 560 px.
- packed_weights: on the CPU, the second copy of the decoder's float32 linear weights in oneDNN's
  layout that batched decoding multiplies (cpu_linear.pack_linears; `cpu_pack`).
- activations: the largest transient of one forward pass, from the code's own tensors, for one request:
  the engine prefills requests together only while their prompt tokens (and, while rows decode, their
  image tokens) stay within its `prefill_tokens_per_step` (1,024 by default, well below one 4-tile
  image), and runs the vision tower in calls within it, so a request at the limits of `context` and
  `images` is prefilled and encoded alone. The vision tower over all images at once (hidden
  states, the kept intermediate layers, q/k/v, the MLP, the additive padding mask of (N x L)^2 per
  image), or the prompt's prefill (hidden states, q/k/v with keys repeated per head, the MLP, the
  cross-attention mask repeated per query group), whichever is larger. The prefill runs the whole
  `context` as the prompt (the worst case); attention scores are not materialised (fused SDPA kernels).

A device fits when the total plus `RUNTIME_RESERVE` (CUDA context, kernel workspaces) is at most its
size. Checked on the CPU against measured peaks (tests/test_memory.py: within 10%); the GPU check is in
bench/gpu_check.sh's list when a GPU is lent.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

from llama_vision import quantize
from llama_vision.config import LlamaVisionConfig

GiB = 2**30
GPU_SIZES_GB = (16, 24, 48, 80, 141)
RUNTIME_RESERVE = 1 * GiB
LOSS_CHUNK_BYTES = 2**28  # float32 logits of one chunk of the training loss (finetune/train.py)
PARTS = ("vision", "projector", "cross_attention", "self_attention", "embeddings_and_head")
PART_NAMES = {
    "vision": "vision encoder",
    "projector": "projector",
    "cross_attention": "cross-attention layers",
    "self_attention": "self-attention layers",
    "embeddings_and_head": "embeddings and head",
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device, by part."""

    weights: int
    kv_cache: int
    image_kv: int
    activations: int
    gradients: int = 0
    optimizer: int = 0
    packed_weights: int = 0  # the CPU's second copy of float32 decoder weights (cpu_linear.pack_linears)

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def fits(self, device_bytes: int) -> bool:
        return self.total + RUNTIME_RESERVE <= device_bytes

    def fitting_gpus(self) -> list[int]:
        """The GPU sizes (GB) of GPU_SIZES_GB that hold this, per device."""
        return [gb for gb in GPU_SIZES_GB if self.fits(gb * GiB)]

    def parts(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"total": self.total}


def quantized_bytes(
    out_features: int, in_features: int, quant: str, device: str = "cuda", size: int = 2
) -> int:
    """Bytes of one quantized (out, in) weight as quantize.py stores it (measured from torchao's tensors);
    `size` is the bytes of the load dtype, which int4's scales and zeros take on the CPU."""
    n = out_features * in_features
    if quant == "nf4":
        return n // 2 + (n // 64) * 4  # bitsandbytes' NF4 (QLoRA): packed nibbles, a float32 absmax per 64
    if quant in ("int8", "w8a8"):  # w8a8 stores the same int8 weights
        return n + 5 * out_features  # int8 values, a float32 scale and an int8 zero point per row
    if quant != "int4":
        raise ValueError(f"quant must be int8, w8a8, int4 or nf4, got {quant!r}")
    group = quantize.group_size(in_features, 128 if device == "cuda" else quantize.CPU_INT4_GROUP)
    if device == "cuda":  # tinygemm's layout: bfloat16 scales and zeros
        size = 2
    return n // 2 + (n // group) * 2 * size  # packed nibbles, a scale and a zero per group


def part_of(name: str, config: LlamaVisionConfig) -> str:
    """The part (one of PARTS) that parameter or module `name` (our hub-layout names) belongs to."""
    if name.startswith("vision_model"):
        return "vision"
    if name.startswith("multi_modal_projector"):
        return "projector"
    match = re.match(r"language_model\.model\.layers\.(\d+)\.", name)
    if match:
        layer = int(match.group(1))
        return "cross_attention" if layer in config.text.cross_attention_layers else "self_attention"
    return "embeddings_and_head"


def parameter_bytes(
    model: nn.Module,
    *,
    quant: str | None = None,
    quantized: Callable[[str], bool] = lambda name: False,
    split: Callable[[str], bool] = lambda name: False,
    tp: int = 1,
    device: str = "cuda",
) -> dict[str, int]:
    """Bytes of a built model's parameters (the meta device will do) by part (PARTS), each in its own
    dtype. With `quant` (int8, int4, nf4) the (out, in) weights that `quantized(name)` selects take
    `quantized_bytes`; the parameters that `split(name)` selects are divided over `tp` devices by rows.
    The one count of parameter memory: inference (`estimate`) and training (finetune/memory.py) use it."""
    parts = dict.fromkeys(PARTS, 0)
    config = model.config
    for name, p in model.named_parameters():
        ways = tp if split(name) else 1
        if quant is not None and quantized(name):
            n = quantized_bytes(p.shape[0] // ways, p.shape[1], quant, device, p.element_size())
        else:
            n = p.numel() * p.element_size() // ways
        parts[part_of(name, config)] += n
    return parts


def _weight_bytes(
    model: nn.Module, config: LlamaVisionConfig, quant: str | None, tp: int, device: str
) -> int:
    """Inference weight bytes per device: quantize.py's targets quantized, parallel.py's layers split."""
    return sum(
        parameter_bytes(
            model,
            quant=quant,
            quantized=lambda name: _quantized(name, config),
            split=lambda name: (
                quantize.part_of(name, config) in ("text", "cross", "vision")
                or name == "language_model.lm_head.weight"
            ),
            tp=tp,
            device=device,
        ).values()
    )


def _quantized(name: str, config: LlamaVisionConfig) -> bool:
    return quantize.part_of(name, config) in quantize.DEFAULT_TARGETS


def _packed_bytes(model: nn.Module, config: LlamaVisionConfig, quant: str | None) -> int:
    """The bytes `pack_linears(model.decoder)` adds: every float32 linear weight of the decoder (its
    layers and the output layer) that is not quantized."""
    linears = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    return sum(
        p.numel() * p.element_size()
        for name, p in model.named_parameters()
        if name in linears
        and name.startswith("language_model.")
        and p.dtype == torch.float32
        and not (quant is not None and _quantized(name, config))
    )


def estimate(
    config: LlamaVisionConfig,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_tiles: int | None = None,
    images: int = 1,
    context: int = 8192,
    batch: int = 1,
    quant: str | None = None,
    tp: int = 1,
    device: str = "cuda",
    cpu_pack: bool | None = None,
) -> MemoryEstimate:
    """Bytes per device to run `config` on requests of this shape (fine-tuning: finetune/memory.py).

    `cpu_pack`: whether the decoder's float32 weights get a packed copy for batched decoding on the CPU
    (`LlamaVision.from_pretrained(cpu_pack=...)`); None, as its default, packs on the CPU in float32
    without tensor parallelism (from_pretrained also checks that the copies fit a quarter of the memory
    available, which a plan made elsewhere cannot know)."""
    from llama_vision.model import LlamaVisionModel

    v = config.vision
    tiles = v.max_num_tiles if max_tiles is None else max_tiles
    check_options(config, tiles, images, context, batch, quant, tp)
    if cpu_pack and device != "cpu":
        raise ValueError(f"cpu_pack packs weights for the CPU; the plan is for {device}")
    if cpu_pack is None:
        cpu_pack = device == "cpu" and tp == 1
    size = torch.finfo(dtype).bits // 8
    with torch.device("meta"):
        model = LlamaVisionModel(config).to(dtype)
    return MemoryEstimate(
        weights=_weight_bytes(model, config, quant, tp, device),
        kv_cache=kv_cache_bytes(config, context, batch, size, tp),
        image_kv=image_kv_bytes(config, images, tiles, batch, size, tp),
        # a request this large is prefilled alone (the engine's per-step prefill budget)
        activations=_activation_bytes(config, tiles, images, context, 1, size, tp),
        packed_weights=_packed_bytes(model, config, quant) if cpu_pack else 0,
    )


def kv_cache_bytes(config: LlamaVisionConfig, context: int, batch: int, size: int, tp: int = 1) -> int:
    t = config.text
    n_self = t.num_hidden_layers - len(t.cross_attention_layers)
    return n_self * 2 * batch * context * (t.num_key_value_heads // tp) * t.head_dim * size


def image_kv_bytes(
    config: LlamaVisionConfig, images: int, tiles: int, batch: int, size: int, tp: int = 1
) -> int:
    t, v = config.text, config.vision
    S = images * tiles * v.num_patches
    return len(t.cross_attention_layers) * 2 * batch * S * (t.num_key_value_heads // tp) * t.head_dim * size


def _activation_bytes(
    config: LlamaVisionConfig, tiles: int, images: int, context: int, batch: int, size: int, tp: int
) -> int:
    """Inference: the vision tower or the prompt's prefill, whichever is larger, and the last logits."""
    kept = batch * context * config.text.hidden_size * size  # the residual stream
    vision = _vision_bytes(config, tiles, images, batch, size, tp)
    layer = _text_layer_bytes(config, tiles, images, context, batch, size, tp)
    return max(vision, kept + layer) + batch * config.text.vocab_size * 4  # float32, last position only


def training_activation_bytes(
    config: LlamaVisionConfig, tiles: int, images: int, context: int, batch: int, size: int
) -> int:
    """Training: the activations of one step of `batch` rows of `context` tokens, by formula (fast, for
    any size; the dry-run plan, finetune/memory.py, simulates the step instead). With activation
    checkpointing per layer, each layer's input is kept and one layer's internals live at a time
    (forward, then recomputed in backward next to their gradients: twice); the loss makes float32
    logits one chunk of positions at a time (`token_loss`, LOSS_CHUNK_BYTES): the chunk, which becomes
    its gradient in place, and its 16-bit copies under autocast."""
    V = config.text.vocab_size
    kept = batch * context * config.text.hidden_size * size
    vision = _vision_bytes(config, tiles, images, batch, size, 1)
    layer = _text_layer_bytes(config, tiles, images, context, batch, size, 1)
    chunk = min(batch * context, max(1, LOSS_CHUNK_BYTES // (4 * V)))
    return vision + config.text.num_hidden_layers * kept + 2 * layer + 2 * chunk * V * 4


def _vision_bytes(config: LlamaVisionConfig, tiles: int, images: int, batch: int, size: int, tp: int) -> int:
    """The vision tower over every image of the batch at once, and the projected image tokens."""
    if not images:
        return 0
    t, v = config.text, config.vision
    L = v.num_patches + (8 - v.num_patches % 8) % 8  # tokens per tile, padded to a multiple of 8
    X = batch * images * tiles * L  # every image token of the batch
    K = len(v.intermediate_layers_indices)
    S = images * tiles * v.num_patches
    return size * (
        X * v.hidden_size * (6 + K)  # x, norm, q, k, v, attention out, kept intermediates
        + X * v.intermediate_size // tp  # the MLP's hidden layer
        + batch * images * (tiles * L) ** 2  # the additive padding mask
        + X * v.vision_output_dim  # the features
        + batch * S * t.hidden_size  # the projected tokens
    )


def _text_layer_bytes(
    config: LlamaVisionConfig, tiles: int, images: int, context: int, batch: int, size: int, tp: int
) -> int:
    """One text layer's internals: q, attention out, o_proj out; keys/values per head; the MLP; with
    images, the cross-attention mask repeated per query group (boolean and additive)."""
    t, v = config.text, config.vision
    B, T, D, F = batch, context, t.hidden_size, t.intermediate_size
    layer = size * B * T * (4 * D + 2 * D // tp + 3 * F // tp)
    if images:
        G = t.num_attention_heads // t.num_key_value_heads
        layer += B * G * T * (images * tiles * v.num_patches) * (1 + size) // tp
    return layer


def check_options(
    config: LlamaVisionConfig,
    tiles: int,
    images: int,
    context: int,
    batch: int,
    quant: str | None,
    tp: int,
) -> None:
    t, v = config.text, config.vision
    if not 1 <= tiles <= v.max_num_tiles:
        raise ValueError(f"max_tiles must be 1..{v.max_num_tiles} for this model, got {tiles}")
    for name, value, low in (
        ("images", images, 0),
        ("context", context, 1),
        ("batch", batch, 1),
        ("tp", tp, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if quant not in (None, *quantize.SCHEMES):
        raise ValueError(f"quant must be one of {', '.join(quantize.SCHEMES)}, got {quant!r}")
    if t.num_key_value_heads % tp or v.attention_heads % tp:
        raise ValueError(
            f"tp={tp} must divide the KV heads ({t.num_key_value_heads}) and the vision heads "
            f"({v.attention_heads})"
        )


# ---------------------------------------------------------------------------------------- requests
def request_cost(
    config: LlamaVisionConfig,
    *,
    prompt_tokens: int,
    max_new_tokens: int,
    images: int = 0,
    tiles: int | None = None,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    tp: int = 1,
) -> MemoryEstimate:
    """What one request adds on top of the loaded weights: its caches and its largest transient."""
    v = config.vision
    tiles = v.max_num_tiles if tiles is None else tiles
    context = prompt_tokens + max_new_tokens
    check_options(config, tiles, images, context, batch, None, tp)
    size = torch.finfo(dtype).bits // 8
    return MemoryEstimate(
        weights=0,
        kv_cache=kv_cache_bytes(config, context, batch, size, tp),
        image_kv=image_kv_bytes(config, images, tiles, batch, size, tp) if images else 0,
        activations=_activation_bytes(config, tiles, images, prompt_tokens, 1, size, tp),
    )


class RequestTooLarge(ValueError):
    """A request whose estimated memory exceeds what is free."""


def check_request(cost: MemoryEstimate, free_bytes: int) -> None:
    """Refuse a request whose estimated cost exceeds the memory left; the message carries the estimate."""
    if cost.total > free_bytes:
        scale, unit = byte_unit(max(cost.total, free_bytes))
        raise RequestTooLarge(
            f"request refused: it needs about {cost.total / scale:.2f} {unit} (KV cache "
            f"{cost.kv_cache / scale:.2f}, image keys/values {cost.image_kv / scale:.2f}, activations "
            f"{cost.activations / scale:.2f}) and {free_bytes / scale:.2f} {unit} are free; use fewer tiles "
            "or images, a shorter prompt, or a smaller max_new_tokens"
        )


def byte_unit(nbytes: int) -> tuple[int, str]:
    """The binary unit that shows `nbytes` with two significant decimals (GiB from 0.1 GiB down)."""
    for scale, unit in ((GiB, "GiB"), (2**20, "MiB")):
        if nbytes >= scale // 10:
            return scale, unit
    return 2**10, "KiB"
