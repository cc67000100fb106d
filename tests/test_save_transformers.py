"""What we save loads in Hugging Face transformers: every tensor consumed, same logits.

transformers >= 4.56 takes the vision features one layer late (REFERENCE.md); our saved config.json holds
the hub's (Meta's) indices, so transformers 5 gives the reference's logits only with its indices lowered
by one. The test checks both: the plain load keeps every weight, the corrected config gives our logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reference import hf_logits, random_image, randomize_

from llama_vision.adapters.masks import cross_attention_mask
from llama_vision.config import PRESETS
from llama_vision.encoders.image_transform import pack_images, transform_image
from llama_vision.model import LlamaVisionModel
from llama_vision.weights import hf_key, save_checkpoint

CONFIG = PRESETS["tiny"]


def test_transformers_loads_what_we_save(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    ours = randomize_(LlamaVisionModel(CONFIG), seed=11).eval()
    save_checkpoint(ours, tmp_path, max_shard_bytes=40_000_000)

    hf, info = transformers.MllamaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf_state = {hf_key(k): v for k, v in hf.state_dict().items()}
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(hf_state[key], value, rtol=0, atol=0, msg=key)

    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_config"]["intermediate_layers_indices"] = [
        i - 1 for i in config["vision_config"]["intermediate_layers_indices"]
    ]
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = transformers.MllamaForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()

    ids = [128256, 128000, 791, 2217, 5039, 264, 8415, 13]  # image first: where HF and Meta agree
    tiled = [[transform_image(random_image(100, 60), tile_size=56, max_num_tiles=4)]]
    packed = pack_images(
        tiled, max_num_tiles=4, tile_size=56, aspect_ratios=CONFIG.vision.supported_aspect_ratios
    )
    inputs = {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.int64),
        "pixel_values": packed["pixel_values"],
        "aspect_ratio_ids": packed["aspect_ratio_ids"],
        "aspect_ratio_mask": packed["aspect_ratio_mask"],
        "cross_attention_mask": cross_attention_mask([ids], packed["num_tiles"], 128256, 4),
    }
    with torch.no_grad():
        expected = ours(**inputs)
    got = hf_logits(hf, inputs)
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())
