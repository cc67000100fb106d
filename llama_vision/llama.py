"""The text-only Llama family (Llama 1, 2, 3, 3.1, 3.2 1B/3B, 3.3) through the same decoder as Llama 3.2
Vision: configuration, presets, the model, and checkpoint loading in both layouts.

The vision model's `TextDecoder` without cross-attention layers and without the 8 learnable embedding
rows is exactly Hugging Face's `LlamaForCausalLM` and Meta's `llama3/model.py` `Transformer`: the same
`DecoderLayer` (RMSNorm, GQA attention with RoPE, SwiGLU), the same module names (`model.embed_tokens`,
`model.layers.N.*`, `model.norm`, `lm_head`), and the same generation code (`DecoderGeneration`), so the
engine, the API and the CLI serve these models unchanged.

What differs across the family is configuration only (`LlamaConfig`):

| family          | attention           | vocabulary            | RoPE theta | RoPE scaling | eps  | context | tied |
|-----------------|---------------------|-----------------------|------------|--------------|------|---------|------|
| Llama 1         | MHA                 | 32,000 SentencePiece  | 10,000     | none         | 1e-6 | 2,048   | no   |
| Llama 2         | MHA (70B: GQA 64/8) | 32,000 SentencePiece  | 10,000     | none         | 1e-5 | 4,096   | no   |
| Llama 3         | GQA                 | 128,256 tiktoken BPE  | 500,000    | none         | 1e-5 | 8,192   | no   |
| Llama 3.1, 3.3  | GQA                 | 128,256               | 500,000    | llama3, x8   | 1e-5 | 131,072 | no   |
| Llama 3.2 1B/3B | GQA                 | 128,256               | 500,000    | llama3, x32  | 1e-5 | 131,072 | yes  |

Non-obvious choices:
- `LlamaConfig` is a `TextConfig` whose `text` is itself and whose `vision` is None: code written for
  `LlamaVisionConfig` (`config.text.eos_token_id`, `config.vision is None`) reads it unchanged.
- Tied checkpoints (Llama 3.2 1B/3B) store no `lm_head.weight`; the head's weight is `embed_tokens`'
  parameter itself (one tensor in memory), after loading too; a stored copy is not read.
- `head_dim` other than hidden_size / num_attention_heads, attention or MLP biases, and RoPE types other
  than `default` and `llama3` are no Llama checkpoint's; config.json files that ask for them are refused
  with the field's name rather than loaded into a different model.
- Meta's `params.json` does not hold the context length; it is taken from the family (use_scaled_rope:
  131,072; 128,256-token vocabulary: 8,192; Llama 2: 4,096; Llama 1, whose norm_eps is 1e-6: 2,048),
  or from `max_seq_len` when the file has one. Meta's llama-models 0.3 hard-codes the scaled-RoPE factor
  8 (`apply_scaling`); `rope_scaling_factor` in params.json overrides it (Llama 3.2 1B/3B: 32 on the hub).
- Meta's Llama 1/2 shards split `tok_embeddings` along the model width (fairscale `ParallelEmbedding`),
  Llama 3's along the vocabulary (`VocabParallelEmbedding`), as HF's `convert_llama_weights_to_hf.py`
  also distinguishes; q/k rows are permuted from interleaved to rotate-half RoPE (meta_checkpoint.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from llama_vision.config import RopeScaling, TextConfig, _meta_ffn_dim, _read_hf_rope
from llama_vision.meta_checkpoint import _interleaved_to_half, is_meta_checkpoint, load_meta_shards
from llama_vision.model import DecoderGeneration, TextDecoder, token_positions
from llama_vision.reading import release_staging
from llama_vision.text import self_attention_mask
from llama_vision.validate import Fields
from llama_vision.weights import _checkpoint_dir, _common_dtype, _fill, _hf_tensors, read_json

LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)


@dataclass(frozen=True, kw_only=True)
class LlamaConfig(TextConfig):
    """A text-only Llama: `TextConfig` with no cross-attention layers and no learnable rows."""

    cross_attention_layers: tuple[int, ...] = ()
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None  # Llama 1/2/3 have none; the processor pads with any id, masked

    vision: ClassVar[None] = None  # a text-only model: code that asks `config.vision` gets None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cross_attention_layers:
            raise ValueError("LlamaConfig: a text-only Llama has no cross_attention_layers")

    @property
    def text(self) -> LlamaConfig:
        return self

    @property
    def num_embeddings(self) -> int:
        return self.vocab_size

    def replace(self, **changes: Any) -> LlamaConfig:
        return replace(self, **changes)

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> LlamaConfig:
        """Read the `config.json` of a `LlamaForCausalLM` checkpoint (transformers 4.x or 5.x); absent
        fields take transformers' `LlamaConfig` defaults."""
        where = "config.json"
        if config.get("model_type") not in (None, "llama"):
            raise ValueError(f"{where}: model_type is {config.get('model_type')!r}, expected 'llama'")
        for name in ("attention_bias", "mlp_bias"):
            if config.get(name):
                raise ValueError(
                    f"{where}: {name}=true is not a Llama layout (no Llama checkpoint has biases)"
                )
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(
                f"{where}: hidden_act {config['hidden_act']!r} is not supported (Llama uses 'silu')"
            )
        f = Fields(config, where)
        hidden = f.integer("hidden_size", 4096)
        heads = f.integer("num_attention_heads", 32, high=4096)
        head_dim = config.get("head_dim")
        if head_dim is not None and head_dim * heads != hidden:
            raise ValueError(
                f"{where}: head_dim={head_dim} differs from hidden_size / num_attention_heads = "
                f"{hidden} / {heads}; no Llama checkpoint has that, and it is not supported"
            )
        theta, scaling = _read_hf_rope(Fields({"rope_theta": 10000.0, **config}, where))
        return cls(
            vocab_size=f.integer("vocab_size", 32000, high=2**24),
            hidden_size=hidden,
            intermediate_size=f.integer("intermediate_size", 11008),
            num_hidden_layers=f.integer("num_hidden_layers", 32, high=4096),
            num_attention_heads=heads,
            num_key_value_heads=f.integer("num_key_value_heads", heads, high=4096),
            rms_norm_eps=f.number("rms_norm_eps", 1e-6, high=1.0),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=f.integer("max_position_embeddings", 2048, high=2**24),
            tie_word_embeddings=f.flag("tie_word_embeddings", False),
            bos_token_id=f.integer("bos_token_id", 1, low=0, high=2**24),
            eos_token_id=f.integers("eos_token_id", 2, scalar=True, nonempty=True, high=2**24),
            pad_token_id=f.integer("pad_token_id", low=0, high=2**24) if f.has("pad_token_id") else None,
        )

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict that transformers' `LlamaForCausalLM` loads."""
        scaling = None if self.rope_scaling is None else {"rope_type": "llama3", **vars(self.rope_scaling)}
        eos = self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "torch_dtype": "bfloat16",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
        }

    # ------------------------------------------------------------------ Meta params.json
    @classmethod
    def from_meta(cls, params: Mapping[str, Any], vocab_size: int | None = None) -> LlamaConfig:
        """Read Meta's `params.json` of a text model (llama 1/2 `ModelArgs`, llama-models `llama3`).
        `vocab_size` replaces the file's when that is -1 (Llama 1/2: the tokenizer's size)."""
        where = "params.json"
        missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
        if missing:
            raise ValueError(f"{where}: missing {missing}")
        vocab = params.get("vocab_size", -1)
        if vocab is None or vocab <= 0:
            if vocab_size is None:
                raise ValueError(f"{where}: vocab_size is {vocab} and no tokenizer.model gives the size")
            vocab = vocab_size
        llama3 = vocab >= 128000
        scaled = bool(params.get("use_scaled_rope", False))
        eps = params.get("norm_eps", 1e-5)
        context = params.get("max_seq_len") or (
            131072 if scaled else 8192 if llama3 else 2048 if eps < 1e-5 else 4096
        )
        dim = params["dim"]
        return cls(
            vocab_size=vocab,
            hidden_size=dim,
            intermediate_size=_meta_ffn_dim(
                dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")
            ),
            num_hidden_layers=params["n_layers"],
            num_attention_heads=params["n_heads"],
            num_key_value_heads=params.get("n_kv_heads") or params["n_heads"],
            rms_norm_eps=eps,
            rope_theta=float(params.get("rope_theta", 500000.0 if llama3 else 10000.0)),
            rope_scaling=RopeScaling(factor=float(params.get("rope_scaling_factor", 8.0)))
            if scaled
            else None,
            max_position_embeddings=context,
            tie_word_embeddings=False,
            bos_token_id=128000 if llama3 else 1,
            eos_token_id=(128001,) if llama3 else (2,),
        )


class LlamaForCausalLM(DecoderGeneration, TextDecoder):
    """A text-only Llama; the module tree equals the keys of transformers' `LlamaForCausalLM`.

    `model(input_ids, attention_mask)` gives float32 logits (B, T, vocab), as the vision model does for
    its inputs; `new_cache` / `prefill` / `decode_step` (DecoderGeneration) drive generation."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__(config)
        if config.tie_word_embeddings:
            self.tie_weights()

    @property
    def decoder(self) -> TextDecoder:
        return self

    def tie_weights(self) -> None:
        """Make the output layer use the embedding table itself (Llama 3.2 1B/3B)."""
        self.lm_head.weight = self.model.embed_tokens.weight

    def forward(  # type: ignore[override]  # the decoder's hidden-state forward is TextDecoder.forward
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **images: Any
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in float32 for token ids (B, T) (left- or right-padded rows)."""
        reject_images(images)
        mask = self_attention_mask(attention_mask, input_ids.shape[1])
        positions = token_positions(input_ids, attention_mask)
        return self.logits(TextDecoder.forward(self, input_ids, positions, mask))


def reject_images(inputs: Mapping[str, Any]) -> None:
    """A text-only model's answer to image inputs: a clear error, not a silently ignored image."""
    given = [k for k, v in inputs.items() if v is not None]
    if given:
        raise ValueError(f"this is a text-only Llama model: it takes no images (got {', '.join(given)})")


# ---------------------------------------------------------------------- checkpoints


def is_text_checkpoint(path: str | Path) -> bool:
    """Whether a checkpoint directory holds a text-only Llama (config.json of `LlamaForCausalLM`, or a
    Meta params.json without vision fields)."""
    path = _checkpoint_dir(path)
    if (path / "config.json").is_file():
        config = read_json(path / "config.json")
        return config.get("model_type") == "llama" or any(
            a in LLAMA_ARCHITECTURES for a in config.get("architectures") or ()
        )
    if (path / "params.json").is_file():
        params = read_json(path / "params.json")
        return "vision_chunk_size" not in params and "vision_model" not in params
    return False


def read_llama_config(path: str | Path) -> LlamaConfig:
    """The `LlamaConfig` of a text checkpoint directory in either layout."""
    path = _checkpoint_dir(path)
    if (path / "config.json").is_file():
        return LlamaConfig.from_hf(read_json(path / "config.json"))
    if (path / "params.json").is_file():
        return LlamaConfig.from_meta(read_json(path / "params.json"), _sentencepiece_size(path))
    raise ValueError(f"{path}: no config.json (Hugging Face layout) or params.json (Meta layout) found")


def load_llama(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = False,
    quantize: str | None = None,
) -> LlamaForCausalLM:
    """Build a text Llama on the meta device and fill it from a checkpoint directory (either layout),
    with the same strict key and shape checks as `load_checkpoint`; `dtype` None keeps the stored one.
    `quantize` "int8" or "int4" quantizes the decoder layers' linear weights and the output layer (int8)
    as they are read (quantize.py; embeddings and norms keep `dtype`; a tied head becomes its own int8
    copy, the embedding table stays for the lookups)."""
    path = _checkpoint_dir(path)
    config = read_llama_config(path)
    hooks = []
    if quantize is not None:
        from llama_vision.quantize import TEXT_MODEL_TARGETS, quantize_hooks  # torchao is optional

        hooks.append(quantize_hooks(config, quantize, TEXT_MODEL_TARGETS))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    if (path / "config.json").is_file():
        tensors: Iterable[tuple[str, str, torch.Tensor]] = _hf_text_tensors(path)
    elif is_meta_checkpoint(path):
        tensors = _meta_text_tensors(path, config)
    else:
        raise ValueError(f"{path}: params.json found but no consolidated.NN.pth weights")
    if config.tie_word_embeddings:
        tensors = _tied(tensors)
    if dtype is None:
        tensors = list(tensors)  # shapes and dtypes only: nothing is read yet
        dtype = _common_dtype(tensors)
    try:
        _fill(model, tensors, torch.device(device), dtype, hooks, progress)
    finally:
        release_staging()
    if config.tie_word_embeddings and type(model.lm_head.weight.data) is torch.Tensor:
        model.tie_weights()  # the two names were filled as two parameters (a quantized head stays apart)
    return model.eval()


def _hf_text_tensors(path: Path) -> Iterator[tuple[str, str, torch.Tensor]]:
    for source, _, tensor in _hf_tensors(path):
        yield source, source, tensor  # LlamaForCausalLM's keys are ours


def _tied(tensors: Iterable[tuple[str, str, torch.Tensor]]) -> Iterator[tuple[str, str, torch.Tensor]]:
    """The head of a tied model is the embedding: a stored `lm_head.weight` copy is not read."""
    for source, ours, tensor in tensors:
        if ours == "lm_head.weight":
            continue
        yield source, ours, tensor
        if ours == "model.embed_tokens.weight":
            yield source, "lm_head.weight", tensor


_META_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    **{f"attention.w{x}.weight": f"self_attn.{x}_proj.weight" for x in "qkvo"},
}
_META_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _meta_text_tensors(path: Path, config: LlamaConfig) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(Meta key, our key, tensor) for Meta's text layout; our key is "" for keys we do not know."""
    shards = load_meta_shards(path)
    for key in shards:
        if key == "rope.freqs":
            continue  # precomputed inverse frequencies, not a weight
        if key == "tok_embeddings.weight" and config.vocab_size < 128000 and len(shards.shards) > 1:
            # Llama 1/2: fairscale ParallelEmbedding splits the width, not the vocabulary.
            yield key, _META_TOP[key], torch.cat([s[key] for s in shards.shards], dim=1)
        elif key in _META_TOP:
            yield key, _META_TOP[key], shards[key]
        elif m := re.fullmatch(r"layers\.(\d+)\.(.+)", key):
            name = _META_LAYER.get(m[2])
            if name is None:
                yield key, "", shards[key]
                continue
            tensor = shards[key]
            if m[2] in ("attention.wq.weight", "attention.wk.weight"):
                heads = (
                    config.num_attention_heads
                    if m[2] == "attention.wq.weight"
                    else config.num_key_value_heads
                )
                tensor = _interleaved_to_half(tensor, heads)
            yield key, f"model.layers.{m[1]}.{name}", tensor
        else:
            yield key, "", shards[key]


def _sentencepiece_size(path: Path) -> int | None:
    """Pieces in the directory's SentencePiece tokenizer.model (Llama 1/2), or None."""
    from llama_vision.sentencepiece_tokenizer import is_sentencepiece_file, load_sentencepiece

    file = path / "tokenizer.model"
    if not file.is_file() or not is_sentencepiece_file(file):
        return None
    return load_sentencepiece(file).get_piece_size()


# ---------------------------------------------------------------------- presets

_LLAMA2 = LlamaConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    rope_scaling=None,
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=(2,),
)
_LLAMA3_8B = LlamaConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=None,
    max_position_embeddings=8192,
    bos_token_id=128000,
    eos_token_id=(128001,),
)
_LLAMA31_8B = _LLAMA3_8B.replace(rope_scaling=RopeScaling(factor=8.0), max_position_embeddings=131072)
_LLAMA31_70B = _LLAMA31_8B.replace(
    hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64
)
_LLAMA32_1B = _LLAMA31_8B.replace(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    rope_scaling=RopeScaling(factor=32.0),
    tie_word_embeddings=True,
)

LLAMA_PRESETS: dict[str, LlamaConfig] = {
    "llama-2-7b": _LLAMA2,
    "llama-2-70b": _LLAMA2.replace(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
    ),
    "llama-3-8b": _LLAMA3_8B,
    "llama-3.1-8b": _LLAMA31_8B,
    "llama-3.1-70b": _LLAMA31_70B,
    "llama-3.1-405b": _LLAMA31_8B.replace(
        hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128
    ),
    "llama-3.2-1b": _LLAMA32_1B,
    "llama-3.2-3b": _LLAMA32_1B.replace(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24),
    "llama-3.3-70b": _LLAMA31_70B,
}


def get_llama_preset(name: str) -> LlamaConfig:
    try:
        return LLAMA_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown Llama preset {name!r}; choose one of {sorted(LLAMA_PRESETS)}") from None


def save_llama(model: LlamaForCausalLM, path: str | Path) -> None:
    """Write config.json and model.safetensors in the Hugging Face layout (a tied head is not stored)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    config = model.config.to_hf()
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


__all__ = [
    "LLAMA_PRESETS",
    "LlamaConfig",
    "LlamaForCausalLM",
    "get_llama_preset",
    "is_text_checkpoint",
    "load_llama",
    "read_llama_config",
    "save_llama",
]
