"""The embedded model's domain generator (llama_vision/domain/): deterministic, pictures that show what
the answers say (pixels read back at the shape centres), questions asked only when unambiguous, hand-
checked answers for fixed scenes, 1 to 4 tiles, and dataset files in the fine-tuning command's form."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from llama_vision.chat import validate_messages
from llama_vision.config import get_preset
from llama_vision.domain import (
    COLOURS,
    FONTS,
    QUESTION_TYPES,
    SHAPES,
    VARIANTS,
    Scene,
    Shape,
    ask,
    describe,
    example,
    generate_dataset,
    render,
)
from llama_vision.domain.dataset import SCENE_TYPES, conversation
from llama_vision.domain.scenes import FONT_DIR, PLURALS, TextPicture, font
from llama_vision.processor import Processor
from llama_vision.tokenizer import Tokenizer

EMBEDDED = Path(__file__).parents[1] / "llama_vision" / "embedded"
EXAMPLES = [example("train", 7, i) for i in range(240)]


def hand_scene(background: str = "plain") -> Scene:
    """A red circle on the left, a green star at the bottom middle, a blue square on the right, and
    two yellow triangles (so "the triangle" and "the yellow one" are never asked about)."""
    shapes = (
        Shape("circle", "red", "large", 30, 40, 16),
        Shape("star", "green", "large", 112, 190, 16),
        Shape("square", "blue", "small", 190, 40, 10),
        Shape("triangle", "yellow", "small", 80, 110, 10),
        Shape("triangle", "yellow", "small", 150, 110, 10),
    )
    return Scene(224, 224, background, shapes, seed=3)


def test_examples_are_deterministic_and_splits_differ() -> None:
    for i in (0, 5, 13):
        a, b = example("eval", 2, i), example("eval", 2, i)
        assert a == b
        assert np.array_equal(np.asarray(a.image()), np.asarray(b.image()))
    train = {repr(example("train", 0, i).picture) for i in range(40)}
    held_out = {repr(example("eval", 0, i).picture) for i in range(40)}
    assert not train & held_out


def test_types_take_turns_and_all_appear() -> None:
    assert [ex.qa.type for ex in EXAMPLES[:8]] == list(QUESTION_TYPES)
    assert Counter(ex.qa.type for ex in EXAMPLES) == {t: 30 for t in QUESTION_TYPES}


@pytest.mark.parametrize("background", ["plain", "tinted", "noisy", "speckled"])
def test_pixels_at_shape_centres_have_the_named_colour(background: str) -> None:
    scene = hand_scene(background)
    pixels = np.asarray(render(scene)).astype(int)
    for s in scene.shapes:
        assert np.abs(pixels[round(s.y), round(s.x)] - COLOURS[s.colour]).max() <= 2, s
    # a shape's colour stops at its edge: just outside the circle is background
    assert np.abs(pixels[40, 30 + 19] - COLOURS["red"]).max() > 40


def test_generated_pictures_show_their_shapes() -> None:
    for ex in EXAMPLES:
        if isinstance(ex.picture, Scene):
            pixels = np.asarray(ex.image()).astype(int)
            assert ex.image().size == (ex.picture.width, ex.picture.height)
            for s in ex.picture.shapes:
                assert 0 <= s.x - s.r and s.x + s.r <= ex.picture.width
                assert np.abs(pixels[int(s.y), int(s.x)] - COLOURS[s.colour]).max() <= 2


def test_hand_checked_answers() -> None:
    scene = hand_scene()
    colours = {"circle": "red", "star": "green", "square": "blue"}
    x = {"red circle": 30, "green star": 112, "blue square": 190}
    y = {"red circle": 40, "green star": 190, "blue square": 40}
    assert describe(scene) == (
        "A red circle, two yellow triangles, a green star and a blue square on a plain background."
    )
    for seed in range(60):
        rng = random.Random(seed)
        qa = ask(scene, "colour", rng)
        shape = next(s for s in SHAPES if re.search(rf"\b{s}\b", qa.question))
        assert qa.answer == colours[shape] and shape != "triangle"
        qa = ask(scene, "shape", rng)
        colour = next(c for c in COLOURS if c in qa.question)
        assert colour != "yellow" and colours[qa.answer] == colour
        assert ask(scene, "count", rng).answer == "5"
        qa = ask(scene, "count_of", rng)
        expected = {"triangles": 2, "yellow shapes": 2, "yellow triangles": 2, "red circles": 1,
                    "circles": 1, "red shapes": 1, "stars": 1, "squares": 1, "green shapes": 1,
                    "green stars": 1, "blue shapes": 1, "blue squares": 1}  # fmt: skip
        thing = re.search(r"(?:many|Count the) (.+?)(?: are| can|\.)", qa.question).group(1)
        assert qa.answer == str(expected.get(thing, 0)), qa
        qa = ask(scene, "position", rng)
        a, b = re.search(r"the (\w+ \w+),? (?:or|and) the (\w+ \w+)", qa.question).groups()
        assert "triangle" not in a + b  # two yellow triangles: "the yellow triangle" is ambiguous
        axis, smaller = (x, ("left",)) if re.search(r"left|right", qa.question) else (y, ("up",))
        first = min((a, b), key=axis.get)
        want_first = any(w in qa.question for w in smaller)
        assert qa.answer == (first if want_first else ({a, b} - {first}).pop())
        qa = ask(scene, "exists", rng)
        thing = re.search(r"(?:there|see|contain) an? (.+?)(?: in the picture)?\?", qa.question).group(1)
        words = thing.removesuffix(" shape").split()
        present = any(all(w in (s.colour, s.kind) for w in words) for s in scene.shapes)
        assert qa.answer == ("yes" if present else "no"), qa


def test_questions_are_unambiguous() -> None:
    seen = Counter()
    for ex in [example("eval", 11, i) for i in range(400)]:
        qa, pic = ex.qa, ex.picture
        seen[qa.type] += 1
        if qa.type == "text":
            assert isinstance(pic, TextPicture) and qa.answer == pic.text
            continue
        names = Counter(s.name for s in pic.shapes)
        if qa.type == "colour":
            shape = next(s for s in SHAPES if re.search(rf"\b{s}\b", qa.question))
            assert [s.colour for s in pic.shapes if s.kind == shape] == [qa.answer]
        elif qa.type == "shape":
            colour = next(c for c in COLOURS if c in qa.question)
            assert [s.kind for s in pic.shapes if s.colour == colour] == [qa.answer]
        elif qa.type == "position":
            a, b = re.search(r"the (\w+ \w+),? (?:or|and) the (\w+ \w+)", qa.question).groups()
            assert names[a] == names[b] == 1 and qa.answer in (a, b)
            sa, sb = (next(s for s in pic.shapes if s.name == n) for n in (a, b))
            axis = "x" if re.search(r"left|right", qa.question) else "y"
            assert abs(getattr(sa, axis) - getattr(sb, axis)) >= 0.75 * (sa.r + sb.r)
        elif qa.type in ("count", "count_of"):
            assert qa.answer.isdigit() and 0 <= int(qa.answer) <= 6
        elif qa.type == "exists":
            assert qa.answer in ("yes", "no")
        elif qa.type == "describe":
            for s in pic.shapes:
                assert s.colour in qa.answer and (s.kind in qa.answer or PLURALS[s.kind] in qa.answer)
    assert Counter(ex.qa.answer for ex in EXAMPLES if ex.qa.type == "exists")["yes"] >= 8  # both answers


def test_questions_that_cannot_be_asked_are_not() -> None:
    twins = Scene(
        224,
        112,
        "plain",
        (Shape("circle", "red", "large", 40, 50, 16), Shape("circle", "red", "large", 150, 50, 16)),
        0,
    )
    rng = random.Random(0)
    for kind in ("colour", "shape", "position", "text"):
        assert ask(twins, kind, rng) is None
    assert ask(twins, "count", rng).answer == "2"
    with pytest.raises(ValueError, match="unknown question type 'size'"):
        ask(twins, "size", rng)


def test_text_pictures_fit_and_use_packaged_fonts() -> None:
    texts = [ex.picture for ex in EXAMPLES if isinstance(ex.picture, TextPicture)]
    assert {t.font for t in texts} == set(FONTS)
    assert any(t.text.isdigit() for t in texts) and any(t.text.isalpha() for t in texts)
    for t in texts:
        assert 1 <= len(t.text) <= 8
        left, top, right, bottom = font(t.font, t.font_size).getbbox(t.text)
        assert 0 <= t.x + left and t.x + right <= t.width and 0 <= t.y + top and t.y + bottom <= t.height
        pixels = np.asarray(render(t)).astype(int)
        assert (np.abs(pixels - COLOURS[t.colour]).max(axis=2) <= 10).sum() > 10  # the text is drawn
    for name in ("dejavu-serif", "dejavu-mono"):
        assert Path(font(name, 20).path).parent == FONT_DIR  # never a system font
    assert (FONT_DIR / "LICENSE-DejaVu.txt").is_file()


def test_pictures_exercise_one_to_four_tiles() -> None:
    processor = Processor(Tokenizer.from_dir(EMBEDDED), get_preset("embedded"))
    pictures = [ex.image() for ex in EXAMPLES[:40]]
    inputs = processor(text=["<|image|>"] * len(pictures), images=[[p] for p in pictures])
    tiles = Counter(inputs["aspect_ratio_mask"].sum(-1).flatten().tolist())
    assert set(tiles) == {1, 2, 3, 4}


@pytest.mark.parametrize("variant", VARIANTS)
def test_robustness_variants(variant: str) -> None:
    exs = [example("eval", 0, i, variant) for i in range(14)]
    if variant == "big_font":
        assert all(ex.qa.type == "text" and ex.picture.font_size > 0.32 * 80 for ex in exs)
    else:
        assert {ex.qa.type for ex in exs} == set(QUESTION_TYPES) - {"text"}
    if variant == "border":
        for ex in exs:
            s, pic = ex.picture.shapes[0], ex.picture
            assert min(s.x - s.r, s.y - s.r, pic.width - s.x - s.r, pic.height - s.y - s.r) == pytest.approx(
                0
            )
    if variant == "speckled":
        assert all(ex.picture.background == "speckled" for ex in exs)
    if variant == "large_canvas":  # larger than any training picture of that grid, shapes as large
        assert max(ex.picture.width * ex.picture.height for ex in exs) > 1.25**2 * 112 * 112 * 4


def test_generate_dataset(tmp_path: Path) -> None:
    path = generate_dataset(tmp_path / "data", 10, seed=3, split="eval")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 10 and [r["type"] for r in records[:8]] == list(QUESTION_TYPES)
    for i, record in enumerate(records):
        validate_messages(record["messages"])
        user, assistant = record["messages"]
        image = user["content"][0]["image"]
        assert not Path(image).is_absolute() and (path.parent / image).is_file()
        assert assistant["content"] == example("eval", 3, i).qa.answer
    with pytest.raises(ValueError, match="unknown split"):
        generate_dataset(tmp_path, 1, split="test")


def test_conversations_ask_every_type_a_picture_allows(tmp_path: Path) -> None:
    talks = [conversation("train", 0, i) for i in range(40)]
    assert talks[5] == conversation("train", 0, 5)
    assert {repr(t.picture) for t in talks}.isdisjoint(repr(e.picture) for e in EXAMPLES)
    for i, talk in enumerate(talks):
        types = [qa.type for qa in talk.qas]
        if i % 2 == 0:
            assert isinstance(talk.picture, TextPicture) and types == ["text"]
            continue
        assert len(types) == len(set(types)) and set(types) <= set(SCENE_TYPES)
        assert {"count", "count_of", "exists", "describe"} <= set(types)  # askable of any scene
        answers = {qa.type: qa.answer for qa in talk.qas}
        assert answers["count"] == str(len(talk.picture.shapes))
        assert answers["describe"] == describe(talk.picture)
    firsts = Counter(t.qas[0].type for t in (conversation("train", 0, i) for i in range(1, 400, 2)))
    assert set(firsts) == set(SCENE_TYPES)  # every type leads some conversations
    path = generate_dataset(tmp_path, 4, split="train", conversations=True)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert path.name == "train-conversations.jsonl" and records[1]["type"] == [qa.type for qa in talks[1].qas]
    for record, talk in zip(records, talks):
        validate_messages(record["messages"])
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"] * len(talk.qas)
        kinds = [[c["type"] for c in m["content"]] for m in record["messages"][2::2]]
        assert all(k == ["text"] for k in kinds)  # the picture comes once, in the first turn
    with pytest.raises(ValueError, match="variants"):
        generate_dataset(tmp_path, 1, split="eval", variant="border", conversations=True)


def test_generate_dense_is_deterministic_and_names_its_classes(tmp_path: Path) -> None:
    from llama_vision.domain.dataset import generate_dense
    from llama_vision.domain.scenes import LABEL_CHANNELS
    from llama_vision.finetune.tags import label_channels, load_tagged

    a, b = generate_dense(tmp_path / "a", 6, seed=3), generate_dense(tmp_path / "b", 6, seed=3)
    assert a.read_text() == b.read_text()
    records = [json.loads(line) for line in a.read_text().splitlines()]
    assert [r["tags"] == ["text"] for r in records] == [False, True] * 3  # scenes and text take turns
    for r in records:
        for key in ("image", "label_map"):
            assert (tmp_path / "a" / r[key]).read_bytes() == (tmp_path / "b" / r[key]).read_bytes()
    assert label_channels(a, load_tagged(a)) == {k: list(v) for k, v in LABEL_CHANNELS.items()}
    other = generate_dense(tmp_path / "c", 6, seed=4)
    assert (tmp_path / "c" / records[0]["image"]).read_bytes() != (
        tmp_path / "a" / records[0]["image"]
    ).read_bytes()
    assert other.read_text() != a.read_text()
