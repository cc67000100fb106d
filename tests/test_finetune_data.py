"""Fine-tuning data and collation: record forms, errors that name the line, the label mask (exactly the
assistant tokens), truncation that keeps images with their tokens, mixed batches, the tile cap."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from reference import random_image

from llama_vision.config import PRESETS
from llama_vision.finetune.collate import IGNORE, Collator, encode_messages, marked_text
from llama_vision.finetune.data import Example, load_examples
from llama_vision.processor import Processor
from llama_vision.tokenizer import Tokenizer

CONFIG = PRESETS["tiny"]


@pytest.fixture(scope="module")
def tokenizer(hf_tokenizer_json: Path) -> Tokenizer:
    return Tokenizer.from_file(hf_tokenizer_json)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    random_image(80, 40, seed=1).save(tmp_path / "img" / "a.png")
    random_image(30, 90, seed=2).save(tmp_path / "img" / "b.png")
    return tmp_path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def image_chat(*images: str, question: str = "What is it?", answer: str = "A cat.") -> dict:
    content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


def test_jsonl_forms_and_relative_paths(data_dir: Path) -> None:
    llava = {
        "images": ["img/a.png", "img/b.png"],
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "<image>\nLeft, and <image>\nright: what changed?"},
            {"from": "gpt", "value": "Colour."},
        ],
    }
    no_marker = {
        "image": "img/a.png",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}],
    }
    placeholders = {
        "images": ["img/b.png"],
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "text": None}, {"type": "text", "text": "Q", "image": None}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "A"}]},
        ],
    }
    path = write_jsonl(
        data_dir / "train.jsonl", [image_chat("img/a.png"), llava, "", no_marker, placeholders]
    )
    examples = load_examples(path)
    assert [e.source for e in examples] == [f"{path}:{n}" for n in (1, 2, 4, 5)]
    assert examples[0].messages[0]["content"][0]["image"] == str(data_dir / "img" / "a.png")
    user = examples[1].messages[1]["content"]
    assert [i["type"] for i in user] == ["image", "text", "image", "text"]
    assert user[1]["text"] == "Left, and " and user[3]["text"] == "right: what changed?"
    assert user[2]["image"] == str(data_dir / "img" / "b.png")
    assert examples[2].messages[0]["content"][0]["type"] == "image"
    assert examples[3].messages[0]["content"] == [
        {"type": "image", "image": str(data_dir / "img" / "b.png")},
        {"type": "text", "text": "Q"},
    ]


@pytest.mark.parametrize(
    "record, message",
    [
        ("{not json", "invalid JSON"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
        (image_chat("img/missing.png"), "not found"),
        (image_chat("img/broken.png"), "cannot read image"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role"),
        (image_chat(question="say <|eot_id|> now"), "special token '<|eot_id|>'"),
        (
            {"image": "img/a.png", "conversations": [{"from": "human", "value": "<image><image>"}]},
            "2 <image> markers",
        ),
        ({"text": "hello"}, "expected a 'messages' or 'conversations' field"),
    ],
)
def test_bad_record_names_file_and_line(data_dir: Path, record: object, message: str) -> None:
    (data_dir / "img" / "broken.png").write_bytes(b"not an image at all")
    path = write_jsonl(data_dir / "train.jsonl", [image_chat("img/a.png"), record, image_chat()])
    with pytest.raises(ValueError, match=rf"train\.jsonl:2: .*{re.escape(message)}"):
        load_examples(path)


def test_skip_bad_drops_and_reports(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(
        data_dir / "train.jsonl", [image_chat("img/a.png"), "{oops", image_chat("img/nope.png")]
    )
    assert len(load_examples(path, skip_bad=True)) == 1
    err = capsys.readouterr().err
    assert "skipped 2 bad records of 3" in err and "train.jsonl:2" in err and "train.jsonl:3" in err


def trained_tokens(encoded, tokenizer: Tokenizer) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(encoded.ids, encoded.labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_label_mask_is_exactly_the_assistant_replies(tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You answer in one word."},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "a"},
                {"type": "image", "image": "b"},
                {"type": "text", "text": "Which is red?"},
            ],
        },  # fmt: skip
        {"role": "assistant", "content": "Left."},
        {"role": "user", "content": "And blue?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Right"}, {"type": "text", "text": "."}]},
    ]
    encoded = encode_messages(messages, tokenizer)
    assert trained_tokens(encoded, tokenizer) == ["Left.<|eot_id|>", "Right.<|eot_id|>"]
    assert encoded.images == ["a", "b"]
    image_positions = [i for i, t in enumerate(encoded.ids) if t == tokenizer.image_id]
    assert len(image_positions) == 2 and all(encoded.labels[i] == IGNORE for i in image_positions)
    # the same ids as the processor gives for the rendered conversation (training == inference format)
    processor = Processor(tokenizer, CONFIG)
    assert encoded.ids == processor.encode_chat(messages, add_generation_prompt=False)
    # text-only conversation
    text_only = encode_messages(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tokenizer
    )
    assert trained_tokens(text_only, tokenizer) == ["Hello!<|eot_id|>"]
    assert max(t for t, lab in zip(text_only.ids, text_only.labels) if lab != IGNORE) < CONFIG.text.vocab_size
    assert "[[Hello!<|eot_id|>]]" in marked_text(text_only, tokenizer)


def test_truncation_drops_images_with_their_tokens(tokenizer: Tokenizer) -> None:
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": "a"},
                {"type": "text", "text": "one two three"},
                {"type": "image", "image": "b"},
                {"type": "text", "text": "four"},
            ],
        },  # fmt: skip
        {"role": "assistant", "content": "five"},
    ]
    full = encode_messages(messages, tokenizer)
    second = [i for i, t in enumerate(full.ids) if t == tokenizer.image_id][1]
    for limit in range(8, len(full.ids) + 1):
        cut = encode_messages(messages, tokenizer, limit)
        assert len(cut.ids) == min(limit, len(full.ids)) and cut.truncated == (limit < len(full.ids))
        assert cut.ids.count(tokenizer.image_id) == len(cut.images)
        assert cut.images == (["a", "b"] if limit > second else ["a"])


def test_mixed_batch_several_images_and_tile_cap(tokenizer: Tokenizer, data_dir: Path) -> None:
    a, b = str(data_dir / "img" / "a.png"), str(data_dir / "img" / "b.png")
    examples = [
        Example(image_chat(a, b)["messages"], "x:1"),
        Example(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."}],
            "x:2",
        ),
        Example(image_chat(b)["messages"], "x:3"),
    ]
    batch = Collator(tokenizer, CONFIG, max_num_tiles=2)(examples)
    B, T = batch["input_ids"].shape
    assert B == 3 and batch["labels"].shape == (B, T)
    assert batch["pixel_values"].shape[:3] == (3, 2, CONFIG.vision.max_num_tiles)
    assert batch["aspect_ratio_mask"].sum(-1).max() <= 2  # at most 2 tiles per image
    assert batch["aspect_ratio_ids"][1].tolist() == [0, 0]  # the text-only row has padding images only
    assert batch["cross_attention_mask"][1].sum() == 0
    lengths = batch["attention_mask"].sum(-1)
    for row in range(B):  # right padding, never trained
        assert (batch["labels"][row, lengths[row] :] == IGNORE).all()
        assert (batch["input_ids"][row, lengths[row] :] == tokenizer.pad_id).all()
    assert (batch["labels"][batch["labels"] != IGNORE] < CONFIG.text.vocab_size).all()


def test_unreadable_image_at_collation_names_the_record(tokenizer: Tokenizer, data_dir: Path) -> None:
    bad = data_dir / "img" / "truncated.png"
    bad.write_bytes((data_dir / "img" / "a.png").read_bytes()[:200])
    with pytest.raises(ValueError, match="train.jsonl:7: "):
        Collator(tokenizer, CONFIG)([Example(image_chat(str(bad))["messages"], "train.jsonl:7")])


def test_batch_runs_through_the_model(tokenizer: Tokenizer, data_dir: Path) -> None:
    from llama_vision import LlamaVisionModel

    a = str(data_dir / "img" / "a.png")
    examples = [Example(image_chat(a)["messages"], "x:1"), Example([{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}], "x:2")]  # fmt: skip
    batch = Collator(tokenizer, CONFIG)(examples)
    labels = batch.pop("labels")
    torch.manual_seed(0)
    logits = LlamaVisionModel(CONFIG)(**batch)
    assert logits.shape[:2] == labels.shape and torch.isfinite(logits).all()


def test_datasets_directory(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = {
        "messages": [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "A dot."}]}],
            [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}],
        ],
        "images": [[random_image(40, 30, seed=5)], []],
    }  # fmt: skip
    features = datasets.Features({
        "messages": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "images": datasets.Sequence(datasets.Image()),
    })  # fmt: skip
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    examples = load_examples(tmp_path / "ds")
    assert [e.source for e in examples] == [f"{tmp_path / 'ds'}[0]", f"{tmp_path / 'ds'}[1]"]
    image_item = examples[0].messages[0]["content"][0]
    assert image_item["type"] == "image" and image_item["image"].size == (40, 30)
    assert examples[1].messages[1]["content"] == [{"type": "text", "text": "Hello"}]
