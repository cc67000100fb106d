"""Loading and saving checkpoints.

Formats read:
- Hugging Face: `config.json` + safetensors (one file, or shards listed in
  `model.safetensors.index.json`), with the hub's key layout (`language_model.model.*`,
  `vision_model.*`, `multi_modal_projector.*`, `language_model.lm_head.weight`) or the layout that
  transformers >= 4.52 keeps in memory and some tools save (`model.language_model.*`, `lm_head.weight`...).
- Meta: `params.json` + `consolidated.NN.pth` (meta_checkpoint.py).

The model is built on the meta device (no memory, no random initialisation), then every tensor is read
once, straight into the requested dtype and device (reading.py: plain reads in chunks of 64 MiB, no
memory map held, so resident memory grows by the loaded weights and little more; on a GPU the model is
never staged in host memory), and assigned to its module at once. Pickled `.bin` files are never
unpickled; Meta's `.pth` files are read with `weights_only=True`. Any missing, unexpected, duplicated or
mis-shaped tensor is an error that names the key and the shapes.

`LoadHooks` let a transform take part in loading, without the loader knowing what it does:
- `prepare(model)` runs on the meta-device model before any weight is read (swap or wrap modules,
  set per-rank head counts);
- `part(name, shape)` picks the slice (dim, start, stop) of a checkpoint tensor to read, so a
  tensor-parallel rank reads only its shard;
- `transform(name, tensor)` is applied to each tensor as soon as it is read (quantize it, wrap the
  shard in a DTensor), so the unquantized model never exists as a whole.

Format written: the Hugging Face hub layout, which transformers loads.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from llama_vision.config import LlamaVisionConfig
from llama_vision.encoders.image_transform import hf_preprocessor_config
from llama_vision.meta_checkpoint import is_meta_checkpoint, load_meta_shards, meta_tensors
from llama_vision.model import LlamaVisionModel
from llama_vision.reading import (
    Part,
    Source,
    TensorSource,
    release_staging,
    safetensors_entries,
    sliced_shape,
)

INDEX_FILE = "model.safetensors.index.json"

# transformers >= 4.52 in-memory names -> hub names (ours)
_NEW_LAYOUT = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)


def read_config(path: str | Path) -> LlamaVisionConfig:
    """The model configuration of a checkpoint directory in either layout."""
    path = _checkpoint_dir(path)
    for name, read in (
        ("config.json", LlamaVisionConfig.from_hf),
        ("params.json", LlamaVisionConfig.from_meta),
    ):
        if (path / name).is_file():
            return read(read_json(path / name), str(path / name))
    raise ValueError(f"{path}: no config.json (Hugging Face layout) or params.json (Meta layout) found")


@dataclass(frozen=True)
class LoadHooks:
    """What a transform adds to loading; every field is optional (see the module docstring)."""

    prepare: Callable[[LlamaVisionModel], None] | None = None
    part: Callable[[str, tuple[int, ...]], Part | None] | None = None
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None


def load_checkpoint(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = False,
    quantize: str | None = None,
    hooks: Sequence[LoadHooks] = (),
) -> LlamaVisionModel:
    """Build the model on the meta device and fill it from a checkpoint directory.

    `dtype` None keeps each tensor's stored dtype (bfloat16 for the official checkpoints). `quantize`
    "int8" or "int4" quantizes the text and cross-attention linear weights as they are read (quantize.py).
    `hooks` run in order: every `prepare`, then per tensor the first `part` that picks a slice and every
    `transform`.
    """
    path = _checkpoint_dir(path)
    config = read_config(path)
    if quantize is not None:
        from llama_vision.quantize import quantize_hooks  # torchao is optional, imported only when asked

        hooks = [*hooks, quantize_hooks(config, quantize)]
    with torch.device("meta"):
        model = LlamaVisionModel(config)
    if (path / "config.json").is_file():
        tensors = _hf_tensors(path)
    elif is_meta_checkpoint(path):
        tensors = meta_tensors(load_meta_shards(path), config)
    else:
        raise ValueError(f"{path}: params.json found but no consolidated.NN.pth weights")
    if dtype is None:  # one stored dtype for all (a float64 tensor among bfloat16 ones breaks products)
        tensors = list(tensors)  # their shapes and dtypes only: nothing is read yet
        dtype = _common_dtype(tensors)
    for hook in hooks:
        if hook.prepare is not None:
            hook.prepare(model)
    try:
        _fill(model, tensors, torch.device(device), dtype, hooks, progress)
    finally:
        release_staging()
    return model.eval()


def _fill(
    model: nn.Module,
    tensors: Iterable[tuple[str, str, torch.Tensor | Source]],
    device: torch.device,
    dtype: torch.dtype | None,
    hooks: Sequence[LoadHooks],
    progress: bool,
) -> None:
    """Read every tensor and assign it to its module as it comes, so nothing is held twice."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}  # global shapes under TP too
    done: set[str] = set()
    unexpected = []
    for n, (key, ours, tensor) in enumerate(tensors, start=1):
        if ours not in expected:
            unexpected.append(key)
            continue
        if ours in done:
            raise ValueError(f"checkpoint holds {ours!r} twice (second time as {key!r})")
        if tuple(tensor.shape) != expected[ours]:
            raise ValueError(
                f"checkpoint tensor {key!r} has shape {tuple(tensor.shape)}, but the model's {ours!r} "
                f"expects {expected[ours]}: the checkpoint does not match its config"
            )
        source = tensor if isinstance(tensor, Source) else TensorSource(tensor)
        if not source.dtype.is_floating_point:
            raise ValueError(
                f"checkpoint tensor {key!r} has dtype {source.dtype}; weights are floating point"
            )
        part = next((p for h in hooks if h.part is not None and (p := h.part(ours, expected[ours]))), None)
        sliced_shape(expected[ours], part)  # a bad slice fails here, naming it
        value = source.read(part, dtype or source.dtype, device)
        for hook in hooks:
            if hook.transform is not None:
                value = hook.transform(ours, value)
        _assign(model, ours, value)
        done.add(ours)
        if progress and (n % max(1, len(expected) // 50) == 0 or n == len(expected)):
            print(f"\rloading weights: {n}/{len(expected)} tensors", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    if unexpected:
        raise ValueError(f"checkpoint has {len(unexpected)} unexpected tensors, e.g. {unexpected[:5]}")
    missing = [k for k in expected if k not in done]
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]}")


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` in place of the meta tensor `name`; a plain tensor keeps the parameter's requires_grad,
    a tensor subclass (quantized) gets none unless the transform made it a Parameter itself."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    old = module._parameters.get(leaf)
    if old is None:
        module._buffers[leaf] = value
    elif isinstance(value, nn.Parameter):
        module._parameters[leaf] = value
    else:
        trainable = old.requires_grad and type(value) is torch.Tensor and value.is_floating_point()
        module._parameters[leaf] = nn.Parameter(value, requires_grad=trainable)


def _common_dtype(tensors: Sequence[tuple[str, str, torch.Tensor | Source]]) -> torch.dtype | None:
    """The floating dtype holding most of the checkpoint's elements; tensors stored otherwise convert."""
    elements: dict[torch.dtype, int] = {}
    for _, _, tensor in tensors:
        if tensor.dtype.is_floating_point:
            elements[tensor.dtype] = elements.get(tensor.dtype, 0) + math.prod(tensor.shape)
    return max(elements, key=elements.__getitem__, default=None)


def hf_key(key: str) -> str:
    """Our (hub-layout) name for a key in either Hugging Face layout."""
    for new, old in _NEW_LAYOUT:
        if key.startswith(new):
            return old + key[len(new) :]
    if key.startswith("language_model.") and not key.startswith(
        ("language_model.model.", "language_model.lm_head.")
    ):
        return "language_model.model." + key[len("language_model.") :]  # MllamaModel dumps
    return key


def _hf_tensors(path: Path) -> Iterator[tuple[str, str, Source]]:
    for file in _safetensors_files(path):
        for entry in safetensors_entries(file):
            yield entry.key, hf_key(entry.key), entry


def _safetensors_files(path: Path) -> list[Path]:
    if (path / INDEX_FILE).is_file():
        weight_map = read_json(path / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{path / INDEX_FILE}: no weight_map")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"{path}: shards listed in {INDEX_FILE} are missing: {absent}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ValueError(
            f"{path}: only pickled PyTorch weights (.bin/.pt) found; they can run code when loaded, so "
            "they are not read. Convert them to safetensors first."
        )
    raise ValueError(f"{path}: no *.safetensors weights found")


def save_checkpoint(model: LlamaVisionModel, path: str | Path, *, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json, preprocessor_config.json and sharded safetensors in the Hugging Face hub layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    config = model.config.to_hf()
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2))
    vision = model.config.vision
    preprocessor = hf_preprocessor_config(vision.image_size, vision.max_num_tiles)
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    if len(shards) == 1:
        save_file(shards[0], path / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _checkpoint_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory; pass the checkpoint's directory")
    return path


def read_json(file: Path) -> dict:
    """A JSON object from `file`; any problem is a ValueError naming the file."""
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {file}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return data
