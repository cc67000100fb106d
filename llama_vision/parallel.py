"""Tensor parallelism over torch.distributed: DTensor's `parallelize_module` on our plain modules, each
rank reading only its shard of every split weight while the checkpoint loads.

    torchrun --nproc-per-node 2 my_script.py          # in it:
    mesh = tp_mesh()                                   # one process per device, gloo on the CPU, nccl on GPUs
    model = load_checkpoint(path, dtype=torch.bfloat16, hooks=[tp_hooks(mesh)])
    Engine(model) ...                                  # every rank runs the same requests

The plan (Megatron-style, one all-reduce per attention block and per MLP):
- text decoder and cross-attention layers: q/k/v and gate/up projections column-parallel (each rank has
  H/TP query heads, Hkv/TP key/value heads, F/TP MLP channels), o/down row-parallel (partial sums
  all-reduced). The image keys/values of a cross-attention layer come from its column-parallel k/v
  projections, so they are held sharded by head too, like the KV cache.
- vision encoder: q/k/v and fc1 column-parallel, o and fc2 row-parallel.
- output layer: column-parallel over the vocabulary, gathered to whole logits on every rank.
- replicated: embeddings, norms, gates, the patch convolution, the position embeddings, the projector.
Attention modules get their local head counts (`n_heads`, `n_kv_heads` divided by TP), which is what
their reshapes and the engine's cache sizes read. Head counts, MLP widths and the vocabulary must be
divisible by TP.

Loading (`tp_hooks`): `prepare` parallelizes the meta-device model, so every split parameter becomes a
DTensor with its placement; `part` turns each placement into the slice this rank reads (sliced reads,
reading.py), and `transform` wraps the slice as the local shard of a DTensor. No rank reads another's
shard of a split tensor.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from llama_vision.adapters.cross_attention import CrossAttentionLayer
from llama_vision.model import LlamaVisionModel
from llama_vision.reading import Part
from llama_vision.weights import LoadHooks


def tp_mesh(device_type: str | None = None) -> DeviceMesh:
    """A 1-D mesh over all ranks of the job (torchrun's environment); gloo on the CPU, nccl on CUDA."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", 1))
    return init_device_mesh(device_type, (world,))


def plan(model: LlamaVisionModel) -> dict[str, object]:
    """Module name -> ParallelStyle for every split linear layer."""
    styles: dict[str, object] = {}
    col, row = ColwiseParallel, RowwiseParallel
    for i, layer in enumerate(model.language_model.model.layers):
        attn = "cross_attn" if isinstance(layer, CrossAttentionLayer) else "self_attn"
        prefix = f"language_model.model.layers.{i}"
        styles |= {f"{prefix}.{attn}.{x}_proj": col() for x in "qkv"}
        styles |= {f"{prefix}.{attn}.o_proj": row(), f"{prefix}.mlp.down_proj": row()}
        styles |= {f"{prefix}.mlp.gate_proj": col(), f"{prefix}.mlp.up_proj": col()}
    vision = model.vision_model
    for stack in ("transformer", "global_transformer"):
        for i in range(len(getattr(vision, stack).layers)):
            prefix = f"vision_model.{stack}.layers.{i}"
            styles |= {f"{prefix}.self_attn.{x}_proj": col() for x in "qkv"}
            styles |= {
                f"{prefix}.self_attn.o_proj": row(),
                f"{prefix}.mlp.fc1": col(),
                f"{prefix}.mlp.fc2": row(),
            }
    styles["language_model.lm_head"] = col(output_layouts=Replicate())
    return styles


def parallelize(model: LlamaVisionModel, mesh: DeviceMesh) -> LlamaVisionModel:
    """Split `model` over `mesh` in place (on the meta device before loading, or a loaded model)."""
    tp = mesh.size()
    t, v = model.config.text, model.config.vision
    sizes = {
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "intermediate_size": t.intermediate_size,
        "vocab_size": t.vocab_size,
        "vision attention_heads": v.attention_heads,
        "vision intermediate_size": v.intermediate_size,
    }
    bad = {k: n for k, n in sizes.items() if n % tp}
    if bad:
        raise ValueError(f"tensor parallelism over {tp} devices needs these divisible by {tp}: {bad}")
    for module in model.modules():
        if hasattr(module, "n_heads"):  # SelfAttention, CrossAttention, VisionAttention
            module.n_heads //= tp
        if hasattr(module, "n_kv_heads"):
            module.n_kv_heads //= tp
    return parallelize_module(model, mesh, plan(model))


def tp_hooks(mesh: DeviceMesh) -> LoadHooks:
    """Loader hooks: parallelize the meta model, read only this rank's slices, wrap them as DTensors."""
    layouts: dict[str, DTensor] = {}  # parameter name -> its meta DTensor (placement, global shape)

    def prepare(model: LlamaVisionModel) -> None:
        parallelize(model, mesh)
        layouts.update({k: p for k, p in model.named_parameters() if isinstance(p, DTensor)})

    def part(name: str, shape: tuple[int, ...]) -> Part | None:
        p = layouts.get(name)
        if p is None or not isinstance(p.placements[0], Shard):
            return None
        dim = p.placements[0].dim % len(shape)
        size = shape[dim] // mesh.size()
        rank = mesh.get_local_rank()
        return dim, rank * size, (rank + 1) * size

    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
        p = layouts.get(name)
        if p is None:
            return tensor
        local = DTensor.from_local(
            tensor, mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )
        return nn.Parameter(local, requires_grad=False)

    return LoadHooks(prepare=prepare, part=part, transform=transform)
