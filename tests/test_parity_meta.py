"""Parity with Meta's reference (llama-models `CrossAttentionTransformer`) on random weights.

tests/reference.py builds Meta's model, writes its checkpoint in Meta's layout (params.json +
consolidated.00.pth) to a temporary directory, and `load_checkpoint` reads it back into ours; logits of
one full forward are compared in float32 with max |ours - Meta| <= 1e-4 * max(1, max |Meta|). Our
inputs come from Meta's own preprocessing (`VariableSizeImageTransform`, `create_vision_mask`), so the
comparison covers the model and the checkpoint conversion, not the image pipeline.

Two small configurations cover the conversion's variables (fusion schedules [3, 7] and [1, 4] of 8 and
5 layers, GQA 4/2 and 2/1, FFN multiplier or not, scaled RoPE or not, 3 or 2 intermediate layers); one
slow case runs Meta's hard-coded ViT-H/14 tower (1280 wide, 32 + 8 layers) at 56 px tiles.
"""

from __future__ import annotations

import resource
import shutil
import tempfile

import pytest
import torch

pytest.importorskip("llama_models")
pytest.importorskip("fairscale")

from reference import (  # noqa: E402
    IMAGE_TOKEN_ID,
    SIZES,
    assert_logits_close,
    build_meta_model,
    chat_prompt,
    meta_logits,
    meta_model_inputs,
    meta_tokenizer,
    random_image,
    release_memory,
    save_meta_checkpoint,
)

from llama_vision.weights import load_checkpoint  # noqa: E402

TILE = 56

_BASE = dict(
    vocab_size=128256, vision_chunk_size=TILE, vision_max_num_chunks=4, vision_num_cross_attention_layers=2
)
CONFIGS = {
    # fusion schedule [3, 7] -> merged cross layers [3, 8]
    "dim128-8layers": (
        dict(
            _BASE,
            dim=128,
            n_layers=8,
            n_heads=4,
            n_kv_heads=2,
            multiple_of=64,
            ffn_dim_multiplier=1.3,
            norm_eps=1e-5,
            rope_theta=500000.0,
            use_scaled_rope=True,
        ),
        dict(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=6,
            num_global_layers=2,
            attention_heads=4,
            intermediate_layers_indices=[1, 3, 5],
        ),
    ),
    # fusion schedule [1, 4] -> merged cross layers [1, 5]
    "dim64-5layers": (
        dict(
            _BASE,
            dim=64,
            n_layers=5,
            n_heads=2,
            n_kv_heads=1,
            multiple_of=32,
            norm_eps=1e-6,
            rope_theta=10000.0,
            use_scaled_rope=False,
        ),
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_global_layers=2,
            attention_heads=2,
            intermediate_layers_indices=[1, 3],
        ),
    ),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(Meta's model, ours loaded from the checkpoint Meta's model wrote, that checkpoint's directory)."""
    params, vision = CONFIGS[request.param]
    meta = build_meta_model(params, vision=vision, seed=1)
    path = save_meta_checkpoint(meta, params, tmp_path_factory.mktemp("meta_ckpt"), vision=vision)
    ours = load_checkpoint(path, dtype=torch.float32)
    return meta, ours, path


@torch.no_grad()
def check(pair, token_rows: list[list[int]], images: list[list]) -> torch.Tensor:
    meta, ours, _ = pair
    ref = meta_logits(meta, token_rows, images)
    got = ours(**meta_model_inputs(token_rows, images, tile_size=TILE))
    assert_logits_close(got, ref)
    return ref


# ------------------------------------------------------------------------------------------ cases
@pytest.mark.parametrize("size", sorted(SIZES), ids=lambda s: f"{s[0]}x{s[1]}")
def test_chat_image_after_user_header(pair, size):
    image = random_image(*size, seed=sum(size))
    tokens, images = chat_prompt([("user", [image, "Describe this image in two sentences."])])
    assert tokens[:5] == [128000, 128006, 882, 128007, 271] and tokens[5] == IMAGE_TOKEN_ID
    assert meta_model_inputs([tokens], [images], tile_size=TILE)["aspect_ratio_mask"].sum() == (
        SIZES[size][0] * SIZES[size][1]
    )
    check(pair, [tokens], [images])


def test_system_prompt_and_image(pair):
    tokens, images = chat_prompt(
        [
            ("system", ["You are a careful assistant. Answer briefly."]),
            ("user", [random_image(100, 100, seed=3), "What is in this picture?"]),
        ]
    )
    check(pair, [tokens], [images])


def test_image_in_second_user_turn(pair):
    tokens, images = chat_prompt(
        [
            ("user", ["Hello there."]),
            ("assistant", ["Hi! How can I help?"]),
            ("user", [random_image(110, 50, seed=4), "Describe it."]),
        ]
    )
    check(pair, [tokens], [images])


def test_two_images_with_text_between(pair):
    first, second = random_image(110, 50, seed=5), random_image(50, 160, seed=6)
    tokens, images = chat_prompt([("user", [first, "Look at this, then at", second, "What changed?"])])
    assert tokens.count(IMAGE_TOKEN_ID) == 2
    check(pair, [tokens], [images])


def test_two_adjacent_images(pair):
    # adjacent <|image|> tokens are attended jointly by the text that follows them
    tokens, images = chat_prompt(
        [("user", [random_image(100, 100, seed=7), random_image(50, 50, seed=8), "Compare them."])]
    )
    check(pair, [tokens], [images])


def test_base_prompt_begin_of_text_then_image(pair):
    # Meta's plain-completion encoding: <|begin_of_text|><|image|>text
    tokens = [128000, IMAGE_TOKEN_ID] + meta_tokenizer().encode(
        "If I had to write a haiku", bos=False, eos=False
    )
    check(pair, [tokens], [[random_image(170, 40, seed=9)]])


def test_batch_of_two_rows(pair):
    a_tokens, a_images = chat_prompt([("user", [random_image(100, 100, seed=10), "Describe this picture."])])
    b_tokens, b_images = chat_prompt([("user", [random_image(50, 110, seed=11), "Describe that picture."])])
    assert len(a_tokens) == len(b_tokens)
    check(pair, [a_tokens, b_tokens], [a_images, b_images])


def test_batch_rows_with_different_image_counts(pair):
    # row 0 has one image and a padding image slot; row 1 two images with different tile counts
    a_tokens, a_images = chat_prompt(
        [("user", [random_image(40, 170, seed=12), "Describe this picture, please."])]
    )
    b_tokens, b_images = chat_prompt(
        [
            (
                "user",
                [random_image(50, 50, seed=13), random_image(160, 50, seed=14), "What differs between them?"],
            )
        ]
    )
    assert len(a_tokens) == len(b_tokens), (len(a_tokens), len(b_tokens))
    check(pair, [a_tokens, b_tokens], [a_images, b_images])


def test_text_only(pair):
    tokens, images = chat_prompt([("user", ["Write a haiku about the sea."])])
    assert images == []
    check(pair, [tokens], [[]])


def test_text_only_batch(pair):
    a, _ = chat_prompt([("user", ["Name a colour."])])
    b, _ = chat_prompt([("user", ["Name a fruit."])])
    assert len(a) == len(b)
    check(pair, [a, b], [[], []])


@torch.no_grad()
def test_text_before_first_image_ignores_the_image(pair):
    """Meta zeroes both branches of the cross-attention layers for rows that see no image, so the chat
    header before `<|image|>` gives logits independent of the image (bit for bit), in Meta and in ours;
    from the image token on, the image changes the logits."""
    meta, ours, _ = pair
    prompt = ["Describe this image in two sentences."]
    logits = {}
    for seed in (20, 21):
        tokens, images = chat_prompt(
            [("system", ["Be brief."]), ("user", [random_image(100, 100, seed=seed), *prompt])]
        )
        logits["meta", seed] = meta_logits(meta, [tokens], [images])
        logits["ours", seed] = ours(**meta_model_inputs([tokens], [images], tile_size=TILE))
    k = tokens.index(IMAGE_TOKEN_ID)
    assert k > 5
    for who in ("meta", "ours"):
        a, b = logits[who, 20], logits[who, 21]
        assert torch.equal(a[:, :k], b[:, :k]), f"{who}: rows before the image depend on the image"
        assert (a[:, k:] - b[:, k:]).abs().amax(-1).min() > 1e-2, (
            f"{who}: some row after the image ignores it"
        )


@torch.no_grad()
def test_our_processor_end_to_end(pair):
    """Our whole pipeline (chat rendering, tokenizer.model from the checkpoint, image transform, masks)
    against Meta's (ChatFormat, VariableSizeImageTransform, create_vision_mask) on a batch of two chats."""
    from llama_vision.processor import Processor

    meta, ours, path = pair
    pictures = [random_image(160, 50, seed=22), random_image(100, 100, seed=23)]
    texts = ["Describe this picture.", "Describe that picture."]
    rows, images = zip(*(chat_prompt([("user", [p, t])]) for p, t in zip(pictures, texts)))
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": p}, {"type": "text", "text": t}]}]
        for p, t in zip(pictures, texts)
    ]
    inputs = Processor.from_dir(path, ours.config).chat_inputs(conversations)
    assert inputs["input_ids"].tolist() == [list(r) for r in rows]
    expected = meta_model_inputs(rows, images, tile_size=TILE)
    for key, value in expected.items():
        assert torch.equal(inputs[key], value), key
    assert_logits_close(ours(**inputs), meta_logits(meta, rows, images))


# ------------------------------------------------------------------------------------- ViT-H tower
@pytest.mark.slow
@torch.no_grad()
def test_full_vit_h_tower():
    """Meta's real vision tower (no "vision" override in params.json) at 56 px tiles. The fp32 checkpoint
    is ~3.5 GB: Meta's model is freed before ours is loaded, and the directory is deleted afterwards."""
    params = dict(
        _BASE,
        dim=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        multiple_of=64,
        ffn_dim_multiplier=1.3,
        norm_eps=1e-5,
        rope_theta=500000.0,
        use_scaled_rope=True,
    )
    a_tokens, a_images = chat_prompt([("user", [random_image(100, 100, seed=30), "Describe this picture."])])
    b_tokens, b_images = chat_prompt([("user", [random_image(160, 50, seed=31), "Describe that picture."])])
    rows, images = [a_tokens, b_tokens], [a_images, b_images]
    directory = tempfile.mkdtemp(prefix="vit_h_meta_", dir="/tmp")
    try:
        meta = build_meta_model(params, seed=2)
        assert meta.vision_model.vision_encoder.conv1._linear.weight.shape == (1280, 588)
        ref = meta_logits(meta, rows, images)
        save_meta_checkpoint(meta, params, directory)
        del meta
        release_memory()
        ours = load_checkpoint(directory, dtype=torch.float32)
        assert ours.config.vision.hidden_size == 1280 and ours.config.vision.num_hidden_layers == 32
        got = ours(**meta_model_inputs(rows, images, tile_size=TILE))
        del ours
        release_memory()
        assert_logits_close(got, ref)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"ViT-H parity: process peak RSS so far {peak_gib:.1f} GiB")
