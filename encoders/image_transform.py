"""Image loading and the tiled image transform of Llama 3.2 Vision.

`load_image` turns a path, raw bytes, a numpy array or a PIL image of any mode into an upright 8-bit RGB
image; `transform_image` resizes it without distortion onto the best canvas of tiles, pads, normalises and
splits it into tiles; `pack_images` stacks a batch of transformed images into the model's inputs.

The transform follows REFERENCE.md section 1.7: Hugging Face's `MllamaImageProcessorPil` and Meta's
`VariableSizeImageTransform` (llama_models/llama3/multimodal/image_transform.py), which compute the same
thing. Our output equals Hugging Face's bit for bit: PIL BILINEAR on the uint8 image (torchvision's
`F.resize` on a PIL image, which Meta uses, calls the same `Image.resize`), black padding before
normalising, `x / 255` in float32 (equal to Hugging Face's float64 rescale rounded to float32 for all
256 values) and `(x - mean) / std` in float32.

Non-obvious choices:
- Transparency is composited onto white, as Hugging Face's `convert_to_rgb` does. Meta's chat path uses
  `.convert("RGB")`, which drops alpha and shows whatever colour the transparent pixels store; that is
  often black, while every viewer shows them light.
- EXIF orientation is applied, so photos come out upright. Neither reference does this: they see a
  rotated phone photo sideways.
- Images deeper than 8 bits are scaled, not clipped (PIL's `convert` clips a 16-bit image to 255):
  uint16 data by 255/65535; other integer data by the bit depth its values need (<= 255: 8 bits,
  <= 65535: 16 bits, PIL's mode I for 16-bit PNG/TIFF; else 32 bits); floats must lie in [0, 1].
- Only formats that PIL decodes itself are opened: EPS (which runs Ghostscript) and the other
  exotic plugins are refused. Sizes are checked from the header before any pixel is decoded.
- `resized_size` computes `floor(h * (target_w / w))` in float64 like both references, not in exact
  integer arithmetic, so the size matches theirs to the pixel; it keeps Hugging Face's minimum of 1 px
  (Meta's code would ask PIL for a zero-height image from e.g. a 1x5000 strip).
- `pack_images` numbers aspect ratios in the model's table even when an image was tiled with a smaller
  per-call `max_num_tiles`. Hugging Face numbers them in the table of the per-call limit, so with
  `max_image_tiles=2` a (2, 1) image gets id 3, which is the model's embedding row for (1, 3).
- A batch without images packs to tensors with I = 0 (never an empty dict), so callers can always
  index the keys; the model skips the vision path when I = 0.
"""

from __future__ import annotations

import functools
import io
import math
import os
import struct
import warnings
from collections.abc import Sequence
from typing import TypedDict

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageOps

from llama_vision.config import supported_aspect_ratios

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP statistics
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_TILES_LIMIT = 4  # the released checkpoints' aspect-ratio tables cover at most 4 tiles
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default Image.MAX_IMAGE_PIXELS

# Formats PIL decodes in-process (JPEG includes MPO). Anything else (EPS via Ghostscript, WMF, ...) is refused.
_SAFE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "ICO", "TGA", "AVIF", "QOI")
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, IndexError, struct.error)
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def hf_preprocessor_config(tile_size: int, max_num_tiles: int) -> dict:
    """preprocessor_config.json of a checkpoint, as the hub's (REFERENCE.md 1.7) at this tile size, so
    transformers' MllamaProcessor reads a saved checkpoint with the transform above."""
    return {
        "image_processor_type": "MllamaImageProcessor",
        "processor_class": "MllamaProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": tile_size, "width": tile_size},
        "resample": 2,  # PIL BILINEAR
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
        "do_pad": True,
        "max_image_tiles": max_num_tiles,
    }


# ----------------------------------------------------------------------------- loading


def load_image(
    image: Image.Image | str | os.PathLike | bytes | np.ndarray, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Any image source -> upright 8-bit RGB PIL image. Every failure is a ValueError saying why."""
    if isinstance(image, Image.Image):
        _check_pixels(image.width, image.height, max_pixels, "image")
        try:
            image.load()
        except _DECODE_ERRORS as e:
            raise ValueError(f"image: truncated or corrupt image data ({e})") from None
        return _to_rgb(image)
    if isinstance(image, np.ndarray):
        return _to_rgb(_array_to_image(image, max_pixels))
    if isinstance(image, (bytes, bytearray, memoryview)):
        if len(image) == 0:
            raise ValueError("image bytes: empty, no image data")
        return _decode(io.BytesIO(image), "image bytes", max_pixels)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise ValueError(f"no such image file: {path!r}")
        if os.path.getsize(path) == 0:
            raise ValueError(f"{path!r}: empty file, no image data")
        return _decode(path, repr(path), max_pixels)
    raise ValueError(
        f"unsupported image type {type(image).__name__}: expected a PIL image, a path, bytes or a numpy array"
    )


@functools.cache
def _safe_formats() -> tuple[str, ...]:
    Image.init()  # register the plugins, so the check below sees every format this PIL build has
    return tuple(f for f in _SAFE_FORMATS if f in Image.OPEN)


def _decode(source: str | io.BytesIO, name: str, max_pixels: int) -> Image.Image:
    # PIL warns above Image.MAX_IMAGE_PIXELS and raises above twice that, while reading the header.
    # The warning becomes an error unless the caller allowed more pixels than PIL's limit.
    # (catch_warnings swaps process-wide state; harmless here, as it only changes this one category.)
    action = "error" if max_pixels <= Image.MAX_IMAGE_PIXELS else "ignore"
    with warnings.catch_warnings():
        warnings.simplefilter(action, Image.DecompressionBombWarning)
        try:
            opened = Image.open(source, formats=_safe_formats())
        except Image.UnidentifiedImageError:
            raise ValueError(
                f"{name}: not an image, or not in a supported format ({', '.join(_safe_formats())})"
            ) from None
        except _BOMB_ERRORS as e:
            raise ValueError(f"{name}: refused as a possible decompression bomb: {e}") from None
        except _DECODE_ERRORS as e:
            raise ValueError(f"{name}: truncated or corrupt image ({e})") from None
        with opened:  # closes the file, also on errors
            _check_pixels(opened.width, opened.height, max_pixels, name)
            try:
                opened.load()  # decode now, so a truncated file fails here and not later
            except _BOMB_ERRORS as e:
                raise ValueError(f"{name}: refused as a possible decompression bomb: {e}") from None
            except _DECODE_ERRORS as e:
                raise ValueError(f"{name}: truncated or corrupt image data ({e})") from None
            return _to_rgb(opened)


def _check_pixels(width: int, height: int, max_pixels: int, name: str) -> None:
    if width == 0 or height == 0:
        raise ValueError(f"{name}: zero-size image ({width}x{height})")
    if width * height > max_pixels:
        raise ValueError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels} "
            "(refused as a possible decompression bomb)"
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    image = _upright(image)
    if image.mode in _HIGH_DEPTH_MODES:
        image = Image.fromarray(_to_uint8(np.asarray(image)))
    if image.mode == "La":  # premultiplied; PIL converts it only to LA
        image = image.convert("LA")
    if image.has_transparency_data:  # alpha band, palette alpha or a tRNS colour key
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:
        raise ValueError(f"cannot convert an image of mode {image.mode!r} to RGB") from None


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError, struct.error):
        return image  # malformed EXIF: the pixels are still good, keep them as stored


def _array_to_image(array: np.ndarray, max_pixels: int) -> Image.Image:
    """(H, W) or (H, W, C) with C in 1..4 (L, LA, RGB, RGBA), channels last."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (2, 3, 4))):
        raise ValueError(
            f"unsupported array shape {array.shape}: expected (H, W) or (H, W, C) with C in 1, 2, 3, 4"
        )
    _check_pixels(array.shape[1], array.shape[0], max_pixels, "array")
    return Image.fromarray(np.ascontiguousarray(_to_uint8(array)))


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale pixel data of any depth to uint8 (see the module docstring for the rules)."""
    kind = array.dtype.kind
    if array.dtype == np.uint8:
        return array
    if kind == "b":
        return array.astype(np.uint8) * 255
    if kind in "iu":
        lo, hi = int(array.min()), int(array.max())
        if lo < 0 or hi >= 2**32:
            raise ValueError(f"integer pixel values must lie in [0, 2**32), got [{lo}, {hi}]")
        if array.dtype.itemsize == 2 and kind == "u":
            peak = 65535
        else:
            peak = 255 if hi <= 255 else 65535 if hi <= 65535 else 2**32 - 1
        return np.rint(array.astype(np.float64) * (255 / peak)).astype(np.uint8)
    if kind == "f":
        lo, hi = float(array.min()), float(array.max())
        if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
            raise ValueError(f"float pixel values must lie in [0, 1], got [{lo}, {hi}]")
        return np.rint(array.astype(np.float64) * 255).astype(np.uint8)
    raise ValueError(f"unsupported array dtype {array.dtype}: expected bool, integer or float pixels")


# ----------------------------------------------------------------------------- tiling


def best_fit_canvas(
    height: int, width: int, tile_size: int, aspect_ratios: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """The (tiles_high, tiles_wide) canvas the image fits best without distortion.

    Per canvas the limiting scale is min(canvas_h / h, canvas_w / w). Take the smallest scale >= 1
    (least upscaling) if any canvas allows upscaling, else the largest scale (least downscaling);
    among equal scales the smallest canvas (least padding).
    """
    scales = [min(th * tile_size / height, tw * tile_size / width) for th, tw in aspect_ratios]
    upscales = [s for s in scales if s >= 1]
    best = min(upscales) if upscales else max(scales)
    candidates = [r for r, s in zip(aspect_ratios, scales) if s == best]
    return min(candidates, key=lambda r: r[0] * r[1])  # first of equal areas, as the references


def resized_size(height: int, width: int, canvas_h: int, canvas_w: int, tile_size: int) -> tuple[int, int]:
    """(new_h, new_w) that keeps the aspect ratio and fits the canvas, upscaling at most to one tile."""
    target_h = min(max(height, tile_size), canvas_h)
    target_w = min(max(width, tile_size), canvas_w)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:  # width is the limiting side
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def transform_image(
    image: Image.Image, *, tile_size: int, max_num_tiles: int
) -> tuple[torch.Tensor, tuple[int, int]]:
    """RGB image -> float32 tiles (N, 3, tile, tile) in row-major order, and (tiles_high, tiles_wide)."""
    if not isinstance(max_num_tiles, int) or isinstance(max_num_tiles, bool):
        raise ValueError(f"max_num_tiles must be an int in 1..{MAX_TILES_LIMIT}, got {max_num_tiles!r}")
    if not 1 <= max_num_tiles <= MAX_TILES_LIMIT:
        raise ValueError(f"max_num_tiles must be in 1..{MAX_TILES_LIMIT}, got {max_num_tiles}")
    if not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile_size must be a positive int, got {tile_size!r}")
    if not isinstance(image, Image.Image) or image.mode != "RGB":
        raise ValueError(f"transform_image takes an RGB PIL image (see load_image), got {_describe(image)}")

    th, tw = best_fit_canvas(image.height, image.width, tile_size, supported_aspect_ratios(max_num_tiles))
    new_h, new_w = resized_size(image.height, image.width, th * tile_size, tw * tile_size, tile_size)
    resized = image.resize((new_w, new_h), Image.Resampling.BILINEAR)

    # Pad bottom/right with black before normalising, so padding becomes -mean/std like the references.
    canvas = torch.zeros(3, th * tile_size, tw * tile_size, dtype=torch.uint8)
    canvas[:, :new_h, :new_w] = torch.from_numpy(np.array(resized)).permute(2, 0, 1)
    tiles = rearrange(canvas, "c (th h) (tw w) -> (th tw) c h w", th=th, tw=tw)  # (N, 3, tile, tile)
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    return (tiles.float() / 255 - mean) / std, (th, tw)


def _describe(image: object) -> str:
    return f"mode {image.mode!r}" if isinstance(image, Image.Image) else type(image).__name__


# ----------------------------------------------------------------------------- batching


class PackedImages(TypedDict):
    pixel_values: torch.Tensor  # float32 (B, I, N, 3, tile, tile), zeros for padding tiles and images
    aspect_ratio_ids: torch.Tensor  # int64 (B, I): row of (h, w) in the model's table + 1; 0 = padding
    aspect_ratio_mask: torch.Tensor  # int64 (B, I, N): 1 for real tiles; tile 0 is 1 even when padding
    num_tiles: list[list[int]]  # tiles per image, per row


def pack_images(
    batch: list[list[tuple[torch.Tensor, tuple[int, int]]]],
    *,
    max_num_tiles: int,
    tile_size: int,
    aspect_ratios: tuple[tuple[int, int], ...],
) -> PackedImages:
    """Stack rows of `transform_image` outputs (0..k images per row) into padded model inputs.

    `max_num_tiles` and `aspect_ratios` are the model's (config.vision); an image tiled with a smaller
    per-call limit still gets the model's id for its (h, w). A batch without images gives I = 0.
    """
    num_images = max((len(row) for row in batch), default=0)
    pixel_values = torch.zeros(len(batch), num_images, max_num_tiles, 3, tile_size, tile_size)
    aspect_ratio_ids = torch.zeros(len(batch), num_images, dtype=torch.int64)
    aspect_ratio_mask = torch.zeros(len(batch), num_images, max_num_tiles, dtype=torch.int64)
    aspect_ratio_mask[:, :, 0] = 1  # as Hugging Face: Meta's reference pads with (1, 1) images
    for b, row in enumerate(batch):
        for i, (tiles, (th, tw)) in enumerate(row):
            if (th, tw) not in aspect_ratios or th * tw > max_num_tiles:
                raise ValueError(
                    f"row {b} image {i}: aspect ratio {(th, tw)} is not among the model's {aspect_ratios} "
                    f"(max_num_tiles={max_num_tiles})"
                )
            if tuple(tiles.shape) != (th * tw, 3, tile_size, tile_size):
                raise ValueError(
                    f"row {b} image {i}: tiles of shape {tuple(tiles.shape)}, expected "
                    f"{(th * tw, 3, tile_size, tile_size)} for aspect ratio {(th, tw)}"
                )
            pixel_values[b, i, : th * tw] = tiles
            aspect_ratio_ids[b, i] = aspect_ratios.index((th, tw)) + 1
            aspect_ratio_mask[b, i, : th * tw] = 1
    num_tiles = [[tiles.shape[0] for tiles, _ in row] for row in batch]
    return PackedImages(
        pixel_values=pixel_values,
        aspect_ratio_ids=aspect_ratio_ids,
        aspect_ratio_mask=aspect_ratio_mask,
        num_tiles=num_tiles,
    )
