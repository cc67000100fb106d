"""Prompts and images to model inputs, with the shapes and meaning of Hugging Face's
`MllamaProcessor` outputs:

    input_ids, attention_mask      (B, T) int64
    pixel_values                   (B, I, N, 3, S, S) float32     only when some row has images
    aspect_ratio_ids               (B, I) int64
    aspect_ratio_mask              (B, I, N) int64
    cross_attention_mask           (B, T, I, N) int64

Differences from HF, on purpose:
- a batch may mix rows with and without images (HF raises; users fed dummy images);
- images may be given per row (nested lists) or as one flat list, which is split by the number of
  `<|image|>` tokens in each row; a count mismatch is an error that names the row;
- a prompt without `<|begin_of_text|>` gets it at the very start, before any image token, as Meta's
  chat format writes it (HF moves leading image tokens in front of BOS);
- rows are left-padded by default (what generation needs); positions count real tokens only, so a
  padded row gives the same logits as the row alone.

Two ways in, on purpose: `chat_inputs(conversations)` (what `LlamaVision.chat/stream/generate` use)
encodes message text as plain text, so special-token strings a user types stay text; `processor(text=...)`
is the raw path for prompts written with special tokens on purpose (rendered templates, few-shot
prompts): special-token strings in `text` are parsed. A prompt that cannot fit the context is refused
before it is encoded when its length alone proves it (`Tokenizer.fewest_tokens`), so a 100 MB prompt
fails in milliseconds; the config and the tokenizer are checked against each other when a processor is
built (`validate.check_tokenizer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llama_vision.adapters.masks import cross_attention_mask
from llama_vision.chat import chat_segments, collect_images, load_chat_template, render_chat
from llama_vision.config import LlamaVisionConfig
from llama_vision.encoders.image_transform import load_image, pack_images, transform_image
from llama_vision.tokenizer import Tokenizer
from llama_vision.validate import check_tokenizer

BOS_TEXT = "<|begin_of_text|>"


class Processor:
    def __init__(
        self,
        tokenizer: Tokenizer,
        config: LlamaVisionConfig,
        *,
        chat_template: str | None = None,
        max_num_tiles: int | None = None,
    ) -> None:
        check_tokenizer(config, tokenizer)
        self.tokenizer = tokenizer
        self.config = config
        self.chat_template = chat_template
        self.max_num_tiles = max_num_tiles or config.vision.max_num_tiles
        self._check_tiles(self.max_num_tiles)

    @classmethod
    def from_dir(cls, directory: str | Path, config: LlamaVisionConfig) -> Processor:
        return cls(Tokenizer.from_dir(directory), config, chat_template=load_chat_template(directory))

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """The prompt string for chat `messages` (the checkpoint's template if it ships one), to look at.
        `processor(text=...)` of it would parse special-token strings typed in the messages: encode chats
        with `encode_chat` / `chat_inputs`."""
        return render_chat(
            messages, add_generation_prompt=add_generation_prompt, chat_template=self.chat_template
        )

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the prompt for chat `messages`: the format's special tokens, message text as text."""
        segments = chat_segments(
            messages, add_generation_prompt=add_generation_prompt, chat_template=self.chat_template
        )
        self._check_length(sum(len(s.text) for s in segments))
        ids = [i for s in segments for i in self.tokenizer.encode(s.text, special=s.special)]
        return self._finish(ids)

    def chat_inputs(
        self, conversations: Sequence[Sequence[dict[str, Any]]], **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """Model inputs for a batch of conversations; images come from the messages themselves."""
        rows = [self.encode_chat(messages) for messages in conversations]
        images = [collect_images(messages) for messages in conversations]
        return self._inputs(rows, images, **kwargs)

    def __call__(
        self,
        text: str | Sequence[str],
        images: Any = None,
        *,
        max_num_tiles: int | None = None,
        padding_side: str = "left",
    ) -> dict[str, torch.Tensor]:
        """Model inputs for raw prompts: special-token strings in `text` ("<|image|>", "<|eot_id|>") are
        parsed. Use `chat_inputs` for text that comes from users."""
        prompts = [text] if isinstance(text, str) else list(text)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("text must be a string or a non-empty list of strings")
        rows = []
        for prompt in prompts:
            self._check_length(len(prompt))
            rows.append(self._finish(self.tokenizer.encode(prompt)))
        return self._inputs(rows, images, max_num_tiles=max_num_tiles, padding_side=padding_side)

    def _inputs(
        self,
        rows: list[list[int]],
        images: Any,
        *,
        max_num_tiles: int | None = None,
        padding_side: str = "left",
    ) -> dict[str, torch.Tensor]:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        max_num_tiles = self.max_num_tiles if max_num_tiles is None else max_num_tiles
        self._check_tiles(max_num_tiles)

        counts = [row.count(self.config.image_token_id) for row in rows]
        per_row = _split_images(images, counts)
        out = self._pad(rows, padding_side)
        if any(per_row):
            v = self.config.vision
            tiled = [[transform_image(load_image(im), tile_size=v.image_size, max_num_tiles=max_num_tiles)
                      for im in row] for row in per_row]  # fmt: skip
            packed = pack_images(
                tiled,
                max_num_tiles=v.max_num_tiles,
                tile_size=v.image_size,
                aspect_ratios=v.supported_aspect_ratios,
            )
            out["pixel_values"] = packed["pixel_values"]
            out["aspect_ratio_ids"] = packed["aspect_ratio_ids"]
            out["aspect_ratio_mask"] = packed["aspect_ratio_mask"]
            out["cross_attention_mask"] = cross_attention_mask(
                out["input_ids"].tolist(), packed["num_tiles"], self.config.image_token_id, v.max_num_tiles
            )
        return out

    def _check_length(self, num_chars: int) -> None:
        """Refuse, before encoding, a prompt whose length alone proves it cannot fit the context."""
        limit = self.config.text.max_position_embeddings
        fewest = self.tokenizer.fewest_tokens(num_chars)
        if fewest > limit:
            raise ValueError(
                f"prompt has {num_chars:,} characters, at least {fewest:,} tokens, more than the model's "
                f"context of {limit:,}"
            )

    def _finish(self, ids: list[int]) -> list[int]:
        if self.tokenizer.bos_id not in ids:
            ids = [self.tokenizer.bos_id, *ids]
        limit = self.config.text.max_position_embeddings
        if len(ids) > limit:
            raise ValueError(f"prompt has {len(ids)} tokens, more than the model's context of {limit}")
        return ids

    def _pad(self, rows: list[list[int]], side: str) -> dict[str, torch.Tensor]:
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.tokenizer.pad_id, dtype=torch.int64)
        mask = torch.zeros(len(rows), T, dtype=torch.int64)
        for b, row in enumerate(rows):
            span = slice(T - len(row), T) if side == "left" else slice(0, len(row))
            ids[b, span] = torch.tensor(row)
            mask[b, span] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def _check_tiles(self, n: Any) -> None:
        limit = self.config.vision.max_num_tiles
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= limit:
            raise ValueError(f"max_num_tiles must be an integer from 1 to {limit}, got {n!r}")


def _split_images(images: Any, counts: list[int]) -> list[list[Any]]:
    """Images per row, from None, one image, a flat list, or one list per row."""
    if images is None:
        images = []
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if images and all(isinstance(x, (list, tuple)) for x in images):  # one list per row
        if len(images) != len(counts):
            raise ValueError(f"{len(images)} image lists for {len(counts)} prompts")
        per_row = [list(x) for x in images]
    else:
        if len(images) != sum(counts):
            raise ValueError(
                f"the prompts hold {sum(counts)} <|image|> tokens ({counts} per row) but {len(images)} images "
                "were given"
            )
        per_row, start = [], 0
        for n in counts:
            per_row.append(list(images[start : start + n]))
            start += n
    for b, (row, n) in enumerate(zip(per_row, counts)):
        if len(row) != n:
            raise ValueError(f"prompt {b} holds {n} <|image|> tokens but {len(row)} images were given for it")
    return per_row
