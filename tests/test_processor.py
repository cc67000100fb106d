"""The processor: outputs equal Hugging Face's MllamaProcessor's where HF is defined, and it handles
what HF rejects (mixed batches, flat image lists) consistently."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from reference import hf_image_processor, random_image

from llama_vision.config import PRESETS, TextConfig
from llama_vision.processor import Processor
from llama_vision.tokenizer import Tokenizer

CONFIG = PRESETS["tiny"]  # 56 px tiles


@pytest.fixture(scope="module")
def processor(hf_tokenizer_json: Path) -> Processor:
    return Processor(Tokenizer.from_file(hf_tokenizer_json), CONFIG)


IMAGES = [random_image(120, 50, seed=1), random_image(40, 40, seed=2), random_image(60, 170, seed=3)]


@pytest.mark.parametrize(
    ("prompt", "n_images"),
    [
        ("<|image|><|begin_of_text|>If I had to write a haiku for this one", 1),
        ("<|image|><|image|><|begin_of_text|>Compare these two pictures.", 2),
        ("<|image|><|begin_of_text|>First this<|image|> then that", 2),
        ("<|begin_of_text|>no image at all", 0),
    ],
)
def test_equals_transformers_processor(
    processor: Processor, hf_tokenizer_json: Path, prompt: str, n_images: int
):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(hf_tokenizer_json),
        bos_token="<|begin_of_text|>",
        pad_token="<|finetune_right_pad_id|>",
    )
    hf = transformers.MllamaProcessor(
        image_processor=hf_image_processor(CONFIG.vision.image_size), tokenizer=hf_tok, chat_template="x"
    )
    images = IMAGES[:n_images]
    expected = hf(text=prompt, images=images or None, return_tensors="pt")
    ours = processor(text=prompt, images=images)
    assert set(ours) == {k for k in expected if k != "num_tiles"}
    for key, value in ours.items():
        torch.testing.assert_close(value, expected[key].to(value.dtype), rtol=0, atol=1e-6, msg=key)


def test_shapes_and_bos(processor: Processor) -> None:
    out = processor(text="<|image|>What is this?", images=IMAGES[0])
    ids = out["input_ids"][0].tolist()
    assert ids[:2] == [128000, 128256]  # Meta's order: BOS, then the image
    T = len(ids)
    assert out["attention_mask"].shape == (1, T)
    assert out["pixel_values"].shape == (1, 1, 4, 3, 56, 56)
    assert out["aspect_ratio_ids"].shape == (1, 1) and out["aspect_ratio_mask"].shape == (1, 1, 4)
    assert out["cross_attention_mask"].shape == (1, T, 1, 4)
    assert out["cross_attention_mask"][0, 0].sum() == 0  # BOS sees no image
    assert out["cross_attention_mask"][0, 1:, 0, :3].all()  # 120x50 -> 1x3 tiles


def test_flat_and_nested_images_agree(processor: Processor) -> None:
    prompts = ["<|image|>one", "<|image|><|image|>two", "none"]
    flat = processor(text=prompts, images=IMAGES)
    nested = processor(text=prompts, images=[[IMAGES[0]], IMAGES[1:], []])
    assert flat.keys() == nested.keys()
    for key in flat:
        torch.testing.assert_close(flat[key], nested[key], rtol=0, atol=0)
    assert flat["pixel_values"].shape[:2] == (3, 2)
    assert flat["cross_attention_mask"][2].sum() == 0  # the row without images


def test_left_padding(processor: Processor) -> None:
    out = processor(
        text=["<|image|>a much longer prompt than the other", "<|image|>short"], images=IMAGES[:2]
    )
    mask = out["attention_mask"]
    assert mask[0].all() and not mask[1, 0] and mask[1, -1]
    n_pad = int((mask[1] == 0).sum())
    assert (out["input_ids"][1, :n_pad] == 128004).all()
    assert out["cross_attention_mask"][1, :n_pad].sum() == 0
    right = processor(
        text=["<|image|>a much longer prompt", "<|image|>x"], images=IMAGES[:2], padding_side="right"
    )
    assert right["attention_mask"][1, 0] == 1 and right["attention_mask"][1, -1] == 0


def test_max_num_tiles_per_call(processor: Processor) -> None:
    four = processor(text="<|image|>x", images=IMAGES[2])  # 60x170 -> 3x1 tiles
    one = processor(text="<|image|>x", images=IMAGES[2], max_num_tiles=1)
    assert four["aspect_ratio_mask"][0, 0].tolist() == [1, 1, 1, 0]
    assert one["aspect_ratio_mask"][0, 0].tolist() == [1, 0, 0, 0]
    assert one["pixel_values"].shape == four["pixel_values"].shape  # always the model's N


@pytest.mark.parametrize("bad", [0, 5, "4", 2.0, True])
def test_bad_max_num_tiles(processor: Processor, bad) -> None:
    with pytest.raises(ValueError, match="max_num_tiles must be an integer from 1 to 4"):
        processor(text="<|image|>x", images=IMAGES[0], max_num_tiles=bad)


def test_image_count_mismatches(processor: Processor) -> None:
    with pytest.raises(ValueError, match=r"1 <\|image\|> tokens .* but 2 images"):
        processor(text="<|image|>x", images=IMAGES[:2])
    with pytest.raises(ValueError, match=r"hold 0 <\|image\|> tokens .* but 1 images"):
        processor(text="no image token", images=IMAGES[0])
    with pytest.raises(ValueError, match=re.escape("prompt 1 holds 1 <|image|> tokens but 0 images")):
        processor(text=["<|image|>a", "<|image|>b"], images=[[IMAGES[0]], []])
    with pytest.raises(ValueError, match="2 image lists for 3 prompts"):
        processor(text=["a", "b", "c"], images=[[], []])


def test_bad_text_and_options(processor: Processor) -> None:
    with pytest.raises(ValueError, match="text must be"):
        processor(text=[])
    with pytest.raises(ValueError, match="text must be"):
        processor(text=[1, 2])
    with pytest.raises(ValueError, match="padding_side"):
        processor(text="x", padding_side="middle")


def test_unreadable_image_is_a_value_error(processor: Processor) -> None:
    with pytest.raises(ValueError):
        processor(text="<|image|>x", images=b"not an image")


def test_prompt_over_the_context(hf_tokenizer_json: Path) -> None:
    config = CONFIG.replace(text=TextConfig(**{**CONFIG.text.__dict__, "max_position_embeddings": 8}))
    small = Processor(Tokenizer.from_file(hf_tokenizer_json), config)
    with pytest.raises(ValueError, match="prompt has 1[0-9] tokens, more than the model's context of 8"):
        small(text="one two three four five six seven eight nine ten")


def test_chat_inputs(processor: Processor) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "image", "image": IMAGES[0]}, {"type": "text", "text": "What?"}],
        },
    ]
    prompt = processor.apply_chat_template(messages)
    assert prompt.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    )
    assert prompt.endswith("<|image|>What?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    out = processor.chat_inputs([messages])
    direct = processor(text=prompt, images=[IMAGES[0]])
    for key in direct:
        torch.testing.assert_close(out[key], direct[key], rtol=0, atol=0)
