"""Questions about the domain's pictures, each with one short exact answer.

Types (`QUESTION_TYPES`): the colour of a named shape, the shape of a named colour, how many shapes, how
many of a colour and/or shape, which of two named shapes is further left/right/up/down, whether
something exists, what the text says, and a one-sentence description of the scene. Every type has
several phrasings (`TEMPLATES`).

A question is asked only when its answer is unambiguous in the picture: "the circle" only when there is
exactly one circle, "the red circle" only when there is exactly one red circle, and "further left" only
when the two centres are apart by at least 3/4 of the sum of the radii along that axis. Answers: colour
and shape names, counts in digits, "yes"/"no", "red circle" for a named shape, the printed text, and
for the description a sentence that names every (colour, shape) group, in the order of `COLOURS` then
`SHAPES` (a fixed order is easier to learn than a spatial one).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from .scenes import COLOURS, PLURALS, SHAPES, Scene, TextPicture

QUESTION_TYPES = ("colour", "shape", "count", "count_of", "position", "exists", "text", "describe")

TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": (
        "What colour is the {shape}?",
        "What color is the {shape}?",
        "Which colour is the {shape}?",
        "The {shape} is which colour?",
    ),
    "shape": (
        "What shape is the {colour} one?",
        "Which shape is {colour}?",
        "What is the shape of the {colour} object?",
        "The {colour} object is which shape?",
    ),
    "count": (
        "How many shapes are there?",
        "How many shapes are in the picture?",
        "Count the shapes.",
        "How many objects can you see?",
    ),
    "count_of": (
        "How many {thing} are there?",
        "How many {thing} are in the picture?",
        "Count the {thing}.",
        "How many {thing} can you see?",
    ),
    "position": (
        "Which is further {direction}, the {a} or the {b}?",
        "Of the {a} and the {b}, which one is further {direction}?",
        "Which shape is further {direction}: the {a} or the {b}?",
    ),
    "exists": (
        "Is there {thing}?",
        "Is there {thing} in the picture?",
        "Can you see {thing}?",
        "Does the picture contain {thing}?",
    ),
    "text": (
        "What does the text say?",
        "What is written in the picture?",
        "Read the text in the image.",
        "What word or number is shown?",
    ),
    "describe": (
        "Describe the scene in one sentence.",
        "Describe the picture in one sentence.",
        "What is in the picture? Answer in one sentence.",
    ),
}
DIRECTIONS = ("left", "right", "up", "down")
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six")


@dataclass(frozen=True)
class QA:
    type: str  # one of QUESTION_TYPES
    question: str
    answer: str


def article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def describe(scene: Scene) -> str:
    """'A red circle, two blue squares and a green star on a noisy background.'"""
    groups = Counter((s.colour, s.kind) for s in scene.shapes)
    parts = []
    for colour in COLOURS:
        for kind in SHAPES:
            n = groups.get((colour, kind), 0)
            if n:
                parts.append(
                    article(f"{colour} {kind}") if n == 1 else f"{NUMBER_WORDS[n]} {colour} {PLURALS[kind]}"
                )
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    sentence = f"{listed} on {article(scene.background)} background."
    return sentence[0].upper() + sentence[1:]


def ask(picture: Scene | TextPicture, kind: str, rng: random.Random) -> QA | None:
    """A question of `kind` about the picture with its answer, or None when the picture allows none."""
    if kind not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {kind!r}; choose one of {list(QUESTION_TYPES)}")
    if isinstance(picture, TextPicture) != (kind == "text"):
        return None
    template = rng.choice(TEMPLATES[kind])
    if kind == "text":
        return QA(kind, template, picture.text)
    shapes = picture.shapes
    kinds = Counter(s.kind for s in shapes)
    colours = Counter(s.colour for s in shapes)
    names = Counter(s.name for s in shapes)
    if kind == "colour":
        unique = sorted(k for k, n in kinds.items() if n == 1)
        if not unique:
            return None
        shape = rng.choice(unique)
        answer = next(s.colour for s in shapes if s.kind == shape)
        return QA(kind, template.format(shape=shape), answer)
    if kind == "shape":
        unique = sorted(c for c, n in colours.items() if n == 1)
        if not unique:
            return None
        colour = rng.choice(unique)
        answer = next(s.kind for s in shapes if s.colour == colour)
        return QA(kind, template.format(colour=colour), answer)
    if kind == "count":
        return QA(kind, template, str(len(shapes)))
    if kind == "count_of":
        # Ask about something present four times in five, so counts of 0 stay a minority.
        s = rng.choice(shapes) if rng.random() < 0.8 else None
        which = rng.choice(("colour", "shape", "both"))
        colour = s.colour if s else rng.choice(tuple(COLOURS))
        shape = s.kind if s else rng.choice(SHAPES)
        thing = {"colour": f"{colour} shapes", "shape": PLURALS[shape], "both": f"{colour} {PLURALS[shape]}"}[
            which
        ]
        n = sum(
            (which == "shape" or t.colour == colour) and (which == "colour" or t.kind == shape)
            for t in shapes
        )
        return QA(kind, template.format(thing=thing), str(n))
    if kind == "position":
        unique = [s for s in shapes if names[s.name] == 1]
        direction = rng.choice(DIRECTIONS)
        axis = "x" if direction in ("left", "right") else "y"
        pairs = [
            (a, b)
            for a in unique
            for b in unique
            if a is not b and abs(getattr(a, axis) - getattr(b, axis)) >= 0.75 * (a.r + b.r)
        ]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        first, last = sorted((a, b), key=lambda s: getattr(s, axis))  # y grows downwards
        answer = (first if direction in ("left", "up") else last).name
        return QA(kind, template.format(direction=direction, a=a.name, b=b.name), answer)
    if kind == "exists":
        yes = rng.random() < 0.5
        which = rng.choice(("colour", "shape", "both"))
        candidates = [
            (c, k)
            for c in COLOURS
            for k in SHAPES
            if (which != "shape" or c == "red") and (which != "colour" or k == "circle")
        ]  # one representative per colour (or shape) when only one attribute is asked about
        rng.shuffle(candidates)
        for colour, shape in candidates:
            found = any(
                (which == "shape" or s.colour == colour) and (which == "colour" or s.kind == shape)
                for s in shapes
            )
            if found == yes:
                thing = {
                    "colour": f"{article(colour)} shape",
                    "shape": article(shape),
                    "both": article(f"{colour} {shape}"),
                }[which]
                return QA(kind, template.format(thing=thing), "yes" if yes else "no")
        return None
    return QA(kind, template, describe(picture))
