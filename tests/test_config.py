"""Presets reproduce the official checkpoints; config readers accept every format in the wild."""

from __future__ import annotations

import json

import pytest
import torch

from llama_vision.config import PRESETS, LlamaVisionConfig, TextConfig, VisionConfig, meta_fusion_schedule
from llama_vision.model import LlamaVisionModel
from llama_vision.weights import hf_key

EXPECTED = {
    "llama-3.2-11b-vision": (10_642_941_475, 906),
    "llama-3.2-11b-vision-instruct": (10_670_220_835, 906),
    "llama-3.2-90b-vision": (88_593_355_323, 1494),
    "llama-3.2-90b-vision-instruct": (88_593_355_323, 1494),
}


def _meta_model(config: LlamaVisionConfig) -> LlamaVisionModel:
    with torch.device("meta"):
        return LlamaVisionModel(config)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_parameter_counts(name: str) -> None:
    model = _meta_model(PRESETS[name])
    params, tensors = EXPECTED[name]
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == tensors


@pytest.mark.parametrize("name", ["llama-3.2-11b-vision-instruct", "llama-3.2-90b-vision"])
def test_keys_and_shapes_equal_transformers(name: str) -> None:
    transformers = pytest.importorskip("transformers")
    config = PRESETS[name]
    with torch.device("meta"):
        hf = transformers.MllamaForConditionalGeneration(transformers.MllamaConfig(**config.to_hf()))
    hf_shapes = {hf_key(k): tuple(v.shape) for k, v in hf.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in _meta_model(config).state_dict().items()}
    assert ours == hf_shapes


def test_tile_sizes_of_base_and_instruct() -> None:
    assert PRESETS["llama-3.2-11b-vision"].vision.num_patches == 1025
    assert PRESETS["llama-3.2-11b-vision-instruct"].vision.num_patches == 1601
    assert PRESETS["llama-3.2-11b-vision-instruct"].vision.vision_output_dim == 7680
    assert PRESETS["llama-3.2-11b-vision-instruct"].text.num_embeddings == 128264


def _hub_config(rope_style: str) -> dict:
    config = PRESETS["llama-3.2-11b-vision-instruct"].to_hf()
    text = config["text_config"]
    if rope_style == "rope_parameters":  # transformers 5 folds both keys into one dict
        text["rope_parameters"] = {"rope_theta": text.pop("rope_theta"), **text.pop("rope_scaling")}
    return json.loads(json.dumps(config))


@pytest.mark.parametrize("rope_style", ["legacy", "rope_parameters"])
def test_from_hf_reads_both_rope_layouts(rope_style: str) -> None:
    config = LlamaVisionConfig.from_hf(_hub_config(rope_style))
    assert config == PRESETS["llama-3.2-11b-vision-instruct"]


def test_from_hf_reads_what_transformers_writes(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    ours = PRESETS["llama-3.2-90b-vision-instruct"]
    transformers.MllamaConfig(**ours.to_hf()).save_pretrained(tmp_path)
    assert LlamaVisionConfig.from_hf(json.loads((tmp_path / "config.json").read_text())) == ours


META_11B = {
    "dim": 4096,
    "n_layers": 32,
    "n_heads": 32,
    "n_kv_heads": 8,
    "vocab_size": 128256,
    "ffn_dim_multiplier": 1.3,
    "multiple_of": 1024,
    "norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
    "vision_chunk_size": 560,
    "vision_max_num_chunks": 4,
    "vision_num_cross_attention_layers": 8,
}


def test_from_meta_params_equal_presets() -> None:
    instruct = LlamaVisionConfig.from_meta(META_11B)
    assert instruct.vision == PRESETS["llama-3.2-11b-vision-instruct"].vision
    assert instruct.text.cross_attention_layers == (3, 8, 13, 18, 23, 28, 33, 38)
    assert instruct.text.intermediate_size == 14336
    big = LlamaVisionConfig.from_meta(
        {
            **META_11B,
            "dim": 8192,
            "n_layers": 80,
            "n_heads": 64,
            "multiple_of": 4096,
            "vision_num_cross_attention_layers": 20,
        }
    )
    assert big.text.intermediate_size == 28672
    assert big.text.cross_attention_layers == PRESETS["llama-3.2-90b-vision"].text.cross_attention_layers
    base = LlamaVisionConfig.from_meta({**META_11B, "vision_chunk_size": 448})
    assert base.vision == PRESETS["llama-3.2-11b-vision"].vision


def test_meta_fusion_schedule() -> None:
    assert meta_fusion_schedule(32, 8) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert meta_fusion_schedule(4, 2) == [1, 3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden_size": 100, "num_attention_heads": 3}, "not divisible"),
        ({"num_attention_heads": 32, "num_key_value_heads": 5}, "not a multiple"),
        ({"cross_attention_layers": (3, 40)}, "cross_attention_layers"),
        ({"cross_attention_layers": (3, 3)}, "distinct"),
    ],
)
def test_text_config_validation_names_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TextConfig(**kwargs)


def test_vision_config_validation() -> None:
    with pytest.raises(ValueError, match="image_size=500"):
        VisionConfig(image_size=500)
    with pytest.raises(ValueError, match=r"intermediate_layers_indices \[32\]"):
        VisionConfig(intermediate_layers_indices=(3, 32))
    with pytest.raises(TypeError):
        VisionConfig(1280)  # keyword-only


def test_from_hf_rejects_other_models() -> None:
    with pytest.raises(ValueError, match="llava"):
        LlamaVisionConfig.from_hf({"model_type": "llava"})
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        LlamaVisionConfig.from_hf({"text_config": {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}})


def test_from_meta_requires_fields() -> None:
    with pytest.raises(ValueError, match="vision_chunk_size"):
        LlamaVisionConfig.from_meta({"dim": 64, "n_layers": 2, "n_heads": 2, "vocab_size": 10})


@pytest.mark.parametrize(
    ("name", "image_tokens"), [("llama-3.2-11b-vision", 4100), ("llama-3.2-90b-vision", 6404)]
)
def test_full_size_forward_shapes_on_the_meta_device(name: str, image_tokens: int) -> None:
    """The real sizes run end to end (no memory: meta tensors), 4 tiles of 448 or 560 px."""
    config = PRESETS[name]
    S = config.vision.image_size
    with torch.device("meta"):
        ids = torch.tensor([[128000, 128256, 791, 2217]])
        model = LlamaVisionModel(config).to(torch.bfloat16)
        images = {
            "pixel_values": torch.empty(1, 1, 4, 3, S, S),
            "aspect_ratio_ids": torch.ones(1, 1, dtype=torch.int64),
            "aspect_ratio_mask": torch.ones(1, 1, 4, dtype=torch.int64),
        }
        states = model.encode_images(**images)
        logits = model(ids, **images, cross_attention_mask=torch.ones(1, 4, 1, 4, dtype=torch.int64))
    assert states.shape == (1, image_tokens, config.text.hidden_size) and states.dtype == torch.bfloat16
    assert logits.shape == (1, 4, 128256) and logits.dtype == torch.float32
