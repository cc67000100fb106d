"""LoRA adapters travel: ours load onto transformers' MllamaForConditionalGeneration through peft with
the logits of our model, reload onto ours, merge into the base with the logits of the adapter run on
the fly, and `from_pretrained(adapter=...)` runs them. The CLI's finetune --dry-run, merge and eval."""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from reference import random_image, randomize_

from llama_vision import LlamaVision, LlamaVisionModel
from llama_vision.adapters.masks import cross_attention_mask
from llama_vision.cli import main
from llama_vision.config import PRESETS
from llama_vision.encoders.image_transform import pack_images, transform_image
from llama_vision.finetune.lora import apply_lora, load_adapter, merge_lora, save_adapter, targets_pattern
from llama_vision.weights import load_checkpoint, save_checkpoint

CONFIG = PRESETS["tiny"]


def require(name: str) -> ModuleType:
    """A reference library; under CI its absence is a failure, not a skip."""
    if os.environ.get("CI") == "true":
        return importlib.import_module(name)
    return pytest.importorskip(name)


def image_first_inputs() -> dict[str, torch.Tensor]:
    """A prompt that begins with the image: where transformers and Meta agree (README, differences)."""
    ids = [128256, 128000, 791, 2217, 5039, 264, 8415, 13]
    tiled = [[transform_image(random_image(100, 60), tile_size=56, max_num_tiles=4)]]
    packed = pack_images(
        tiled, max_num_tiles=4, tile_size=56, aspect_ratios=CONFIG.vision.supported_aspect_ratios
    )
    return {
        "input_ids": torch.tensor([ids]),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.int64),
        "pixel_values": packed["pixel_values"],
        "aspect_ratio_ids": packed["aspect_ratio_ids"],
        "aspect_ratio_mask": packed["aspect_ratio_mask"],
        "cross_attention_mask": cross_attention_mask([ids], packed["num_tiles"], 128256, 4),
    }


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A base checkpoint and a LoRA adapter on every part with a linear layer, non-zero B matrices."""
    require("peft")
    root = tmp_path_factory.mktemp("peft")
    base = randomize_(LlamaVisionModel(CONFIG), seed=4).eval()
    save_checkpoint(base, root / "base")
    apply_lora(base, rank=4, alpha=8, parts=("vision", "projector", "cross_attention", "self_attention"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=g)
    save_adapter(base, root / "adapter", base=root / "base")
    return root / "base", root / "adapter"


def ours_with_adapter(base: Path, adapter: Path) -> LlamaVisionModel:
    return load_adapter(load_checkpoint(base), adapter).eval()


@torch.no_grad()
def test_adapter_loads_onto_transformers_with_equal_logits(
    adapter: tuple[Path, Path], tmp_path: Path
) -> None:
    transformers, peft = require("transformers"), require("peft")
    base, adapter_dir = adapter
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4
    # transformers 5 takes vision features one layer late (README); lower its indices to compare
    config = json.loads((base / "config.json").read_text())
    config["vision_config"]["intermediate_layers_indices"] = [
        i - 1 for i in config["vision_config"]["intermediate_layers_indices"]
    ]
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(config))
    (hf_dir / "model.safetensors").symlink_to(base / "model.safetensors")
    hf = transformers.MllamaForConditionalGeneration.from_pretrained(
        hf_dir, attn_implementation="eager"
    ).eval()
    inputs = image_first_inputs()
    without = hf(**inputs).logits
    hf = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    lora_modules = [n for n, m in hf.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    ours = ours_with_adapter(base, adapter_dir)
    assert len(lora_modules) == sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in ours.modules())
    assert all(".lm_head" not in n and "embed_tokens" not in n for n in lora_modules)
    theirs, expected = hf(**inputs).logits, ours(**inputs)
    assert (without - expected).abs().max() > 1e-2  # the adapter changes the logits
    assert (theirs - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())


@torch.no_grad()
def test_merge_equals_adapter_on_the_fly(adapter: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter_dir = adapter
    inputs = image_first_inputs()
    expected = ours_with_adapter(base, adapter_dir)(**inputs)
    merged = merge_lora(ours_with_adapter(base, adapter_dir))
    assert not any("lora" in n or "base_layer" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(**inputs), expected, rtol=1e-4, atol=1e-4)
    # the command line gives the same checkpoint
    assert (
        main(["merge", "--model", str(base), "--adapter", str(adapter_dir), "--output", str(tmp_path / "m")])
        == 0
    )
    torch.testing.assert_close(load_checkpoint(tmp_path / "m")(**inputs), expected, rtol=1e-4, atol=1e-4)


def test_targets_pattern_matches_both_layouts_exactly() -> None:
    names = ["language_model.model.layers.1.cross_attn.q_proj", "vision_model.transformer.layers.0.mlp.fc1",
             "multi_modal_projector"]  # fmt: skip
    import re

    pattern = targets_pattern(names)
    for name in names:
        assert re.fullmatch(pattern, name)
    for theirs in ("model.language_model.layers.1.cross_attn.q_proj", "model.vision_model.transformer.layers.0.mlp.fc1",
                   "model.multi_modal_projector"):  # fmt: skip
        assert re.fullmatch(pattern, theirs)
    for other in ("language_model.model.layers.11.cross_attn.q_proj", "language_model.model.layers.1.cross_attn.k_proj",
                  "vision_model.global_transformer.layers.0.mlp.fc1"):  # fmt: skip
        assert not re.fullmatch(pattern, other)


def test_bad_adapter_dir_is_a_clear_error(tmp_path: Path, tiny_checkpoint: Callable[[int], Path]) -> None:
    require("peft")
    with pytest.raises(ValueError, match="is not a PEFT adapter: adapter_config.json is missing"):
        LlamaVision.from_pretrained(tiny_checkpoint(3), adapter=tmp_path)


@pytest.fixture
def run_dir(tmp_path: Path, tiny_checkpoint: Callable[[int], Path]) -> tuple[Path, Path]:
    random_image(70, 50, seed=3).save(tmp_path / "cat.png")
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "cat.png"},
                                                   {"type": "text", "text": "What is it?"}]},
                      {"role": "assistant", "content": "A cat."}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ]  # fmt: skip
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tiny_checkpoint(3), tmp_path


def test_cli_dry_run_prints_the_example_parts_and_plan(
    run_dir: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    require("peft")
    model, d = run_dir
    argv = ["finetune", "--config", str(Path(__file__).parents[1] / "recipes" / "tiny-cpu.yaml"), "--model",
            str(model), "--data", str(d / "train.jsonl"), "--output", str(d / "out"), "--dry-run", "max_length=64"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr()
    assert "[[A cat.<|eot_id|>]]" in out.out and "<|image|>What is it?" in out.out
    for part in (
        "vision encoder",
        "projector",
        "cross-attention layers",
        "self-attention layers",
        "embeddings and head",
    ):
        assert part in out.out
    assert "memory plan" in out.out and "peak" in out.out
    assert not (d / "out").exists()


def test_cli_finetune_then_eval_json(run_dir: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    require("peft")
    model, d = run_dir
    argv = ["finetune", "--model", str(model), "--data", str(d / "train.jsonl"), "--output", str(d / "out"),
            "--mode", "lora", "--max-steps", "2", "--batch-size", "2", "max_length=64", "device=cpu"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    argv = ["eval", "--model", str(model), "--adapter", str(d / "out" / "final"), "--data", str(d / "train.jsonl"),
            "--json", "--max-new-tokens", "3", "--max-tiles", "2"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 2 and 0.0 <= result["accuracy"] <= 1.0


def test_cli_errors_are_one_line(run_dir: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model, d = run_dir
    (d / "bad.jsonl").write_text('{"messages": []}\n{oops\n')
    assert (
        main(["finetune", "--model", str(model), "--data", str(d / "bad.jsonl"), "--output", str(d / "o")])
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("llama-vision: error: ") and "bad.jsonl:1" in err and "\n" not in err
    assert main(["finetune", "--model", str(model), "--data", str(d / "train.jsonl"), "lora_rnak=3"]) == 1
    assert "unknown keys ['lora_rnak']" in capsys.readouterr().err
