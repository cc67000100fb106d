"""What a model of the embedded domain has learnt to see: two diagnostics of a checkpoint.

    python bench/embedded_diagnostics.py --model llama_vision/embedded
    python bench/embedded_diagnostics.py --model init      # a freshly initialised embedded preset

1. Seeing against blind: the held-out answer loss (mean over answer tokens and their end-of-turn) of
   each question type with the real picture and with a blank light-grey one of the same size. A type
   whose two losses are equal is answered from the question alone.
2. Shape probe: a linear classifier (softmax regression on the mean and the max over the image tokens
   of the projected vision features) trained on 500 pictures of one shape and scored on 200 more: how
   often the features tell the shape's kind (chance 1 in 6).

The questions are the evaluation split's seed 5, never seen in training; the probe's pictures come from
a seed of their own ("probe/7").
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict

import torch
import torch.nn.functional as F
from PIL import Image

from llama_vision.bundled import EMBEDDED_DIR
from llama_vision.domain import QUESTION_TYPES, example
from llama_vision.domain.scenes import SHAPES, render, sample_scene
from llama_vision.finetune.collate import Collator
from llama_vision.finetune.data import Example
from llama_vision.finetune.train import init_weights, token_loss
from llama_vision.processor import Processor
from llama_vision.tokenizer import Tokenizer
from llama_vision.weights import load_checkpoint


def seeing_and_blind(model: torch.nn.Module, tokenizer: Tokenizer, n: int) -> dict[str, tuple[float, float]]:
    collator = Collator(tokenizer, model.config, max_length=256)
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for i in range(n):
        ex = example("eval", 5, i)
        image = ex.image()
        blank = Image.new("RGB", image.size, (240, 240, 240))
        for k, picture in ((0, image), (2, blank)):
            loss, count, _ = token_loss(model, collator([Example(ex.messages(picture), f"eval:{i}")]))
            sums[ex.qa.type][k] += float(loss)
            sums[ex.qa.type][k + 1] += int(count)
    return {t: (s[0] / s[1], s[2] / s[3]) for t, s in sums.items()}


def shape_probe(model: torch.nn.Module, processor: Processor, train: int = 500, test: int = 200) -> float:
    rng = random.Random("probe/7")
    features, kinds = [], []
    for _ in range(train + test):
        scene = sample_scene(rng, min_shapes=1, max_shapes=1)
        inputs = processor("<|image|>", [render(scene)])
        tokens = model.encode_images(
            inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"]
        )
        per_tile = tokens.shape[1] // model.config.vision.max_num_tiles
        real = tokens[0, : int(inputs["aspect_ratio_mask"].sum()) * per_tile]  # tokens of real tiles
        features.append(torch.cat([real.mean(0), real.amax(0)]))
        kinds.append(SHAPES.index(scene.shapes[0].kind))
    x, y = torch.stack(features), torch.tensor(kinds)
    x = (x - x[:train].mean(0)) / (x[:train].std(0) + 1e-6)
    weight = torch.zeros(x.shape[1], len(SHAPES), requires_grad=True)
    bias = torch.zeros(len(SHAPES), requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    with torch.enable_grad():
        for _ in range(500):
            loss = F.cross_entropy(x[:train] @ weight + bias, y[:train]) + 1e-3 * weight.pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return float(((x[train:] @ weight + bias).argmax(1) == y[train:]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory, or 'init' for a fresh model")
    parser.add_argument("--n", type=int, default=160, help="held-out questions for the losses (default 160)")
    args = parser.parse_args()
    model = load_checkpoint(EMBEDDED_DIR if args.model == "init" else args.model).eval()
    if args.model == "init":
        init_weights(model, seed=0)
    tokenizer = Tokenizer.from_dir(EMBEDDED_DIR if args.model == "init" else args.model)
    with torch.no_grad():
        losses = seeing_and_blind(model, tokenizer, args.n)
        probe = shape_probe(model, Processor(tokenizer, model.config))
    print(f"model {args.model}; held-out answer loss over {args.n} questions\n")
    print("| question type | with the picture | with a blank picture |")
    print("|---|---:|---:|")
    for t in QUESTION_TYPES:
        if t in losses:
            print(f"| {t} | {losses[t][0]:.3f} | {losses[t][1]:.3f} |")
    print(f"\nshape probe on the vision features: {100 * probe:.1f}% right (chance {100 / len(SHAPES):.1f}%)")


if __name__ == "__main__":
    main()
