"""Accuracy of a model on the embedded model's domain: per question type and on pictures outside the
training distribution, as a Markdown table.

    python bench/embedded_accuracy.py --model DIR [--n 500] [--robust-n 100] [--seed 0]

The questions are fresh: examples of the "eval" split (llama_vision/domain/dataset.py), whose seeds can
never be training seeds. Question types take turns, so 500 questions hold 62 or 63 of each. Answers are
greedy. A short answer counts when it equals the expected one after trimming spaces, a final period and
letter case ("Red." for "red"); the printed text must match in case too. The description is judged by
whether it names every colour and every shape present (a plural counts); its exact match is shown too.

Robustness rows (`--robust-n` questions each, all seven scene types in turn, or text for the font row):
pictures 1.6 times as large with shapes of the training size (`large_canvas`), coloured speckle noise
(`speckled`), one shape touching an edge (`border`), text larger than any in training (`big_font`).
Runs on any checkpoint directory `from_pretrained` loads.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict

from llama_vision import LlamaVision
from llama_vision.domain import QUESTION_TYPES, VARIANTS, Example, Scene, example
from llama_vision.domain.scenes import PLURALS


def short_match(expected: str, answer: str, *, keep_case: bool = False) -> bool:
    def clean(s: str) -> str:
        s = s.strip().removesuffix(".").strip()
        return s if keep_case else s.lower()

    return clean(expected) == clean(answer)


def names_everything(scene: Scene, answer: str) -> bool:
    """Does the description name every colour and every shape kind in the scene?"""
    words = set(re.findall(r"[a-z]+", answer.lower()))
    wanted = {s.colour for s in scene.shapes} | {s.kind for s in scene.shapes}
    return all(w in words or PLURALS.get(w) in words for w in wanted)


def correct(ex: Example, answer: str) -> bool:
    if ex.qa.type == "describe":
        return names_everything(ex.picture, answer)
    return short_match(ex.qa.answer, answer, keep_case=ex.qa.type == "text")


def answer_all(lv: LlamaVision, examples: list[Example], batch: int) -> list[str]:
    answers: list[str] = []
    for start in range(0, len(examples), batch):
        chunk = examples[start : start + batch]
        conversations = [ex.messages(ex.image())[:1] for ex in chunk]
        answers += lv.generate(conversations, temperature=0.0, max_new_tokens=48)
    return answers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--n", type=int, default=500, help="held-out questions (default 500)")
    parser.add_argument("--robust-n", type=int, default=100, help="questions per robustness row (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="of the eval split (any: never a training seed)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--show-errors", type=int, default=0, help="print this many wrong answers")
    args = parser.parse_args(argv)
    try:
        lv = LlamaVision.from_pretrained(args.model, device=args.device, max_batch=args.batch)
    except (ValueError, OSError) as e:
        sys.exit(f"llama-vision: error: {e}")

    t0 = time.perf_counter()
    rows: dict[str, list[bool]] = defaultdict(list)
    exact_describe: list[bool] = []
    errors: list[str] = []
    examples = [example("eval", args.seed, i) for i in range(args.n)]
    for ex, answer in zip(examples, answer_all(lv, examples, args.batch)):
        ok = correct(ex, answer)
        rows[ex.qa.type].append(ok)
        if ex.qa.type == "describe":
            exact_describe.append(answer.strip() == ex.qa.answer)
        if not ok and len(errors) < args.show_errors:
            errors.append(f"{ex.qa.question!r}: expected {ex.qa.answer!r}, got {answer!r}")
    for variant in VARIANTS if args.robust_n else ():
        examples = [example("eval", args.seed, i, variant) for i in range(args.robust_n)]
        for ex, answer in zip(examples, answer_all(lv, examples, args.batch)):
            rows[f"robust: {variant}"].append(correct(ex, answer))

    print(f"model {args.model}; {args.n} held-out questions (eval split, seed {args.seed}); greedy\n")
    print("| question type | questions | exact match |")
    print("|---|---:|---:|")
    for name in [*QUESTION_TYPES, *(k for k in rows if k.startswith("robust"))]:
        if not rows[name]:
            continue
        label = "describe (names every shape and colour)" if name == "describe" else name
        print(f"| {label} | {len(rows[name])} | {100 * sum(rows[name]) / len(rows[name]):.1f}% |")
        if name == "describe":
            print(f"| describe (word for word) | {len(exact_describe)} | "
                  f"{100 * sum(exact_describe) / len(exact_describe):.1f}% |")  # fmt: skip
    print(f"\n{time.perf_counter() - t0:.0f} s")
    for line in errors:
        print(line)


if __name__ == "__main__":
    main()
