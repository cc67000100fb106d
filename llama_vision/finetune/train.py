"""The fine-tuning loop: `train(TrainConfig)` on one process or under torchrun (DDP or FSDP2).

Modes (what has requires_grad; everything else is frozen):
- `adapters`: the cross-attention layers and the projector (Meta's recipe), plus the vision encoder
  with `train_vision`;
- `lora`: LoRA layers from peft (lora.py), by default on the vision encoder and the cross-attention
  layers (torchtune's recipe);
- `qlora`: the same on a base whose frozen linear layers are 4-bit NF4 (bitsandbytes `Linear4bit`);
- `full`: every parameter but the parts named in `freeze`; with `preset` + `tokenizer` instead of
  `model`, a new model from scratch;
- `vision`: the vision encoder and the projector, as an image tagger with a head of its own (tags.py),
  the first stage of a model trained from scratch.

Transforms are applied to the built model from outside, in an order where none hides a layer from the
next: quantization, LoRA, activation checkpointing (torch's composable `checkpoint` on every text and
vision layer: hooks, no wrapper modules, so names stay the checkpoint keys), then DDP or `fully_shard`.
Trained parameters are kept in float32; frozen weights stay in `dtype`, with bf16 autocast.

The loss is the mean cross-entropy over the trained tokens of the whole global batch: each pass adds
its sum of token losses divided by the global count of trained tokens (summed over passes and
processes before the first pass), so gradient accumulation and data parallelism give the gradients of
one pass over the global batch. Data order is a permutation per epoch seeded by (seed, epoch), with
`group_by_length` regrouped into batches of similar text lengths in shuffled order, and step s reads
global batch s of it (the incomplete last batch of an epoch is dropped): the data position is a
function of the step, and resuming restores the step, the weights, AdamW's state and the generators.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from llama_vision import memory
from llama_vision.adapters.cross_attention import CrossAttentionLayer
from llama_vision.api import LlamaVision
from llama_vision.config import LlamaVisionConfig, get_preset
from llama_vision.encoders.vision import VisionLayer
from llama_vision.finetune import checkpoint as ckpt
from llama_vision.finetune.collate import IGNORE, Collator
from llama_vision.finetune.config import TrainConfig
from llama_vision.finetune.data import load_examples, text_length
from llama_vision.finetune.evaluate import ExactMatch, exact_match, held_out_loss, lockstep_exact_match
from llama_vision.finetune.lora import apply_lora, has_lora, read_adapter, save_adapter
from llama_vision.finetune.report import TensorBoard, summary_writer_class
from llama_vision.finetune.tags import (
    TagCollator,
    TagLoss,
    label_channels,
    load_head,
    load_tagged,
    new_head,
    save_head,
    tag_vocabulary,
)
from llama_vision.memory import PART_NAMES, PARTS, part_of
from llama_vision.model import LlamaVisionModel
from llama_vision.processor import Processor
from llama_vision.text import DecoderLayer
from llama_vision.tokenizer import Tokenizer
from llama_vision.weights import hf_key, load_checkpoint, save_checkpoint

GROUP_BATCHES = 64  # group_by_length sorts runs of this many global batches
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The tanh gates: cross-attention layers (attention, MLP), the vision encoder's global layers and its
# tile-position embeddings (module names as in the Hugging Face checkpoints).
GATES = ("cross_attn_attn_gate", "cross_attn_mlp_gate", "gate_attn", "gate_ffn", "gate")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")  # fmt: skip


class TrainingStopped(RuntimeError):
    """The run stopped on a non-finite loss or gradient; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    output: Path
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss of the steps run here
    final: Path | None = None


# ----------------------------------------------------------------------------- building


def build_model(config: TrainConfig, device: torch.device) -> tuple[LlamaVisionModel, Tokenizer]:
    dtype = None if config.dtype is None else DTYPES[config.dtype]
    if config.model is not None:
        tokenizer = Tokenizer.from_dir(config.model)
        model = load_checkpoint(config.model, device=device, dtype=dtype)
        return model, tokenizer
    tokenizer_path = Path(config.tokenizer)
    tokenizer = (
        Tokenizer.from_dir(tokenizer_path) if tokenizer_path.is_dir() else Tokenizer.from_file(tokenizer_path)
    )
    with torch.device(device):
        model = LlamaVisionModel(preset_config(config.preset))
    init_weights(model, config.seed, vision_positions=config.vision_positions, patch_std=config.patch_std)
    return model.to(dtype or torch.float32), tokenizer


def preset_config(preset: str) -> LlamaVisionConfig:
    """A preset's name, or the path of a Hugging Face config.json (an architecture of one's own)."""
    if preset.endswith(".json"):
        path = Path(preset)
        try:
            return LlamaVisionConfig.from_hf(json.loads(path.read_text(encoding="utf-8")), str(path))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"preset {preset}: cannot read it as a config.json ({e})") from None
    return get_preset(preset)


@torch.no_grad()
def init_weights(
    model: LlamaVisionModel,
    seed: int,
    std: float = 0.02,
    gate: float = 0.5,
    vision_positions: str = "random",
    patch_std: float | None = None,
) -> None:
    """Initialise a model trained from scratch: normal(0, std) matrices and embeddings, zero biases,
    norms 1, every tanh gate at `gate`; the vision position tables normal(0, std) too, or with
    `vision_positions="sincos"` a grid of sines (`grid_positions`).

    The constructor's zero gates suit new cross-attention layers in a trained text model (they pass
    its text through), but from scratch they stall learning: what a zero gate holds back gets no
    gradient, so neither the vision encoder nor the cross-attention layers learn until the gates creep
    open (after 250 steps of the embedded recipe they were still below 0.02 and answers were at
    chance)."""
    if vision_positions not in ("random", "sincos"):
        raise ValueError(f"vision_positions must be 'random' or 'sincos', got {vision_positions!r}")
    g = torch.Generator(device=model.device).manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            module.weight.normal_(0.0, std, generator=g)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] in GATES:
            p.fill_(gate)
    vision = model.vision_model
    position = vision.gated_positional_embedding
    for p in (vision.class_embedding, position.embedding, position.tile_embedding.weight):
        p.normal_(0.0, std, generator=g)
    if patch_std is not None:  # after the loop above, so the other weights keep their draws
        vision.patch_embedding.weight.normal_(0.0, patch_std, generator=g)
    if vision_positions == "sincos":
        grid_positions(vision)


@torch.no_grad()
def grid_positions(vision: nn.Module) -> None:
    """Set the vision encoder's position tables to `sincos_2d` of each patch's place: within its tile
    for the local table, within the whole grid of tiles for each aspect ratio's table (row-major, as
    the processor cuts tiles); the class token and the padding id get zeros."""
    position = vision.gated_positional_embedding
    side = vision.config.image_size // vision.config.patch_size  # patches along a tile's side
    rows, cols = torch.arange(side).repeat_interleave(side), torch.arange(side).repeat(side)  # row-major
    position.embedding.zero_()
    position.embedding[1:] = sincos_2d(rows, cols, position.embedding.shape[1])
    tiles = position.tile_embedding.weight.view(-1, *position.shape)  # ids, tiles, 1 + patches, D
    tiles.zero_()
    for k, (high, wide) in enumerate(vision.config.supported_aspect_ratios, start=1):
        for t in range(high * wide):
            r, c = divmod(t, wide)
            tiles[k, t, 1:] = sincos_2d(r * side + rows, c * side + cols, tiles.shape[-1])


def sincos_2d(rows: torch.Tensor, cols: torch.Tensor, dim: int, scale: float = 0.5) -> torch.Tensor:
    """(len(rows), dim): sines and cosines of patch coordinates, half the features for each axis, wave
    lengths from 6 to 200 patches, at `scale` RMS. The vision encoder's first position embeddings when
    it is trained from scratch: neighbours start alike, far patches apart, and a grid of tiles continues
    one tile's grid. Random ones at the other weights' std (0.02) are some 40 times smaller than the
    patches' own features at the start (0.87 RMS, measured on a picture of the embedded domain), so
    the encoder begins nearly blind to where a patch lies. Measured on the embedded recipe, 300 steps:
    held-out answer loss on colour questions 0.70 with these against 0.94, on counts 0.73 against
    0.93. A whole run with them and larger shapes was no better on average (README, "Embedded
    model"), so they are not the default."""
    quarter = dim // 4
    freq = 1.0 / 32.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    parts = []
    for coord in (rows, cols):
        angle = coord.to(torch.float64)[:, None] * freq
        parts += [angle.sin(), angle.cos()]
    table = F.pad(torch.cat(parts, dim=1), (0, dim - 4 * quarter))
    return (table * scale * 2**0.5).float()


def select_trainable(model: LlamaVisionModel, config: TrainConfig) -> None:
    """requires_grad by mode (LoRA and QLoRA: lora.py sets it when the layers are added)."""
    if config.mode in ("lora", "qlora"):
        apply_lora(
            model,
            rank=config.lora_rank,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            parts=config.lora_parts,
            modules=config.lora_modules,
        )
        return
    trained = {
        "full": set(PARTS),
        "adapters": {"cross_attention", "projector"},
        "vision": {"vision", "projector"},  # tags.py: the vision encoder learns alone first
    }[config.mode]
    if config.mode == "adapters" and config.train_vision:
        trained.add("vision")
    trained -= set(config.freeze)
    for name, p in model.named_parameters():
        p.requires_grad_(part_of(name, model.config) in trained)


def quantize_frozen(model: LlamaVisionModel, config: TrainConfig, device: torch.device) -> None:
    """QLoRA: every linear layer of the text decoder and vision encoder becomes a frozen 4-bit NF4
    bitsandbytes layer (the projector and the output layer stay as they are); LoRA goes on top."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ValueError("mode qlora needs bitsandbytes: pip install 'llama-vision[qlora]'") from None
    if device.type not in ("cuda", "cpu", "xpu"):
        raise ValueError(f"mode qlora: bitsandbytes has no 4-bit kernels for device {device.type!r}")
    compute = torch.bfloat16 if config.autocast is not False else torch.float32
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name in ("language_model.lm_head", "multi_modal_projector"):
            continue
        q = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute,
            quant_type="nf4",
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(module.weight.data.cpu(), requires_grad=False, quant_type="nf4")
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.data, requires_grad=False)
        q = q.to(device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)


def checkpoint_layers(model: LlamaVisionModel) -> None:
    """Activation checkpointing on every text and vision layer, through hooks (no wrapper modules)."""
    from torch.distributed._composable import checkpoint

    for module in model.modules():
        if isinstance(module, (DecoderLayer, CrossAttentionLayer, VisionLayer)):
            checkpoint(module)


def count_parameters(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Parameters by part: (trainable, total)."""
    counts = {part: [0, 0] for part in PART_NAMES}
    for name, p in model.named_parameters():
        part = part_of(name, model.config)
        n = p.numel() * (2 if p.dtype == torch.uint8 else 1)  # 4-bit weights pack two per byte
        counts[part][1] += n
        counts[part][0] += n if p.requires_grad else 0
    return {PART_NAMES[part]: (a, b) for part, (a, b) in counts.items()}


def adamw(params: Any, lr: float, betas: tuple[float, float] = (0.9, 0.999), *, fsdp: bool = False):
    """AdamW as the trainer runs it: PyTorch's fused kernel (one pass over each parameter, no
    temporaries the size of the parameters: measured on bench-small full fine-tuning, a peak 490 MB
    lower than the for-each implementation and faster), or, for FSDP2's sharded parameters, the plain
    loop. The memory plan (finetune/memory.py) and bench/finetune.py build theirs here too."""
    if fsdp:
        return torch.optim.AdamW(params, lr=lr, betas=betas, foreach=False)
    return torch.optim.AdamW(params, lr=lr, betas=betas, fused=True)


class StepInBackward:
    """AdamW that updates each trained parameter as soon as its gradient is complete in the backward
    pass (a post-accumulate-grad hook) and frees that gradient, so the gradients of all the parameters
    never exist at once: full fine-tuning peaks lower by about the trained weights' size (torchtune's
    `optimizer_in_bwd`). Each parameter has its own `adamw` with the run's settings, so a step updates
    every parameter exactly as one AdamW over `groups` would; `state_dict` is the one that AdamW would
    write, so a run resumes from either kind of checkpoint.

    The trainer arms it for the last pass of a step only (earlier passes of gradient accumulation add up
    as usual) and calls `finish`, which steps what the hooks did not reach and returns the gradient norm.
    Not possible with it: clipping by the global norm (known only after the last gradient) and more than
    one process (DDP and FSDP reduce the gradients after the hooks have run). Each parameter's gradient
    norm is read on the host as it is stepped (one device sync per parameter on a GPU); a parameter whose
    gradient is not finite is not stepped, nor is any after it."""

    def __init__(self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float]) -> None:
        self.groups = [list(g["params"]) for g in groups]
        self.optimizers = {
            p: adamw([{"params": [p], "weight_decay": g["weight_decay"]}], lr, betas)
            for g in groups
            for p in g["params"]
        }
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.optimizers]
        self.armed = False
        self._norm_sq, self.bad = 0.0, False

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """One group per parameter (setting the learning rate on each sets it for the step)."""
        return [o.param_groups[0] for o in self.optimizers.values()]

    def _hook(self, p: torch.Tensor) -> None:
        if self.armed:
            self._step(p)

    def _step(self, p: torch.Tensor) -> None:
        norm_sq = float(torch.linalg.vector_norm(p.grad).square())
        self._norm_sq += norm_sq
        self.bad = self.bad or not math.isfinite(norm_sq)
        if not self.bad:
            self.optimizers[p].step()
        p.grad = None

    def finish(self) -> float:
        """After the last pass of a step: step the parameters whose gradients came from earlier passes
        only, disarm, and return the step's gradient norm."""
        if self.armed:
            for p in self.optimizers:
                if p.grad is not None:
                    self._step(p)
        self.armed = False
        norm, self._norm_sq = math.sqrt(self._norm_sq), 0.0
        return norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.optimizers:
            p.grad = None

    def state_dict(self) -> dict[str, Any]:
        state: dict[int, Any] = {}
        groups = []
        index = 0
        for params in self.groups:
            settings = {k: v for k, v in self.optimizers[params[0]].param_groups[0].items() if k != "params"}
            for p in params:
                entry = self.optimizers[p].state_dict()["state"]
                if 0 in entry:
                    state[index] = entry[0]
                index += 1
            groups.append({**settings, "params": list(range(index - len(params), index))})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, raw: dict[str, Any]) -> None:
        params = [p for group in self.groups for p in group]
        for group in raw["param_groups"]:
            settings = {k: v for k, v in group.items() if k != "params"}
            for i in group["params"]:
                entry = {0: raw["state"][i]} if i in raw["state"] else {}
                self.optimizers[params[i]].load_state_dict(
                    {"state": entry, "param_groups": [{**settings, "params": [0]}]}
                )


def _param_lists(optimizer: Any) -> list[list[torch.Tensor]]:
    """The parameters of each group, as the optimizer's state_dict numbers them."""
    if isinstance(optimizer, StepInBackward):
        return optimizer.groups
    return [g["params"] for g in optimizer.param_groups]


def _implementation(group: dict[str, Any]) -> dict[str, Any]:
    """The implementation flags of an optimizer group, which a loaded state keeps (a checkpoint written
    by another implementation resumes with this run's)."""
    return {k: group[k] for k in ("foreach", "fused") if k in group}


# ----------------------------------------------------------------------------- the loss


def token_loss(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum of the cross-entropy over trained tokens, their count, and how many the model predicts
    right (all three tensors). Position t predicts label t + 1.

    The head runs on the hidden states of the trained positions only, in chunks of LOSS_CHUNK_BYTES of
    float32 logits, so the (B, T, vocab) logits, the largest activation of the step (11B: 1 GiB per
    2,048 positions, and as much again for their gradient), never exist. A plain output layer (an
    `nn.Linear` without hooks: one process or DDP) gets each chunk's gradients as soon as its loss is
    known (`_LinearCrossEntropy`): the chunk's logits become its gradient in place and are freed, so
    nothing is made twice. Any other head (FSDP's sharded one, LoRA on the head) has each chunk
    checkpointed instead: its logits are made again in backward, one more pass of the head. On the
    meta device (the memory planner) every position counts as trained, the planner's worst case,
    since which ones are is data the meta device does not hold."""
    labels = batch["labels"][:, 1:].flatten()  # B*(T-1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    h = model.hidden_states(**inputs)[:, :-1].flatten(0, 1)  # B*(T-1) D
    keep = labels != IGNORE
    if h.device.type == "meta":
        index = torch.arange(labels.shape[0], device=h.device)
    else:
        index = keep.nonzero().squeeze(1)
    h, labels = h.index_select(0, index), labels.index_select(0, index)  # N D, N
    decoder = model.language_model
    rows = max(1, memory.LOSS_CHUNK_BYTES // (4 * model.config.text.vocab_size))  # 11B: 523
    head = decoder.lm_head
    if _plain_head(head) and torch.is_grad_enabled():  # (evaluation: the plain chunks below)
        loss, correct = _LinearCrossEntropy.apply(h, head.weight, labels, rows)
        return loss, keep.sum(), correct
    loss = h.sum().float() * 0.0  # in the graph even with no trained position (FSDP's passes must reach it)
    correct = labels.new_zeros(())
    for start in range(0, h.shape[0], rows):
        part, hits = torch.utils.checkpoint.checkpoint(
            _chunk_loss,
            decoder,
            h[start : start + rows],
            labels[start : start + rows],
            use_reentrant=False,
            preserve_rng_state=h.device.type != "meta",  # no generator to save on the meta device
        )
        loss, correct = loss + part, correct + hits
    return loss, keep.sum(), correct


def _chunk_loss(
    decoder: nn.Module, h: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = decoder.logits(h)  # n V float32
    loss = F.cross_entropy(logits, labels, reduction="sum")
    return loss, (logits.detach().argmax(-1) == labels).sum()


def _plain_head(head: nn.Module) -> bool:
    """Whether the output layer computes `F.linear(h, weight)` and nothing else: a plain `nn.Linear`
    without bias or hooks, its weight a plain tensor (CPU inference's few-row forward, cpu_linear.py,
    computes the same product)."""
    from llama_vision.cpu_linear import blocked_forward

    forward = head.__dict__.get("forward")
    return (
        type(head) is nn.Linear
        and head.bias is None
        and type(head.weight) in (torch.Tensor, nn.Parameter)
        and not (head._forward_hooks or head._forward_pre_hooks)
        and (forward is None or getattr(forward, "__func__", None) is blocked_forward)
    )


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `F.linear(h, weight)` (float32 logits) against `labels`, and the count of
    right predictions, computed `rows` positions at a time with the gradients of each chunk made in the
    forward pass: softmax minus the one-hot labels, in the logits' own buffer, times the weight (for
    `h`) and times `h` (for the weight, summed over the chunks). Backward only scales them. The same
    products as autograd's backward of the plain head (under autocast in its dtype), none made twice."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int):
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        correct = labels.new_zeros(())
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        dtype = _product_dtype(h, weight)
        w = weight.to(dtype)  # once for every chunk (autocast would cast it in each product)
        for start in range(0, h.shape[0], rows):
            part, target = h[start : start + rows].to(dtype), labels[start : start + rows]
            logits = F.linear(part, w).float()  # n V
            picked = logits.gather(1, target[:, None])[:, 0]
            best, index = logits.max(-1)
            correct += (index == target).sum()
            # the softmax in place (logsumexp would make an n x V temporary)
            grad = logits.sub_(best[:, None]).exp_()
            total = grad.sum(-1)
            loss += (best + total.log() - picked).sum()
            grad.div_(total[:, None])
            grad.scatter_add_(1, target[:, None], grad.new_full((target.shape[0], 1), -1.0))
            grad = grad.to(dtype)
            if grad_h is not None:
                grad_h[start : start + rows] = grad @ w
            if grad_w is not None:
                if grad_w.dtype == dtype:
                    grad_w.addmm_(grad.t(), part)
                else:  # autocast: the product in its dtype, summed in the weight's
                    grad_w += grad.t() @ part  # V D
            del logits, grad
        del w
        ctx.grad_h, ctx.grad_w, ctx.spent = grad_h, grad_w, False
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_correct: torch.Tensor):
        if ctx.spent:
            raise RuntimeError("token_loss's gradients are made once: backward through it only once")
        grad_h, grad_w = ctx.grad_h, ctx.grad_w
        ctx.grad_h = ctx.grad_w = None  # the only references left: autograd takes them over
        ctx.spent = True
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss.to(grad_w.dtype))
        return grad_h, grad_w, None, None


def _product_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype autocast (if on) gives `F.linear(h, weight)` on this device, else the inputs' own. The
    memory planner's meta tensors stand for the CPU's."""
    device = "cpu" if h.device.type == "meta" else h.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.result_type(h, weight)


class LossModule(nn.Module):
    """The model and its loss as one module, which DDP wraps (so the model itself stays unwrapped and
    keeps its names).

    Every pass must take part in the same gradient reductions on every process: a text-only batch
    skips the vision tower and the cross-attention layers. DDP (with `find_unused_parameters`) copes
    with unused parameters, but not with a pass that reaches no trained parameter at all (LoRA on the
    vision side only), so such a pass gets a zero term over the trained parameters. FSDP2 reduces only
    the parameters that got a gradient, and only when the model's output needs one: `zero_grad_term`
    adds the term to the output itself, always.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss, n, correct = token_loss(self.model, batch)
        if torch.is_grad_enabled() and not loss.requires_grad:
            loss = loss + sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
        return loss, n, correct


def zero_grad_term(model: nn.Module, output: torch.Tensor) -> torch.Tensor:
    """FSDP: the output plus zero times every trained parameter of the root group, so each process
    reduces the same gradients. Runs inside FSDP's forward of `hidden_states`, while those parameters
    are gathered (the self-attention layers' are sharded DTensors by then; they always get gradients)."""
    from torch.distributed.tensor import DTensor

    if not torch.is_grad_enabled():
        return output
    gathered = [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]
    return output + sum(p.sum() for p in gathered) * 0.0


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to lr x min_lr_ratio at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(total_steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / decay_steps, 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


# ----------------------------------------------------------------------------- the run


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # CUDA tensors (DDP, FSDP) through NCCL; the host-side sums, barriers and gathered objects of
        # the loop (Dist.sum, the RNG states) are CPU tensors, which NCCL does not take: gloo
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(config: TrainConfig, d: Dist) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    if torch.cuda.is_available():
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


class Trainer:
    def __init__(self, config: TrainConfig, *, log: Callable[[str], None] | None = None) -> None:
        if config.data is None:
            raise ValueError("data: give the training data (a JSONL file or a datasets directory)")
        if config.output is None:
            raise ValueError("output: give the output directory")
        self.config = config
        self.d = init_distributed()
        self.device = pick_device(config, self.d)
        self.say = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.output = Path(config.output)
        torch.manual_seed(config.seed)

        if config.tensorboard_dir is not None:
            summary_writer_class()  # a missing package is said before the model loads
        self.tagging = config.mode == "vision"
        load = load_tagged if self.tagging else load_examples
        self.examples: list[Any] = load(config.data, skip_bad=config.skip_bad)
        self.eval_examples: list[Any] = (
            load(config.eval_data, skip_bad=config.skip_bad) if config.eval_data else []
        )
        # QLoRA: load on the CPU and quantize layer by layer onto the device, which never holds the bf16 base
        cpu = torch.device("cpu")
        self.model, self.tokenizer = build_model(config, cpu if config.mode == "qlora" else self.device)
        self.model_config: LlamaVisionConfig = self.model.config
        self.collator: Any = Collator(
            self.tokenizer, self.model_config, max_length=config.max_length, max_num_tiles=config.max_tiles
        )
        self.head: nn.Module | None = None
        if self.tagging:
            if self.d.world > 1 and config.distributed == "fsdp":
                raise ValueError("mode vision: distributed fsdp is not supported; use ddp (the default)")
            self.tag_labels = tag_vocabulary(self.examples)
            channels = label_channels(config.data, self.examples)
            if self.eval_examples and label_channels(config.eval_data, self.eval_examples) != channels:
                raise ValueError(
                    f"eval_data {config.eval_data}: its label maps must name the classes of data's"
                )
            self.collator = TagCollator(
                self.model_config, self.tag_labels, max_num_tiles=config.max_tiles, channels=channels
            )
            self.head = new_head(self.model_config, len(self.tag_labels), config.seed, channels).to(
                self.device
            )
        if config.mode == "qlora":
            quantize_frozen(self.model, config, self.device)
            self.model.to(self.device)
        select_trainable(self.model, config)
        for p in self.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # trained parameters in float32 (master weights)
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(f"mode {config.mode}: no parameter is trainable")
        self.autocast = self._autocast()

        self.global_batch = config.batch_size * config.grad_accum * self.d.world
        self.lengths = [text_length(e) for e in self.examples] if config.group_by_length else []
        self._order: tuple[int, list[int]] = (-1, [])
        self.steps_per_epoch = len(self.examples) // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{config.data}: {len(self.examples)} examples are fewer than one global batch of "
                f"{self.global_batch} (batch_size x grad_accum x processes)"
            )
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.step = 0

    # -- setup that dry runs skip

    def prepare(self) -> None:
        """Activation checkpointing, the parallel wrapper and the optimizer; then resume if asked."""
        if self.config.activation_checkpointing:
            checkpoint_layers(self.model)
        self.fsdp = self.d.world > 1 and self.config.distributed == "fsdp"
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

            for layer in self.model.modules():
                if isinstance(layer, DecoderLayer):  # they always run (LossModule says why it matters)
                    # Frozen layers keep their gathered weights from forward to backward: a backward
                    # that need not pass through them (a text-only batch when only image-side
                    # parameters train) would otherwise gather them on some processes only and hang.
                    frozen = not any(p.requires_grad for p in layer.parameters())
                    fully_shard(layer, reshard_after_forward=not frozen)
            fully_shard(self.model)
            hidden_states = self.model.hidden_states  # the loss's entry (token_loss), not forward

            def gathered_hidden_states(*args: Any, **kwargs: Any) -> torch.Tensor:
                return zero_grad_term(self.model, hidden_states(*args, **kwargs))

            # FSDP's hooks wrap __call__ only: a method the loss calls must be registered, and the zero
            # term goes inside FSDP's own pre/post-forward, where the root group is gathered
            self.model.hidden_states = gathered_hidden_states
            register_fsdp_forward_method(self.model, "hidden_states")
        self.runner: nn.Module = (
            TagLoss(self.model, self.head) if self.head is not None else LossModule(self.model)
        )
        if self.d.world > 1 and not self.fsdp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.runner = nn.parallel.DistributedDataParallel(
                self.runner, device_ids=ids, find_unused_parameters=True
            )  # text-only batches leave the vision tower and the adapters without gradients
        self.named_trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.head is not None:
            self.named_trainable += [(f"tag_head.{n}", p) for n, p in self.head.named_parameters()]
        c = self.config
        decay = [p for n, p in self.named_trainable if p.dim() >= 2]
        no_decay = [p for n, p in self.named_trainable if p.dim() < 2]  # norms, biases, gates
        groups = [
            {"params": decay, "weight_decay": c.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        if c.optimizer_in_backward:
            if self.d.world > 1:
                raise ValueError(
                    "optimizer_in_backward: one process only (DDP and FSDP reduce the gradients after "
                    "the backward pass)"
                )
            self.optimizer: Any = StepInBackward(groups, c.lr, tuple(c.betas))
        else:
            self.optimizer = adamw(groups, c.lr, tuple(c.betas), fsdp=self.fsdp)
        if self.d.main:
            self.output.mkdir(parents=True, exist_ok=True)
        self.d.barrier()
        if c.resume:
            self.resume()
        self.tensorboard = None
        if self.d.main and c.tensorboard_dir is not None:
            # resumed: hide what a killed run logged after the checkpoint, so the curves are one run
            self.tensorboard = TensorBoard(c.tensorboard_dir, purge_step=self.step + 1 if self.step else None)

    def _autocast(self) -> contextlib.AbstractContextManager:
        c = self.config
        low_precision = any(p.dtype in (torch.bfloat16, torch.float16) for p in self.model.parameters())
        wanted = c.autocast if c.autocast is not None else (
            low_precision or (self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        )  # fmt: skip
        if not wanted:
            return contextlib.nullcontext()
        if self.device.type == "cpu" and not cpu_has_bf16():
            self.say(
                "warning: bf16 autocast on a CPU without bfloat16 instructions "
                f"({torch.backends.cpu.get_cpu_capability()}) is many times slower than float32; "
                "set autocast: false"
            )
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    # -- data

    def order(self, epoch: int) -> list[int]:
        """Epoch `epoch`'s permutation of the examples; global batch s is its s-th slice."""
        if self._order[0] != epoch:
            self._order = (epoch, self._permutation(epoch))
        return self._order[1]

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.examples), generator=g).tolist()
        if not self.config.group_by_length:
            return order
        # Sort each run of GROUP_BATCHES global batches by length, cut it into global batches and shuffle
        # those: a batch holds rows of similar length (less padding), and the batches are random.
        size = self.global_batch
        kept = len(order) // size * size  # the incomplete last batch stays last and is dropped
        batches = []
        for start in range(0, kept, size * GROUP_BATCHES):
            run = sorted(
                order[start : min(start + size * GROUP_BATCHES, kept)], key=lambda i: -self.lengths[i]
            )
            batches += [run[k : k + size] for k in range(0, len(run), size)]
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return [i for batch in shuffled for i in batch] + order[kept:]

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This process's passes of global batch `step`."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        indices = self.order(epoch)[offset * self.global_batch : (offset + 1) * self.global_batch]
        per_rank = self.config.batch_size * self.config.grad_accum
        mine = indices[self.d.rank * per_rank : (self.d.rank + 1) * per_rank]
        bs = self.config.batch_size
        return [self.to_device(self.collator([self.examples[i] for i in mine[k : k + bs]]))
                for k in range(0, per_rank, bs)]  # fmt: skip

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    # -- the loop

    def run(self) -> TrainResult:
        try:
            return self._run()
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()

    def log(self, log_file: Path, record: dict[str, Any]) -> None:
        """One record to log.jsonl and TensorBoard (main process only)."""
        with open(log_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            self.tensorboard.write(record)

    def _run(self) -> TrainResult:
        result = TrainResult(self.output)
        progress = self.config.progress if self.config.progress is not None else sys.stderr.isatty()
        log_file = self.output / "log.jsonl"
        self.runner.train()
        start = time.perf_counter()
        while self.step < self.total_steps:
            step = self.step
            t0 = time.perf_counter()
            record = self.train_step(step)
            elapsed = time.perf_counter() - t0
            record.update(
                samples_per_s=self.global_batch / elapsed,
                tokens_per_s=record.pop("input_tokens") / elapsed,
                peak_memory_mb=peak_memory_mb(self.device),
            )
            result.losses[step + 1] = record["loss"]
            self.step = step + 1
            if self.d.main and (self.step % self.config.log_every == 0 or self.step == self.total_steps):
                self.log(log_file, record)
            if self.d.main and progress:
                print(
                    f"\rstep {self.step}/{self.total_steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                    f"{record['samples_per_s']:.2f} samples/s  {record['tokens_per_s']:.0f} tokens/s",
                    end="", file=sys.stderr, flush=True,
                )  # fmt: skip
            if (
                self.config.eval_every
                and self.step % self.config.eval_every == 0
                and self.step < self.total_steps
            ):
                self.evaluate(log_file)
            if (
                self.config.save_every
                and self.step % self.config.save_every == 0
                and self.step < self.total_steps
            ):
                self.save(f"checkpoint-{self.step}")
        if self.d.main and progress:
            print(file=sys.stderr)
        if self.eval_examples:
            self.evaluate(log_file)
        result.final = self.save("final")
        if self.d.main:
            self.say(
                f"trained {self.total_steps} steps in {time.perf_counter() - start:.1f} s; wrote {result.final}"
            )
        return result

    def train_step(self, step: int) -> dict[str, Any]:
        batches = self.micro_batches(step)
        if self.tagging:  # the loss is a mean over pictures; "tokens" are their image tokens
            local_tokens = sum(len(b["tags"]) for b in batches)
            patches = self.model_config.vision.num_patches
            input_tokens = sum(int(b["aspect_ratio_mask"].sum()) * patches for b in batches)
        else:
            local_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
            input_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        (total_tokens,) = self.d.sum(local_tokens)
        lr = learning_rate(self.config, step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        in_backward = isinstance(self.optimizer, StepInBackward)
        loss_sum, correct = 0.0, 0.0
        for k, batch in enumerate(batches):
            last = k == len(batches) - 1
            with self._sync(last), self.autocast:
                loss, _, hits = self.runner(batch)
            if in_backward:  # the update happens in backward: look at the loss before it
                if not math.isfinite(value := float(loss.detach())):
                    self._stop(step, value, None, "stopped without updating")
                self.optimizer.armed = last and total_tokens > 0
            # each pass's share of the global mean; DDP and FSDP average gradients over processes
            (loss * (self.d.world / max(total_tokens, 1))).backward()
            loss_sum, correct = loss_sum + float(loss.detach()), correct + float(hits)
        loss_sum, correct = self.d.sum(loss_sum, correct)
        loss = loss_sum / max(total_tokens, 1)
        if in_backward:
            norm = self.optimizer.finish()
            if self.optimizer.bad:
                self.optimizer.bad = False
                self._stop(step, loss, norm, "the parameters stepped before the first non-finite gradient "
                           "were updated in memory")  # fmt: skip
        else:
            params = [p for _, p in self.named_trainable]
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm or float("inf"))
            norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            if not math.isfinite(loss) or not math.isfinite(norm):
                self._stop(step, loss, norm, "stopped without updating")
            if total_tokens:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "step": step + 1,
            "epoch": step // self.steps_per_epoch,
            "loss": loss,
            "tags_exact" if self.tagging else "token_accuracy": correct / max(total_tokens, 1),
            "grad_norm": norm,
            "lr": lr,
            "tokens": int(total_tokens),
            "input_tokens": input_tokens * self.d.world,
        }

    def _stop(self, step: int, loss: float, norm: float | None, what: str) -> None:
        latest = ckpt.latest_checkpoint(self.output)
        norm_text = "" if norm is None else f" and the gradient norm {norm}"
        raise TrainingStopped(
            f"step {step + 1}: the loss is {loss}{norm_text}; {what}. "
            f"The last good checkpoint is {latest if latest else 'none (no checkpoint was written yet)'}; "
            "try a lower lr, warmup_steps, or max_grad_norm"
        )

    def _sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradients are reduced across processes on the last pass of a step only."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if isinstance(self.runner, nn.parallel.DistributedDataParallel) and not last:
            return self.runner.no_sync()
        return contextlib.nullcontext()

    # -- evaluation

    def evaluate(self, log_file: Path) -> dict[str, Any]:
        self.runner.eval()
        c = self.config
        batches = [
            self.to_device(self.collator(self.eval_examples[i : i + c.batch_size]))
            for i in range(0, len(self.eval_examples), c.batch_size)
        ]

        def loss_fn(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            with self.autocast:
                return self.runner(batch)

        record: dict[str, Any] = {"step": self.step}
        accuracy = "eval_tags_exact" if self.tagging else "eval_token_accuracy"
        record["eval_loss"], record[accuracy] = held_out_loss(loss_fn, batches)
        # a tagging run has nothing to generate. The engine calls the model's parts, which FSDP does not
        # gather: under FSDP every process answers its share through the model's forward instead
        processor = Processor(self.tokenizer, self.model_config)
        options = dict(
            batch_size=c.eval_batch_size, max_new_tokens=c.eval_max_new_tokens, max_num_tiles=c.max_tiles
        )
        em = None
        if self.fsdp and not self.tagging:
            stop_ids = sorted({*self.model_config.text.eos_token_id, *self.tokenizer.stop_ids})
            with self.autocast:
                em = lockstep_exact_match(self.model, processor, self.eval_examples, rank=self.d.rank,
                                          world=self.d.world, device=self.device, stop_ids=stop_ids, **options)  # fmt: skip
        elif self.d.main and not self.tagging:
            lv = LlamaVision(model=self.model, processor=processor)
            with self.autocast:
                em = exact_match(lv, self.eval_examples, **options)
        if em is not None and self.d.main:
            record.update(eval_exact_match=em.accuracy, eval_n=em.n)
            self.write_answers(em)
        self.d.barrier()
        self.runner.train()
        if self.d.main:
            self.log(log_file, record)
            self.say("eval: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in record.items()))  # fmt: skip
        return record

    def write_answers(self, em: ExactMatch) -> None:
        """`output/eval/step-N.jsonl`: each evaluation example's source, greedy answer, reference and
        whether they match (after normalising whitespace and case)."""
        folder = self.output / "eval"
        folder.mkdir(exist_ok=True)
        with open(folder / f"step-{self.step}.jsonl", "w", encoding="utf-8") as f:
            for example, answer, reference, match in zip(
                self.eval_examples, em.answers, em.references, em.matches
            ):
                f.write(json.dumps({"source": example.source, "answer": answer, "reference": reference,
                                    "match": match}) + "\n")  # fmt: skip

    # -- checkpoints

    def model_state(self) -> dict[str, torch.Tensor]:
        """The full state dict on the main process (gathered from the shards under FSDP)."""
        if not self.fsdp:
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def optimizer_state(self) -> dict[str, Any]:
        """AdamW's state keyed by parameter name (the same on one process, DDP and FSDP)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return get_optimizer_state_dict(self.model, self.optimizer, options=options)
        names = {id(p): n for n, p in self.named_trainable}
        raw = self.optimizer.state_dict()
        lists = _param_lists(self.optimizer)
        params = [p for group in lists for p in group]
        state = {names[id(params[i])]: entry for i, entry in raw["state"].items()}
        groups = []
        for group, raw_group in zip(lists, raw["param_groups"]):
            groups.append({**raw_group, "params": [names[id(p)] for p in group]})
        return {"state": state, "param_groups": groups}

    def save(self, name: str) -> Path:
        state = self.model_state()
        optimizer = self.optimizer_state()
        rng = [ckpt.rng_state()]
        if self.d.world > 1:
            rng = [None] * self.d.world
            dist.all_gather_object(rng, ckpt.rng_state())
        path = self.output / name
        if self.d.main:
            tmp = ckpt.temporary_dir(self.output, name)
            self.write_model(state, tmp)
            (tmp / ckpt.STATE_DIR).mkdir()
            ckpt.save_optimizer(optimizer, tmp / ckpt.STATE_DIR)
            ckpt.save_rng(rng, tmp / ckpt.STATE_DIR)
            trainer_state = {
                "step": self.step,
                "epoch": self.step // self.steps_per_epoch,
                "offset": self.step % self.steps_per_epoch,
                "global_batch": self.global_batch,
                "total_steps": self.total_steps,
                "config": self.config.to_dict(),
            }
            (tmp / ckpt.TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
            ckpt.commit(tmp, self.output, name)
            ckpt.prune(self.output, self.config.keep_checkpoints)
        self.d.barrier()
        return path

    def write_model(self, state: dict[str, torch.Tensor], directory: Path) -> None:
        if has_lora(self.model):
            save_adapter(self.model, directory, base=self.config.model, state=state)
            return
        save_checkpoint(_StateView(self.model, state), directory)
        self.copy_tokenizer(directory)
        if self.head is not None:
            save_head(self.head, self.tag_labels, directory)

    def copy_tokenizer(self, directory: Path) -> None:
        """The tokenizer files (and generation settings) next to a full checkpoint, so from_pretrained and
        transformers load it: the base checkpoint's, or, from scratch, the tokenizer file and what its
        folder holds of the same files (tokenizer_config.json with the chat template, generation_config.json)."""
        source = Path(self.config.model) if self.config.model is not None else self.tokenizer.path.parent
        if self.config.model is None:
            shutil.copy(self.tokenizer.path, directory / self.tokenizer.path.name)
        for name in TOKENIZER_FILES:
            if (source / name).is_file() and not (directory / name).exists():
                shutil.copy(source / name, directory / name)

    def resume(self) -> None:
        path = ckpt.latest_checkpoint(self.output)
        if path is None:
            self.say(f"resume: no checkpoint in {self.output}; starting from the beginning")
            return
        saved = json.loads((path / ckpt.TRAINER_STATE).read_text())
        if saved["global_batch"] != self.global_batch:
            raise ValueError(
                f"resume: {path} was trained with a global batch of {saved['global_batch']}, this run has "
                f"{self.global_batch}; the data order and the loss would not continue exactly"
            )
        if has_lora(self.model):
            state = read_adapter(self.model, path)
        else:
            state = read_checkpoint_tensors(path)
        self.load_model_state(state)
        if self.head is not None:
            load_head(self.head, self.tag_labels, path)
        self.load_optimizer_state(ckpt.load_optimizer(path / ckpt.STATE_DIR))
        ckpt.set_rng_state(ckpt.load_rng(path / ckpt.STATE_DIR, self.d.rank))
        self.step = saved["step"]
        self.say(f"resumed from {path} at step {self.step}")

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(
                self.model, state, options=StateDictOptions(full_state_dict=True, strict=False)
            )
            return
        current = self.model.state_dict()
        with torch.no_grad():
            for key, tensor in state.items():
                current[key].copy_(tensor)

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.model, self.optimizer, state, options=options)
            return
        names = {id(p): n for n, p in self.named_trainable}
        lists = _param_lists(self.optimizer)
        index = {names[id(p)]: i for i, p in enumerate(p for group in lists for p in group)}
        implementation = _implementation(self.optimizer.param_groups[0])  # every group's is the same
        if [len(g["params"]) for g in state["param_groups"]] != [len(group) for group in lists]:
            raise ValueError("resume: the checkpoint's optimizer groups do not match this run's parameters")
        raw = {
            "state": {index[name]: entry for name, entry in state["state"].items()},
            "param_groups": [
                {**g, "params": [index[n] for n in g["params"]], **implementation}
                for g in state["param_groups"]
            ],
        }
        self.optimizer.load_state_dict(raw)


def read_checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory we wrote (save_checkpoint), under our names."""
    from safetensors.torch import load_file

    state = {}
    for file in sorted(path.glob("*.safetensors")):
        if file.name.startswith("model"):
            state.update({hf_key(k): v for k, v in load_file(file).items()})
    return state


class _StateView:
    """What `save_checkpoint` reads from a model (config, dtype, state_dict), over a given state dict."""

    def __init__(self, model: LlamaVisionModel, state: dict[str, torch.Tensor]) -> None:
        self.config, self.dtype, self._state = model.config, model.dtype, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated memory on a CUDA device; on the CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX-512 BF16, AMX), which bf16 autocast needs to be
    faster than float32. On an AVX2-only CPU (2026-12-03, with other work running) the embedded recipe's
    first stage had not done 25 steps in 5 minutes under bf16 autocast; in float32 it does them in 26 s."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def train(config: TrainConfig, *, log: Callable[[str], None] | None = None) -> TrainResult:
    trainer = Trainer(config, log=log)
    trainer.prepare()
    return trainer.run()
