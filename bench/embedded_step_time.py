"""Time of one training step of the embedded model (preset `embedded`) on this machine, and the
training time that gives for a number of examples. On a shared machine the wall-clock figures say
more about the other users than about the model; the CPU time per example, divided by the threads,
is the estimate for an idle machine (an upper bound: contention slows each thread too).

A step is what `llama-vision finetune` does per batch of a from-scratch run: the processor's inputs for
a batch of domain examples, the logits, cross-entropy on the answer tokens (and `<|eot_id|>`), backward,
AdamW. Image decoding and processing are timed apart from the model, since a training loop can prepare
them ahead. Run on an idle machine for the real figure (the load average is printed):

    python bench/embedded_step_time.py --batch 16 --steps 10 --examples 100000
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from llama_vision.config import get_preset
from llama_vision.domain import example
from llama_vision.model import LlamaVisionModel
from llama_vision.processor import Processor
from llama_vision.tokenizer import Tokenizer

EMBEDDED_DIR = os.path.join(os.path.dirname(__file__), "..", "llama_vision", "embedded")


def batch_inputs(processor: Processor, start: int, size: int) -> dict[str, torch.Tensor]:
    """Inputs and labels of training examples start..start+size (labels -100 outside the answers)."""
    examples = [example("train", 0, i) for i in range(start, start + size)]
    prompts = [[m for m in ex.messages(ex.image())[:1]] for ex in examples]
    answers = [processor.tokenizer.encode(ex.qa.answer + "<|eot_id|>") for ex in examples]
    texts = [processor.apply_chat_template(p) for p in prompts]
    full = [t + ex.qa.answer + "<|eot_id|>" for t, ex in zip(texts, examples)]
    images = [[p[0]["content"][0]["image"]] for p in prompts]
    inputs = processor(text=full, images=images, padding_side="right")
    labels = torch.full_like(inputs["input_ids"], -100)
    for b, answer in enumerate(answers):
        end = int(inputs["attention_mask"][b].sum())
        labels[b, end - len(answer) : end] = inputs["input_ids"][b, end - len(answer) : end]
    inputs["labels"] = labels
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--examples", type=int, default=100_000, help="for the training-time estimate")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = get_preset("embedded")
    processor = Processor(Tokenizer.from_dir(EMBEDDED_DIR), config)
    model = LlamaVisionModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    t0, c0 = time.perf_counter(), time.process_time()
    batches = [batch_inputs(processor, s * args.batch, args.batch) for s in range(args.steps + 1)]
    prep = (time.perf_counter() - t0) / ((args.steps + 1) * args.batch)
    prep_cpu = (time.process_time() - c0) / ((args.steps + 1) * args.batch)

    times, cpu_times = [], []
    for i, inputs in enumerate(batches):
        labels = inputs.pop("labels")
        t0, c0 = time.perf_counter(), time.process_time()
        logits = model(**inputs)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:  # the first step warms up allocators
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    step = sorted(times)[len(times) // 2]
    per_sample = step / args.batch
    cpu_per_sample = sorted(cpu_times)[len(cpu_times) // 2] / args.batch
    threads = torch.get_num_threads()
    tokens = batches[0]["input_ids"].shape[1]
    print(
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    )
    print(
        f"params {sum(p.numel() for p in model.parameters()):,}; batch {args.batch}, {tokens} tokens per row"
    )
    print(f"median step {step * 1000:.0f} ms = {per_sample * 1000:.1f} ms per example (model, wall clock)")
    print(f"CPU time {cpu_per_sample * 1000:.1f} ms per example, all threads together")
    print(
        f"rendering + processing {prep * 1000:.1f} ms per example (wall clock), {prep_cpu * 1000:.1f} ms CPU"
    )
    total = args.examples * (per_sample + prep)
    print(f"{args.examples:,} examples: {total / 60:.1f} min at this load (model + data on the same cores)")
    idle = args.examples * (cpu_per_sample / threads + prep_cpu)  # data preparation is one thread
    print(
        f"{args.examples:,} examples: about {idle / 60:.0f} min on an idle machine (CPU time / {threads} threads)"
    )


if __name__ == "__main__":
    main()
