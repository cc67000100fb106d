"""Examples of the domain (a picture and one question with its answer) and datasets of them on disk.

Example `index` of split `split` is drawn from `random.Random(f"{split}/{variant}/{seed}/{index}")`
(Python seeds a `Random` from a string through SHA-512, the same on every machine and run). The split
name is part of every seed, so the training and evaluation sets never share a seed whatever numbers
are chosen: disjoint by construction. Question types take turns (`index % 8`), so any 500 consecutive
examples hold 62 or 63 of each type.

Variants, for the robustness rows of the accuracy table (never in training):
- `large_canvas`: pictures 1.6 times as large with shapes of the training size in pixels (so, after the
  processor scales the picture to its tiles, smaller shapes than any in training);
- `speckled`: coloured salt-and-pepper noise instead of the training backgrounds;
- `border`: one shape touching an edge of the picture;
- `big_font`: text 0.36-0.45 of the tile side high, above the training range (0.16-0.30).

A dataset is a JSONL file in the chat form the fine-tuning command reads, with PNG images beside it:

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/000001.png"},
                                               {"type": "text", "text": "How many stars are there?"}]},
                  {"role": "assistant", "content": "2"}], "type": "count_of"}
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .questions import QA, QUESTION_TYPES, ask
from .scenes import LABEL_CHANNELS, Scene, TextPicture, label_map, render, sample_scene, sample_text_picture

SPLITS = ("train", "eval")
VARIANTS = ("large_canvas", "speckled", "border", "big_font")
SCENE_TYPES = tuple(t for t in QUESTION_TYPES if t != "text")


@dataclass(frozen=True)
class Example:
    picture: Scene | TextPicture
    qa: QA

    def image(self) -> Image.Image:
        return render(self.picture)

    def messages(self, image: object) -> list[dict]:
        """The example as chat messages, the picture given as `image` (a path, or a PIL image)."""
        return [
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": self.qa.question}],
            },
            {"role": "assistant", "content": self.qa.answer},
        ]


def example(split: str, seed: int, index: int, variant: str | None = None) -> Example:
    """Example `index` of a split (and robustness variant), the same on every machine."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
    rng = random.Random(f"{split}/{variant}/{seed}/{index}")
    if variant == "big_font":
        kind = "text"
    elif variant is not None:
        kind = SCENE_TYPES[index % len(SCENE_TYPES)]
    else:
        kind = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    while True:  # draw pictures until one allows a question of this kind (a few tries at most)
        if kind == "text":
            sizes = (0.36, 0.45) if variant == "big_font" else None
            picture = sample_text_picture(rng, **({"font_sizes": sizes} if sizes else {}))
        else:
            picture = sample_scene(
                rng,
                min_shapes=2 if kind == "position" else 1,
                canvas_scale=1.6 if variant == "large_canvas" else 1.0,
                background="speckled" if variant == "speckled" else None,
                border=variant == "border",
            )
        qa = ask(picture, kind, rng)
        if qa is not None:
            return Example(picture, qa)


@dataclass(frozen=True)
class Conversation:
    """A picture and several questions about it, asked in turn (a multi-turn training example)."""

    picture: Scene | TextPicture
    qas: tuple[QA, ...]

    def image(self) -> Image.Image:
        return render(self.picture)

    def messages(self, image: object) -> list[dict]:
        messages: list[dict] = []
        for k, qa in enumerate(self.qas):
            text = {"type": "text", "text": qa.question}
            content = [{"type": "image", "image": image}, text] if k == 0 else [text]
            messages += [{"role": "user", "content": content}, {"role": "assistant", "content": qa.answer}]
        return messages


def conversation(split: str, seed: int, index: int) -> Conversation:
    """Conversation `index` of a split: even indices are printed text with its one question; odd ones a
    scene with a question of every type it allows, in random order (each type comes first as often).
    Seeded apart from `example` (`{split}/conversation/...`), so never equal to an evaluation example."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    rng = random.Random(f"{split}/conversation/{seed}/{index}")
    if index % 2 == 0:
        picture = sample_text_picture(rng)
        return Conversation(picture, (ask(picture, "text", rng),))
    picture = sample_scene(rng, min_shapes=2 if rng.random() < 0.8 else 1)
    kinds = list(SCENE_TYPES)
    rng.shuffle(kinds)
    qas = tuple(qa for kind in kinds if (qa := ask(picture, kind, rng)) is not None)
    return Conversation(picture, qas)


def tagged_picture(split: str, seed: int, index: int, max_shapes: int = 6) -> Scene:
    """Picture `index` of a split's pretraining set (`generate_tagged`): a scene of 1 to `max_shapes`
    shapes. Seeded apart from the examples and conversations (`{split}/tags/...`)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    if not 1 <= max_shapes <= 6:
        raise ValueError(f"max_shapes must be from 1 to 6, got {max_shapes}")
    return sample_scene(random.Random(f"{split}/tags/{seed}/{index}"), min_shapes=1, max_shapes=max_shapes)


def shape_tags(scene: Scene) -> list[str]:
    """The kinds of shape in a scene, sorted: the tags of the vision encoder's pretraining. Kinds only:
    with colours and colour-shape pairs among the tags too, 300 steps of the embedded recipe's first
    stage gave an encoder whose head names a lone shape 27% of the time, against 73% with kinds only
    (the colours, easy, took the head's attention; the language model learns colours anyway)."""
    return sorted({s.kind for s in scene.shapes})


def generate_tagged(
    out_dir: str | Path, n: int, seed: int = 0, *, split: str = "train", max_shapes: int = 6
) -> Path:
    """Write n scenes of 1 to `max_shapes` shapes tagged with `shape_tags` as `out_dir/{split}-tags.jsonl`
    (images in `out_dir/img/`), the records of the vision encoder's pretraining (`mode: vision`); returns
    the path. One shape a picture is what the embedded recipe starts with: the encoder learns each kind
    of shape on its own, which carries over to scenes (README, "Embedded model")."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out_dir = Path(out_dir)
    (out_dir / "img").mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{split}-tags.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            picture = tagged_picture(split, seed, i, max_shapes)
            image = f"img/{split}-tags-{i:06d}.png"
            render(picture).save(out_dir / image)
            f.write(json.dumps({"image": image, "tags": shape_tags(picture)}) + "\n")
    return path


def dense_picture(split: str, seed: int, index: int) -> Scene | TextPicture:
    """Picture `index` of a split's patch-labelled pretraining set (`generate_dense`): even indices a
    scene of 1 to 6 shapes, odd ones printed text. Seeded apart from everything else
    (`{split}/dense/...`)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    rng = random.Random(f"{split}/dense/{seed}/{index}")
    return sample_scene(rng) if index % 2 == 0 else sample_text_picture(rng)


def generate_dense(out_dir: str | Path, n: int, seed: int = 0, *, split: str = "train") -> Path:
    """Write n pictures (`dense_picture`) as `out_dir/{split}-dense.jsonl` for `mode: vision`, each with
    its tags (the kinds of shape, or "text") and a label map (`label_map`, a 4-channel PNG beside the
    picture), and `out_dir/labels.json`, the class names of the map's channels; returns the JSONL path.
    The vision encoder then learns what is at every patch, not only what the picture holds."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out_dir = Path(out_dir)
    (out_dir / "img").mkdir(parents=True, exist_ok=True)
    (out_dir / "labels.json").write_text(json.dumps(LABEL_CHANNELS, indent=1) + "\n", encoding="utf-8")
    path = out_dir / f"{split}-dense.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            picture = dense_picture(split, seed, i)
            image, labels = f"img/{split}-dense-{i:06d}.png", f"img/{split}-dense-{i:06d}-labels.png"
            render(picture).save(out_dir / image)
            Image.fromarray(label_map(picture), "RGBA").save(out_dir / labels)
            tags = shape_tags(picture) if isinstance(picture, Scene) else ["text"]
            f.write(json.dumps({"image": image, "tags": tags, "label_map": labels}) + "\n")
    return path


def generate_dataset(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    *,
    split: str = "train",
    variant: str | None = None,
    conversations: bool = False,
) -> Path:
    """Write n examples as `out_dir/{split}.jsonl` with images in `out_dir/img/`; returns the JSONL path.
    With `conversations`, each record is a `Conversation` (several questions about one picture)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if conversations and variant is not None:
        raise ValueError("robustness variants are single questions; drop --conversations")
    out_dir = Path(out_dir)
    (out_dir / "img").mkdir(parents=True, exist_ok=True)
    name = split if variant is None else f"{split}-{variant}"
    name += "-conversations" if conversations else ""
    path = out_dir / f"{name}.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            ex = conversation(split, seed, i) if conversations else example(split, seed, i, variant)
            image = f"img/{name}-{i:06d}.png"
            ex.image().save(out_dir / image)
            types = [qa.type for qa in ex.qas] if conversations else ex.qa.type
            record = {"messages": ex.messages(image), "type": types}
            f.write(json.dumps(record) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llama_vision.domain", description="Write a dataset of the embedded model's domain."
    )
    parser.add_argument("out_dir", help="folder for {split}.jsonl and img/")
    parser.add_argument("--n", type=int, default=1000, help="number of examples (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=SPLITS, default="train")
    parser.add_argument("--variant", choices=VARIANTS, default=None, help="a robustness variant (eval only)")
    parser.add_argument(
        "--conversations",
        action="store_true",
        help="several questions a picture, as turns of one conversation (half text pictures); "
        "writes {split}-conversations.jsonl",
    )
    parser.add_argument(
        "--shape-tags",
        metavar="MAX_SHAPES",
        type=int,
        help="instead, write {split}-tags.jsonl: scenes of 1 to MAX_SHAPES shapes tagged with their kinds "
        "of shape, for the vision encoder's pretraining (mode: vision)",
    )
    parser.add_argument(
        "--dense",
        action="store_true",
        help="instead, write {split}-dense.jsonl: scenes and text pictures with tags and a label map of "
        "what is at every pixel (labels.json names the classes), for mode: vision",
    )
    args = parser.parse_args(argv)
    try:
        if args.dense:
            if args.conversations or args.variant or args.shape_tags is not None:
                raise ValueError("--dense writes labelled pictures only; drop the other options")
            print(generate_dense(args.out_dir, args.n, args.seed, split=args.split))
            return
        if args.shape_tags is not None:
            if args.conversations or args.variant:
                raise ValueError("--shape-tags writes tagged scenes only; drop --conversations and --variant")
            print(
                generate_tagged(args.out_dir, args.n, args.seed, split=args.split, max_shapes=args.shape_tags)
            )
            return
        path = generate_dataset(
            args.out_dir, args.n, args.seed, split=args.split, variant=args.variant,
            conversations=args.conversations,
        )  # fmt: skip
    except (ValueError, OSError) as e:
        parser.exit(2, f"llama-vision: error: {e}\n")
    print(path)
