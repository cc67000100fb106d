"""Tests of encoders/image_transform.py: parity with Hugging Face's PIL processor and Meta's transform,
every image mode and source `load_image` accepts, and the errors it raises."""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from llama_vision.config import supported_aspect_ratios
from llama_vision.encoders.image_transform import (
    IMAGE_MEAN,
    IMAGE_STD,
    best_fit_canvas,
    load_image,
    pack_images,
    resized_size,
    transform_image,
)

MODEL_RATIOS = supported_aspect_ratios(4)  # the model's table: ids 1..8
SIZES = [
    (1, 1),
    (3, 500),
    (500, 3),
    (300, 800),
    (800, 300),
    (1000, 1000),
    (561, 560),
    (559, 1121),
    (2000, 700),
]
# (45, 50): 45 * (560 / 50) = 503.99999... in float64, so the references resize to 503 rows, not 504.
SIZES += [(45, 50), (1, 5000)]  # (1, 5000): Meta's code would ask PIL for a zero-height image


def hf_processor(tile: int, max_tiles: int = 4):
    """Configured like the hub's 11B-Instruct preprocessor_config.json (tile size aside)."""
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    return MllamaImageProcessorPil(
        do_convert_rgb=True,
        do_resize=True,
        size={"height": tile, "width": tile},
        resample=Image.Resampling.BILINEAR,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        do_pad=True,
        max_image_tiles=max_tiles,
    )


def noise(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def image_of_mode(mode: str, height: int, width: int) -> Image.Image:
    rgb = Image.fromarray(noise(height, width))
    if mode in ("RGB", "L", "1", "CMYK", "YCbCr"):
        return rgb if mode == "RGB" else rgb.convert(mode)
    if mode == "RGBA":
        return Image.fromarray(noise(height, width, 4, seed=1))
    if mode in ("LA", "PA"):
        return Image.merge(mode, (rgb.convert(mode[0]), Image.fromarray(noise(height, width, 1, seed=2))))
    if mode == "P":
        return rgb.quantize(64)
    if mode == "P+transparency":
        image = rgb.quantize(64)
        image.info["transparency"] = 5
        return image
    raise AssertionError(mode)


def ours(rows: list[list[Image.Image]], tile: int, max_tiles: int = 4):
    transformed = [
        [transform_image(load_image(im), tile_size=tile, max_num_tiles=max_tiles) for im in row]
        for row in rows
    ]
    return pack_images(transformed, max_num_tiles=4, tile_size=tile, aspect_ratios=MODEL_RATIOS)


def assert_same_as_hf(rows: list[list[Image.Image]], tile: int) -> None:
    expected = hf_processor(tile)(images=rows, return_tensors="pt")
    got = ours(rows, tile)
    # Bit-exact: same PIL resize, and x / 255 in float32 equals HF's float64 rescale cast to float32.
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
    assert torch.equal(got["aspect_ratio_ids"], expected["aspect_ratio_ids"])
    assert torch.equal(got["aspect_ratio_mask"], expected["aspect_ratio_mask"])
    assert got["num_tiles"] == expected["num_tiles"]


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("size", SIZES, ids=str)
def test_hf_parity_sizes_560(size):
    assert_same_as_hf([[Image.fromarray(noise(*size))]], tile=560)


@pytest.mark.parametrize(
    "mode", ["RGB", "L", "1", "RGBA", "P", "P+transparency", "LA", "PA", "CMYK", "YCbCr"]
)
@pytest.mark.parametrize("size", [(1, 1), (3, 500), (300, 800), (800, 300), (561, 560)], ids=str)
def test_hf_parity_modes(mode, size):
    assert_same_as_hf([[image_of_mode(mode, *size)]], tile=112)


def test_hf_parity_batch_with_uneven_rows():
    rows = [
        [Image.fromarray(noise(300, 800)), image_of_mode("RGBA", 900, 200), image_of_mode("L", 50, 60)],
        [Image.fromarray(noise(1000, 1000, seed=3))],
    ]
    assert_same_as_hf(rows, tile=112)
    packed = ours(rows, tile=112)
    assert packed["pixel_values"].shape == (2, 3, 4, 3, 112, 112)
    assert packed["aspect_ratio_ids"][1].tolist() == [6, 0, 0]  # (2, 2), then padding
    assert packed["aspect_ratio_mask"][1].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 0, 0]]
    assert packed["pixel_values"][1, 1:].abs().sum() == 0


@pytest.mark.parametrize("max_tiles", [1, 2, 3, 4])
@pytest.mark.parametrize("size", SIZES, ids=str)
@pytest.mark.parametrize("tile", [56, 560])
def test_meta_parity(size, max_tiles, tile):
    from llama_models.llama3.multimodal.image_transform import VariableSizeImageTransform

    image = Image.fromarray(noise(*size))
    tiles, ratio = transform_image(load_image(image), tile_size=tile, max_num_tiles=max_tiles)
    try:
        meta_tiles, meta_ratio = VariableSizeImageTransform(tile)(image, max_num_chunks=max_tiles)
    except ValueError as e:
        # A strip so thin that it resizes below 1 px: Meta asks PIL for a zero-size image (no minimum of
        # 1 px as in HF's get_image_size_fit_to_canvas); we keep 1 px like HF.
        assert "height and width must be > 0" in str(e)
        th, tw = ratio
        assert 1 in resized_size(*size, th * tile, tw * tile, tile)
        return
    assert ratio == tuple(meta_ratio)
    # Meta: ToTensor (uint8 / 255 in float32) then Normalize (sub_, div_): the same float32 operations.
    assert torch.equal(tiles, meta_tiles)


@pytest.mark.parametrize("max_tiles", [1, 2, 3, 4])
def test_per_call_max_num_tiles(max_tiles):
    """Tiles and ratio equal HF's with max_image_tiles=k; the id is the model's (a documented difference)."""
    images = [Image.fromarray(noise(h, w)) for h, w in [(800, 300), (300, 800), (1000, 1000), (2000, 500)]]
    expected = hf_processor(56, max_tiles)(images=[images], return_tensors="pt")
    packed = ours([images], tile=56, max_tiles=max_tiles)
    for i, image in enumerate(images):
        tiles, (th, tw) = transform_image(load_image(image), tile_size=56, max_num_tiles=max_tiles)
        assert (th, tw) in supported_aspect_ratios(max_tiles)
        assert torch.equal(tiles, expected["pixel_values"][0, i, : th * tw])
        assert packed["aspect_ratio_ids"][0, i] == MODEL_RATIOS.index((th, tw)) + 1
        # HF numbers the ratio in the smaller table of max_image_tiles, not in the model's table.
        hf_id = supported_aspect_ratios(max_tiles).index((th, tw)) + 1
        assert expected["aspect_ratio_ids"][0, i] == hf_id
    assert torch.equal(packed["aspect_ratio_mask"][..., :max_tiles], expected["aspect_ratio_mask"])
    assert packed["pixel_values"].shape[2] == 4  # padded to the model's max_num_tiles


def test_hf_ids_differ_from_model_table_for_fewer_tiles():
    tall = Image.fromarray(noise(800, 300))
    assert ours([[tall]], tile=56, max_tiles=2)["aspect_ratio_ids"].item() == 5  # (2, 1) in the model's table
    assert hf_processor(56, 2)(images=[[tall]], return_tensors="pt")["aspect_ratio_ids"].item() == 3


def test_canvas_and_size_helpers():
    assert best_fit_canvas(300, 800, 560, MODEL_RATIOS) == (1, 2)
    assert best_fit_canvas(1, 1, 560, MODEL_RATIOS) == (1, 1)  # every canvas upscales; least area wins
    assert best_fit_canvas(5000, 5000, 560, MODEL_RATIOS) == (2, 2)  # no upscaling: least downscaling
    assert resized_size(300, 800, 560, 1120, 560) == (300, 800)  # fits: no resize
    assert resized_size(100, 200, 560, 560, 560) == (280, 560)  # upscales up to one tile
    assert resized_size(45, 50, 560, 560, 560) == (503, 560)  # float64 floor, as the references
    assert resized_size(1, 5000, 560, 2240, 560) == (1, 2240)  # at least 1 px


def test_transform_output_layout():
    image = load_image(Image.new("RGB", (300, 50), (255, 0, 0)))  # (h, w) = (50, 300): resized to 37 x 224
    tiles, ratio = transform_image(image, tile_size=56, max_num_tiles=4)
    assert ratio == (1, 4) and tiles.shape == (4, 3, 56, 56) and tiles.dtype == torch.float32
    mean, std = torch.tensor(IMAGE_MEAN), torch.tensor(IMAGE_STD)
    red = (torch.tensor([1.0, 0.0, 0.0]) - mean) / std
    torch.testing.assert_close(tiles[:, :, 36, -1], red.expand(4, 3))  # row-major: the strip spans all 4
    torch.testing.assert_close(tiles[:, :, 37, 0], (-mean / std).expand(4, 3))  # bottom padding is black


# ----------------------------------------------------------------------------- batching


def test_pack_rows_without_images():
    tiles = transform_image(load_image(noise(100, 300)), tile_size=56, max_num_tiles=4)
    packed = pack_images([[], [tiles]], max_num_tiles=4, tile_size=56, aspect_ratios=MODEL_RATIOS)
    assert packed["aspect_ratio_ids"].tolist() == [[0], [MODEL_RATIOS.index(tiles[1]) + 1]]
    assert packed["aspect_ratio_mask"][0].tolist() == [[1, 0, 0, 0]]
    assert packed["num_tiles"] == [[], [tiles[0].shape[0]]]

    empty = pack_images([[], []], max_num_tiles=4, tile_size=56, aspect_ratios=MODEL_RATIOS)
    assert empty["pixel_values"].shape == (2, 0, 4, 3, 56, 56)
    assert empty["aspect_ratio_ids"].shape == (2, 0) and empty["aspect_ratio_mask"].shape == (2, 0, 4)
    assert empty["num_tiles"] == [[], []]


def test_pack_rejects_ratio_outside_model_table():
    tiles = torch.zeros(4, 3, 56, 56)
    with pytest.raises(ValueError, match=r"aspect ratio \(2, 2\) is not among the model's"):
        pack_images(
            [[(tiles, (2, 2))]], max_num_tiles=2, tile_size=56, aspect_ratios=supported_aspect_ratios(2)
        )
    with pytest.raises(ValueError, match=r"tiles of shape \(4, 3, 56, 56\), expected \(2, 3, 56, 56\)"):
        pack_images([[(tiles, (1, 2))]], max_num_tiles=4, tile_size=56, aspect_ratios=MODEL_RATIOS)


# ----------------------------------------------------------------------------- load_image


@pytest.mark.parametrize(
    "mode", ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "I", "I;16", "F"]
)
def test_every_mode_loads_as_rgb(mode):
    image = load_image(Image.new(mode, (7, 5)))
    assert image.mode == "RGB" and image.size == (7, 5)


def test_alpha_is_composited_onto_white():
    rgba = np.zeros((2, 2, 4), np.uint8)  # transparent black, as PNG encoders usually store it
    rgba[0, 0] = (255, 0, 0, 255)
    rgba[0, 1] = (0, 0, 255, 128)
    out = np.asarray(load_image(rgba))
    assert out[1, 1].tolist() == [255, 255, 255]
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [127, 127, 255]  # half blue over white
    palette = Image.new("P", (2, 2), 3)
    palette.info["transparency"] = 3
    assert np.asarray(load_image(palette)).tolist() == [[[255, 255, 255]] * 2] * 2
    assert np.asarray(load_image(Image.new("LA", (1, 1), (0, 0))))[0, 0].tolist() == [255, 255, 255]


def test_high_bit_depth_is_scaled_not_clipped():
    values16 = np.array([[0, 257 * 7, 32896, 65535]], np.uint16)
    expected = [0, 7, 128, 255]
    assert np.asarray(load_image(values16))[0, :, 0].tolist() == expected
    assert np.asarray(load_image(Image.fromarray(values16)))[0, :, 0].tolist() == expected  # mode I;16
    as_mode_i = Image.fromarray(values16.astype(np.int32))  # how PIL may hold a 16-bit PNG/TIFF
    assert as_mode_i.mode == "I"
    assert np.asarray(load_image(as_mode_i))[0, :, 0].tolist() == expected
    big = np.array([[0, 2**32 - 1]], np.uint32)
    assert np.asarray(load_image(big))[0, :, 0].tolist() == [0, 255]
    small_ints = np.array([[0, 10, 255]], np.int64)  # 8-bit values in a wide type stay as they are
    assert np.asarray(load_image(small_ints))[0, :, 0].tolist() == [0, 10, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32))
    assert floats.mode == "F"
    assert np.asarray(load_image(floats))[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize(
    "array",
    [
        noise(4, 6, 1),
        noise(4, 6, 1)[..., None],
        noise(4, 6, 2),
        noise(4, 6),
        noise(4, 6, 4),
        noise(4, 6).astype(np.uint16) * 257,
        noise(4, 6).astype(np.float32) / 255,
        noise(4, 6, 4).astype(np.float64) / 255,
        noise(4, 6) > 127,
    ],
    ids=["HxW", "HxWx1", "HxWx2", "HxWx3", "HxWx4", "uint16", "float32", "float64 RGBA", "bool"],
)
def test_numpy_arrays(array):
    image = load_image(array)
    assert image.mode == "RGB" and image.size == (6, 4)
    if array.ndim == 3 and array.shape[2] == 3 and array.dtype != np.bool_:
        scale = {np.dtype(np.uint8): 1, np.dtype(np.uint16): 1 / 257, np.dtype(np.float32): 255}
        assert np.array_equal(np.asarray(image), np.rint(array * scale[array.dtype]))


def test_paths_and_bytes(tmp_path):
    png = tmp_path / "x.png"
    Image.fromarray(noise(9, 11)).save(png)
    expected = noise(9, 11)
    for source in (png, str(png), png.read_bytes(), bytearray(png.read_bytes())):
        assert np.array_equal(np.asarray(load_image(source)), expected)


def test_exif_orientation_is_applied():
    pixels = np.zeros((20, 40, 3), np.uint8)  # w=40, h=20: left half red, right half blue
    pixels[:, :20, 0] = 255
    pixels[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", exif=exif.tobytes(), quality=95)
    image = np.asarray(load_image(buffer.getvalue()))
    assert image.shape == (40, 20, 3)
    assert image[5, 10, 0] > 200 and image[5, 10, 2] < 50  # the left (red) half is now on top
    assert image[35, 10, 2] > 200 and image[35, 10, 0] < 50


def test_pil_input_is_not_modified():
    image = Image.new("RGBA", (3, 3), (0, 0, 0, 0))
    load_image(image)
    assert image.mode == "RGBA" and image.getpixel((0, 0)) == (0, 0, 0, 0)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_no_file_left_open(tmp_path):
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    Image.fromarray(noise(64, 64)).save(good)
    bad.write_bytes(good.read_bytes()[:300])
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(20_000, 20_000))
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        load_image(good)
        for path in (bad, bomb):
            with pytest.raises(ValueError):
                load_image(path)
    assert len(os.listdir("/proc/self/fd")) == before


# ----------------------------------------------------------------------------- errors


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height 1-bit pixels and holds almost no data (decoding it would fail)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def encoded(fmt: str, height: int = 64, width: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(noise(height, width)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (encoded("JPEG")[:400], "truncated or corrupt"),
        (encoded("PNG")[:2000], "truncated or corrupt"),
        (np.random.default_rng(0).bytes(1000), "not an image"),
        (b"", "empty"),
        (
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
            "not in a supported format",
        ),  # no Ghostscript
        (png_header_only(20_000, 20_000), "decompression bomb"),  # PIL's own error, while reading the header
        (png_header_only(10_000, 10_000), "decompression bomb"),  # PIL's warning, made an error
        (np.zeros((0, 5, 3), np.uint8), "zero-size"),
        (np.zeros((5, 0), np.float32), "zero-size"),
        (Image.new("RGB", (0, 4)), "zero-size"),
        (np.zeros((4, 4, 5), np.uint8), "unsupported array shape"),
        (np.zeros(16, np.uint8), "unsupported array shape"),
        (np.zeros((2, 2, 3, 1), np.uint8), "unsupported array shape"),
        (np.zeros((2, 2), np.complex64), "unsupported array dtype"),
        (np.array([["a", "b"]]), "unsupported array dtype"),
        (np.full((2, 2), -1, np.int16), "integer pixel values must lie in"),
        (np.full((2, 2), 1.5, np.float32), r"float pixel values must lie in \[0, 1\]"),
        (np.full((2, 2), np.nan), r"float pixel values must lie in \[0, 1\]"),
        (123, "unsupported image type int"),
        ([[0, 1]], "unsupported image type list"),
    ],
    ids=[
        "truncated jpeg",
        "truncated png",
        "random bytes",
        "empty bytes",
        "eps",
        "bomb 20000^2",
        "bomb 10000^2",
        "0xW array",
        "Hx0 array",
        "0xH image",
        "5 channels",
        "1-D",
        "4-D",
        "complex",
        "strings",
        "negative",
        "float > 1",
        "nan",
        "int",
        "list",
    ],
)
def test_load_errors(source, message):
    with pytest.raises(ValueError, match=message):
        load_image(source)


def test_max_pixels_is_checked_before_decoding():
    with pytest.raises(ValueError, match=r"20x20 = 400 pixels exceeds max_pixels=100"):
        load_image(encoded("PNG", 20, 20), max_pixels=100)
    # A header-only PNG would fail to decode: the size check must come first.
    with pytest.raises(ValueError, match="exceeds max_pixels=1000"):
        load_image(png_header_only(40, 40), max_pixels=1000)


def test_file_errors(tmp_path):
    with pytest.raises(ValueError, match="no such image file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="no such image file"):
        load_image(str(tmp_path))  # a directory
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "cut.jpg").write_bytes(encoded("JPEG")[:400])
    with pytest.raises(ValueError, match="cut.jpg.*truncated or corrupt"):
        load_image(tmp_path / "cut.jpg")


@pytest.mark.parametrize("bad", [0, 5, -1, "4", 2.0, True, None])
def test_bad_max_num_tiles(bad):
    with pytest.raises(ValueError, match=rf"max_num_tiles must be .*got {bad!r}"):
        transform_image(Image.new("RGB", (8, 8)), tile_size=56, max_num_tiles=bad)


def test_transform_needs_rgb():
    with pytest.raises(ValueError, match="RGB PIL image .* got mode 'RGBA'"):
        transform_image(Image.new("RGBA", (8, 8)), tile_size=56, max_num_tiles=4)
    with pytest.raises(ValueError, match="tile_size must be a positive int"):
        transform_image(Image.new("RGB", (8, 8)), tile_size=0, max_num_tiles=4)
