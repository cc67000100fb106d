"""Tensor parallelism (llama_vision/parallel.py) on the CPU: 2 processes on gloo load the tiny checkpoint
with `tp_hooks`, each reading only its shards; their logits and greedy tokens equal the single-process
run's, and the engine's caches hold each rank's share of the heads."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from reference import random_image

from llama_vision.generation import Engine
from llama_vision.processor import Processor
from llama_vision.sampling import GenerationConfig
from llama_vision.weights import load_checkpoint, read_config

WORLD = 2
GREEDY = GenerationConfig(max_new_tokens=8, temperature=0.0, eos_token_ids=(-5,))


def _inputs(path: Path) -> dict[str, torch.Tensor]:
    processor = Processor.from_dir(path, read_config(path))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": random_image(90, 60)},
                {"type": "text", "text": "What is it?"},
            ],
        }
    ]
    return processor.chat_inputs([messages])


def _run(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        logits = model(**inputs)
    tokens = torch.stack(list(Engine(model).tokens(inputs, GREEDY)), 1)
    return {"logits": logits, "tokens": tokens}


def _worker(rank: int, path: Path, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from llama_vision.parallel import tp_hooks, tp_mesh

        model = load_checkpoint(path, dtype=torch.float32, hooks=[tp_hooks(tp_mesh("cpu"))])
        result = _run(model, _inputs(path))
        q = model.language_model.model.layers[0].self_attn.q_proj.weight
        result["q_local"] = q.to_local()
        cache = model.new_cache(1, 16, 0)  # sized from the layers' own (local) head counts
        result["cache_heads"] = torch.tensor(cache.layers[0].k.shape[1])
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_equal_one_process(tiny_checkpoint, tmp_path: Path) -> None:
    path = tiny_checkpoint(0)
    single_model = load_checkpoint(path, dtype=torch.float32)
    single = _run(single_model, _inputs(path))
    mp.spawn(_worker, args=(path, _free_port(), tmp_path), nprocs=WORLD, join=True)
    full_q = single_model.language_model.model.layers[0].self_attn.q_proj.weight
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["logits"], single["logits"], rtol=1e-4, atol=1e-4)
        assert torch.equal(got["tokens"], single["tokens"])
        rows = full_q.shape[0] // WORLD
        assert torch.equal(got["q_local"], full_q[rank * rows : (rank + 1) * rows])  # only its shard
        assert got["cache_heads"].item() == read_config(path).text.num_key_value_heads // WORLD


def test_indivisible_sizes_are_named(tiny_checkpoint) -> None:
    from llama_vision.parallel import parallelize

    class FakeMesh:  # only its size is read before the check fails
        def size(self) -> int:
            return 3

    model = load_checkpoint(tiny_checkpoint(0))
    with pytest.raises(ValueError, match=r"over 3 devices needs these divisible by 3: .*num_attention_heads"):
        parallelize(model, FakeMesh())  # type: ignore[arg-type]
