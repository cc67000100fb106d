"""Configuration of Llama 3.2 Vision ("Mllama"): frozen dataclasses, presets, and readers for
Hugging Face `config.json` (legacy `rope_theta` + `rope_scaling` and transformers 5's `rope_parameters`)
and Meta's `params.json`.

Numbers live here and nowhere else. The presets reproduce the official checkpoints exactly; the
parameter counts in tests/test_config.py pin them (11B Instruct: 10,670,220,835).

Non-obvious choices:
- `TextConfig.cross_attention_layers` indexes the merged layer list of the Hugging Face layout
  (11B: [3, 8, ..., 38] of 40). Meta keeps 32 self-attention layers and 8 cross-attention layers in two
  lists; `from_meta` derives the merged indices from Meta's fusion schedule
  (`llama_layers[::-1][::k][:n][::-1]`, k = ceil(n_layers / n_cross)): cross layer J runs just before
  self-attention layer schedule[J], so its merged index is schedule[J] + J.
- `supported_aspect_ratios` are (tiles high, tiles wide); aspect-ratio id = index + 1, id 0 = padding.
- The 11B *base* model uses 448 px tiles, everything else 560 px (HF issue #33812).
- The file readers check every field's JSON type and range through `validate.Fields` (errors name the
  file and the field); `__post_init__` checks what holds between fields, for configs built in code too.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from llama_vision.validate import Fields, is_int

IMAGE_TOKEN_ID = 128256
NUM_LEARNABLE_EMBEDDINGS = 8  # extra embedding rows after the text vocabulary; row 0 is <|image|>


def supported_aspect_ratios(max_num_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (tiles high, tiles wide) grids with at most `max_num_tiles` tiles, in the reference order."""
    return tuple(
        (h, w)
        for h in range(1, max_num_tiles + 1)
        for w in range(1, max_num_tiles + 1)
        if h * w <= max_num_tiles
    )


def _fail(cls: type, message: str) -> None:
    raise ValueError(f"{cls.__name__}: {message}")


def _check_positive(config: Any, names: tuple[str, ...]) -> None:
    """Sizes are positive integers (before any divisibility check divides by them)."""
    for name in names:
        value = getattr(config, name)
        if not is_int(value) or value < 1:
            _fail(type(config), f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama 3 frequency scaling of RoPE (`rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.factor <= 0 or self.low_freq_factor <= 0 or self.high_freq_factor <= self.low_freq_factor:
            _fail(
                type(self),
                f"need factor > 0 and high_freq_factor > low_freq_factor > 0, got factor={self.factor}, "
                f"low_freq_factor={self.low_freq_factor}, high_freq_factor={self.high_freq_factor}",
            )


_VISION_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_global_layers", "attention_heads",
                 "image_size", "patch_size", "max_num_tiles")  # fmt: skip
_TEXT_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32  # the local transformer
    num_global_layers: int = 8  # the gated global transformer
    attention_heads: int = 16
    image_size: int = 560  # tile side in pixels
    patch_size: int = 14
    num_channels: int = 3
    max_num_tiles: int = 4
    norm_eps: float = 1e-5
    intermediate_layers_indices: tuple[int, ...] = (3, 7, 15, 23, 30)
    supported_aspect_ratios: tuple[tuple[int, int], ...] = field(
        default_factory=lambda: supported_aspect_ratios(4)
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "intermediate_layers_indices", tuple(self.intermediate_layers_indices))
        object.__setattr__(
            self, "supported_aspect_ratios", tuple(tuple(r) for r in self.supported_aspect_ratios)
        )
        _check_positive(self, _VISION_SIZES)
        if self.num_channels != 3:
            _fail(type(self), f"num_channels must be 3 (images are read as RGB), got {self.num_channels}")
        ratios = self.supported_aspect_ratios
        if not ratios or len(set(ratios)) != len(ratios):
            _fail(type(self), f"supported_aspect_ratios must be distinct pairs, got {ratios}")
        if self.hidden_size % self.attention_heads:
            _fail(
                type(self),
                f"hidden_size={self.hidden_size} is not divisible by attention_heads={self.attention_heads}",
            )
        if self.image_size % self.patch_size:
            _fail(
                type(self), f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        bad = [i for i in self.intermediate_layers_indices if not 0 <= i < self.num_hidden_layers]
        if bad:
            _fail(
                type(self),
                f"intermediate_layers_indices {bad} outside 0..{self.num_hidden_layers - 1} "
                f"(num_hidden_layers={self.num_hidden_layers})",
            )
        too_big = [r for r in self.supported_aspect_ratios if r[0] * r[1] > self.max_num_tiles]
        if too_big:
            _fail(type(self), f"supported_aspect_ratios {too_big} exceed max_num_tiles={self.max_num_tiles}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.attention_heads

    @property
    def num_patches(self) -> int:
        """Tokens per tile: one per patch plus the class token (1601 at 560 px, 1025 at 448 px)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def vision_output_dim(self) -> int:
        """Width of the projector's input: final features plus each intermediate layer, interleaved."""
        return self.hidden_size * (1 + len(self.intermediate_layers_indices))

    @property
    def max_aspect_ratio_id(self) -> int:
        return len(self.supported_aspect_ratios)


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 40  # self-attention and cross-attention layers together
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    max_position_embeddings: int = 131072
    cross_attention_layers: tuple[int, ...] = (3, 8, 13, 18, 23, 28, 33, 38)
    bos_token_id: int = 128000
    eos_token_id: tuple[int, ...] = (128001,)
    pad_token_id: int = 128004

    def __post_init__(self) -> None:
        object.__setattr__(self, "cross_attention_layers", tuple(self.cross_attention_layers))
        eos = self.eos_token_id
        object.__setattr__(self, "eos_token_id", (eos,) if isinstance(eos, int) else tuple(eos))
        _check_positive(self, _TEXT_SIZES)
        ids = {"bos_token_id": (self.bos_token_id,), "pad_token_id": (self.pad_token_id,)}
        if self.pad_token_id is None:  # text Llamas have none (their processor pads with a masked id)
            del ids["pad_token_id"]
        for name, values in ids.items():
            if not all(is_int(i) and 0 <= i < self.num_embeddings for i in values):
                _fail(type(self), f"{name} must be an id in 0..{self.num_embeddings - 1}, got {values[0]!r}")
        eos = self.eos_token_id
        if not eos or not all(is_int(i) and 0 <= i < self.vocab_size for i in eos):
            _fail(type(self), f"eos_token_id must be ids in 0..{self.vocab_size - 1}, got {eos}")
        if self.hidden_size % self.num_attention_heads:
            _fail(
                type(self),
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}",
            )
        if self.num_attention_heads % self.num_key_value_heads:
            _fail(
                type(self),
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}",
            )
        if self.head_dim % 2:
            _fail(type(self), f"head_dim={self.head_dim} must be even for RoPE")
        bad = [i for i in self.cross_attention_layers if not 0 <= i < self.num_hidden_layers]
        if bad or len(set(self.cross_attention_layers)) != len(self.cross_attention_layers):
            _fail(
                type(self),
                f"cross_attention_layers {list(self.cross_attention_layers)} must be distinct indices in "
                f"0..{self.num_hidden_layers - 1}",
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_embeddings(self) -> int:
        """Rows of embed_tokens: the vocabulary plus 8 learnable rows (128,264); lm_head has 128,256."""
        return self.vocab_size + NUM_LEARNABLE_EMBEDDINGS


@dataclass(frozen=True, kw_only=True)
class LlamaVisionConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = IMAGE_TOKEN_ID

    def __post_init__(self) -> None:
        if not self.text.vocab_size <= self.image_token_id < self.text.num_embeddings:
            _fail(
                type(self),
                f"image_token_id={self.image_token_id} must be one of the learnable rows "
                f"{self.text.vocab_size}..{self.text.num_embeddings - 1}",
            )

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf(cls, config: dict[str, Any], source: str = "config.json") -> LlamaVisionConfig:
        """Read a Hugging Face `config.json` dict (transformers 4.45 to 5.x); errors name `source`."""
        f = Fields(config, source)
        if f.raw("model_type", "mllama") != "mllama":
            raise ValueError(f"{source}: model_type is {f.raw('model_type')!r}, expected 'mllama'")
        v, t = f.section("vision_config"), f.section("text_config")
        max_tiles = v.integer("max_num_tiles", 4, high=64)
        layers = v.integer("num_hidden_layers", 32, high=100_000)
        # transformers writes attention_heads; some tools write num_attention_heads
        heads = v.integer("attention_heads" if v.has("attention_heads") else "num_attention_heads", 16)
        text_layers = t.integer("num_hidden_layers", 40, high=100_000)
        vocab = t.integer("vocab_size", 128256)
        ids = dict(low=0, high=vocab + NUM_LEARNABLE_EMBEDDINGS - 1)
        with _naming(source):
            vision = VisionConfig(
                hidden_size=v.integer("hidden_size", 1280),
                intermediate_size=v.integer("intermediate_size", 5120),
                num_hidden_layers=layers,
                num_global_layers=v.integer("num_global_layers", 8, high=100_000),
                attention_heads=heads,
                image_size=v.integer("image_size", 448),  # the HF class default, see REFERENCE 1.1
                patch_size=v.integer("patch_size", 14),
                num_channels=v.integer("num_channels", 3, low=3, high=3),
                max_num_tiles=max_tiles,
                norm_eps=v.number("norm_eps", 1e-5, high=1.0),
                intermediate_layers_indices=v.integers(
                    "intermediate_layers_indices", (3, 7, 15, 23, 30), high=layers - 1
                ),
                supported_aspect_ratios=v.pairs(
                    "supported_aspect_ratios", supported_aspect_ratios(max_tiles)
                ),
            )
            theta, scaling = _read_hf_rope(t)
            text = TextConfig(
                vocab_size=vocab,
                hidden_size=t.integer("hidden_size", 4096),
                intermediate_size=t.integer("intermediate_size", 14336),
                num_hidden_layers=text_layers,
                num_attention_heads=t.integer("num_attention_heads", 32),
                num_key_value_heads=t.integer("num_key_value_heads", 8),
                rms_norm_eps=t.number("rms_norm_eps", 1e-5, high=1.0),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=t.integer("max_position_embeddings", 131072, high=2**24),
                cross_attention_layers=t.integers(
                    "cross_attention_layers", (3, 8, 13, 18, 23, 28, 33, 38), high=text_layers - 1
                ),
                bos_token_id=t.integer("bos_token_id", 128000, **ids),
                eos_token_id=t.integers(
                    "eos_token_id", 128001, low=0, high=vocab - 1, scalar=True, nonempty=True
                ),
                pad_token_id=t.integer("pad_token_id", 128004, **ids),
            )
            key = "image_token_index" if f.has("image_token_index") else "image_token_id"
            image_token = f.integer(key, IMAGE_TOKEN_ID, **ids)
            return cls(vision=vision, text=text, image_token_id=image_token)

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` dict in the layout the hub checkpoints use (loads in transformers 4.45 to 5.x)."""
        v, t = self.vision, self.text
        rope_scaling = None
        if t.rope_scaling is not None:
            rope_scaling = {"rope_type": "llama3", **asdict(t.rope_scaling)}
        eos = t.eos_token_id[0] if len(t.eos_token_id) == 1 else list(t.eos_token_id)
        return {
            "architectures": ["MllamaForConditionalGeneration"],
            "model_type": "mllama",
            "image_token_index": self.image_token_id,
            "torch_dtype": "bfloat16",
            "vision_config": {
                "model_type": "mllama_vision_model",
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_hidden_layers": v.num_hidden_layers,
                "num_global_layers": v.num_global_layers,
                "attention_heads": v.attention_heads,
                "image_size": v.image_size,
                "patch_size": v.patch_size,
                "num_channels": v.num_channels,
                "max_num_tiles": v.max_num_tiles,
                "norm_eps": v.norm_eps,
                "intermediate_layers_indices": list(v.intermediate_layers_indices),
                "supported_aspect_ratios": [list(r) for r in v.supported_aspect_ratios],
                "vision_output_dim": v.vision_output_dim,
                "hidden_act": "gelu",
            },
            "text_config": {
                "model_type": "mllama_text_model",
                "vocab_size": t.vocab_size,
                "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size,
                "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads,
                "num_key_value_heads": t.num_key_value_heads,
                "rms_norm_eps": t.rms_norm_eps,
                "rope_theta": t.rope_theta,
                "rope_scaling": rope_scaling,
                "max_position_embeddings": t.max_position_embeddings,
                "cross_attention_layers": list(t.cross_attention_layers),
                "bos_token_id": t.bos_token_id,
                "eos_token_id": eos,
                "pad_token_id": t.pad_token_id,
                "hidden_act": "silu",
                "tie_word_embeddings": False,
            },
        }

    # ------------------------------------------------------------------ Meta params.json
    @classmethod
    def from_meta(cls, params: dict[str, Any], source: str = "params.json") -> LlamaVisionConfig:
        """Read Meta's `params.json` (llama-models ModelArgs); errors name `source`.

        Meta hard-codes the ViT-H/14 tower (width 1280, 32 + 8 layers, 16 heads, intermediates
        [3, 7, 15, 23, 30]); only the tile size (`vision_chunk_size`) and tile count vary. An optional
        `"vision"` dict overrides the tower's sizes; our tests use it for small towers.
        """
        p = Fields(params, source)
        missing = [
            k for k in ("dim", "n_layers", "n_heads", "vocab_size", "vision_chunk_size") if not p.has(k)
        ]
        if missing:
            raise ValueError(f"{source}: missing {missing}")
        dim, n_layers = p.integer("dim"), p.integer("n_layers", high=100_000)
        adapter = p.section("vision_model").section("cross_attention_adapter")
        if p.has("vision_num_cross_attention_layers"):
            n_cross = p.integer("vision_num_cross_attention_layers", high=n_layers)
        elif adapter.has("num_layers"):
            n_cross = adapter.integer("num_layers", high=n_layers)
        else:
            raise ValueError(f"{source}: vision_num_cross_attention_layers is missing")
        schedule = meta_fusion_schedule(n_layers, n_cross)
        multiplier = p.number("ffn_dim_multiplier", 1.0, high=1000.0) if p.has("ffn_dim_multiplier") else None
        hidden = _meta_ffn_dim(dim, p.integer("multiple_of", 256), multiplier)
        max_tiles = p.integer("vision_max_num_chunks", 4, high=64)
        o = p.section("vision")
        width = o.integer("hidden_size", 1280)
        tower_layers = o.integer("num_hidden_layers", 32, high=100_000)
        n_heads = p.integer("n_heads")
        with _naming(source):
            vision = VisionConfig(
                hidden_size=width,
                intermediate_size=o.integer("intermediate_size", 4 * width),
                num_hidden_layers=tower_layers,
                num_global_layers=o.integer("num_global_layers", 8, high=100_000),
                attention_heads=o.integer("attention_heads", 16),
                image_size=p.integer("vision_chunk_size"),
                patch_size=14,
                max_num_tiles=max_tiles,
                intermediate_layers_indices=o.integers(
                    "intermediate_layers_indices", (3, 7, 15, 23, 30), high=tower_layers - 1
                ),
                supported_aspect_ratios=supported_aspect_ratios(max_tiles),
            )
            text = TextConfig(
                vocab_size=p.integer("vocab_size"),
                hidden_size=dim,
                intermediate_size=hidden,
                num_hidden_layers=n_layers + n_cross,
                num_attention_heads=n_heads,
                num_key_value_heads=p.integer("n_kv_heads", n_heads),
                rms_norm_eps=p.number("norm_eps", 1e-5, high=1.0),
                rope_theta=p.number("rope_theta", 500000.0),
                rope_scaling=RopeScaling() if p.flag("use_scaled_rope", False) else None,
                cross_attention_layers=tuple(s + j for j, s in enumerate(schedule)),
            )
            return cls(vision=vision, text=text)

    # ------------------------------------------------------------------ helpers
    def replace(self, **changes: Any) -> LlamaVisionConfig:
        return replace(self, **changes)


def meta_fusion_schedule(n_layers: int, n_cross: int) -> list[int]:
    """Meta's self-attention layers that get a cross-attention layer run just before them."""
    k = math.ceil(n_layers / n_cross)
    return list(range(n_layers))[::-1][::k][:n_cross][::-1]


def _meta_ffn_dim(dim: int, multiple_of: int, multiplier: float | None) -> int:
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _read_hf_rope(text: Fields) -> tuple[float, RopeScaling | None]:
    """rope_theta and llama3 scaling from either `rope_theta` + `rope_scaling` or `rope_parameters`."""
    if text.has("rope_parameters"):
        scaling = text.section("rope_parameters")
        theta = scaling.number("rope_theta", text.number("rope_theta", 500000.0))
    else:
        theta = text.number("rope_theta", 500000.0)
        scaling = text.section("rope_scaling")
    rope_type = scaling.raw("rope_type", scaling.raw("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ValueError(
            f"{text.where}: unsupported {scaling.prefix}rope_type {rope_type!r} (expected 'llama3' or 'default')"
        )
    return theta, RopeScaling(
        factor=scaling.number("factor", 8.0),
        low_freq_factor=scaling.number("low_freq_factor", 1.0),
        high_freq_factor=scaling.number("high_freq_factor", 4.0),
        original_max_position_embeddings=scaling.integer(
            "original_max_position_embeddings", 8192, high=2**24
        ),
    )


@contextmanager
def _naming(source: str) -> Iterator[None]:
    """Prefix the dataclasses' own checks (between fields) with the file they were read from."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


_INSTRUCT_EOS = (128001, 128008, 128009)
_TEXT_90B = TextConfig(
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=100,
    num_attention_heads=64,
    cross_attention_layers=tuple(range(3, 100, 5)),
)

PRESETS: dict[str, LlamaVisionConfig] = {
    "llama-3.2-11b-vision": LlamaVisionConfig(vision=VisionConfig(image_size=448), text=TextConfig()),
    "llama-3.2-11b-vision-instruct": LlamaVisionConfig(
        vision=VisionConfig(image_size=560), text=TextConfig(eos_token_id=_INSTRUCT_EOS)
    ),
    "llama-3.2-90b-vision": LlamaVisionConfig(vision=VisionConfig(image_size=560), text=_TEXT_90B),
    "llama-3.2-90b-vision-instruct": LlamaVisionConfig(
        vision=VisionConfig(image_size=560), text=replace(_TEXT_90B, eos_token_id=_INSTRUCT_EOS)
    ),
    # Small configurations of the same architecture, for tests and benchmarks.
    "tiny": LlamaVisionConfig(
        vision=VisionConfig(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=6,
            num_global_layers=2,
            attention_heads=4,
            image_size=56,
            intermediate_layers_indices=(1, 3, 5),
        ),
        text=TextConfig(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            cross_attention_layers=(1, 4),
            eos_token_id=_INSTRUCT_EOS,
        ),
    ),
    "bench-small": LlamaVisionConfig(
        vision=VisionConfig(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=8,
            num_global_layers=2,
            attention_heads=4,
            image_size=224,
            intermediate_layers_indices=(1, 3, 5, 7),
        ),
        text=TextConfig(
            hidden_size=512,
            intermediate_size=1536,
            num_hidden_layers=12,
            num_attention_heads=8,
            num_key_value_heads=2,
            cross_attention_layers=(2, 6, 10),
            eos_token_id=_INSTRUCT_EOS,
        ),
    ),
    # The embedded default model (llama_vision/embedded/): 112 px tiles of 8 x 8 patches, its own
    # 768-token vocabulary (llama_vision/domain/corpus.py: <|image|> = 768, <|begin_of_text|> = 757).
    "embedded": LlamaVisionConfig(
        vision=VisionConfig(
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_global_layers=2,
            attention_heads=4,
            image_size=112,
            intermediate_layers_indices=(1, 3),
        ),
        text=TextConfig(
            vocab_size=768,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            cross_attention_layers=(1, 4),
            bos_token_id=757,
            eos_token_id=(758, 765, 766),
            pad_token_id=761,
        ),
        image_token_id=768,
    ),
}


def get_preset(name: str) -> LlamaVisionConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
