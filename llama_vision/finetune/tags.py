"""Vision pretraining on image tags (`mode: vision`): the vision encoder and the projector learn to
tell what a picture shows before a language model reads their tokens.

Why it exists: trained from scratch through the language model alone, a vision encoder learns what
survives an average of its tokens (colours, how much of the picture is covered) but not what a small
object looks like. A fresh cross-attention spreads its weight evenly over a picture's tokens, so the
few tokens of one object get a few percent of the gradient, and the attention has no reason to pick
them out while they carry nothing. Measured on the embedded model (README, "Embedded model"): 300
steps of shape questions through the language model leave it naming a lone shape 19% of the time
(chance 17%); the same 300 steps after 300 steps of this pretraining, 62%. Here a linear head
reads the mean and the max of a picture's tokens (the max lets one object's tokens speak alone) and
is trained to give the picture's tags (`TagLoss`). Meta's vision encoder was pretrained too (on image-text pairs) before its adapters
were trained; this is the small, labelled version of that step.

Records, one JSON object per line, image paths relative to the file:

    {"image": "img/0001.png", "tags": ["circle", "star"]}

The labels are the sorted set of the training file's tags. The output is a full checkpoint (the text
decoder as it started), so a next stage trains from it with `model: DIR`, plus the head
(`tag_head/head.safetensors`) and its labels (`tag_head/tags.json`), for resuming and for looking at
what it learnt.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llama_vision.config import LlamaVisionConfig
from llama_vision.finetune.collate import checked_max_tiles, tiled_images
from llama_vision.finetune.data import _Invalid, _jsonl_rows, _resolve_image, checked_records

HEAD_DIR = "tag_head"  # a folder of its own: checkpoint loading reads every top-level *.safetensors
HEAD_FILE = f"{HEAD_DIR}/head.safetensors"
TAGS_FILE = f"{HEAD_DIR}/tags.json"


@dataclass(frozen=True)
class TaggedImage:
    image: str  # absolute path
    tags: tuple[str, ...]
    source: str  # "file:line"


def load_tagged(path: str | Path, *, skip_bad: bool = False) -> list[TaggedImage]:
    """Every record of a JSONL file of tagged images, checked (a bad one is named by file and line)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tagged images {path}: no such file (mode vision reads a JSONL file)")
    return checked_records(_jsonl_rows(path), _parse, path, skip_bad)


def _parse(row: Any, base: Path, source: str) -> TaggedImage:
    if isinstance(row, _Invalid):
        raise ValueError(row.reason)
    if not isinstance(row, dict) or "image" not in row or "tags" not in row:
        raise ValueError('mode vision: expected {"image": PATH, "tags": [TAG, ...]}')
    tags = row["tags"]
    if not isinstance(tags, list) or not all(isinstance(t, str) and t.strip() for t in tags):
        raise ValueError(f"tags must be a list of non-empty strings, got {tags!r}")
    if not isinstance(row["image"], str):
        raise ValueError(f"image must be a path, got {type(row['image']).__name__}")
    try:
        image = _resolve_image(row["image"], base, 0)
    except ValueError as e:  # its message names a chat message ("message 0: ..."), which a tag record has not
        raise ValueError(str(e).removeprefix("message 0: ")) from None
    return TaggedImage(image, tuple(dict.fromkeys(tags)), source)


def tag_vocabulary(examples: Sequence[TaggedImage]) -> list[str]:
    return sorted({t for e in examples for t in e.tags})


class TagCollator:
    """`collator(examples)` -> the vision encoder's inputs plus `tags` (B, labels) of 0 and 1; tags that
    are not among the labels (an evaluation file's) are left out."""

    def __init__(
        self, config: LlamaVisionConfig, labels: Sequence[str], *, max_num_tiles: int | None
    ) -> None:
        self.config, self.max_num_tiles = config, checked_max_tiles(config, max_num_tiles)
        self.index = {t: i for i, t in enumerate(labels)}

    def __call__(self, examples: Sequence[TaggedImage]) -> dict[str, torch.Tensor]:
        sources = [e.source for e in examples]
        packed = tiled_images([[e.image] for e in examples], sources, self.config, self.max_num_tiles)
        tags = torch.zeros(len(examples), len(self.index))
        for row, e in enumerate(examples):
            for t in e.tags:
                if t in self.index:
                    tags[row, self.index[t]] = 1.0
        return {
            "pixel_values": packed["pixel_values"],
            "aspect_ratio_ids": packed["aspect_ratio_ids"],
            "aspect_ratio_mask": packed["aspect_ratio_mask"],
            "tags": tags,
        }


def new_head(config: LlamaVisionConfig, labels: int, seed: int) -> nn.Linear:
    """The linear head over [mean, max] of the projected image tokens, normal(0, 0.02), zero bias."""
    head = nn.Linear(2 * config.text.hidden_size, labels)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.02)
        head.bias.zero_()
    return head


def pooled(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, 2D): the mean and the max over each picture's tokens in real tiles (padding tiles left out)."""
    tokens = model.encode_images(batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"])
    B, S, D = tokens.shape
    real = batch["aspect_ratio_mask"].bool()  # B I N
    per_tile = S // real[0].numel()
    keep = real.repeat_interleave(per_tile, dim=-1).view(B, S, 1)
    mean = (tokens * keep).sum(1) / keep.sum(1).clamp(min=1)
    top = tokens.masked_fill(~keep, torch.finfo(tokens.dtype).min).amax(1)
    return torch.cat([mean, top], dim=-1)


class TagLoss(nn.Module):
    """The model and the head as one module (which DDP wraps). The loss is a softmax cross-entropy over
    all labels against the picture's tags, each of its k tags weighted 1/k (as Mahajan et al. 2018
    train on hashtags). Measured on the embedded model, 300 steps on one-shape pictures tagged with
    their shape, colour and both give an encoder whose head names the shape 23% of the time with a
    binary cross-entropy per label, 29% with this; tagged with the shape only, 73% with this.
    Returns the Trainer's (loss sum, count, hits): the sum over pictures, the number of pictures, and
    how many pictures have exactly their tags as the k most likely labels."""

    def __init__(self, model: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.head(pooled(self.model, batch)).float()
        target = batch["tags"]
        k = target.sum(1)
        loss = -(target / k.clamp(min=1)[:, None] * logits.log_softmax(1)).sum()
        order = logits.detach().argsort(1, descending=True)
        top = torch.arange(target.shape[1], device=target.device)[None] < k[:, None]  # the k first places
        exact = (target.gather(1, order).bool() == top).all(1).sum()
        return loss, torch.tensor(target.shape[0], device=target.device), exact


def save_head(head: nn.Linear, labels: Sequence[str], directory: Path) -> None:
    from safetensors.torch import save_file

    (directory / HEAD_DIR).mkdir(exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, directory / HEAD_FILE)
    (directory / TAGS_FILE).write_text(json.dumps(list(labels), indent=0) + "\n", encoding="utf-8")


def load_head(head: nn.Linear, labels: Sequence[str], directory: Path) -> None:
    """The head saved in a checkpoint directory, into `head`; the labels must be the same."""
    from safetensors.torch import load_file

    saved = json.loads((directory / TAGS_FILE).read_text(encoding="utf-8"))
    if saved != list(labels):
        raise ValueError(
            f"resume: {directory} was trained on {len(saved)} tags, this run's data has {len(labels)} "
            "different ones; the head would not continue"
        )
    state = load_file(directory / HEAD_FILE)
    with torch.no_grad():
        for key, tensor in head.state_dict().items():
            tensor.copy_(state[key])
