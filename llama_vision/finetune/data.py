"""Training data: chat examples read from JSONL files (two record forms) or a local Hugging Face
`datasets` directory, checked record by record.

Record forms, one JSON object per line:

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/0001.png"},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": "A cat."}]}

    {"image": "img/0001.png", "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                                                {"from": "gpt", "value": "A cat."}]}      (LLaVA / ShareGPT)

Image paths are relative to the JSONL file. Messages may hold several images or none and any number of
turns. A messages record may also list its images in a top-level `images` (or `image`) field and mark
their places with `{"type": "image"}` items, which is what Hugging Face datasets hold; a LLaVA record
places its images at its `<image>` markers, or before the first human text when it has none.

Checks made here, so a bad record is reported with `file:line` before training starts: JSON syntax,
the message shape (`llama_vision.chat.validate_messages`), at least one assistant reply with text only,
the image count against the markers, image files that exist, are not empty and that PIL recognises
(decoding happens at collation; a file that fails there is reported with its line too), and text that
holds special-token strings such as `<|eot_id|>`: they would be parsed as control tokens and corrupt
the label mask, so they are refused rather than trained on. Nothing is dropped silently: `skip_bad`
drops bad records, prints how many and the first few reasons to stderr.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from llama_vision.chat import validate_messages

T = TypeVar("T")
SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
               "system": "system"}  # fmt: skip
LLAVA_IMAGE = "<image>"


@dataclass(frozen=True)
class Example:
    """One conversation; image items hold absolute paths (JSONL) or PIL images (datasets).
    `source` is "file:line" (or "dir[row]") for error messages."""

    messages: list[dict[str, Any]]
    source: str


def text_length(example: Example) -> int:
    """Characters of an example's text, a cheap stand-in for its token count (`group_by_length`)."""
    total = 0
    for message in example.messages:
        content = message["content"]
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        total += sum(len(item.get("text", "")) for item in items if item["type"] == "text")
    return total


def load_examples(path: str | Path, *, skip_bad: bool = False) -> list[Example]:
    """Every example of a JSONL file or a `datasets.save_to_disk` directory, checked."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"training data {path} does not exist")
    if path.is_dir():
        rows = _dataset_rows(path)
    else:
        rows = _jsonl_rows(path)
    return checked_records(
        rows, lambda row, base, source: Example(parse_record(row, base), source), path, skip_bad
    )


def checked_records(
    rows: list[tuple[str, Any, Path]], parse: Callable[[Any, Path, str], T], path: Path, skip_bad: bool
) -> list[T]:
    """`parse(row, base, source)` of every row; a ValueError stops with the row's source, or with
    `skip_bad` drops the row and is counted on stderr (with the first few reasons)."""
    records, bad = [], []
    for source, row, base in rows:
        try:
            records.append(parse(row, base, source))
        except ValueError as e:
            if not skip_bad:
                raise ValueError(f"{source}: {e}") from None
            bad.append(f"{source}: {e}")
    if bad:
        print(f"skipped {len(bad)} bad records of {len(bad) + len(records)} in {path}", file=sys.stderr)
        for reason in bad[:5]:
            print(f"  {reason}", file=sys.stderr)
    if not records:
        raise ValueError(f"{path}: no usable examples")
    return records


def _jsonl_rows(path: Path) -> list[tuple[str, Any, Path]]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row: Any = json.loads(line)
        except json.JSONDecodeError as e:
            row = _Invalid(f"invalid JSON ({e.msg} at column {e.colno})")
        rows.append((f"{path}:{n}", row, path.parent))
    return rows


class _Invalid:
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _dataset_rows(path: Path) -> list[tuple[str, Any, Path]]:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"{path} is a directory: reading a Hugging Face datasets directory needs the `datasets` "
            "package (pip install 'llama-vision[finetune]')"
        ) from None
    try:
        data = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError and its own errors for a bad directory
        raise ValueError(f"cannot read the datasets directory {path}: {e}") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise ValueError(f"{path}: a DatasetDict without a 'train' split (has {list(data)})")
        data = data["train"]
    if "messages" not in data.column_names and "conversations" not in data.column_names:
        raise ValueError(f"{path}: needs a 'messages' (or 'conversations') column, has {data.column_names}")
    return [(f"{path}[{i}]", row, path) for i, row in enumerate(data)]


def parse_record(row: Any, base: Path) -> list[dict[str, Any]]:
    """The chat messages of one record, images resolved; ValueError says what is wrong."""
    if isinstance(row, _Invalid):
        raise ValueError(row.reason)
    if not isinstance(row, Mapping):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    images = _top_level_images(row)
    if "messages" in row:
        messages = _chat_messages(row["messages"], images)
    elif "conversations" in row:
        messages = _llava_messages(row["conversations"], images)
    else:
        raise ValueError(f"expected a 'messages' or 'conversations' field, got fields {sorted(row)}")
    validate_messages(messages)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: nothing to train on")
    for i, message in enumerate(messages):
        content = message["content"]
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for item in items:
            if item["type"] == "text" and (token := SPECIAL_TOKEN.search(item["text"])):
                raise ValueError(
                    f"message {i}: text holds the special token {token.group()!r}; special tokens come only "
                    "from the chat format"
                )
            if item["type"] == "image":
                if message["role"] != "user":
                    raise ValueError(f"message {i}: images are allowed in user messages only")
                item["image"] = _resolve_image(item.get("image"), base, i)
    return messages


def _top_level_images(row: Mapping[str, Any]) -> list[Any]:
    images = row.get("images", row.get("image"))
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _chat_messages(raw: Any, images: list[Any]) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise ValueError(f"'messages' must be a list, got {type(raw).__name__}")
    messages, pending = [], list(images)
    for i, message in enumerate(raw):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i}: expected an object with 'role' and 'content'")
        content = message.get("content")
        if isinstance(content, list):
            content = [_item(item, pending, i) for item in content]
        messages.append({"role": message.get("role"), "content": content})
    if pending:
        raise ValueError(f"{len(images)} images listed but only {len(images) - len(pending)} image items")
    return messages


def _item(item: Any, pending: list[Any], i: int) -> dict[str, Any]:
    """A content item with the None fields of datasets' Arrow structs removed; an image item without
    its own image takes the next one of the record's image list."""
    if not isinstance(item, Mapping):
        raise ValueError(f"message {i}: content items must be objects, got {item!r}")
    item = {k: v for k, v in item.items() if v is not None}
    if item.get("type") == "image" and "image" not in item:
        if not pending:
            raise ValueError(f"message {i}: more image items than images")
        item["image"] = pending.pop(0)
    return item


def _llava_messages(raw: Any, images: list[Any]) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise ValueError(f"'conversations' must be a list, got {type(raw).__name__}")
    turns = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {i}: expected an object with 'from' and a 'value' string")
        role = LLAVA_ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(
                f"turn {i}: unknown 'from' {turn.get('from')!r}, expected one of {list(LLAVA_ROLES)}"
            )
        turns.append((role, turn["value"]))
    markers = sum(value.count(LLAVA_IMAGE) for _, value in turns)
    if markers and markers != len(images):
        raise ValueError(f"{markers} {LLAVA_IMAGE} markers but {len(images)} images")
    pending = list(images)
    messages = []
    for role, value in turns:
        if role != "user" or not images:
            messages.append({"role": role, "content": value})
            continue
        if not markers and pending:  # no markers: every image before the first user text
            value = LLAVA_IMAGE * len(pending) + value
        content: list[dict[str, Any]] = []
        for n, piece in enumerate(value.split(LLAVA_IMAGE)):
            if n:
                content.append({"type": "image", "image": pending.pop(0)})
            piece = piece.strip("\n") if n or content else piece  # the "<image>\n" convention
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": content})
    return messages


def _resolve_image(image: Any, base: Path, i: int) -> Any:
    """A path relative to the data file -> absolute path, checked; other images (PIL, bytes) as they are."""
    if image is None:
        raise ValueError(f"message {i}: an image item without an image")
    if isinstance(image, Mapping) and "path" in image:  # datasets' undecoded Image feature
        image = image.get("bytes") or image["path"]
    if not isinstance(image, str):
        return image
    path = Path(image) if Path(image).is_absolute() else base / image
    if not path.is_file():
        raise ValueError(f"message {i}: image file {str(path)!r} not found")
    if path.stat().st_size == 0:
        raise ValueError(f"message {i}: image file {str(path)!r} is empty")
    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 - reads the header only
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError...
        raise ValueError(f"message {i}: cannot read image {str(path)!r}: {e}") from None
    return str(path)


def reply_and_prompt(messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """For evaluation: the messages before the last assistant reply, and that reply's text."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    content = messages[last]["content"]
    text = content if isinstance(content, str) else "".join(item["text"] for item in content)
    return list(messages[:last]), text
