"""Bounded-memory reads (llama_vision/reading.py) and the loader's hooks (weights.LoadHooks): slices read
from safetensors files, in-memory tensors and joined pieces equal slicing the whole tensor; hooks see
the meta-device model first and every tensor once; broken headers name the file and the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reference import randomize_
from safetensors.torch import save_file

from llama_vision import reading
from llama_vision.config import PRESETS
from llama_vision.model import LlamaVisionModel
from llama_vision.reading import Concat, TensorSource, safetensors_entries
from llama_vision.weights import LoadHooks, load_checkpoint, save_checkpoint

PARTS = [None, (0, 0, 7), (0, 3, 11), (1, 2, 5), (2, 0, 4), (1, 0, 0)]


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reading, "CHUNK_BYTES", 200)  # many chunks even for tiny tensors


def _slice(t: torch.Tensor, part: tuple[int, int, int] | None) -> torch.Tensor:
    return t if part is None else t.narrow(part[0], part[1], part[2] - part[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("part", PARTS)
def test_safetensors_slices(tmp_path: Path, small_chunks: None, dtype: torch.dtype, part) -> None:
    full = torch.randn(11, 6, 4, dtype=dtype)
    save_file({"w": full, "s": torch.tensor(2.5)}, tmp_path / "a.safetensors")
    entries = {e.key: e for e in safetensors_entries(tmp_path / "a.safetensors")}
    assert entries["w"].shape == (11, 6, 4) and entries["w"].dtype == dtype
    for target in (dtype, torch.float32, torch.float16):
        got = entries["w"].read(part, target)
        torch.testing.assert_close(got, _slice(full, part).to(target), rtol=0, atol=0)
    assert entries["s"].read(None).item() == 2.5


@pytest.mark.parametrize("part", PARTS)
def test_concat_and_tensor_sources(small_chunks: None, part) -> None:
    a, b, c = torch.randn(4, 6, 4), torch.randn(7, 6, 4), torch.randn(11, 3, 4)
    rows = Concat([TensorSource(a), TensorSource(b)], dim=0)
    torch.testing.assert_close(rows.read(part), _slice(torch.cat([a, b]), part), rtol=0, atol=0)
    whole = torch.cat([torch.cat([a, b]), c], dim=1)  # 11 x 9 x 4
    cols = Concat([rows, TensorSource(c)], dim=1)
    torch.testing.assert_close(cols.read(part, torch.bfloat16), _slice(whole, part).bfloat16())


def test_bad_slice_and_bad_headers(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"slice \(1, 0, 9\).*\(4, 6\)"):
        TensorSource(torch.zeros(4, 6)).read((1, 0, 9))
    file = tmp_path / "bad.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}).encode()
    file.write_bytes(len(header).to_bytes(8, "little") + header + bytes(10))
    with pytest.raises(ValueError, match=r"bad.safetensors.*'w' lies beyond the end"):
        safetensors_entries(file)
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 60]}}).encode()
    file.write_bytes(len(header).to_bytes(8, "little") + header + bytes(64))
    with pytest.raises(ValueError, match=r"'w' has 60 bytes for shape \(4, 4\)"):
        safetensors_entries(file)
    header = json.dumps({"w": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}).encode()
    file.write_bytes(len(header).to_bytes(8, "little") + header + bytes(1))
    with pytest.raises(ValueError, match=r"bad header entry for 'w'"):
        safetensors_entries(file)


def test_mapped_pages_are_released_but_the_copy_stays(tmp_path: Path) -> None:
    t = torch.randn(2048, 1024)
    torch.save({"w": t}, tmp_path / "x.pth")
    mapped = torch.load(tmp_path / "x.pth", mmap=True, weights_only=True)["w"]
    out = TensorSource(mapped, mapped=True).read(None, torch.bfloat16)
    torch.testing.assert_close(out, t.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(mapped, t, rtol=0, atol=0)  # dropped pages are read back from the file


def test_hooks_prepare_part_transform(tiny_checkpoint) -> None:
    path = tiny_checkpoint(0)
    reference = load_checkpoint(path)
    seen: list[str] = []

    def prepare(model: torch.nn.Module) -> None:
        assert all(p.is_meta for p in model.parameters())  # before any weight is read
        seen.append("prepare")

    def part(name: str, shape: tuple[int, ...]):
        return (0, 0, shape[0] // 2) if name.endswith("q_proj.weight") else None

    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
        seen.append(name)
        return tensor * 2 if name.endswith("norm.weight") else tensor

    model = load_checkpoint(path, hooks=[LoadHooks(prepare=prepare, part=part, transform=transform)])
    assert seen[0] == "prepare" and sorted(seen[1:]) == sorted(reference.state_dict())
    for name, value in model.state_dict().items():
        want = reference.state_dict()[name]
        if name.endswith("q_proj.weight"):
            want = want[: want.shape[0] // 2]
        elif name.endswith("norm.weight"):
            want = want * 2
        torch.testing.assert_close(value, want, rtol=0, atol=0, msg=name)


def test_bad_part_is_named(tiny_checkpoint) -> None:
    hook = LoadHooks(
        part=lambda name, shape: (0, 0, shape[0] + 1) if name.endswith("lm_head.weight") else None
    )
    with pytest.raises(ValueError, match=r"slice \(0, 0, 128257\)"):
        load_checkpoint(tiny_checkpoint(0), hooks=[hook])


def test_fp32_checkpoint_loads_as_bf16_equal_to_cast(tmp_path: Path, small_chunks: None) -> None:
    model = randomize_(LlamaVisionModel(PRESETS["tiny"]), seed=1)
    save_checkpoint(model, tmp_path)
    loaded = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[name].bfloat16(), rtol=0, atol=0, msg=name)
    assert all(p.requires_grad for p in loaded.parameters())  # as load_state_dict(assign=True) kept them


def test_two_threads_read_at_once(tmp_path: Path, small_chunks: None) -> None:
    from concurrent.futures import ThreadPoolExecutor

    tensors = {f"w{i}": torch.randn(64, 33) for i in range(2)}
    save_file(tensors, tmp_path / "a.safetensors")
    entries = safetensors_entries(tmp_path / "a.safetensors")
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda e: [e.read(None, torch.float64) for _ in range(20)], entries))
    for entry, reads in zip(entries, results):
        for got in reads:
            torch.testing.assert_close(got, tensors[entry.key].double(), rtol=0, atol=0)
