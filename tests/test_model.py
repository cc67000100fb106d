"""Invariants of the assembled model on tiny random weights (no reference needed)."""

from __future__ import annotations

import re

import pytest
import torch
from reference import randomize_

from llama_vision.adapters.cross_attention import CrossAttentionLayer
from llama_vision.adapters.masks import cross_attention_mask, vision_token_intervals
from llama_vision.config import PRESETS
from llama_vision.model import LlamaVisionModel

IMG = 128256
CONFIG = PRESETS["tiny"]


@pytest.fixture(scope="module")
def model() -> LlamaVisionModel:
    torch.manual_seed(0)
    return randomize_(LlamaVisionModel(CONFIG), seed=1).eval()


def _images(n_rows: int, n_images: int, tiles: list[list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    S = CONFIG.vision.image_size
    pixel_values = torch.randn(n_rows, n_images, 4, 3, S, S, generator=g)
    ratios = CONFIG.vision.supported_aspect_ratios
    by_tiles = {1: (1, 1), 2: (1, 2), 3: (3, 1), 4: (2, 2)}
    ids = torch.tensor([[ratios.index(by_tiles[n]) + 1 for n in row] for row in tiles])
    mask = torch.zeros(n_rows, n_images, 4, dtype=torch.int64)
    for b, row in enumerate(tiles):
        for i, n in enumerate(row):
            mask[b, i, :n] = 1
            pixel_values[b, i, n:] = 0
    return {"pixel_values": pixel_values, "aspect_ratio_ids": ids, "aspect_ratio_mask": mask}


def _inputs(ids: list[list[int]], tiles: list[list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    out = {"input_ids": torch.tensor(ids)}
    out.update(_images(len(ids), len(tiles[0]), tiles, seed))
    out["cross_attention_mask"] = cross_attention_mask(ids, tiles, IMG, 4)
    return out


PROMPT = [128000, 128006, 882, 128007, 271, IMG, 3923, 374, 420, 30, 128009, 128006, 78191, 128007, 271]


@torch.no_grad()
def test_text_before_the_image_is_untouched(model: LlamaVisionModel) -> None:
    first = PROMPT.index(IMG)
    a = model(**_inputs([PROMPT], [[4]], seed=0))
    b = model(**_inputs([PROMPT], [[4]], seed=1))
    text_only = model(torch.tensor([PROMPT]))
    torch.testing.assert_close(a[:, :first], text_only[:, :first], rtol=0, atol=0)
    torch.testing.assert_close(b[:, :first], text_only[:, :first], rtol=0, atol=0)
    assert (a[:, first:] - b[:, first:]).abs().max() > 1e-3  # the image does matter after it


@torch.no_grad()
def test_closed_gates_leave_the_text_model_unchanged() -> None:
    model = randomize_(LlamaVisionModel(CONFIG), seed=2).eval()
    for layer in model.language_model.model.layers:
        if isinstance(layer, CrossAttentionLayer):
            layer.cross_attn_attn_gate.zero_()
            layer.cross_attn_mlp_gate.zero_()
    with_image = model(**_inputs([PROMPT], [[2]]))
    torch.testing.assert_close(with_image, model(torch.tensor([PROMPT])), rtol=0, atol=0)


@torch.no_grad()
def test_text_only_skips_the_adapters(model: LlamaVisionModel, monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("cross-attention layer ran without an image")

    monkeypatch.setattr(CrossAttentionLayer, "forward", fail)
    logits = model(torch.tensor([PROMPT]))
    assert logits.shape == (1, len(PROMPT), CONFIG.text.vocab_size) and logits.dtype == torch.float32


@torch.no_grad()
def test_batch_with_left_padding_equals_rows_alone(model: LlamaVisionModel) -> None:
    short = [128000, IMG, 791, 2217, 374]
    rows = [PROMPT, short]
    T = len(PROMPT)
    padded = [PROMPT, [128004] * (T - len(short)) + short]
    batch = _inputs(padded, [[4], [3]], seed=3)
    batch["attention_mask"] = torch.tensor([[1] * T, [0] * (T - len(short)) + [1] * len(short)])
    out = model(**batch)
    for b, (row, tiles) in enumerate(zip(rows, [[4], [3]])):
        alone = _inputs([row], [tiles])
        alone["pixel_values"] = batch["pixel_values"][b : b + 1]
        single = model(**alone)
        torch.testing.assert_close(out[b, T - len(row) :], single[0], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_batch_mixing_rows_with_and_without_images(model: LlamaVisionModel) -> None:
    text_row = [128000, 9906, 1917, 11, 1268, 527, 499, 3432, 30, 128009, 128006, 78191, 128007, 271, 40]
    batch = {"input_ids": torch.tensor([PROMPT, text_row])}
    images = _images(1, 1, [[2]])
    batch["pixel_values"] = torch.cat([images["pixel_values"], torch.zeros_like(images["pixel_values"])])
    batch["aspect_ratio_ids"] = torch.tensor([[images["aspect_ratio_ids"][0, 0]], [0]])
    batch["aspect_ratio_mask"] = torch.tensor([images["aspect_ratio_mask"][0].tolist(), [[1, 0, 0, 0]]])
    batch["cross_attention_mask"] = cross_attention_mask([PROMPT, text_row], [[2], []], IMG, 4)
    out = model(**batch)
    torch.testing.assert_close(out[1], model(torch.tensor([text_row]))[0], rtol=1e-5, atol=1e-5)
    single = {k: v[:1] for k, v in batch.items()}
    torch.testing.assert_close(out[0], model(**single)[0], rtol=1e-5, atol=1e-5)


def test_adjacent_images_are_attended_jointly() -> None:
    ids = [1, IMG, IMG, 5, 6, IMG, 7]
    assert vision_token_intervals(ids, IMG) == [[1, 5], [2, 5], [5, 7]]
    assert vision_token_intervals([1, IMG, 3], IMG) == [[1, -1]]
    assert vision_token_intervals([1, 2], IMG) == []
    mask = cross_attention_mask([ids], [[1, 4, 2]], IMG, 4)
    assert mask.shape == (1, 7, 3, 4)
    assert mask[0, :, 0, 0].tolist() == [0, 1, 1, 1, 1, 0, 0]
    assert mask[0, 3, 1].tolist() == [1, 1, 1, 1]
    assert mask[0, 6, 2].tolist() == [1, 1, 0, 0]


def test_mask_rejects_wrong_image_counts() -> None:
    with pytest.raises(ValueError, match=re.escape("row 0: 1 <|image|> tokens but 2 images")):
        cross_attention_mask([[1, IMG, 2]], [[1, 1]], IMG, 4)


@torch.no_grad()
def test_bfloat16_runs_close_to_float32(model: LlamaVisionModel) -> None:
    inputs = _inputs([PROMPT], [[4]])
    ref = model(**inputs)
    low = LlamaVisionModel(CONFIG).to(torch.bfloat16)
    low.load_state_dict(model.state_dict())
    out = low(**inputs)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_vision_padding_layout_equals_the_mask(model: LlamaVisionModel, monkeypatch) -> None:
    """Each tile count of a call runs alone and without the padding mask (real tokens first, two unmasked
    products). Features and gradients equal the masked path over the whole mixed batch."""
    from llama_vision.encoders import vision

    images = _images(2, 2, [[1, 4], [2, 1]], seed=3)  # three tile counts, two images per row
    encoder = model.vision_model
    layout, groups = vision.padding_layout, vision._tile_groups
    taken = []
    monkeypatch.setattr(vision, "padding_layout", lambda is_pad: taken.append(layout(is_pad)) or taken[-1])
    runs = []
    for split in (True, False):
        if not split:  # Meta's masked attention over the mixed batch, as before
            monkeypatch.setattr(vision, "padding_layout", lambda is_pad: None)
            monkeypatch.setattr(vision, "_tile_groups", lambda tile_mask: None)
        encoder.zero_grad(set_to_none=True)
        out = encoder(**images)
        (out * torch.linspace(-1, 1, out.shape[-1])).square().mean().backward()
        runs.append(
            (out.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None})
        )
    encoder.zero_grad(set_to_none=True)
    assert groups(images["aspect_ratio_mask"].flatten(0, 1)) is not None
    assert sorted(t[2] for t in taken) == [encoder.config.num_patches * n for n in (1, 2, 4)]  # real tokens
    (split_out, split_grads), (mask_out, mask_grads) = runs
    torch.testing.assert_close(split_out, mask_out, rtol=1e-4, atol=1e-4)
    assert split_grads.keys() == mask_grads.keys() and len(split_grads) > 10
    for name, g in split_grads.items():
        torch.testing.assert_close(g, mask_grads[name], rtol=1e-3, atol=1e-5, msg=name)
