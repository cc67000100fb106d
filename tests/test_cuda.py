"""The engine on a CUDA GPU: the model on the device against the CPU, cached decoding against the full
forward there, and the compiled step with CUDA graphs (mode "reduce-overhead") against eager.

Skipped without a GPU (CI has none); `bash bench/gpu_check.sh` runs them on a lent one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from reference import random_image

from llama_vision import GenerationConfig, LlamaVision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NEVER = (-7,)  # an end-of-turn id no model can produce: rows run to max_new_tokens


def user(text: str, *images) -> dict:
    content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


CONVERSATIONS = [
    [user("What is this?", random_image(170, 40, seed=1))],
    [user("Tell me a story about a lighthouse keeper.")],
    [user("Look at this.", random_image(60, 90, seed=2)), {"role": "assistant", "content": "Noise."},
     user("And what colour is it mostly?")],
]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Callable[[int], Path]) -> Path:
    return tiny_checkpoint(11)


@pytest.fixture(autouse=True)
def no_tf32():
    """Full float32 matrix products and convolutions, so the GPU computes what the CPU does."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def tokens(lv: LlamaVision, conversations: list, n: int) -> torch.Tensor:
    inputs = lv.processor.chat_inputs(conversations)
    config = GenerationConfig(max_new_tokens=n, eos_token_ids=NEVER)
    return torch.stack([t.cpu() for t in lv.engine.tokens(inputs, config)], dim=1)  # B n


@torch.no_grad()
def test_logits_on_the_gpu_equal_the_cpu(checkpoint: Path) -> None:
    cpu = LlamaVision.from_pretrained(checkpoint, dtype=torch.float32)
    gpu = LlamaVision.from_pretrained(checkpoint, device="cuda", dtype=torch.float32)
    inputs = cpu.processor.chat_inputs(CONVERSATIONS)
    expected = cpu.model(**inputs)
    got = gpu.model(**{k: v.cuda() for k, v in inputs.items()}).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_cached_decoding_on_the_gpu_equals_the_full_forward(checkpoint: Path) -> None:
    gpu = LlamaVision.from_pretrained(checkpoint, device="cuda", dtype=torch.float32)
    conversation = CONVERSATIONS[0]
    inputs = gpu.processor.chat_inputs([conversation])
    n = 8
    new = tokens(gpu, [conversation], n)
    ids = torch.cat([inputs["input_ids"], new], dim=1)
    cam = inputs["cross_attention_mask"]  # a new token sees what the last prompt token saw
    full = dict(
        inputs,
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        cross_attention_mask=torch.cat([cam, cam[:, -1:].expand(-1, n, -1, -1)], dim=1),
    )
    logits = gpu.model(**{k: v.cuda() for k, v in full.items()})[0, inputs["input_ids"].shape[1] - 1 : -1]
    assert torch.equal(logits.argmax(-1).cpu(), new[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_cuda_graphs_equal_eager(checkpoint: Path, dtype: torch.dtype) -> None:
    """The compiled step replays CUDA graphs on the engine's one cache, request after request. In float32
    its tokens equal eager's; in bfloat16 (fused kernels round differently, so tokens may part ways
    after a near tie) every step's logits equal the eager full forward's over the same tokens within
    bfloat16 rounding, and so do their argmaxes."""
    from torch._dynamo.utils import counters

    eager = LlamaVision.from_pretrained(checkpoint, device="cuda", dtype=dtype)
    graphs = LlamaVision(model=eager.model, processor=eager.processor, compile=True)
    counters.clear()
    expected = tokens(eager, CONVERSATIONS, 10)
    first = tokens(graphs, CONVERSATIONS, 10)
    cache = graphs.engine._cache
    for _ in range(2):  # later requests replay the graphs on the same cache
        assert torch.equal(tokens(graphs, CONVERSATIONS, 10), first)
    assert graphs.engine._cache is cache
    assert counters["inductor"]["cudagraph_skips"] == 0, "the decode step did not run as a CUDA graph"
    if dtype == torch.float32:
        assert torch.equal(first, expected)
        return
    conversation = CONVERSATIONS[0]
    steps = []
    compiled = graphs.engine._step
    graphs.engine._step = lambda *args: steps.append(compiled(*args)[0].clone()) or steps[-1][None]
    n = 10
    new = tokens(graphs, [conversation], n)
    inputs = eager.processor.chat_inputs([conversation])
    ids = torch.cat([inputs["input_ids"], new], dim=1)
    cam = inputs["cross_attention_mask"]
    full = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
    full["cross_attention_mask"] = torch.cat([cam, cam[:, -1:].expand(-1, n, -1, -1)], dim=1)
    logits = eager.model(**{k: v.cuda() for k, v in full.items()})[0, inputs["input_ids"].shape[1] : -1]
    assert len(steps) == n - 1
    torch.testing.assert_close(torch.stack(steps).float(), logits.float(), rtol=0.05, atol=0.05)
    assert torch.equal(logits.argmax(-1).cpu(), new[0, 1:])
