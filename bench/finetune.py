"""Fine-tuning benchmark: one training step, ours against transformers + peft, on the same random
checkpoint and the same collated batch, for LoRA and for full fine-tuning.

    python bench/finetune.py                     # bench-small, float32, CPU, batch 2
    python bench/finetune.py --batch 4 --repeats 5
    python bench/finetune.py --autocast          # both sides under bf16 autocast (CPUs with bf16 units)
    python bench/finetune.py --answer short      # question answering: answers of a few tokens

A step is forward, loss, backward, AdamW step, zero_grad; both sides use PyTorch's fused AdamW (ours:
the trainer's `finetune.train.adamw`; theirs: what transformers' `Trainer` picks by default,
`adamw_torch_fused`). Ours: `LlamaVisionModel` with LoRA from
`llama_vision.finetune.lora.apply_lora` and `finetune.train.token_loss`; theirs:
`MllamaForConditionalGeneration` with `peft.get_peft_model` and the loss it computes from `labels`. Both
put LoRA (rank 8, alpha 16) on the same modules, the vision encoder's and the cross-attention layers'
linear layers (one `target_modules` pattern fits both trees), and train the same parameters in full
mode (a third row: our full step with the optimizer stepped in backward, `StepInBackward`, the
trainer's `optimizer_in_backward: true`, against their plain full step). The batch: rows of one 4-tile image, a question and an answer, collated by `finetune.collate`,
labels on the answers (`--answer long`, the default: six sentences, most of a row's text tokens;
`short`: a few words, as in visual question answering, where our loss computes the 128,256-row output
layer on the answer tokens only and transformers on every token); the checkpoint's vision feature indices are lowered by one for transformers
(README, "Known differences"), so both sides compute the same function.

- samples/s: the batch size over the median step time of --repeats steps after one warm-up step, both
  sides in this process, alternating;
- peak memory: each side and mode in a fresh subprocess, the highest RSS (sampled every 5 ms) above the
  level after loading, over the warm-up step and one more (so AdamW's state is included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from generate import peak_memory, release_memory, write_checkpoint  # noqa: E402
from reference import random_image  # noqa: E402

from llama_vision.config import get_preset  # noqa: E402
from llama_vision.finetune.collate import Collator  # noqa: E402
from llama_vision.finetune.data import Example  # noqa: E402
from llama_vision.finetune.lora import DEFAULT_LORA_PARTS, lora_targets, targets_pattern  # noqa: E402
from llama_vision.finetune.train import StepInBackward, adamw, token_loss  # noqa: E402
from llama_vision.tokenizer import Tokenizer  # noqa: E402
from llama_vision.weights import load_checkpoint  # noqa: E402


def batch_of(checkpoint: Path, size: int, answer: str = "long") -> dict[str, torch.Tensor]:
    config = get_preset("bench-small")
    tokenizer = Tokenizer.from_dir(checkpoint)
    examples = []
    for i in range(size):
        image = random_image(448, 448, seed=i)  # 2 x 2 tiles of 224
        question = f"Picture {i}: describe the colours, the shapes and what they may show, in detail."
        if answer == "long":
            reply = " ".join(f"The region number {j} is a gradient of colour {i + j}." for j in range(6))
        else:
            reply = f"A gradient of colour {i}."
        messages = [
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": question}],
            },
            {"role": "assistant", "content": reply},
        ]
        examples.append(Example(messages, f"bench:{i}"))
    return Collator(tokenizer, config, max_length=512)(examples)


class Side:
    def __init__(self, name: str, mode: str, checkpoint: Path, autocast: bool = False) -> None:
        # full-in-backward: full fine-tuning with our optimizer stepped in backward (theirs: plain full)
        self.in_backward = name == "ours" and mode == "full-in-backward"
        mode = "full" if mode == "full-in-backward" else mode
        self.name, self.mode, self.autocast = name, mode, autocast
        if name == "ours":
            from llama_vision.finetune.lora import apply_lora

            self.model = load_checkpoint(checkpoint).train()
            if mode == "lora":
                apply_lora(self.model, rank=8, alpha=16)
        else:
            import peft
            import transformers

            hf_dir = checkpoint / "hf"
            self.model = transformers.MllamaForConditionalGeneration.from_pretrained(
                hf_dir, attn_implementation="sdpa"
            ).train()
            if mode == "lora":
                ours = load_checkpoint(checkpoint)
                pattern = targets_pattern(lora_targets(ours, DEFAULT_LORA_PARTS, _modules()))
                del ours
                config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=pattern)
                self.model = peft.get_peft_model(self.model, config)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        if self.in_backward:  # the trainer's with optimizer_in_backward: true
            self.optimizer = StepInBackward([{"params": params, "weight_decay": 0.0}], 1e-5, (0.9, 0.999))
        elif name == "ours":
            self.optimizer = adamw(params, 1e-5)  # the trainer's: PyTorch's fused AdamW
        else:  # transformers' Trainer default (optim="adamw_torch_fused" with torch >= 2.8)
            self.optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        # float32 weights and optimizer either way; autocast runs the matrix products in bfloat16
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            if self.name == "ours":
                loss_sum, n, _ = token_loss(self.model, batch)
                loss = loss_sum / n
            else:
                loss = self.model(**batch, use_cache=False).loss
        if self.in_backward:
            self.optimizer.armed = True
            loss.backward()
            self.optimizer.finish()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def _modules() -> tuple[str, ...]:
    from llama_vision.finetune.lora import DEFAULT_LORA_MODULES

    return DEFAULT_LORA_MODULES


def prepare_checkpoint(path: Path) -> None:
    write_checkpoint(get_preset("bench-small"), path, seed=0)  # with Meta's tokenizer.model beside it

    hf = path / "hf"
    hf.mkdir()
    config = json.loads((path / "config.json").read_text())
    vision = config["vision_config"]
    vision["intermediate_layers_indices"] = [i - 1 for i in vision["intermediate_layers_indices"]]
    (hf / "config.json").write_text(json.dumps(config))
    (hf / "model.safetensors").symlink_to(path / "model.safetensors")


def memory_run(checkpoint: Path, name: str, mode: str, batch_size: int, autocast: bool, answer: str) -> None:
    """One side and mode, alone in this process: print its peak memory in MB."""
    batch = batch_of(checkpoint, batch_size, answer)
    side = Side(name, mode, checkpoint, autocast)
    release_memory()
    with peak_memory(torch.device("cpu")) as peak:
        side.step(batch)
        side.step(batch)
    print(json.dumps({"peak_mb": peak[0]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--checkpoint", type=Path, help="reuse (or keep) the random checkpoint here")
    parser.add_argument("--autocast", action="store_true", help="both sides under bfloat16 autocast")
    parser.add_argument(
        "--answer",
        choices=("long", "short"),
        default="long",
        help="answers of six sentences (default) or of a few words",
    )
    parser.add_argument("--memory-run", nargs=2, metavar=("SIDE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    tmp = None
    if args.checkpoint is None:
        tmp = tempfile.TemporaryDirectory()
        args.checkpoint = Path(tmp.name) / "bench-small"
    if not (args.checkpoint / "config.json").is_file():
        prepare_checkpoint(args.checkpoint)
    if args.memory_run:
        memory_run(args.checkpoint, *args.memory_run, args.batch, args.autocast, args.answer)
        return

    batch = batch_of(args.checkpoint, args.batch, args.answer)
    tokens = int(batch["attention_mask"].sum())
    trained = int((batch["labels"] != -100).sum())
    precision = "float32 weights, bfloat16 autocast" if args.autocast else "float32"
    print(f"bench-small, {precision}, CPU ({torch.get_num_threads()} threads), batch {args.batch} rows of "
          f"{batch['input_ids'].shape[1]} tokens ({tokens} in all, {trained} trained), one 4-tile image per row")  # fmt: skip
    rows = []
    for mode in ("lora", "full", "full-in-backward"):
        sides = {name: Side(name, mode, args.checkpoint, args.autocast) for name in ("ours", "transformers")}
        times: dict[str, list[float]] = {name: [] for name in sides}
        losses = {name: side.step(batch) for name, side in sides.items()}  # warm-up
        for _ in range(args.repeats):
            for name, side in sides.items():
                start = time.perf_counter()
                side.step(batch)
                times[name].append(time.perf_counter() - start)
        del sides
        release_memory()
        memory = {}
        for name in ("ours", "transformers"):
            command = [sys.executable, __file__, "--checkpoint", str(args.checkpoint), "--batch", str(args.batch),
                       "--answer", args.answer, "--memory-run", name, mode, *(["--autocast"] if args.autocast else [])]  # fmt: skip
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            memory[name] = json.loads(out.strip().splitlines()[-1])["peak_mb"]
        speed = {name: args.batch / statistics.median(t) for name, t in times.items()}
        rows.append((mode, speed, memory, losses))
    print()
    print("| mode | ours samples/s | transformers + peft samples/s | ours / theirs | ours peak MB | theirs peak MB | ours / theirs | first loss (ours, theirs) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for mode, speed, memory, losses in rows:
        print(
            f"| {mode} | {speed['ours']:.2f} | {speed['transformers']:.2f} | {speed['ours'] / speed['transformers']:.2f}x "
            f"| {memory['ours']:.0f} | {memory['transformers']:.0f} | {memory['ours'] / memory['transformers']:.2f}x "
            f"| {losses['ours']:.4f}, {losses['transformers']:.4f} |"
        )  # fmt: skip
    print("\ntargets: samples/s at least 1.5x theirs, peak memory at most 0.8x theirs")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
