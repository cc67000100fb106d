"""The embedded model's domain: a deterministic generator of pictures (coloured shapes, printed words
and numbers) and questions about them with short exact answers, its text corpus for the tokenizer, and
dataset files for training and evaluation. See `scenes`, `questions`, `dataset` and `corpus`."""

from .dataset import VARIANTS, Example, example, generate_dataset
from .questions import QA, QUESTION_TYPES, ask, describe
from .scenes import COLOURS, FONTS, SHAPES, Scene, Shape, TextPicture, render

__all__ = ["COLOURS", "FONTS", "QA", "QUESTION_TYPES", "SHAPES", "VARIANTS", "Example", "Scene", "Shape",
           "TextPicture", "ask", "describe", "example", "generate_dataset", "render"]  # fmt: skip
