"""LoRA through `peft`, applied to a built `LlamaVisionModel` from outside, and adapters saved in the
PEFT format that transformers' `MllamaForConditionalGeneration` loads.

`peft.inject_adapter_in_model` replaces each targeted `nn.Linear` by a LoRA layer in place: the model
keeps its class and forward, module names only gain `base_layer` / `lora_A` / `lora_B` below the target,
so generation, checkpointing and FSDP see the same tree. Targets are named by model part
(`PARTS`) and by linear layer names (`q_proj`, `fc1`, ...); the default is torchtune's recipe: LoRA on the
vision encoder and the cross-attention layers, the text decoder frozen.

The adapter written is `adapter_config.json` + `adapter_model.safetensors`, keyed in transformers 5's
module layout (`base_model.model.model.language_model.layers.3.cross_attn.q_proj.lora_A.weight`,
`...model.vision_model...`), which `peft.PeftModel.from_pretrained` loads onto transformers' model. Its
`target_modules` is a regular expression that fullmatches the targeted modules in both trees, ours
(`language_model.model.layers.3...`, the hub layout) and transformers' (`model.language_model.layers.3...`),
so one config serves both; without that, peft's suffix matching of a plain name list would put LoRA on
every `q_proj` of the other model, untrained ones included.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llama_vision.memory import PARTS, part_of
from llama_vision.model import LlamaVisionModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_LORA_PARTS = ("vision", "cross_attention")
DEFAULT_LORA_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "fc1",
    "fc2",
)

# Our (hub-layout) module prefixes -> a pattern matching them and transformers 5's names.
_BOTH_LAYOUTS = (
    ("language_model.model.", r"(?:language_model\.model|model\.language_model)\."),
    ("language_model.lm_head", r"(?:language_model\.)?lm_head"),
    ("vision_model.", r"(?:model\.)?vision_model\."),
    ("multi_modal_projector", r"(?:model\.)?multi_modal_projector"),
)
# Our names -> transformers 5's (the reverse of weights.hf_key for the new layout).
_TO_TRANSFORMERS = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head", "lm_head"),
    ("vision_model.", "model.vision_model."),
    ("multi_modal_projector", "model.multi_modal_projector"),
)
_PEFT_PREFIX = "base_model.model."


def check_parts(parts: Sequence[str], option: str) -> tuple[str, ...]:
    bad = [p for p in parts if p not in PARTS]
    if bad or isinstance(parts, str):
        raise ValueError(f"{option}: unknown model parts {bad or parts!r}; choose from {list(PARTS)}")
    return tuple(parts)


def lora_targets(model: LlamaVisionModel, parts: Sequence[str], modules: Sequence[str]) -> list[str]:
    """Names of the linear layers in `parts` whose own name is one of `modules`."""
    parts = check_parts(parts, "lora_parts")
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name.rsplit(".", 1)[-1] in modules
        and part_of(name, model.config) in parts
    ]
    if not names:
        raise ValueError(
            f"no linear layers named {list(modules)} in the parts {list(parts)}: nothing to adapt"
        )
    return names


def targets_pattern(names: Sequence[str]) -> str:
    """A regular expression that fullmatches exactly these modules, in our names and transformers'."""
    groups: dict[tuple[str, str], list[str]] = {}  # (prefix, suffix) -> layer indices
    singles = []
    for name in names:
        match = re.fullmatch(r"(.*\.layers)\.(\d+)\.(.*)", name)
        if match:
            groups.setdefault((match.group(1), match.group(3)), []).append(match.group(2))
        else:
            singles.append(_both(name))
    by_layers: dict[tuple[str, tuple[str, ...]], list[str]] = {}  # (prefix, indices) -> suffixes
    for (prefix, suffix), indices in groups.items():
        by_layers.setdefault((prefix, tuple(indices)), []).append(re.escape(suffix))
    alternatives = singles + [
        rf"{_both(prefix)}\.(?:{'|'.join(indices)})\.(?:{'|'.join(suffixes)})"
        for (prefix, indices), suffixes in by_layers.items()
    ]
    return "|".join(f"(?:{a})" for a in alternatives)


def _both(name: str) -> str:
    for ours, pattern in _BOTH_LAYOUTS:
        if name.startswith(ours):
            return pattern + re.escape(name[len(ours) :])
    return re.escape(name)


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ValueError("LoRA needs the `peft` package: pip install 'llama-vision[finetune]'") from None
    return peft


def apply_lora(
    model: LlamaVisionModel,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    parts: Sequence[str] = DEFAULT_LORA_PARTS,
    modules: Sequence[str] = DEFAULT_LORA_MODULES,
) -> LlamaVisionModel:
    """Put LoRA layers on the targeted linear layers in place; everything else is frozen."""
    peft = _peft()
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora_rank must be a positive integer, got {rank!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {dropout!r}")
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets_pattern(lora_targets(model, parts, modules)),
    )
    return _inject(model, config)


def _inject(model: LlamaVisionModel, config: Any) -> LlamaVisionModel:
    peft = _peft()
    for p in model.parameters():
        p.requires_grad_(False)
    peft.inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)
    model.lora_config = config  # what save_adapter writes (an attribute, not a module: names unchanged)
    return model


def lora_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a model state dict, in the PEFT file's keys (transformers' layout, the
    adapter name removed)."""
    return {
        _PEFT_PREFIX + to_transformers(name.replace(".default.", ".")): tensor.detach().cpu().contiguous()
        for name, tensor in state.items()
        if ".lora_" in name
    }


def to_transformers(name: str) -> str:
    for ours, theirs in _TO_TRANSFORMERS:
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    return name


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    base: str | Path | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write adapter_config.json and adapter_model.safetensors (PEFT format) into `directory`. `state`
    is the model's full state dict when it is not `model.state_dict()` (gathered from FSDP shards)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.lora_config.to_dict()
    config["target_modules"] = model.lora_config.target_modules
    config["base_model_name_or_path"] = None if base is None else str(base)
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    tensors = lora_state(model.state_dict() if state is None else state)
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def read_adapter(model: nn.Module, directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter under the model's own state-dict names, checked against it."""
    directory = Path(directory)
    ours = {to_ours(k): v for k, v in load_file(directory / ADAPTER_WEIGHTS).items()}
    current = model.state_dict()
    expected = {k.replace(".default.", "."): k for k in current if ".lora_" in k}
    unknown = sorted(set(ours) - set(expected))
    missing = sorted(set(expected) - set(ours))
    if unknown or missing:
        raise ValueError(
            f"{directory / ADAPTER_WEIGHTS} does not fit this model: {len(unknown)} unexpected tensors "
            f"(e.g. {unknown[:3]}), {len(missing)} missing (e.g. {missing[:3]})"
        )
    state = {expected[k]: v for k, v in ours.items()}
    for key, tensor in state.items():
        if tensor.shape != current[key].shape:
            raise ValueError(
                f"adapter tensor {key!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(current[key].shape)}"
            )
    return state


def load_adapter(model: LlamaVisionModel, directory: str | Path) -> LlamaVisionModel:
    """Put a saved PEFT LoRA adapter (ours, or one made for transformers' Mllama) onto `model`."""
    peft = _peft()
    directory = Path(directory)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / name).is_file():
            raise ValueError(f"{directory} is not a PEFT adapter: {name} is missing")
    try:
        config = peft.LoraConfig.from_pretrained(str(directory))
    except Exception as e:  # peft raises TypeError/ValueError/JSONDecodeError for a bad config
        raise ValueError(f"cannot read {directory / ADAPTER_CONFIG}: {e}") from None
    if not isinstance(config, peft.LoraConfig):
        raise ValueError(f"{directory / ADAPTER_CONFIG}: only LoRA adapters are supported")
    config.inference_mode = True
    _inject(model, config)
    state = read_adapter(model, directory)
    model.load_state_dict(state, strict=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def to_ours(key: str) -> str:
    """A PEFT file key (either transformers layout) -> our module path."""
    from llama_vision.weights import hf_key

    return hf_key(key.removeprefix(_PEFT_PREFIX))


def merge_lora(model: LlamaVisionModel) -> LlamaVisionModel:
    """Fold every LoRA layer into its base weight and put the plain linear layer back."""
    peft = _peft()
    for name, module in list(model.named_modules()):
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def has_lora(model: nn.Module) -> bool:
    return any(".lora_" in name for name, _ in model.named_parameters())
