"""Checkpoint loading and saving: layouts, model-parallel shards, and every broken input's error."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from reference import build_meta_model, randomize_, save_meta_checkpoint
from safetensors.torch import load_file, save_file

from llama_vision.config import PRESETS
from llama_vision.model import LlamaVisionModel
from llama_vision.weights import load_checkpoint, save_checkpoint

CONFIG = PRESETS["tiny"]
IDS = torch.tensor([[128000, 128256, 791, 2217, 374, 264]])


@pytest.fixture(scope="module")
def model() -> LlamaVisionModel:
    return randomize_(LlamaVisionModel(CONFIG), seed=3).eval()


@pytest.fixture(scope="module")
def hf_dir(model: LlamaVisionModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hf")
    save_checkpoint(model, path, max_shard_bytes=30_000_000)
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


def test_save_then_load_round_trips_sharded(model: LlamaVisionModel, hf_dir: Path) -> None:
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = load_checkpoint(hf_dir)
    _states_equal(model, loaded)
    assert not any(p.is_meta for p in loaded.parameters())


def test_dtype_and_device_conversion(hf_dir: Path) -> None:
    loaded = load_checkpoint(hf_dir, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_new_transformers_layout_loads(model: LlamaVisionModel, hf_dir: Path, tmp_path: Path) -> None:
    """transformers >= 4.52 keeps `model.language_model.*` and `lm_head.*` in memory; raw dumps carry them."""
    out = tmp_path / "new"
    out.mkdir()
    shutil.copy(hf_dir / "config.json", out)
    renamed = {}
    for k, v in model.state_dict().items():
        k = k.replace("language_model.model.", "model.language_model.").replace(
            "language_model.lm_head.", "lm_head."
        )
        k = "model." + k if k.startswith(("vision_model.", "multi_modal_projector.")) else k
        renamed[k] = v.contiguous()
    save_file(renamed, out / "model.safetensors")
    _states_equal(model, load_checkpoint(out))


def _single_file(hf_dir: Path, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    out = tmp_path / "ckpt"
    out.mkdir()
    shutil.copy(hf_dir / "config.json", out)
    state = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(f))
    return out, state


def test_missing_tensor_is_named(hf_dir: Path, tmp_path: Path) -> None:
    out, state = _single_file(hf_dir, tmp_path)
    del state["language_model.model.layers.1.cross_attn.k_norm.weight"]
    save_file(state, out / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing 1 tensors.*layers\.1\.cross_attn\.k_norm\.weight"):
        load_checkpoint(out)


def test_unexpected_tensor_is_named(hf_dir: Path, tmp_path: Path) -> None:
    out, state = _single_file(hf_dir, tmp_path)
    state["vision_model.extra.weight"] = torch.zeros(2)
    save_file(state, out / "model.safetensors")
    with pytest.raises(ValueError, match=r"1 unexpected tensors.*vision_model\.extra\.weight"):
        load_checkpoint(out)


def test_wrong_shape_names_key_and_both_shapes(hf_dir: Path, tmp_path: Path) -> None:
    out, state = _single_file(hf_dir, tmp_path)
    state["multi_modal_projector.weight"] = torch.zeros(128, 100)
    save_file(state, out / "model.safetensors")
    with pytest.raises(ValueError, match=r"multi_modal_projector\.weight.*\(128, 100\).*\(128, 256\)"):
        load_checkpoint(out)


def test_config_mismatch_is_a_shape_error(hf_dir: Path, tmp_path: Path) -> None:
    out = _copy(hf_dir, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    config["vision_config"]["image_size"] = 112  # e.g. the 448/560 px confusion
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"gated_positional_embedding\.embedding.*\(17, 64\).*\(65, 64\)"):
        load_checkpoint(out)


def test_duplicate_tensor_across_shards(hf_dir: Path, tmp_path: Path) -> None:
    out, state = _single_file(hf_dir, tmp_path)
    save_file(state, out / "a.safetensors")
    save_file(
        {"language_model.lm_head.weight": state["language_model.lm_head.weight"]}, out / "b.safetensors"
    )
    with pytest.raises(ValueError, match="twice"):
        load_checkpoint(out)


def test_broken_files(hf_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not a directory"):
        load_checkpoint(hf_dir / "config.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_checkpoint(empty)

    truncated = _copy(hf_dir, tmp_path / "truncated")
    shard = sorted(truncated.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"cannot read .*{shard.name}"):
        load_checkpoint(truncated)

    lost = _copy(hf_dir, tmp_path / "lost")
    sorted(lost.glob("*.safetensors"))[-1].unlink()
    with pytest.raises(ValueError, match="shards listed in model.safetensors.index.json are missing"):
        load_checkpoint(lost)

    bad_json = _copy(hf_dir, tmp_path / "badjson")
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read .*config.json"):
        load_checkpoint(bad_json)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(hf_dir / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"whatever")
    with pytest.raises(ValueError, match="pickled"):
        load_checkpoint(pickled)


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/llama_vision_pwned"),))


def test_meta_loading_never_runs_pickled_code(tmp_path: Path) -> None:
    marker = Path("/tmp/llama_vision_pwned")
    marker.unlink(missing_ok=True)
    (tmp_path / "params.json").write_text(
        json.dumps(
            {
                "dim": 64,
                "n_layers": 2,
                "n_heads": 2,
                "vocab_size": 128256,
                "vision_chunk_size": 56,
                "vision_num_cross_attention_layers": 1,
            }
        )  # fmt: skip
    )
    with open(tmp_path / "consolidated.00.pth", "wb") as f:
        pickle.dump({"x": _Exploit()}, f)
    with pytest.raises(ValueError, match="cannot read .*consolidated.00.pth"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


# ------------------------------------------------------------------ Meta's model-parallel shards
META_PARAMS = {
    "dim": 64,
    "n_layers": 4,
    "n_heads": 4,
    "n_kv_heads": 2,
    "vocab_size": 128256,
    "multiple_of": 32,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
    "vision_chunk_size": 56,
    "vision_max_num_chunks": 4,
    "vision_num_cross_attention_layers": 2,
}
META_VISION = {
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_global_layers": 2,
    "attention_heads": 2,
    "intermediate_layers_indices": [1, 3],
}


def _split_dims(meta_model: torch.nn.Module) -> dict[str, int | None]:
    """How fairscale partitions each tensor: read from the layer types of Meta's own model."""
    from fairscale.nn.model_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )

    dims: dict[str, int | None] = {}
    for name, module in meta_model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, ColumnParallelLinear):
            dims[prefix + "weight"] = 0
            dims[prefix + "bias"] = 0
        elif isinstance(module, RowParallelLinear):
            dims[prefix + "weight"] = 1
        elif isinstance(module, VocabParallelEmbedding):
            dims[prefix + "weight"] = 0
    return dims


def test_meta_model_parallel_shards_merge(tmp_path: Path) -> None:
    meta = build_meta_model(META_PARAMS, vision=META_VISION, seed=5)
    single = save_meta_checkpoint(meta, META_PARAMS, tmp_path / "one", vision=META_VISION)
    reference = load_checkpoint(single)

    n = 8  # as the 90B checkpoints
    dims = _split_dims(meta)
    state = torch.load(single / "consolidated.00.pth", weights_only=True)
    shards = [{} for _ in range(n)]
    for key, tensor in state.items():
        dim = dims.get(key)
        parts = tensor.chunk(n, dim=dim) if dim is not None else [tensor] * n
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    split = _copy(single, tmp_path / "four")
    (split / "consolidated.00.pth").unlink()
    for i, shard in enumerate(shards):
        torch.save(shard, split / f"consolidated.{i:02d}.pth")
    _states_equal(reference, load_checkpoint(split))
