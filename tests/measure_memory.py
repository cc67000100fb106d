"""Run by tests/test_memory.py in a fresh process: peak resident memory of loading a checkpoint and
generating once, printed as one JSON line. Arguments: checkpoint images tiles prompt_tokens new_tokens
batch dtype.

One-time costs of the process are paid before the peak counter is reset, as a long-running server has
paid them: the processor (tokenizer tables), torch's meta-device machinery (imported on first use,
about 160 MB) and a first small matrix product."""

from __future__ import annotations

import ctypes
import gc
import json
import sys
from pathlib import Path

import torch
from reference import random_image

from llama_vision import LlamaVisionModel
from llama_vision.generation import Engine
from llama_vision.processor import Processor
from llama_vision.sampling import GenerationConfig
from llama_vision.weights import load_checkpoint, read_config


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def main() -> None:
    path, images, tiles, prompt, new, batch, dtype = sys.argv[1:8]
    images, tiles, prompt, new, batch = int(images), int(tiles), int(prompt), int(new), int(batch)
    config = read_config(path)
    processor = Processor.from_dir(path, config)
    with torch.device("meta"):
        LlamaVisionModel(config)
    torch.ones(64, 64) @ torch.ones(64, 64)
    content = [{"type": "image", "image": random_image(300, 200, seed=i)} for i in range(images)]
    content.append({"type": "text", "text": "word " * (prompt - 10 - 5 * images)})
    inputs = processor.chat_inputs([[{"role": "user", "content": content}]] * batch, max_num_tiles=tiles)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)

    Path("/proc/self/clear_refs").write_text("5")  # the peak counter starts from here
    before = status("VmRSS")
    model = load_checkpoint(path, dtype=getattr(torch, dtype))
    length = inputs["input_ids"].shape[1] + new  # the engine sized for exactly this request shape
    engine = Engine(model, max_batch=batch, max_length=length, max_images=images, prefix_cache_bytes=0)
    config = GenerationConfig(max_new_tokens=new, temperature=0.0, eos_token_ids=(-5,))  # never stops early
    steps = sum(1 for _ in engine.tokens(inputs, config))
    print(
        json.dumps({"peak": status("VmHWM") - before, "prompt": inputs["input_ids"].shape[1], "steps": steps})
    )


if __name__ == "__main__":
    main()
