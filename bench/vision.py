"""Vision tower benchmark: our tiled ViT and transformers' `MllamaVisionModel` side by side, in one
process, on the same random checkpoint and the same preprocessed images, at 1, 2 and 4 tiles per image
and for a batch mixing the three.

    python bench/vision.py                        # bench-small, float32, CPU
    python bench/vision.py --repeats 7 --checkpoint /tmp/bsmall

What is timed (median of --repeats after one warm-up; per case ours, theirs, then ours with the mask):
- forward: the tower alone without autograd, as in time to first token;
- forward + backward: every vision parameter trainable, the loss a mean square of the features, as in a
  fine-tuning step that trains the encoder;
for ours, also with Meta's padding mask forced on every call (`mask` column), the path taken before
images of one tile count dropped it (encoders/vision.py, `padding_layout`).

A 4-tile slot holds padding tiles for smaller images; Meta's mask (only padding-to-padding pairs masked)
lets every real token attend to them, so their tokens stay in every product either way. The maximum
difference of our features from theirs is printed as a sanity check (HF loads the checkpoint with its
vision feature indices lowered by one, README "Known differences").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from generate import write_checkpoint  # noqa: E402
from reference import random_image  # noqa: E402

from llama_vision import LlamaVision  # noqa: E402
from llama_vision.config import get_preset  # noqa: E402
from llama_vision.encoders import vision  # noqa: E402

SIZES = {1: (224, 224), 2: (448, 224), 4: (448, 448)}  # bench-small's 224 px tiles


@contextmanager
def masked() -> None:
    """Our tower as it ran before: one call for all images, Meta's mask in every attention."""
    layout, groups = vision.padding_layout, vision._tile_groups
    vision.padding_layout, vision._tile_groups = (lambda is_pad: None), (lambda tile_mask: None)
    try:
        yield
    finally:
        vision.padding_layout, vision._tile_groups = layout, groups


def median_time(run: Callable[[], None], repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward(model: torch.nn.Module, hf: bool, pixels: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model(*pixels)

    return run


def train(model: torch.nn.Module, hf: bool, pixels: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    def run() -> None:
        out = model(*pixels)
        (out.last_hidden_state if hf else out).square().mean().backward()
        model.zero_grad(set_to_none=True)

    return run


def hf_vision(checkpoint: Path) -> torch.nn.Module:
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    config = MllamaConfig.from_pretrained(checkpoint)
    config.vision_config.intermediate_layers_indices = [
        i - 1 for i in config.vision_config.intermediate_layers_indices
    ]
    model = MllamaForConditionalGeneration.from_pretrained(
        checkpoint, config=config, attn_implementation="sdpa"
    )
    return model.model.vision_model.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpoint", type=Path, help="reuse (or keep) the random checkpoint here")
    args = parser.parse_args()
    tmp = None
    if args.checkpoint is None:
        tmp = tempfile.TemporaryDirectory()
        args.checkpoint = Path(tmp.name) / "bench-small"
    if not (args.checkpoint / "config.json").is_file():
        write_checkpoint(get_preset("bench-small"), args.checkpoint, seed=0)

    lv = LlamaVision.from_pretrained(args.checkpoint, background=False)
    ours, theirs = lv.model.vision_model.float(), hf_vision(args.checkpoint)
    print(f"bench-small vision tower ({sum(p.numel() for p in ours.parameters()) / 1e6:.1f} M parameters), "
          f"float32, CPU, {torch.get_num_threads()} threads; median of {args.repeats}")  # fmt: skip
    cases = [(f"1 image, {n} tile{'s' if n > 1 else ''}", [n]) for n in SIZES] + [
        ("3 images: 1, 2, 4 tiles", [1, 2, 4])
    ]
    rows = []
    for name, tiles in cases:
        images = [[random_image(*SIZES[n], seed=i)] for i, n in enumerate(tiles)]
        inputs = lv.processor(text=["<|image|>"] * len(tiles), images=images)
        pixels = (inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"])
        with torch.no_grad():
            ours_out = ours(*pixels)
            hf_out = theirs(*pixels).last_hidden_state
        diff = (ours_out - hf_out.view_as(ours_out)).abs().max().item()

        timing: dict[str, dict[str, float]] = {"forward": {}, "train": {}}
        for kind, make in (("forward", forward), ("train", train)):
            timing[kind]["ours"] = median_time(make(ours, False, pixels), args.repeats)
            timing[kind]["hf"] = median_time(make(theirs, True, pixels), args.repeats)
            with masked():
                timing[kind]["mask"] = median_time(make(ours, False, pixels), args.repeats)
        rows.append((name, timing, diff))

    print()
    print("| images | forward ours (ms) | ours with the mask | transformers | ours / theirs "
          "| fwd+bwd ours (ms) | ours with the mask | transformers | ours / theirs | max diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, t, diff in rows:
        f, b = t["forward"], t["train"]
        print(f"| {name} | {f['ours'] * 1e3:.1f} | {f['mask'] * 1e3:.1f} | {f['hf'] * 1e3:.1f} | "
              f"{f['hf'] / f['ours']:.2f}x | {b['ours'] * 1e3:.1f} | {b['mask'] * 1e3:.1f} | {b['hf'] * 1e3:.1f} | "
              f"{b['hf'] / b['ours']:.2f}x | {diff:.1e} |")  # fmt: skip
    print("\nours / theirs: their time over ours (above 1: ours is faster)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
