"""The two reference implementations, driven for the parity tests: Meta's llama-models
(`llama_models.llama3.multimodal.model.CrossAttentionTransformer`) and Hugging Face transformers 5.x
(`MllamaForConditionalGeneration`). Both are built on seeded random weights in float32, run on the CPU,
and saved in their own checkpoint layouts so that `llama_vision.weights.load_checkpoint` reads exactly
what the references wrote. Only tests import this file; it calls the references' public classes and
copies no code from them.

Non-obvious choices:
- Random weights. Meta's fairscale layers are created with an identity init (uninitialised memory) and
  both references start their gates at zero, which would make the images invisible. Every parameter is
  refilled from one seeded generator: matrices N(0, 1/fan_in) (unit-scale activations, so attention is
  far from uniform), embeddings and positional tables N(0, 1) (as large as the patch features, so they
  are not washed out), norm weights 1 + N(0, 0.1^2), biases N(0, 0.1^2), and every gate U(0.3, 1.0).
- Small Meta towers. Meta hard-codes ViT-H/14 (width 1280, 32 + 8 layers); only the tile size follows
  params.json. `build_meta_model(vision=...)` swaps in Meta's own `VisionEncoder` with the given sizes and
  a projection of matching width; `save_meta_checkpoint` records the sizes as params.json's `"vision"`
  dict, which `LlamaVisionConfig.from_meta` reads. Without `vision` the real ViT-H tower is used.
- Meta checkpoint contents. `consolidated.00.pth` is the model's state_dict, plus
  `text_model.rope.freqs` (head_dim / 2 inverse frequencies): the current module computes RoPE on the
  fly and has no such tensor, but the released files carry it (the HF and torchtune converters drop it),
  so a loader must skip it.
- HF intermediate layers. transformers >= 4.56 (5.x included) collects the *output* of vision layer i
  where Meta and transformers <= 4.54 collect its *input*. `build_hf_model` therefore gives HF every index
  lowered by one, which makes it compute what Meta computes (REFERENCE "Checked by running code"), and
  `save_hf_checkpoint` raises them back in config.json: a hub config lists Meta's indices. Index 0 has no
  HF equivalent (HF would read index -1, the last layer), so configs used here must not list it.
- HF row masking. For text before the first `<|image|>`, HF lets the tokens attend uniformly to the image
  (transformers issue #39379) where Meta zeroes both branches of the cross-attention layer; HF and Meta
  agree only on prompts whose first token is the image.
"""

from __future__ import annotations

import ctypes
import gc
import io
import json
import os
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGE_TOKEN_ID = 128256  # <|image|> as the model sees it (Meta's tiktoken numbers it 128011)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# (width, height) -> tile grid (tiles high, tiles wide) that Meta's and HF's preprocessing pick at 56 px
# tiles: every supported grid of 1 to 4 tiles once.
SIZES = {
    (50, 50): (1, 1),
    (110, 50): (1, 2),
    (160, 50): (1, 3),
    (170, 40): (1, 4),
    (50, 110): (2, 1),
    (100, 100): (2, 2),
    (50, 160): (3, 1),
    (40, 170): (4, 1),
}


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    """max |ours - ref| <= rel * max(1, max |ref|), float32; on failure names the worst row and token."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert ours.dtype == torch.float32, ours.dtype
    diff = (ours - ref).abs()
    tol = rel * max(1.0, ref.abs().max().item())
    worst = diff.flatten().argmax().item()
    b, t = divmod(worst // ref.shape[-1], ref.shape[1])
    assert diff.max().item() <= tol, (
        f"max |ours - ref| = {diff.max().item():.3g} > {tol:.3g} at row {b}, token {t}; "
        f"per-token max diff of that row: {[round(x, 6) for x in diff[b].amax(-1).tolist()]}"
    )


# ---------------------------------------------------------------------------------------- random weights
def _param_kind(name: str, p: torch.Tensor) -> str:
    """How to draw parameter `name`: gate, norm weight, bias, embedding table or matrix."""
    leaf = name.rsplit(".", 1)[-1]
    if "gate" in name and p.numel() == 1:
        return "gate"
    is_norm = "norm" in name or "ln_" in name
    if p.ndim == 1 and is_norm:
        return "norm_bias" if leaf == "bias" else "norm_weight"
    if p.ndim == 1 and leaf == "bias":
        return "bias"
    if "embed" in name and "patch_embedding" not in name:
        return "embedding"  # token tables, class embedding, positional and tile tables
    if p.ndim >= 2:
        return "matrix"
    raise ValueError(f"no random-init rule for parameter {name} {tuple(p.shape)}")


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Refill every parameter of `model` in place from one seeded generator (see the module docstring),
    on the parameters' own device (bench/generate.py fills GPU-sized models this way too)."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        kind = _param_kind(name, p)
        if kind == "gate":
            p.uniform_(0.3, 1.0, generator=g)
        elif kind == "norm_weight":
            p.normal_(1.0, 0.1, generator=g)
        elif kind in ("norm_bias", "bias"):
            p.normal_(0.0, 0.1, generator=g)
        elif kind == "embedding":
            p.normal_(0.0, 1.0, generator=g)
        else:
            fan_in = p[0].numel()
            p.normal_(0.0, fan_in**-0.5, generator=g)
    return model


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc keeps freed tensors of a few tens
    of MB in its arenas, which would double the peak of the ViT-H test when another model is loaded)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image of smooth colour gradients plus noise (resizing keeps it varied)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3)
    fx, fy = rng.uniform(0.02, 0.2, size=2)
    pixels = base + 80 * np.sin(fx * x + fy * y)[..., None] + rng.normal(0, 40, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------------------------- Meta
def meta_tokenizer():  # -> llama_models.llama3.tokenizer.Tokenizer
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()


def meta_tokenizer_path() -> Path:
    """Meta's tokenizer.model from llama-models, or the copy LLAMA_TOKENIZER_MODEL names (for machines
    without llama-models, such as the GPU machine bench/gpu_check.sh runs on)."""
    if os.environ.get("LLAMA_TOKENIZER_MODEL"):
        return Path(os.environ["LLAMA_TOKENIZER_MODEL"])
    import llama_models.llama3

    return Path(llama_models.llama3.__file__).parent / "tokenizer.model"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_model_parallel() -> None:
    """A one-process gloo group and fairscale model parallelism of size 1, once per process."""
    import fairscale.nn.model_parallel.initialize as fs_init
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)


def build_meta_model(
    params: dict[str, Any],
    *,
    vision: dict[str, Any] | None = None,
    seed: int = 0,
    max_seq_len: int = 256,
    max_batch_size: int = 4,
):  # -> llama_models.llama3.multimodal.model.CrossAttentionTransformer
    """Meta's `CrossAttentionTransformer(ModelArgs(**params))` in float32 with random weights and its caches
    set up. `vision` (keys hidden_size, intermediate_size, num_hidden_layers, num_global_layers,
    attention_heads, intermediate_layers_indices) replaces the hard-coded ViT-H tower with Meta's own
    `VisionEncoder` of those sizes."""
    init_model_parallel()
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.multimodal.model import CrossAttentionTransformer, VisionEncoder

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        # Fairscale allocates with torch.empty, so building the ViT-H tower only to replace it costs nothing.
        model = CrossAttentionTransformer(
            ModelArgs(**params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
        )
        if vision is not None:
            width = vision["hidden_size"]
            indices = list(vision["intermediate_layers_indices"])
            vm = model.vision_model
            vm.vision_encoder = VisionEncoder(
                max_num_tiles=4,  # as CrossAttentionTransformerVision hard-codes it
                image_size=params["vision_chunk_size"],
                patch_size=vm.patch_size,
                width=width,
                layers=vision["num_hidden_layers"],
                heads=vision["attention_heads"],
                mlp_ratio=vision.get("intermediate_size", 4 * width) / width,
                n_global_layers=vision["num_global_layers"],
                global_model=True,
                return_intermediate=indices,
            )
            # vision_input_dim is read only to size this projection (CrossAttentionTransformerVision.__init__).
            vm.vision_input_dim = width * (1 + len(indices))
            vm.vision_projection = ColumnParallelLinear(
                vm.vision_input_dim, params["dim"], bias=True, init_method=lambda x: x
            )
        model = model.float()
        randomize_(model, seed)
        model.setup_cache(max_batch_size, "cpu", torch.float32)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def meta_rope_freqs(params: dict[str, Any]) -> torch.Tensor:
    """The `text_model.rope.freqs` tensor of Meta's released checkpoints: head_dim / 2 inverse frequencies."""
    head_dim = params["dim"] // params["n_heads"]
    theta = float(params.get("rope_theta", 500000.0))
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def save_meta_checkpoint(
    model: torch.nn.Module,
    params: dict[str, Any],
    out_dir: str | Path,
    *,
    vision: dict[str, Any] | None = None,
) -> Path:
    """Write Meta's layout: consolidated.00.pth (the state_dict plus rope.freqs), params.json (with the
    small tower's sizes under "vision"), and the tokenizer.model that llama-models ships."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = dict(model.state_dict())
    state["text_model.rope.freqs"] = meta_rope_freqs(params)
    torch.save(state, out / "consolidated.00.pth")
    del state
    written = dict(params)
    if vision is not None:
        written["vision"] = {
            **vision,
            "intermediate_layers_indices": list(vision["intermediate_layers_indices"]),
        }
    (out / "params.json").write_text(json.dumps(written, indent=2))
    shutil.copyfile(meta_tokenizer_path(), out / "tokenizer.model")
    return out


@torch.no_grad()
def meta_logits(
    model: torch.nn.Module, token_rows: Sequence[Sequence[int]], images: Sequence[Sequence[Image.Image]]
) -> torch.Tensor:
    """Logits (B, T, V) of one full forward of Meta's model over equal-length rows; `<|image|>` = 128256."""
    from llama_models.llama3.chat_format import create_vision_mask

    lengths = {len(r) for r in token_rows}
    if len(lengths) != 1:
        raise ValueError(f"rows must have one length, got {sorted(lengths)}")
    (T,) = lengths
    masks = [create_vision_mask(list(r), IMAGE_TOKEN_ID) for r in token_rows]
    for row, m, imgs in zip(token_rows, masks, images):
        if len(m) != len(imgs):
            raise ValueError(f"{len(imgs)} images for {len(m)} <|image|> tokens in {list(row)}")
    # compute_vision_tokens_masks rewrites the intervals in place: give it copies.
    xattn_caches, xattn_mask, row_mask = model.compute_vision_tokens_masks(
        [list(r) for r in images], [[list(i) for i in m] for m in masks], T, "cpu"
    )
    tokens = torch.tensor([list(r) for r in token_rows], dtype=torch.long)
    return model.forward(
        position_ids=torch.arange(T),
        tokens=tokens,
        cross_attention_masks=xattn_mask,
        full_text_row_masked_out_mask=row_mask,
        xattn_caches=xattn_caches,
        text_only_inference=not any(len(r) for r in images),
    )


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def chat_prompt(
    messages: Sequence[tuple[str, Sequence[str | Image.Image]]],
) -> tuple[list[int], list[Image.Image]]:
    """Token ids (image = 128256) and RGB images of a dialog in Meta's chat format, ending with the assistant
    header. `messages` are (role, [text or PIL image, ...]); images pass through PNG bytes as Meta reads them."""
    from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem
    from llama_models.llama3.chat_format import ChatFormat

    raw = []
    for role, content in messages:
        items = [
            RawTextItem(text=c) if isinstance(c, str) else RawMediaItem(data=_png_bytes(c)) for c in content
        ]
        raw.append(RawMessage(role=role, content=items))
    llm_input = ChatFormat(meta_tokenizer()).encode_dialog_prompt(raw)
    return list(llm_input.tokens), (list(llm_input.vision.images) if llm_input.vision else [])


def image_first_prompt(text: str, n_images: int = 1) -> list[int]:
    """`<|image|>` x n, then `<|begin_of_text|>` + text: what HF's processor makes of "<|image|>text"."""
    return [IMAGE_TOKEN_ID] * n_images + meta_tokenizer().encode(text, bos=True, eos=False)


def dense_cross_attention_mask(
    intervals: Sequence[Sequence[Sequence[int]]],
    num_tiles: Sequence[Sequence[int]],
    T: int,
    max_num_tiles: int,
) -> torch.Tensor:
    """int64 (B, T, I, N): 1 where text token t may see tile n of image i ([start, end) per image, end -1
    or past the row means to its end). The layout of HF's processor output."""
    n_images = max(1, max(len(m) for m in intervals))
    out = torch.zeros(len(intervals), T, n_images, max_num_tiles, dtype=torch.long)
    for b, (row, tiles) in enumerate(zip(intervals, num_tiles)):
        for i, ((start, end), n) in enumerate(zip(row, tiles)):
            end = T if end == -1 else min(end, T)
            out[b, start:end, i, :n] = 1
    return out


def meta_model_inputs(
    token_rows: Sequence[Sequence[int]],
    images: Sequence[Sequence[Image.Image]],
    *,
    tile_size: int,
    max_num_tiles: int = 4,
) -> dict[str, torch.Tensor]:
    """Our model's keyword inputs built with Meta's own preprocessing (`VariableSizeImageTransform`,
    `create_vision_mask`) in HF's tensor layout: pixel_values (B, I, N, 3, S, S) zero-padded,
    aspect_ratio_ids (B, I) (index in the supported grids + 1, 0 = no image), aspect_ratio_mask (B, I, N)
    (tile 0 always 1), cross_attention_mask int (B, T, I, N). Text-only rows give just input_ids."""
    from llama_models.llama3.chat_format import create_vision_mask
    from llama_models.llama3.multimodal.image_transform import VariableSizeImageTransform

    from llama_vision.config import supported_aspect_ratios

    input_ids = torch.tensor([list(r) for r in token_rows], dtype=torch.long)
    if not any(len(r) for r in images):
        return {"input_ids": input_ids}
    B, T = input_ids.shape
    n_images = max(len(r) for r in images)
    grids = supported_aspect_ratios(max_num_tiles)
    transform = VariableSizeImageTransform(size=tile_size)
    pixel_values = torch.zeros(B, n_images, max_num_tiles, 3, tile_size, tile_size)
    aspect_ratio_ids = torch.zeros(B, n_images, dtype=torch.long)
    aspect_ratio_mask = torch.zeros(B, n_images, max_num_tiles, dtype=torch.long)
    aspect_ratio_mask[:, :, 0] = 1
    num_tiles = []
    for b, row in enumerate(images):
        num_tiles.append([])
        for i, image in enumerate(row):
            tiles, (h, w) = transform(image, max_num_chunks=max_num_tiles)
            pixel_values[b, i, : h * w] = tiles
            aspect_ratio_ids[b, i] = grids.index((h, w)) + 1
            aspect_ratio_mask[b, i, : h * w] = 1
            num_tiles[-1].append(h * w)
    intervals = [create_vision_mask(list(r), IMAGE_TOKEN_ID) for r in token_rows]
    return {
        "input_ids": input_ids,
        "pixel_values": pixel_values,
        "aspect_ratio_ids": aspect_ratio_ids,
        "aspect_ratio_mask": aspect_ratio_mask,
        "cross_attention_mask": dense_cross_attention_mask(intervals, num_tiles, T, max_num_tiles),
    }


# ------------------------------------------------------------------------------------- Hugging Face
def hf_config(config: Any, attn_implementation: str = "eager"):  # -> transformers.MllamaConfig
    """transformers' MllamaConfig for our `LlamaVisionConfig`, intermediate indices lowered by one."""
    from transformers import MllamaConfig

    d = config.to_hf()
    indices = d["vision_config"]["intermediate_layers_indices"]
    if min(indices) < 1:
        raise ValueError(
            f"intermediate_layers_indices {indices}: index 0 has no transformers >= 4.56 equivalent"
        )
    d["vision_config"]["intermediate_layers_indices"] = [i - 1 for i in indices]
    return MllamaConfig(**d, attn_implementation=attn_implementation)


def build_hf_model(config: Any, seed: int = 0, attn_implementation: str = "eager"):
    """transformers' `MllamaForConditionalGeneration` for our config, float32, random weights, eval mode."""
    from transformers import MllamaForConditionalGeneration

    model = MllamaForConditionalGeneration(hf_config(config, attn_implementation)).float()
    return randomize_(model, seed).eval()


def save_hf_checkpoint(model: torch.nn.Module, out_dir: str | Path) -> Path:
    """`save_pretrained` (config.json + model.safetensors; transformers 5.23 writes the legacy hub keys
    `vision_model.*`, `multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.*`),
    then config.json's intermediate indices raised back by one to what a hub config says."""
    out = Path(out_dir)
    model.save_pretrained(out)
    path = out / "config.json"
    config = json.loads(path.read_text())
    vision = config["vision_config"]
    vision["intermediate_layers_indices"] = [i + 1 for i in vision["intermediate_layers_indices"]]
    path.write_text(json.dumps(config, indent=2))
    return out


def hf_image_processor(tile_size: int, max_num_tiles: int = 4):
    """transformers' PIL-backed Mllama image processor with the hub's settings (CLIP mean/std, bilinear)."""
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    return MllamaImageProcessorPil(
        size={"height": tile_size, "width": tile_size},
        max_image_tiles=max_num_tiles,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def hf_inputs(
    token_rows: Sequence[Sequence[int]],
    images: Sequence[Sequence[Image.Image]],
    *,
    tile_size: int,
    max_num_tiles: int = 4,
) -> dict[str, torch.Tensor]:
    """What `MllamaProcessor` returns for these ids and images: input_ids, attention_mask, and with images
    pixel_values, aspect_ratio_ids, aspect_ratio_mask and the dense cross_attention_mask."""
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    input_ids = torch.tensor([list(r) for r in token_rows], dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if not any(len(r) for r in images):
        return out
    features = hf_image_processor(tile_size, max_num_tiles)([list(r) for r in images], return_tensors="pt")
    intervals = [get_cross_attention_token_mask(list(r), IMAGE_TOKEN_ID) for r in token_rows]
    mask = convert_sparse_cross_attention_mask_to_dense(
        intervals, features["num_tiles"], max_num_tiles=max_num_tiles, length=input_ids.shape[1]
    )
    out.update(
        pixel_values=features["pixel_values"],
        aspect_ratio_ids=features["aspect_ratio_ids"],
        aspect_ratio_mask=features["aspect_ratio_mask"],
        cross_attention_mask=torch.from_numpy(mask),
    )
    return out


@torch.no_grad()
def hf_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (B, T, V) float32 of one full forward of the HF model, no cache."""
    return model(**inputs, use_cache=False).logits.float()
