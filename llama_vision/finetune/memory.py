"""The memory plan of a training run: weights, trainable parameters, gradients, AdamW's state and the
activations of one step, for a batch size, sequence length, images per row and tiles per image.

Weights, gradients and optimizer state are counted from the run's model built on the meta device
(`_state_bytes`, with llama_vision/memory.py's `parameter_bytes`, the count that inference planning
uses too). The activations are simulated (`plan_memory`, the `--dry-run` plan): the mode, LoRA and
activation checkpointing are applied as for the run, and two training steps (forward, `token_loss`,
backward, AdamW; the first step creates the optimizer state) run under a dispatch mode that tracks
every tensor storage created and freed. The peak of live bytes over the steps is the plan's peak,
transients included (the loss's chunk of logits and its gradient, the recomputation of checkpointed
layers; AdamW is the trainer's fused kernel, which makes no temporaries and does not run on the meta
device, so its state is allocated as it allocates it, `_FusedAdamWMemory`, or, under FSDP, the plain
loop's temporaries are tracked as they run). Attention is counted as a fused kernel
(`_FusedAttention`: inputs, output and log-sum-exp, never the attention weights), as CUDA runs it. It is the memory of the tensors;
a CUDA allocator's cache, CUDA's context and the Python process come on top. `training_estimate`
(`llama-vision estimate --mode`) takes the same state bytes and memory.py's activation formula
instead of the simulation, which takes minutes for 11B or 90B.

Worst case of the inputs: every row at the full sequence length, every token trained, every image with
all its tiles. Under FSDP the weights, gradients and optimizer state are divided by the number of
processes. For QLoRA the linear weights of the frozen base count as bitsandbytes' NF4 (0.5 byte per
parameter and a float32 absmax per block of 64); the simulation itself runs on bf16 weights.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from llama_vision.config import LlamaVisionConfig
from llama_vision.finetune.config import TrainConfig
from llama_vision.memory import (
    GiB,
    MemoryEstimate,
    check_options,
    parameter_bytes,
    training_activation_bytes,
)
from llama_vision.model import LlamaVisionModel


@dataclass
class MemoryPlan:
    parameters: int
    trainable: int
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int  # the step's peak above weights, gradients and optimizer state
    peak_bytes: int
    batch: int
    seq_len: int
    images: int
    tiles: int
    world: int = 1
    in_backward: bool = False  # optimizer_in_backward: gradient_bytes is the largest single gradient

    @property
    def estimate(self) -> MemoryEstimate:
        """The plan as the inference planner's parts (llama_vision/memory.py): image keys/values and
        every other transient of the step are in `activations`; there is no KV cache in training."""
        return MemoryEstimate(
            weights=self.weight_bytes,
            kv_cache=0,
            image_kv=0,
            activations=self.activation_bytes,
            gradients=self.gradient_bytes,
            optimizer=self.optimizer_bytes,
        )

    def table(self) -> str:
        def gib(n: int) -> str:
            return f"{n / GiB:8.3f} GiB"

        rows = [
            f"memory plan (per process; batch {self.batch} x {self.seq_len} tokens, {self.images} images x "
            f"{self.tiles} tiles per row):",
            f"  parameters        {self.parameters:>15,}   weights    {gib(self.weight_bytes)}",
            f"  trainable         {self.trainable:>15,}   gradients  {gib(self.gradient_bytes)}"
            + ("  (stepped in backward: one at a time, the largest)" if self.in_backward else ""),
            f"  optimizer state (AdamW)              {gib(self.optimizer_bytes)}",
            f"  activations and temporaries (peak)   {gib(self.activation_bytes)}",
            f"  peak                                 {gib(self.peak_bytes)}",
        ]
        return "\n".join(rows)


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of the storages that ops create, and the peak of what is alive at once."""

    def __init__(self, ignore: set[int]) -> None:
        super().__init__()
        self.ignore = ignore  # storages that exist outside (the weights)
        self.refs: dict[int, list[int]] = {}  # storage -> [live tensors on it, bytes]
        self.live = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.ignore:
            return
        entry = self.refs.get(key)
        if entry is None:
            entry = self.refs[key] = [0, storage.nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[key]


class _FusedAttention(torch.autograd.Function):
    """Stands in for SDPA while planning, with the memory of a fused kernel (flash or memory-efficient
    attention, what CUDA runs): q, k, v, the output and the log-sum-exp kept for backward, never the
    T x S attention weights. On the meta device SDPA would take the math path, which materialises them
    (gigabytes for 4 tiles of 1601 tokens)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return _FusedAttention.apply(q, k, v)


def plan_memory(
    model_config: LlamaVisionConfig,
    config: TrainConfig,
    *,
    batch: int | None = None,
    seq_len: int | None = None,
    images: int = 1,
    tiles: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    world: int = 1,
) -> MemoryPlan:
    """The plan for `model_config` trained as `config` says (mode, LoRA, checkpointing, batch_size,
    max_length, max_tiles unless given here); weights in `dtype` (trained parameters in float32)."""
    from llama_vision.finetune.tags import pooled
    from llama_vision.finetune.train import adamw, checkpoint_layers, token_loss

    batch = batch or config.batch_size
    seq_len = seq_len or config.max_length
    tiles = tiles or config.max_tiles or model_config.vision.max_num_tiles
    model = _planned_model(model_config, config, dtype)
    if config.activation_checkpointing:
        checkpoint_layers(model)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    weight_bytes, grad_bytes, optimizer_bytes = _state_bytes(model, config)

    tracker = _LiveBytes({p.untyped_storage()._cdata for p in params})
    fsdp = world > 1 and config.distributed == "fsdp"
    if fsdp:
        optimizer: Any = adamw(trainable, 1e-4, fsdp=True)
    else:
        optimizer = _FusedAdamWMemory(trainable, in_backward=config.optimizer_in_backward)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32)
    with tracker, mock.patch.object(F, "scaled_dot_product_attention", _fused_sdpa):
        for _ in range(2):
            with torch.device("meta"):
                inputs = _worst_case_batch(model_config, batch, seq_len, images, tiles)
            with autocast:
                if config.mode == "vision":  # the pooled tokens; the tag head's few kilobytes left out
                    loss = pooled(model, inputs).float().square().mean()
                else:
                    loss, _, _ = token_loss(model, inputs)
            loss.backward()
            del loss, inputs
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if config.optimizer_in_backward:  # one gradient at a time (the largest counts)
        grad_bytes = max((p.numel() * p.element_size() for p in trainable), default=0)
    shard = world if config.distributed == "fsdp" and world > 1 else 1
    weight_bytes, grad_bytes, optimizer_bytes = (
        weight_bytes // shard,
        grad_bytes // shard,
        optimizer_bytes // shard,
    )
    # the tracked peak holds gradients and optimizer state as they were alive at that moment
    activation_bytes = max(tracker.peak - (grad_bytes + optimizer_bytes) * shard, 0)
    peak = weight_bytes + grad_bytes + optimizer_bytes + activation_bytes
    return MemoryPlan(
        parameters=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in trainable),
        weight_bytes=weight_bytes,
        gradient_bytes=grad_bytes,
        optimizer_bytes=optimizer_bytes,
        activation_bytes=activation_bytes,
        peak_bytes=peak,
        batch=batch,
        seq_len=seq_len,
        images=images,
        tiles=tiles,
        world=world,
        in_backward=config.optimizer_in_backward,
    )


def _planned_model(model_config: LlamaVisionConfig, config: TrainConfig, dtype: torch.dtype) -> nn.Module:
    """The run's model on the meta device: weights in `dtype`, the mode's trained parameters (LoRA
    layers added) in float32, as the Trainer sets them up."""
    from llama_vision.finetune.train import select_trainable

    with torch.device("meta"):
        model = LlamaVisionModel(model_config).to(dtype)
    select_trainable(model, replace(config, mode="lora") if config.mode == "qlora" else config)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


class _FusedAdamWMemory:
    """What the trainer's fused AdamW (train.adamw) allocates, on the meta device, where PyTorch's
    fused kernel does not run: both moments of every trained parameter at its first step, and no
    temporaries (the kernel updates each parameter in one pass). `in_backward`: as train.StepInBackward,
    each parameter is stepped and its gradient freed as soon as the gradient is complete."""

    def __init__(self, params: list[torch.Tensor], in_backward: bool = False) -> None:
        self.params, self.state = params, {}
        if in_backward:
            for p in params:
                p.register_post_accumulate_grad_hook(self._step_one)

    def _step_one(self, p: torch.Tensor) -> None:
        if p not in self.state:
            self.state[p] = (torch.zeros_like(p), torch.zeros_like(p))
        p.grad = None

    def step(self) -> None:
        for p in self.params:
            if p.grad is not None:
                self._step_one(p)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def _state_bytes(model: nn.Module, config: TrainConfig) -> tuple[int, int, int]:
    """Weights (QLoRA: its base in NF4), gradients and AdamW's two moments of the trained parameters."""
    nf4 = _qlora_quantized(model) if config.mode == "qlora" else set()
    weights = sum(parameter_bytes(model, quant="nf4" if nf4 else None, quantized=nf4.__contains__).values())
    gradients = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights, gradients, 2 * gradients  # the moments in the trained parameters' float32


def _worst_case_batch(
    config: LlamaVisionConfig, batch: int, seq_len: int, images: int, tiles: int
) -> dict[str, torch.Tensor]:
    """Meta tensors shaped like a collated batch: full rows, all tokens trained, images with all tiles.
    attention_mask is left out: with no padding the model takes the same path (causal kernel)."""
    v = config.vision
    ids = torch.zeros(batch, seq_len, dtype=torch.int64)
    inputs = {"input_ids": ids, "labels": torch.zeros_like(ids)}
    if images:
        inputs.update(
            pixel_values=torch.zeros(batch, images, v.max_num_tiles, 3, v.image_size, v.image_size),
            aspect_ratio_ids=torch.ones(batch, images, dtype=torch.int64),
            aspect_ratio_mask=torch.ones(batch, images, v.max_num_tiles, dtype=torch.int64),
            cross_attention_mask=torch.ones(batch, seq_len, images, v.max_num_tiles, dtype=torch.int64),
        )
        inputs["aspect_ratio_mask"][:, :, tiles:] = 0
        inputs["cross_attention_mask"][:, :, :, tiles:] = 0
    return inputs


def _qlora_quantized(model: nn.Module) -> set[str]:
    """Names of the weights that QLoRA stores as NF4: every frozen linear weight (LoRA's base layers
    included) but the output layer's and the projector's, as train.quantize_frozen does."""
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name not in ("language_model.lm_head", "multi_modal_projector")
        and not module.weight.requires_grad
    }


def training_estimate(
    config: LlamaVisionConfig,
    mode: str,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_tiles: int | None = None,
    images: int = 1,
    context: int = 2048,
    batch: int = 1,
    world: int = 1,
) -> MemoryEstimate:
    """Per device, fine-tuning `config` in `mode` with the recipes' settings (LoRA's defaults,
    activation checkpointing) on rows of `context` tokens with `images` images of `max_tiles` tiles,
    FSDP over `world` processes: what `llama-vision estimate --mode` prints. Weights, gradients and
    optimizer state are the dry-run plan's own (`_state_bytes`); the activations come from the formula
    of llama_vision/memory.py, as simulating a step of 11B or 90B takes minutes."""
    tiles = config.vision.max_num_tiles if max_tiles is None else max_tiles
    check_options(config, tiles, images, context, batch, None, world)
    train = TrainConfig(model="estimate", mode=mode, activation_checkpointing=True, batch_size=batch,
                        max_length=context, max_tiles=tiles, distributed="fsdp")  # fmt: skip
    weights, gradients, optimizer = (
        n // world for n in _state_bytes(_planned_model(config, train, dtype), train)
    )
    size = torch.finfo(dtype).bits // 8
    return MemoryEstimate(
        weights=weights,
        kv_cache=0,
        image_kv=0,  # in the activations
        activations=training_activation_bytes(config, tiles, images, context, batch, size),
        gradients=gradients,
        optimizer=optimizer,
    )


def plan_for(trainer: Any) -> MemoryPlan:
    """The plan of a Trainer's run (its model config, settings and number of processes)."""
    c = trainer.config
    dtype = next(p.dtype for p in trainer.model.parameters() if not p.requires_grad) if any(
        not p.requires_grad for p in trainer.model.parameters()
    ) else torch.float32  # fmt: skip
    if c.mode == "qlora":
        dtype = torch.bfloat16
    images = 1  # mode vision: one picture a record
    if c.mode != "vision":
        images = max((sum(1 for m in e.messages for i in _items(m) if i["type"] == "image")
                      for e in trainer.examples[:1000]), default=0)  # fmt: skip
    return plan_memory(trainer.model_config, c, images=images, dtype=dtype, world=trainer.d.world)


def _items(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message["content"]
    return [{"type": "text"}] if isinstance(content, str) else content
