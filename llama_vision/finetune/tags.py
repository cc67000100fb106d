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
    {"image": "img/0002.png", "tags": ["text"], "label_map": "img/0002-labels.png"}

A label map (optional) says what is at every pixel: a PNG of the picture's size whose channels hold
class ids (0 = nothing), named by `labels.json` beside the JSONL file ({"channel": [class 1, class 2,
...], ...}, at most 4 channels). It is cut into the picture's tiles and patches as the processor cuts
the picture (`patch_targets`), and a second linear head on every image token learns, per channel, the
share of each class in that token's patch, and the patch's place in the picture (x and y from 0 to
1). Why: the cross-attention layers find an object by its tokens, so each token must say what lies
under it; a pooled head teaches only what the whole picture holds (README, "Embedded model").

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

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import nn

from llama_vision.config import LlamaVisionConfig, supported_aspect_ratios
from llama_vision.encoders.image_transform import best_fit_canvas, resized_size
from llama_vision.finetune.collate import checked_max_tiles, tiled_images
from llama_vision.finetune.data import _Invalid, _jsonl_rows, _resolve_image, checked_records

HEAD_DIR = "tag_head"  # a folder of its own: checkpoint loading reads every top-level *.safetensors
HEAD_FILE = f"{HEAD_DIR}/head.safetensors"
TAGS_FILE = f"{HEAD_DIR}/tags.json"
LABELS_NAME = "labels.json"  # beside a JSONL file whose records have label maps
MAX_PIXELS = 4096 * 4096  # of a label map


@dataclass(frozen=True)
class TaggedImage:
    image: str  # absolute path
    tags: tuple[str, ...]
    source: str  # "file:line"
    label_map: str | None = None  # absolute path


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
    label_map = row.get("label_map")
    if label_map is not None:
        if not isinstance(label_map, str):
            raise ValueError(f"label_map must be a path, got {type(label_map).__name__}")
        path = Path(label_map) if Path(label_map).is_absolute() else base / label_map
        if not path.is_file():
            raise ValueError(f"label map file {str(path)!r} not found")
        label_map = str(path)
    return TaggedImage(image, tuple(dict.fromkeys(tags)), source, label_map)


def label_channels(path: str | Path, examples: Sequence[TaggedImage]) -> dict[str, list[str]] | None:
    """The label maps' channels and class names, from `labels.json` beside the JSONL file `path`; None
    when no record has a label map. Every record must have one then (a picture without one would
    teach its tokens that nothing is anywhere)."""
    with_map = sum(e.label_map is not None for e in examples)
    if with_map == 0:
        return None
    if with_map != len(examples):
        first = next(e for e in examples if e.label_map is None)
        raise ValueError(f"{first.source}: no label_map, but other records have one; give every record one")
    file = Path(path).parent / LABELS_NAME
    try:
        channels = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{file}: not found; records with a label_map need it to name the classes") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: cannot read it ({e})") from None
    ok = (
        isinstance(channels, dict)
        and 1 <= len(channels) <= 4
        and all(
            isinstance(names, list) and 1 <= len(names) <= 255 and all(isinstance(n, str) for n in names)
            for names in channels.values()
        )
    )
    if not ok:
        raise ValueError(
            f'{file}: expected {{"channel": ["class 1", ...], ...}}, 1 to 4 channels of 1 to 255 classes'
        )
    return channels


def read_label_map(path: str, channels: int) -> np.ndarray:
    """(H, W, channels) uint8 class ids of a PNG label map; grey and RGB(A) maps give their first bands."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise ValueError(f"label map {path!r}: expected a PNG, got {image.format}")
            if image.width * image.height > MAX_PIXELS:
                raise ValueError(f"label map {path!r}: {image.width}x{image.height} pixels is too large")
            array = np.asarray(image)
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"label map {path!r}: cannot read it ({e})") from None
    if array.dtype != np.uint8:
        raise ValueError(f"label map {path!r}: expected 8-bit class ids, got {array.dtype}")
    array = array[..., None] if array.ndim == 2 else array
    if array.shape[2] < channels:
        raise ValueError(f"label map {path!r}: {array.shape[2]} channels, labels.json names {channels}")
    return array[..., :channels]


def patch_targets(
    label_map: np.ndarray, classes: Sequence[int], config: LlamaVisionConfig, max_num_tiles: int
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """A picture's label map cut as `transform_image` cuts the picture: resized (nearest) into the
    same canvas, padded with class 0, split into tiles and patches. Returns per channel the share of
    each class in each patch (tiles, patches, classes + 1), each patch's centre in the picture
    (tiles, patches, 2; x and y from 0 to 1), and which patch centres lie on the picture."""
    v = config.vision
    height, width = label_map.shape[:2]
    th, tw = best_fit_canvas(height, width, v.image_size, supported_aspect_ratios(max_num_tiles))
    new_h, new_w = resized_size(height, width, th * v.image_size, tw * v.image_size, v.image_size)
    canvas = np.zeros((th * v.image_size, tw * v.image_size, label_map.shape[2]), dtype=np.int64)
    for c in range(label_map.shape[2]):
        band = Image.fromarray(np.ascontiguousarray(label_map[..., c]))
        canvas[:new_h, :new_w, c] = np.asarray(band.resize((new_w, new_h), Image.Resampling.NEAREST))
    side = v.image_size // v.patch_size
    shares = []
    for c, n in enumerate(classes):
        ids = torch.from_numpy(canvas[..., c])
        one_hot = torch.nn.functional.one_hot(ids, n + 1).float()  # H W K
        per_patch = rearrange(
            one_hot, "(th gh ph) (tw gw pw) k -> (th tw) (gh gw) (ph pw) k",
            th=th, tw=tw, gh=side, gw=side, ph=v.patch_size, pw=v.patch_size,
        )  # fmt: skip
        shares.append(per_patch.mean(2))
    centre = (torch.arange(side * th) + 0.5) * v.patch_size, (torch.arange(side * tw) + 0.5) * v.patch_size
    y, x = torch.meshgrid(centre[0] / new_h, centre[1] / new_w, indexing="ij")
    place = rearrange(torch.stack([x, y], -1), "(th gh) (tw gw) c -> (th tw) (gh gw) c", th=th, tw=tw)
    return shares, place, (place <= 1).all(-1)


def tag_vocabulary(examples: Sequence[TaggedImage]) -> list[str]:
    return sorted({t for e in examples for t in e.tags})


class TagCollator:
    """`collator(examples)` -> the vision encoder's inputs plus `tags` (B, labels) of 0 and 1; tags that
    are not among the labels (an evaluation file's) are left out."""

    def __init__(
        self,
        config: LlamaVisionConfig,
        labels: Sequence[str],
        *,
        max_num_tiles: int | None,
        channels: dict[str, list[str]] | None = None,
    ) -> None:
        self.config, self.max_num_tiles = config, checked_max_tiles(config, max_num_tiles)
        self.index = {t: i for i, t in enumerate(labels)}
        self.channels = dict(channels or {})
        self.classes = [len(names) for names in self.channels.values()]

    def __call__(self, examples: Sequence[TaggedImage]) -> dict[str, torch.Tensor]:
        sources = [e.source for e in examples]
        packed = tiled_images([[e.image] for e in examples], sources, self.config, self.max_num_tiles)
        tags = torch.zeros(len(examples), len(self.index))
        for row, e in enumerate(examples):
            for t in e.tags:
                if t in self.index:
                    tags[row, self.index[t]] = 1.0
        batch = {
            "pixel_values": packed["pixel_values"],
            "aspect_ratio_ids": packed["aspect_ratio_ids"],
            "aspect_ratio_mask": packed["aspect_ratio_mask"],
            "tags": tags,
        }
        if self.classes:
            batch.update(self._patches(examples))
        return batch

    def _patches(self, examples: Sequence[TaggedImage]) -> dict[str, torch.Tensor]:
        """`patch_shares` (B, N, patches, sum of classes + 1), `patch_places` (B, N, patches, 2) and
        `patch_real` (B, N, patches): zeros and False for padding tiles."""
        v = self.config.vision
        width = sum(n + 1 for n in self.classes)
        shares = torch.zeros(len(examples), v.max_num_tiles, v.num_patches - 1, width)
        places = torch.zeros(len(examples), v.max_num_tiles, v.num_patches - 1, 2)
        real = torch.zeros(len(examples), v.max_num_tiles, v.num_patches - 1, dtype=torch.bool)
        for b, e in enumerate(examples):
            try:
                label_map = read_label_map(e.label_map, len(self.classes))
                for (name, names), top in zip(
                    self.channels.items(), label_map.reshape(-1, len(self.classes)).max(0)
                ):
                    if top > len(names):
                        raise ValueError(
                            f"label map {e.label_map!r}: channel {name!r} holds class {top}, but labels.json "
                            f"names {len(names)} classes"
                        )
            except ValueError as err:
                raise ValueError(f"{e.source}: {err}") from None
            per_channel, place, on_picture = patch_targets(
                label_map, self.classes, self.config, self.max_num_tiles
            )
            n = place.shape[0]
            shares[b, :n] = torch.cat(per_channel, -1)
            places[b, :n], real[b, :n] = place, on_picture
        return {"patch_shares": shares, "patch_places": places, "patch_real": real}


class TagHead(nn.Module):
    """`tags`: a linear head over [mean, max] of the projected image tokens; `patches` (with label
    maps): a linear head on each patch's token, giving each channel's class logits and the patch's
    x and y. Weights normal(0, 0.02), biases zero."""

    def __init__(self, config: LlamaVisionConfig, labels: int, classes: Sequence[int], seed: int) -> None:
        super().__init__()
        D = config.text.hidden_size
        self.classes = list(classes)
        self.tags = nn.Linear(2 * D, labels)
        self.patches = nn.Linear(D, sum(n + 1 for n in classes) + 2) if classes else None
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for layer in (self.tags, self.patches):
                if layer is not None:
                    layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.02)
                    layer.bias.zero_()


def new_head(
    config: LlamaVisionConfig, labels: int, seed: int, channels: dict[str, list[str]] | None = None
) -> TagHead:
    return TagHead(config, labels, [len(names) for names in channels.values()] if channels else [], seed)


def pooled(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, 2D): the mean and the max over each picture's tokens in real tiles (padding tiles left out)."""
    return pool(image_tokens(model, batch), batch)


def image_tokens(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.encode_images(batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"])


def pool(tokens: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
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
    how many pictures have exactly their tags as the k most likely labels.

    With label maps, each picture adds the patch loss (`patch_loss`), a mean over its patches."""

    def __init__(self, model: nn.Module, head: TagHead) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = image_tokens(self.model, batch)
        logits = self.head.tags(pool(tokens, batch)).float()
        target = batch["tags"]
        k = target.sum(1)
        loss = -(target / k.clamp(min=1)[:, None] * logits.log_softmax(1)).sum()
        if self.head.patches is not None:
            loss = loss + patch_loss(self.head, tokens, batch).sum()
        order = logits.detach().argsort(1, descending=True)
        top = torch.arange(target.shape[1], device=target.device)[None] < k[:, None]  # the k first places
        exact = (target.gather(1, order).bool() == top).all(1).sum()
        return loss, torch.tensor(target.shape[0], device=target.device), exact


def patch_loss(head: TagHead, tokens: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,): per picture, the mean over its patches of the cross-entropies of every channel against the
    class shares of the patch, plus 4 times the squared error of the patch's place (x, y). Class tokens
    and padding tiles are left out; patches whose centre lies on the canvas padding learn their classes
    (nothing) but no place."""
    B = tokens.shape[0]
    N, patches = batch["patch_real"].shape[1:]
    per_tile = tokens.view(B, -1, N, patches + 1, tokens.shape[-1])[:, 0, :, 1:]  # the first image, no CLS
    out = head.patches(per_tile).float()  # B N patches (classes + 2)
    tile_real = batch["aspect_ratio_mask"][:, 0].bool()[:, :, None].expand(B, N, patches)
    loss, start = 0.0, 0
    for n in head.classes:
        share = batch["patch_shares"][..., start : start + n + 1]
        loss = loss - (share * out[..., start : start + n + 1].log_softmax(-1)).sum(-1)
        start += n + 1
    place = ((out[..., start:] - batch["patch_places"]) ** 2).sum(-1) * batch["patch_real"]
    loss = (loss + 4 * place) * tile_real
    return loss.sum((1, 2)) / tile_real.sum((1, 2)).clamp(min=1)


def save_head(head: nn.Module, labels: Sequence[str], directory: Path) -> None:
    from safetensors.torch import save_file

    (directory / HEAD_DIR).mkdir(exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, directory / HEAD_FILE)
    (directory / TAGS_FILE).write_text(json.dumps(list(labels), indent=0) + "\n", encoding="utf-8")


def load_head(head: nn.Module, labels: Sequence[str], directory: Path) -> None:
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
