"""The public API end to end: from_pretrained on both layouts, processor -> model -> logits."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from reference import random_image

from llama_vision import LlamaVision
from llama_vision.config import PRESETS

CONFIG = PRESETS["tiny"]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Callable[[int], Path]) -> Path:
    return tiny_checkpoint(7)


def test_from_pretrained_and_logits(checkpoint: Path) -> None:
    lv = LlamaVision.from_pretrained(checkpoint, device="cpu", dtype=torch.float32)
    assert lv.config == CONFIG and lv.tokenizer.image_id == 128256
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    prompt = lv.processor.apply_chat_template(messages, add_generation_prompt=True)
    with torch.no_grad():
        logits = lv.model(**lv.processor(text=prompt, images=[random_image(80, 60)]))
    T = len(lv.tokenizer.encode(prompt))
    assert logits.shape == (1, T, CONFIG.text.vocab_size) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_checkpoint_chat_template_is_used(checkpoint: Path, tmp_path: Path) -> None:
    path = shutil.copytree(checkpoint, tmp_path / "templated")
    (path / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    lv = LlamaVision.from_pretrained(path)
    assert lv.processor.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|begin_of_text|>[user]>"


def test_missing_tokenizer_fails_before_loading(checkpoint: Path, tmp_path: Path) -> None:
    path = shutil.copytree(checkpoint, tmp_path / "no_tokenizer")
    (path / "tokenizer.json").unlink()
    (path / "model.safetensors").unlink()  # would fail later; the tokenizer error must come first
    with pytest.raises(ValueError, match="no tokenizer in"):
        LlamaVision.from_pretrained(path)


def test_cpu_pack_choice(checkpoint: Path) -> None:
    """cpu_pack: by default the decoder is packed when the engine batches, not for max_batch=1; True and
    False decide; packed and plain give the same greedy answers from several requests at once."""
    from llama_vision.api import _pack_wanted
    from llama_vision.cpu_linear import packed_layers

    default = LlamaVision.from_pretrained(checkpoint)
    assert packed_layers(default.model.decoder) > 0 and packed_layers(default.model.vision_model) == 0
    assert not _pack_wanted(None, default.model, 1) and _pack_wanted(None, default.model, 8)
    assert _pack_wanted(True, default.model, 1) and not _pack_wanted(False, default.model, 8)
    plain = LlamaVision.from_pretrained(checkpoint, cpu_pack=False)
    assert packed_layers(plain.model) == 0
    with pytest.raises(ValueError, match="cpu_pack must be True, False or None"):
        LlamaVision.from_pretrained(checkpoint, cpu_pack="yes")
    conversations = [[{"role": "user", "content": f"Say {i} things."}] for i in range(4)]
    assert default.generate(conversations, max_new_tokens=6) == plain.generate(
        conversations, max_new_tokens=6
    )
