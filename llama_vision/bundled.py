"""What ships with the package: the embedded model and example pictures.

The embedded model (llama_vision/embedded/) is the default of `LlamaVision.from_pretrained()`,
`llama-vision ask`, `serve` and `demo`: a 5.6M-parameter Llama 3.2 Vision trained from scratch by
`llama-vision finetune` on pictures of coloured shapes and printed words, in two stages
(`recipes/embedded-vision.yaml`, then `recipes/embedded.yaml`). `model_dir` turns a `--model` value (None, "embedded" or a directory) into a directory.

Example pictures by short name: `llama-vision ask --image shapes ...`, the demo's examples, the README.

They are pictures of the embedded model's domain (llama_vision/domain/), drawn by the generator from
the evaluation split with seed 2026, which neither training nor the accuracy benchmark uses, so the
embedded model has never seen them. `python -m llama_vision.bundled` draws them again into
llama_vision/embedded/examples/ (a test checks the shipped files are those drawings).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_DIR = Path(__file__).parent / "embedded"
EMBEDDED_NAME = "embedded"
EXAMPLES_DIR = EMBEDDED_DIR / "examples"
SEED = 2026


@dataclass(frozen=True)
class ExampleImage:
    index: int  # of the generator's evaluation split, seed 2026
    question: str  # a question the picture answers (the generator's, with its answer below)
    answer: str


EXAMPLES: dict[str, ExampleImage] = {
    "shapes": ExampleImage(2, "How many shapes are there?", "6"),
    "row": ExampleImage(
        28, "Of the purple circle and the pink cross, which one is further left?", "purple circle"
    ),
    "tall": ExampleImage(29, "Is there a circle?", "yes"),
    "word": ExampleImage(22, "What is written in the picture?", "FEATHER"),
    "number": ExampleImage(38, "What is written in the picture?", "7390"),
}


def model_dir(model: str | Path | None) -> Path:
    """The checkpoint directory of a `--model` value: the embedded model for None or "embedded" (unless a
    directory of that name exists here), else the path as given."""
    if model is None or (str(model) == EMBEDDED_NAME and not Path(model).exists()):
        return EMBEDDED_DIR
    return Path(model)


def example_path(name: str) -> Path:
    """The file of the example picture `name` (one of `EXAMPLES`)."""
    if name not in EXAMPLES:
        raise ValueError(f"unknown example image {name!r}; choose one of {', '.join(EXAMPLES)}")
    return EXAMPLES_DIR / f"{name}.png"


def resolve_image(value: str) -> str:
    """An image argument as a path: an existing file as given, else the example picture of that name."""
    if Path(value).exists():
        return value
    if value in EXAMPLES:
        return str(example_path(value))
    raise FileNotFoundError(f"no such image file: {value!r} (nor an example image: {', '.join(EXAMPLES)})")


def write_examples(directory: Path = EXAMPLES_DIR) -> list[Path]:
    """Draw every example picture into `directory` as `{name}.png`; returns the paths."""
    from llama_vision.domain import example

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, entry in EXAMPLES.items():
        ex = example("eval", SEED, entry.index)
        if (ex.qa.question, ex.qa.answer) != (entry.question, entry.answer):
            raise RuntimeError(f"example {name!r}: the generator no longer draws {entry.question!r}")
        paths.append(directory / f"{name}.png")
        ex.image().save(paths[-1], optimize=True)
    return paths


if __name__ == "__main__":
    for path in write_examples(Path(sys.argv[1]) if len(sys.argv) > 1 else EXAMPLES_DIR):
        print(path)
