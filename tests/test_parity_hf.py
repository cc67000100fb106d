"""Parity with Hugging Face transformers' `MllamaForConditionalGeneration` on random weights.

tests/reference.py builds the HF model for our config (vision intermediate indices lowered by one, which
makes transformers >= 4.56 compute what Meta computes), `save_pretrained` writes it, config.json gets the
hub's indices back, and `load_checkpoint` reads the directory. Inputs are what HF's processor makes
(its PIL image processor and its mask functions, on token ids from Meta's tokenizer), given to both
models; logits are compared in float32 with max |ours - HF| <= 1e-4 * max(1, max |HF|).

HF and ours (= Meta) agree when no text row sees zero images, i.e. when the first token is `<|image|>`
(`<|image|><|begin_of_text|>...` is what HF's processor makes of "<|image|>..."), and on text-only
prompts. For text before the first image HF lets the tokens attend uniformly to the image (transformers
issue #39379) where Meta zeroes them; `test_known_difference_text_before_image` pins that.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("llama_models")  # Meta's tokenizer writes the token ids

from reference import (  # noqa: E402
    IMAGE_TOKEN_ID,
    SIZES,
    assert_logits_close,
    build_hf_model,
    chat_prompt,
    hf_inputs,
    hf_logits,
    image_first_prompt,
    meta_tokenizer,
    random_image,
    save_hf_checkpoint,
)
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from llama_vision.config import PRESETS, TextConfig, VisionConfig  # noqa: E402
from llama_vision.weights import load_checkpoint  # noqa: E402

TILE = 56
TINY = PRESETS["tiny"]  # vision 64 wide, 6 + 2 layers, intermediates (1, 3, 5); text 128 wide, cross (1, 4)
CONFIGS = {
    "tiny": TINY,
    # one KV head, a cross-attention layer last, no RoPE scaling, two intermediates
    "tiny-kv1": TINY.replace(
        vision=VisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_global_layers=2,
            attention_heads=2,
            image_size=TILE,
            intermediate_layers_indices=(1, 2),
        ),
        text=TextConfig(
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=5,
            num_attention_heads=2,
            num_key_value_heads=1,
            rope_theta=10000.0,
            rope_scaling=None,
            cross_attention_layers=(2, 4),
        ),
    ),
}
assert TINY.vision.image_size == TILE


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(HF's model, ours loaded from the directory `save_pretrained` wrote, that directory)."""
    hf = build_hf_model(CONFIGS[request.param], seed=3)
    path = save_hf_checkpoint(hf, tmp_path_factory.mktemp("hf_ckpt"))
    return hf, load_checkpoint(path, dtype=torch.float32), path


@torch.no_grad()
def check(pair, token_rows: list[list[int]], images: list[list]) -> dict[str, torch.Tensor]:
    """Compare logits on the processor's inputs for these rows; return those inputs."""
    hf, ours, _ = pair
    inputs = hf_inputs(token_rows, images, tile_size=TILE)
    assert_logits_close(ours(**inputs), hf_logits(hf, inputs))
    return inputs


# ------------------------------------------------------------------------------------------ cases
def test_saved_checkpoint_is_the_hub_layout(pair):
    """transformers 5.23's save_pretrained writes the legacy hub keys; config.json lists Meta's indices."""
    hf, ours, path = pair
    with safe_open(path / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    prefixes = ("vision_model.", "multi_modal_projector.", "language_model.model.", "language_model.lm_head.")
    assert keys and all(k.startswith(prefixes) for k in keys), sorted(
        k for k in keys if not k.startswith(prefixes)
    )
    assert keys == set(ours.state_dict())
    saved = json.loads((path / "config.json").read_text())["vision_config"]["intermediate_layers_indices"]
    assert saved == list(ours.config.vision.intermediate_layers_indices)
    assert [i - 1 for i in saved] == list(hf.config.vision_config.intermediate_layers_indices)


@pytest.mark.parametrize("size", sorted(SIZES), ids=lambda s: f"{s[0]}x{s[1]}")
def test_image_first(pair, size):
    tokens = image_first_prompt("If I had to write a haiku for this one, it would be:")
    assert tokens[:2] == [IMAGE_TOKEN_ID, 128000]
    inputs = check(pair, [tokens], [[random_image(*size, seed=sum(size))]])
    h, w = SIZES[size]
    assert inputs["aspect_ratio_mask"].sum() == h * w


def test_two_adjacent_images_first(pair):
    tokens = image_first_prompt("Compare these two pictures.", n_images=2)
    check(pair, [tokens], [[random_image(100, 100, seed=40), random_image(50, 160, seed=41)]])


def test_two_images_with_text_between(pair):
    encode = meta_tokenizer().encode
    tokens = (
        [IMAGE_TOKEN_ID]
        + encode("Look at this picture", bos=True, eos=False)
        + [IMAGE_TOKEN_ID]
        + encode(" and at this one. What changed?", bos=False, eos=False)
    )
    check(pair, [tokens], [[random_image(110, 50, seed=42), random_image(170, 40, seed=43)]])


def test_batch_rows_with_different_image_counts(pair):
    # row 0: one image and a padding image slot (aspect ratio id 0); row 1: two images
    a = image_first_prompt("Describe this picture, please.")
    b = image_first_prompt("What differs between them?", n_images=2)
    assert len(a) == len(b)
    images = [
        [random_image(40, 170, seed=44)],
        [random_image(50, 50, seed=45), random_image(160, 50, seed=46)],
    ]
    check(pair, [a, b], images)


def test_text_only(pair):
    tokens, _ = chat_prompt([("user", ["Write a haiku about the sea."])])
    check(pair, [tokens], [[]])


def test_new_transformers_key_layout_loads(pair, tmp_path):
    """A raw state_dict of transformers >= 4.52 (`model.language_model.*`, `lm_head.weight`, ...), as
    trainers and PEFT merges save it, loads to the same model."""
    hf, ours, path = pair
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if "rotary_emb" not in k}
    assert any(k.startswith("model.language_model.layers.") for k in state) and "lm_head.weight" in state
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    reloaded = load_checkpoint(tmp_path, dtype=torch.float32)
    for key, tensor in ours.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key


@torch.no_grad()
def test_known_difference_text_before_image(pair):
    """transformers issue #39379: in a chat prompt the header before `<|image|>` sees no image. Meta (and
    ours) zero the cross-attention layers for those rows, so they equal a text-only run; HF lets them
    attend uniformly to all image tokens, so HF differs on those rows and, through self-attention to
    them, on every row after them too."""
    hf, ours, _ = pair
    tokens, images = chat_prompt([("user", [random_image(100, 100, seed=47), "Describe this image."])])
    k = tokens.index(IMAGE_TOKEN_ID)
    assert k == 5
    inputs = hf_inputs([tokens], [images], tile_size=TILE)
    ref = hf_logits(hf, inputs)
    got = ours(**inputs)
    text_only = ours(input_ids=inputs["input_ids"])
    tol = 1e-4 * max(1.0, ref.abs().max().item())

    assert torch.equal(got[:, :k], text_only[:, :k])  # ours: the image is invisible before its token
    per_row = (got - ref).abs().amax(-1)[0]  # T
    assert (per_row[:k] > 100 * tol).all(), per_row  # HF: every header row attends to the image
    assert (per_row[k:] > 100 * tol).all(), per_row  # and every later row sees those rows
    # HF's own view of the pre-image rows does depend on the image
    other = hf_inputs([tokens], [[random_image(100, 100, seed=48)]], tile_size=TILE)
    assert (hf_logits(hf, other)[:, :k] - ref[:, :k]).abs().max() > 100 * tol
