"""int8/int4 weights and w8a8 (torchao, llama_vision/quantize.py) against the unquantized model, on the same
random weights: agreement of next-token predictions, logit error, weight memory, decode speed.

Model: preset `bench-small` (text width 512, 12 layers of which 3 cross-attention, the full vocabulary;
ViT width 256) with the tests' random weights, or `--preset`. Per activation dtype (float32, bfloat16)
the unquantized model is the reference; int8, w8a8 and int4 quantize the text and cross-attention linears
(the default targets) of a copy of it.
- Agreement: one forward pass over a prompt of one 4-tile image and `--positions` random tokens
  (teacher forcing); the share of positions whose top-1 token equals the reference's, and the largest
  absolute logit difference next to the reference logits' own spread (standard deviation).
- Memory: the bytes of every parameter, torchao's inner tensors (values, scales, zero points) included.
- Decode: greedy tokens/s over `--new-tokens` steps after a 64-token text prompt, median of 2 runs after a warm-up,
  through the engine, on the CPU with the few-row path from_pretrained applies (cpu_linear.py).

    python bench/quantize.py                       # about 2 minutes on 2 cores
    python bench/quantize.py --device cuda         # int4 then uses tinygemm's packed layout (bfloat16)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import meta_tokenizer_path, random_image, randomize_  # noqa: E402

from llama_vision import GenerationConfig, LlamaVisionModel, Processor, get_preset  # noqa: E402
from llama_vision.cpu_linear import use_blocked_linears  # noqa: E402
from llama_vision.generation import Engine  # noqa: E402
from llama_vision.quantize import quantize_model, tensor_bytes  # noqa: E402
from llama_vision.tokenizer import Tokenizer  # noqa: E402


def agreement(model: LlamaVisionModel, reference: torch.Tensor, inputs: dict) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(**inputs)[0]
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return agree, (logits - reference).abs().max().item()


def decode_speed(model: LlamaVisionModel, device: torch.device, new_tokens: int) -> float:
    if device.type == "cpu":
        use_blocked_linears(model)  # as from_pretrained does on the CPU
    engine = Engine(model)
    ids = torch.randint(0, 128000, (1, 64), generator=torch.Generator().manual_seed(1)).to(device)
    config = GenerationConfig(max_new_tokens=new_tokens + 1, temperature=0.0, eos_token_ids=(-5,))
    speeds = []
    for _ in range(3):  # the first is a warm-up
        tokens = engine.tokens({"input_ids": ids}, config)
        next(tokens)  # prefill and the first token
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        n = sum(1 for _ in tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
        speeds.append(n / (time.perf_counter() - start))
    return statistics.median(speeds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench-small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--positions", type=int, default=300)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    device = torch.device(args.device)
    config = get_preset(args.preset)
    torch.set_num_threads(torch.get_num_threads())
    base = randomize_(LlamaVisionModel(config), seed=0).eval()
    processor = Processor(Tokenizer.from_file(meta_tokenizer_path()), config)
    inputs = processor(text="<|image|>" + " a" * 4, images=[random_image(640, 480)])
    words = torch.randint(0, 128000, (1, args.positions), generator=torch.Generator().manual_seed(0))
    inputs["input_ids"] = torch.cat([inputs["input_ids"], words], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    cam = inputs["cross_attention_mask"]
    inputs["cross_attention_mask"] = torch.cat([cam, cam[:, -1:].expand(-1, args.positions, -1, -1)], 1)
    inputs = {k: v.to(device) for k, v in inputs.items()}

    print(
        f"preset {args.preset}, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"agreement over {inputs['input_ids'].shape[1]} positions (one 4-tile image, then random tokens)")
    print(
        "| activations | weights | top-1 agreement | max abs logit diff | logit std | weight MB | decode tok/s | vs unquantized |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        reference_model = copy.deepcopy(base).to(device=device, dtype=dtype)
        with torch.no_grad():
            reference = reference_model(**inputs)[0]
        rows = {"unquantized": reference_model}
        for scheme in ("int8", "w8a8", "int4"):
            if scheme == "int4" and device.type == "cuda" and dtype != torch.bfloat16:
                continue  # tinygemm's int4 needs bfloat16
            rows[scheme] = quantize_model(copy.deepcopy(reference_model), scheme)
        base_speed = None
        for label, model in rows.items():
            agree, diff = agreement(model, reference, inputs)
            mb = sum(tensor_bytes(p) for p in model.parameters()) / 1e6
            speed = decode_speed(model, device, args.new_tokens)
            base_speed = base_speed or speed
            print(
                f"| {name} | {label} | {agree:.1%} | {diff:.3f} | {reference.std().item():.3f} | {mb:.0f} | "
                f"{speed:.1f} | {speed / base_speed:.2f}x |"
            )
            del model
        del rows, reference_model


if __name__ == "__main__":
    main()
