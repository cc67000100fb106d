"""The memory planner: what a model, a request shape and a way of running it need, per device, before
anything is loaded. `estimate(config, ...)` gives the parts (`MemoryEstimate`); `llama-vision estimate`
prints them (cli_estimate.py); `request_cost` and `check_request` price one request for an engine that
refuses what cannot fit.

The parts, in bytes per device (TP = tensor-parallel degree):
- weights: every parameter in the weight dtype; with `quant` the linear weights that quantize.py
  quantizes take its bytes (int8: 1 byte + 5 per row; int4: CUDA 0.5 + 4 per group of 128, CPU 1 +
  3 per group of 32 in float32, see quantize.py). Under TP the decoder's, the cross-attention layers'
  and the vision encoder's projections and the output layer are split TP ways (parallel.py); embeddings,
  norms, gates and the projector are replicated.
- kv_cache: self-attention keys and values for `context` tokens (prompt + new tokens): self-attention
  layers x 2 x batch x context x KV heads / TP x head width, in the activation dtype.
- image_kv: the cross-attention keys and values held for the request: cross-attention layers x 2 x batch
  x (images x tiles x tokens per tile) x KV heads / TP x head width. Tokens per tile: 1601 at 560 px.
- activations: the largest transient of one forward pass, from the code's own tensors; for inference of
  one request (training: the whole batch): the engine prefills requests together only while their prompt
  and image tokens stay within its `prefill_tokens_per_step` (1,024 by default, well below one 4-tile
  image), so a request at the limits of `context` and `images` is prefilled alone. The vision tower
  over all images at once (hidden states, the kept intermediate layers, q/k/v, the MLP,
  the additive padding mask of (N x L)^2 per image), or the prompt's prefill (hidden states, q/k/v with
  keys repeated per head, the MLP, the cross-attention mask repeated per query group), whichever is
  larger. The prefill runs the whole `context` as the prompt (the worst case); attention scores are not
  materialised (fused SDPA kernels).
- training (`mode`), AdamW with float32 moments, gradients in the weight dtype, no float32 master copy:
  "full" trains everything; "lora" and "qlora" (base weights quantized to int4) train rank-16 adapters
  on every linear of the text decoder and the cross-attention layers; "adapters" trains the cross-
  attention layers and the projector. The vision tower is frozen except in "full". Training activations
  assume activation checkpointing per layer (each layer's input kept, one layer's internals recomputed)
  and float32 logits for every position, with their gradient.

A device fits when the total plus `RUNTIME_RESERVE` (CUDA context, kernel workspaces) is at most its
size. Checked on the CPU against measured peaks (tests/test_memory.py: within 10%); the GPU check is in
bench/gpu_check.sh's list when a GPU is lent.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from llama_vision.config import LlamaVisionConfig
from llama_vision.quantize import DEFAULT_TARGETS, part_of

GiB = 2**30
GPU_SIZES_GB = (16, 24, 48, 80, 141)
RUNTIME_RESERVE = 1 * GiB
MODES = ("lora", "qlora", "full", "adapters")
LORA_RANK = 16
_TEXT_PARTS = ("text", "cross")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device, by part."""

    weights: int
    kv_cache: int
    image_kv: int
    activations: int
    gradients: int = 0
    optimizer: int = 0

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


def quantized_bytes(out_features: int, in_features: int, quant: str, device: str = "cuda") -> int:
    """Bytes of one quantized (out, in) weight as quantize.py stores it (measured from torchao's tensors)."""
    n = out_features * in_features
    if quant == "int8":
        return n + 5 * out_features  # int8 values, a float32 scale and an int8 zero point per row
    if quant != "int4":
        raise ValueError(f"quant must be int8 or int4, got {quant!r}")
    if device == "cuda":
        group = next(g for g in (128, 64, 32) if in_features % g == 0)
        return n // 2 + 4 * n // group  # packed nibbles, a bfloat16 scale and zero per group
    return n + 5 * n // 32  # one int8 per value; a float32 scale and an int8 zero point per group of 32


def _weight_bytes(
    config: LlamaVisionConfig, dtype: torch.dtype, quant: str | None, tp: int, device: str
) -> tuple[int, dict[str, int]]:
    """Weight bytes per device, and the parameter counts per part (for the training terms)."""
    from llama_vision.model import LlamaVisionModel

    with torch.device("meta"):
        model = LlamaVisionModel(config)
    size = torch.finfo(dtype).bits // 8
    total = 0
    counts = dict.fromkeys(("all", "lora", "adapters"), 0)
    cross = tuple(f"language_model.model.layers.{i}." for i in config.text.cross_attention_layers)
    for name, p in model.named_parameters():
        part = part_of(name, config)
        counts["all"] += p.numel()
        if part in _TEXT_PARTS:
            counts["lora"] += LORA_RANK * (p.shape[0] + p.shape[1])
        if name.startswith((*cross, "multi_modal_projector.")):
            counts["adapters"] += p.numel()
        split = tp if (part in ("text", "cross", "vision") or name == "language_model.lm_head.weight") else 1
        if quant is not None and part in DEFAULT_TARGETS:
            total += quantized_bytes(p.shape[0] // split, p.shape[1], quant, device)
        else:
            total += p.numel() * size // split
    return total, counts


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
    mode: str | None = None,
    device: str = "cuda",
) -> MemoryEstimate:
    """Bytes per device to run (or with `mode`, to fine-tune) `config` on requests of this shape."""
    v = config.vision
    tiles = v.max_num_tiles if max_tiles is None else max_tiles
    _check(config, tiles, images, context, batch, quant, tp, mode)
    if mode == "qlora":
        quant = "int4"
    size = torch.finfo(dtype).bits // 8
    weights, counts = _weight_bytes(config, dtype, quant, tp, device)
    kv = kv_cache_bytes(config, context, batch, size, tp)
    image_kv = image_kv_bytes(config, images, tiles, batch, size, tp)
    # A request this large is prefilled alone (the engine's per-step prefill budget), so inference
    # activations are one request's.
    activations = _activation_bytes(
        config, tiles, images, context, batch if mode is not None else 1, size, tp, training=mode is not None
    )
    if mode is None:
        return MemoryEstimate(weights=weights, kv_cache=kv, image_kv=image_kv, activations=activations)
    trainable = counts["all" if mode == "full" else "adapters" if mode == "adapters" else "lora"]
    extra = trainable * size if mode in ("lora", "qlora") else 0  # the adapters' own weights
    return MemoryEstimate(
        weights=weights + extra // tp,
        kv_cache=0,  # training runs the whole sequence at once, no cache
        image_kv=image_kv,
        activations=activations,
        gradients=trainable * size // tp,
        optimizer=trainable * 8 // tp,
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
    config: LlamaVisionConfig,
    tiles: int,
    images: int,
    context: int,
    batch: int,
    size: int,
    tp: int,
    training: bool,
) -> int:
    t, v = config.text, config.vision
    B, T, D, F, V = batch, context, t.hidden_size, t.intermediate_size, t.vocab_size
    G = t.num_attention_heads // t.num_key_value_heads
    S = images * tiles * v.num_patches
    vision = 0
    if images:
        L = v.num_patches + (8 - v.num_patches % 8) % 8  # tokens per tile, padded to a multiple of 8
        X = B * images * tiles * L  # every image token of the batch, through the tower at once
        K = len(v.intermediate_layers_indices)
        vision = size * (
            X * v.hidden_size * (6 + K)  # x, norm, q, k, v, attention out, kept intermediates
            + X * v.intermediate_size // tp  # the MLP's hidden layer
            + B * images * (tiles * L) ** 2  # the additive padding mask
        )
        vision += size * (X * v.vision_output_dim + B * S * D)  # the features, the projected tokens
    kept = B * T * D * size  # the residual stream
    text = (
        size * B * T * (4 * D + 2 * D // tp + 3 * F // tp)
    )  # q, attention out, o_proj out; keys/values per head; MLP
    if images:
        text += B * G * T * S * (1 + size) // tp  # the cross-attention mask, boolean and additive
    if not training:
        return max(vision, kept + text) + B * V * 4  # logits of the last position only, float32
    layers = t.num_hidden_layers
    logits = 2 * B * T * V * 4  # float32 logits and their gradient
    return vision + layers * kept + 2 * text + logits


def _check(
    config: LlamaVisionConfig,
    tiles: int,
    images: int,
    context: int,
    batch: int,
    quant: str | None,
    tp: int,
    mode: str | None,
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
    if quant not in (None, "int8", "int4"):
        raise ValueError(f"quant must be int8 or int4, got {quant!r}")
    if mode not in (None, *MODES):
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
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
    _check(config, tiles, images, context, batch, None, tp, None)
    size = torch.finfo(dtype).bits // 8
    return MemoryEstimate(
        weights=0,
        kv_cache=kv_cache_bytes(config, context, batch, size, tp),
        image_kv=image_kv_bytes(config, images, tiles, batch, size, tp) if images else 0,
        activations=_activation_bytes(config, tiles, images, prompt_tokens, 1, size, tp, training=False),
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
