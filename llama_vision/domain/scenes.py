"""Pictures of the embedded model's domain: scenes of coloured shapes, and printed words or numbers.

Everything is drawn from a `random.Random`, so one seed gives one picture on every machine (the noise
of a noisy background comes from a numpy generator seeded by that `Random`).

Sizes are given per tile: a picture is a grid of (tiles high, tiles wide) cells of about `TILE` pixels
(scaled by 0.8-1.25), one of the grids the processor supports, so the training set exercises 1 to 4
tiles. Shapes are drawn at twice the size and reduced, which gives them anti-aliased edges like real
pictures have, while the inside of every shape keeps its exact colour (tests read it at the centre).

Non-obvious choices:
- Colours are saturated and far apart, backgrounds are light (white, pale tints, light grey noise), so
  every named colour stays recognisable on every background; there is no "white" or "grey" shape.
- Shapes never overlap (their circumscribed circles are apart) and keep a margin from the border; the
  `border` variant puts one shape against an edge, for the robustness table only.
- Fonts: Pillow's built-in scalable font (Aileron, `ImageFont.load_default(size)`, Pillow >= 10.1) and
  two DejaVu fonts cut to ASCII that ship in `fonts/` with their licence. No system font is used.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TILE = 112  # pixels per tile of the embedded model (its VisionConfig.image_size)
GRIDS = ((1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (2, 2), (1, 4), (4, 1))  # (tiles high, tiles wide)

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (235, 215, 0),
    "green": (30, 150, 50),
    "blue": (30, 80, 220),
    "purple": (130, 40, 180),
    "pink": (255, 110, 190),
    "brown": (120, 70, 20),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
SIZES = {"small": 0.09, "large": 0.15}  # circumradius as a fraction of the tile side
BACKGROUNDS = ("plain", "tinted", "noisy")
TEXT_COLOURS = ("red", "green", "blue", "purple", "brown", "black")  # dark enough on a light background
FONT_SIZES = (0.16, 0.30)  # training range of the text height, as a fraction of the tile side
FONT_DIR = Path(__file__).parent / "fonts"
FONTS = ("aileron", "dejavu-serif", "dejavu-mono")

# A word list of everyday nouns of 3 to 8 letters for the text pictures (printed in capitals).
WORDS = tuple(
    """
    apple bread chair cloud dance eagle flame grape horse island jacket kettle lemon mango night ocean
    pencil queen river stone tiger umbrella violin water yacht zebra anchor basket candle desert engine
    forest garden hammer igloo jungle kitchen ladder magnet needle orange parrot rabbit saddle tomato
    valley window branch castle dragon feather guitar harbor lantern meadow napkin pepper rocket summer
    ticket winter bottle button camera carpet cookie copper cotton donkey finger flower frozen garlic
    helmet honey insect kitten letter marble mirror monkey museum muffin orbit palace pillow planet
    pocket puzzle radio ribbon saturn shadow silver spider spoon square statue sugar tunnel turtle
    velvet wagon walnut wizard yellow lamp moon star tree fish bird boat cake door frog gold hat kite
    leaf map nest owl pear ring ship sock train vase wolf yarn bell coin drum fork goat harp iron jar
    key lion mask nut oven pig rope sun tent van web box cup egg fan gem hill ink jam
    """.split()
)


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # one of COLOURS
    size: str  # one of SIZES
    x: float  # centre, in pixels of the picture
    y: float
    r: float  # circumradius in pixels

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    background: str  # one of BACKGROUNDS, or "speckled" (robustness only)
    shapes: tuple[Shape, ...]
    seed: int  # of the background noise


@dataclass(frozen=True)
class TextPicture:
    width: int
    height: int
    background: str
    text: str
    font: str  # one of FONTS
    font_size: int  # pixels
    colour: str  # one of TEXT_COLOURS
    x: int  # top-left corner of the text
    y: int
    seed: int


# ----------------------------------------------------------------------------- sampling


def sample_canvas(rng: random.Random, scale: float = 1.0) -> tuple[int, int, float]:
    """(width, height, tile side in pixels) of a picture on one of the supported tile grids."""
    rows, cols = rng.choice(GRIDS)
    tile = TILE * rng.uniform(0.8, 1.25) * scale
    return round(cols * tile), round(rows * tile), tile


def sample_scene(
    rng: random.Random,
    *,
    min_shapes: int = 1,
    max_shapes: int = 6,
    canvas_scale: float = 1.0,
    background: str | None = None,
    border: bool = False,
) -> Scene:
    """1 to 6 non-overlapping shapes. `canvas_scale` > 1 makes the picture larger at the same shape size
    in pixels; `border` puts the first shape against an edge (both for the robustness table)."""
    width, height, tile = sample_canvas(rng, canvas_scale)
    tile /= canvas_scale  # shapes keep their training size in pixels
    count = rng.randint(min_shapes, max_shapes)
    shapes: list[Shape] = []
    attempts = 0
    while len(shapes) < count:
        attempts += 1
        if attempts > 2000:  # a crowded small canvas: start the picture again
            return sample_scene(
                rng, min_shapes=min_shapes, max_shapes=max_shapes, canvas_scale=canvas_scale,
                background=background, border=border,
            )  # fmt: skip
        size = rng.choice(tuple(SIZES))
        r = SIZES[size] * tile
        margin = r * 1.15
        if margin * 2 >= min(width, height):
            continue
        x, y = rng.uniform(margin, width - margin), rng.uniform(margin, height - margin)
        if border and not shapes:  # touching one edge: the shape's extent reaches it
            edge = rng.choice(("left", "right", "top", "bottom"))
            x = {"left": r, "right": width - r}.get(edge, x)
            y = {"top": r, "bottom": height - r}.get(edge, y)
        if any(math.dist((x, y), (s.x, s.y)) < (r + s.r) * 1.2 for s in shapes):
            continue
        shapes.append(Shape(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), size, x, y, r))
    return Scene(width, height, background or rng.choice(BACKGROUNDS), tuple(shapes), rng.getrandbits(32))


def sample_text_picture(
    rng: random.Random, *, font_sizes: tuple[float, float] = FONT_SIZES, background: str | None = None
) -> TextPicture:
    """A word (capitals) or a number of up to 8 characters, placed wholly inside the picture."""
    if rng.random() < 0.6:
        text = rng.choice(WORDS).upper()
    else:
        text = str(rng.randint(0, 10 ** rng.randint(1, 8) - 1))
    font_name = rng.choice(FONTS)
    for _ in range(100):
        width, height, tile = sample_canvas(rng)
        size = round(rng.uniform(*font_sizes) * tile)
        left, top, right, bottom = font(font_name, size).getbbox(text)
        w, h = right - left, bottom - top
        if w + 8 <= width and h + 8 <= height:
            x = rng.randint(4, width - w - 4) - left
            y = rng.randint(4, height - h - 4) - top
            colour = rng.choice(TEXT_COLOURS)
            bg = background or rng.choice(BACKGROUNDS)
            return TextPicture(width, height, bg, text, font_name, size, colour, x, y, rng.getrandbits(32))
    raise ValueError(f"cannot fit {text!r} at font sizes {font_sizes} of the tile side")


# ----------------------------------------------------------------------------- drawing


@cache
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    if name == "aileron":
        return ImageFont.load_default(size)
    files = {"dejavu-serif": "DejaVuSerif-ASCII.ttf", "dejavu-mono": "DejaVuSansMono-ASCII.ttf"}
    if name not in files:
        raise ValueError(f"unknown font {name!r}; choose one of {list(FONTS)}")
    return ImageFont.truetype(str(FONT_DIR / files[name]), size)


def background_image(width: int, height: int, kind: str, seed: int) -> Image.Image:
    """A light background: plain white/grey, a pale tint, grey noise, or speckles (robustness only)."""
    rng = np.random.default_rng(seed)
    if kind == "plain":
        level = int(rng.choice([255, 245, 235]))
        return Image.new("RGB", (width, height), (level,) * 3)
    if kind == "tinted":
        hue = rng.integers(0, 256, size=3)
        tint = tuple(int(255 - (255 - c) * 0.18) for c in hue)  # 82% white
        return Image.new("RGB", (width, height), tint)
    if kind == "noisy":
        grey = rng.normal(225, 18, size=(height, width, 1))
        pixels = np.clip(grey + rng.normal(0, 6, size=(height, width, 3)), 150, 255)
        return Image.fromarray(pixels.astype(np.uint8), "RGB")
    if kind == "speckled":  # coloured salt-and-pepper on white: a noise the training set never shows
        pixels = np.full((height, width, 3), 250, dtype=np.uint8)
        spots = rng.random((height, width)) < 0.06
        pixels[spots] = rng.integers(0, 256, size=(int(spots.sum()), 3), dtype=np.uint8)
        return Image.fromarray(pixels, "RGB")
    raise ValueError(f"unknown background {kind!r}; choose one of {[*BACKGROUNDS, 'speckled']}")


def shape_polygon(kind: str, x: float, y: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of a shape of circumradius r centred at (x, y); None for the circle."""
    if kind == "circle":
        return None
    if kind == "square":
        a = r / math.sqrt(2)
        return [(x - a, y - a), (x + a, y - a), (x + a, y + a), (x - a, y + a)]
    if kind == "triangle":  # equilateral, pointing up; its centre is the centroid
        return [(x + r * math.sin(t), y - r * math.cos(t)) for t in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    if kind == "diamond":  # a rhombus, taller than wide, so it differs from a turned square
        return [(x, y - r), (x + 0.62 * r, y), (x, y + r), (x - 0.62 * r, y)]
    if kind == "star":  # five points, inner radius 0.45 r
        return [
            (x + rr * math.sin(k * math.pi / 5), y - rr * math.cos(k * math.pi / 5))
            for k in range(10)
            for rr in [r if k % 2 == 0 else 0.45 * r]
        ]
    if kind == "cross":  # a plus sign with arms a third of the width
        a, b = r / math.sqrt(2), r / (3 * math.sqrt(2))
        return [(x - b, y - a), (x + b, y - a), (x + b, y - b), (x + a, y - b), (x + a, y + b),
                (x + b, y + b), (x + b, y + a), (x - b, y + a), (x - b, y + b), (x - a, y + b),
                (x - a, y - b), (x - b, y - b)]  # fmt: skip
    raise ValueError(f"unknown shape {kind!r}; choose one of {list(SHAPES)}")


def render(picture: Scene | TextPicture) -> Image.Image:
    """The RGB picture."""
    image = background_image(picture.width, picture.height, picture.background, picture.seed)
    if isinstance(picture, TextPicture):
        draw = ImageDraw.Draw(image)
        draw.text((picture.x, picture.y), picture.text, fill=COLOURS[picture.colour],
                  font=font(picture.font, picture.font_size))  # fmt: skip
        return image
    # Draw at 2x on a transparent layer, reduce it, and paste it: anti-aliased edges, exact insides.
    k = 2
    layer = Image.new("RGBA", (picture.width * k, picture.height * k), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for s in picture.shapes:
        fill = (*COLOURS[s.colour], 255)
        points = shape_polygon(s.kind, s.x * k, s.y * k, s.r * k)
        if points is None:
            draw.ellipse((k * (s.x - s.r), k * (s.y - s.r), k * (s.x + s.r), k * (s.y + s.r)), fill=fill)
        else:
            draw.polygon(points, fill=fill)
    layer = layer.resize((picture.width, picture.height), Image.Resampling.BOX)
    image.paste(layer, (0, 0), layer)
    return image


# ----------------------------------------------------------------------------- patch labels

CHARACTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"  # every character a text picture can hold
LABEL_CHANNELS: dict[str, tuple[str, ...]] = {  # class 0 of every channel is "nothing of this here"
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "character": tuple(CHARACTERS),
    "place": tuple(f"character {k}" for k in range(1, 9)),  # which character of the text, from the left
}


def label_map(picture: Scene | TextPicture) -> np.ndarray:
    """(height, width, 4) uint8 of class ids per pixel, channels as `LABEL_CHANNELS` (0 = none): the
    colour and shape of the shape drawn there, and for text the character whose cell (its advance
    width by the text's height) holds the pixel, with its place in the text. Drawn without
    anti-aliasing at the picture's own size, so it lies on the picture as `render` draws it."""
    out = np.zeros((picture.height, picture.width, 4), dtype=np.uint8)
    if isinstance(picture, TextPicture):
        f = font(picture.font, picture.font_size)
        _, top, _, bottom = f.getbbox(picture.text)
        y0, y1 = max(picture.y + top, 0), min(picture.y + bottom, picture.height)
        for k, char in enumerate(picture.text):
            x0 = round(picture.x + f.getlength(picture.text[:k]))
            x1 = round(picture.x + f.getlength(picture.text[: k + 1]))
            cell = out[y0:y1, max(x0, 0) : min(x1, picture.width)]
            cell[..., 2] = CHARACTERS.index(char) + 1
            cell[..., 3] = k + 1
        return out
    for channel, value_of in (
        (0, lambda s: tuple(COLOURS).index(s.colour)),
        (1, lambda s: SHAPES.index(s.kind)),
    ):
        layer = Image.new("L", (picture.width, picture.height), 0)
        draw = ImageDraw.Draw(layer)
        for s in picture.shapes:
            value = value_of(s) + 1
            points = shape_polygon(s.kind, s.x, s.y, s.r)
            if points is None:
                draw.ellipse((s.x - s.r, s.y - s.r, s.x + s.r, s.y + s.r), fill=value)
            else:
                draw.polygon(points, fill=value)
        out[..., channel] = np.asarray(layer)
    return out
