"""Examples -> training batches in Meta's chat format, with labels on the assistant replies only.

Token ids are built segment by segment, the way Meta's `ChatFormat.encode_dialog_prompt` builds them
(llama-models `llama3/chat_format.py`): `<|begin_of_text|>`, then per message the header
`<|start_header_id|>role<|end_header_id|>` + "\\n\\n", the content (each `<|image|>` and each text item
tokenized on its own), `<|eot_id|>`. Special tokens come only from this format; a text item is tokenized
as text (data.py refuses text holding special-token strings). Because the segments are known, the label
mask needs no searching in rendered text: a token is trained exactly when it belongs to an assistant
message's content or closes it (`<|eot_id|>`). Headers, system and user text, `<|image|>` (id 128256,
which the 128,256-row output layer cannot even predict) and padding get -100. For ordinary text the ids
equal what the processor gives for `render_chat(...)` (tested); they can differ only where a content
starts with whitespace that the rendered string would merge with the header's "\\n\\n".

Labels are aligned with `input_ids` (the loss shifts them). Rows are right-padded. Truncation to
`max_length` cuts the end of the row and drops the images whose `<|image|>` token was cut, so an image
token never loses its image (and no image lacks its token). `max_num_tiles` caps the tiles of each
image, which bounds the image memory of a batch. A batch may mix rows with and without images, and
rows with several.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llama_vision.adapters.masks import cross_attention_mask
from llama_vision.chat import ROLES
from llama_vision.config import LlamaVisionConfig
from llama_vision.encoders.image_transform import load_image, pack_images, transform_image
from llama_vision.finetune.data import Example
from llama_vision.tokenizer import END_HEADER, START_HEADER, Tokenizer

IGNORE = -100  # the label of tokens that are not trained (cross_entropy's ignore_index)


@dataclass
class Encoded:
    ids: list[int]
    labels: list[int]
    images: list[Any]  # one per <|image|> in ids, in order
    truncated: bool


def encode_messages(
    messages: Sequence[dict[str, Any]], tokenizer: Tokenizer, max_length: int | None = None
) -> Encoded:
    """Token ids and labels of one conversation (see the module docstring), truncated to `max_length`."""
    ids, labels, images = [tokenizer.bos_id], [IGNORE], []

    def add(tokens: list[int], trained: bool) -> None:
        ids.extend(tokens)
        labels.extend(tokens if trained else [IGNORE] * len(tokens))

    for message in messages:
        trained = message["role"] == "assistant"
        add(tokenizer.encode(f"{START_HEADER}{ROLES[message['role']]}{END_HEADER}\n\n"), False)
        content = message["content"]
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for item in items:
            if item["type"] == "image":
                add([tokenizer.image_id], False)
                images.append(item["image"])
            else:
                add(tokenizer.encode(item["text"]), trained)
        add([tokenizer.eot_id], trained)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
        images = images[: ids.count(tokenizer.image_id)]  # the images whose tokens were kept
    return Encoded(ids, labels, images, truncated)


def checked_max_tiles(config: LlamaVisionConfig, max_num_tiles: int | None) -> int:
    """The tiles per image to cut to: the model's maximum when None, else checked against it."""
    limit = config.vision.max_num_tiles
    max_num_tiles = limit if max_num_tiles is None else max_num_tiles
    if not isinstance(max_num_tiles, int) or not 1 <= max_num_tiles <= limit:
        raise ValueError(f"max_num_tiles must be an integer from 1 to {limit}, got {max_num_tiles!r}")
    return max_num_tiles


def tiled_images(
    rows: Sequence[Sequence[Any]], sources: Sequence[str], config: LlamaVisionConfig, max_num_tiles: int
) -> dict[str, Any]:
    """Each row's images loaded, cut into at most `max_num_tiles` tiles and packed (`pack_images`); an
    image that fails is reported with its row's source ("file:line")."""
    v = config.vision
    tiled = []
    for images, source in zip(rows, sources):
        try:
            tiled.append(
                [
                    transform_image(load_image(im), tile_size=v.image_size, max_num_tiles=max_num_tiles)
                    for im in images
                ]
            )
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
    return pack_images(
        tiled, max_num_tiles=v.max_num_tiles, tile_size=v.image_size, aspect_ratios=v.supported_aspect_ratios
    )


class Collator:
    """`collator(examples)` -> model inputs plus `labels` (B, T), right-padded."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        config: LlamaVisionConfig,
        *,
        max_length: int = 2048,
        max_num_tiles: int | None = None,
    ) -> None:
        max_num_tiles = checked_max_tiles(config, max_num_tiles)
        if not isinstance(max_length, int) or max_length < 8:
            raise ValueError(f"max_length must be an integer of at least 8, got {max_length!r}")
        self.tokenizer, self.config = tokenizer, config
        self.max_length, self.max_num_tiles = max_length, max_num_tiles
        self.truncated = 0  # rows cut to max_length so far

    def encode(self, example: Example) -> Encoded:
        return encode_messages(example.messages, self.tokenizer, self.max_length)

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        rows = [self.encode(e) for e in examples]
        self.truncated += sum(r.truncated for r in rows)
        T = max(len(r.ids) for r in rows)
        B = len(rows)
        input_ids = torch.full((B, T), self.tokenizer.pad_id, dtype=torch.int64)
        labels = torch.full((B, T), IGNORE, dtype=torch.int64)
        attention_mask = torch.zeros(B, T, dtype=torch.int64)
        for b, row in enumerate(rows):
            n = len(row.ids)
            input_ids[b, :n] = torch.tensor(row.ids)
            labels[b, :n] = torch.tensor(row.labels)
            attention_mask[b, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if any(row.images for row in rows):
            batch.update(self._images(rows, examples))
        return batch

    def _images(self, rows: list[Encoded], examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        v = self.config.vision
        packed = tiled_images(
            [row.images for row in rows], [e.source for e in examples], self.config, self.max_num_tiles
        )
        mask = cross_attention_mask(
            [row.ids for row in rows], packed["num_tiles"], self.config.image_token_id, v.max_num_tiles
        )
        return {
            "pixel_values": packed["pixel_values"],
            "aspect_ratio_ids": packed["aspect_ratio_ids"],
            "aspect_ratio_mask": packed["aspect_ratio_mask"],
            "cross_attention_mask": mask,
        }


def marked_text(encoded: Encoded, tokenizer: Tokenizer) -> str:
    """The row as text with the trained spans between `[[` and `]]` (for `--dry-run`)."""
    out, trained = [], False
    for token, label in zip(encoded.ids, encoded.labels):
        if (label != IGNORE) != trained:
            trained = not trained
            out.append("[[" if trained else "]]")
        out.append(tokenizer.decode([token]))
    if trained:
        out.append("]]")
    return "".join(out)
