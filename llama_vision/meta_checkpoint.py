"""Meta's original checkpoint layout (`consolidated.NN.pth` + `params.json`), converted on the fly
to our module names, which equal the Hugging Face keys.

What the conversion does (REFERENCE.md 1.9; same rules as HF's `convert_mllama_weights_to_hf.py`):
- model-parallel shards (90B: 8) are merged tensor by tensor: column-parallel weights on dim 0,
  row-parallel weights (`wo`, `w2`, vision `c_proj`) on dim 1, norms, gates, row-parallel biases and
  position embeddings are replicated (shard 0 is taken);
- Meta's 32 self-attention layers and separate list of 8 cross-attention layers are merged into one
  list (config.text.cross_attention_layers gives the cross layers' places);
- self-attention q/k rows are permuted from Meta's interleaved RoPE pairs to the rotate-half layout;
  cross-attention q/k and their norms are not (no RoPE there);
- the 8 learnable embedding rows are appended to the 128,256-row token table;
- the patch "conv" (Unfold + Linear, [D, C*p*p]) becomes a Conv2d weight [D, C, p, p];
- the tile position grids ([4, 4, n, D]) are expanded into one row per aspect-ratio id.

Tensors are loaded with `torch.load(weights_only=True, mmap=True)`: no pickled code runs, and a
tensor is read from disk only when its turn comes. Tensors that need no arithmetic come out as
`reading.Source`s (shards joined by `Concat`, the embedding table with its learnable rows too), so the
loader copies them piece by piece into the result and drops the mapped pages it has read; only the
permuted q/k projections, the patch weight and the vision position tables are built in memory first.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from llama_vision.config import LlamaVisionConfig
from llama_vision.reading import Concat, Source, TensorSource, release_pages

_ROW_PARALLEL = re.compile(r"(attention\.wo|attn\.wo|feed_forward\.w2|mlp\.c_proj)\.weight$")
_REPLICATED = re.compile(
    r"(norm\.weight|ln_(pre|post|1|2)\.(weight|bias)|gate(_attn|_ffwd|_ffn)?$|c_proj\.bias$"
    r"|class_embedding$|positional_embedding$|gated_positional_embedding(_gate)?$|tile_pos_embed\."
    r"|rope\.freqs$)"
)

_TEXT_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_SELF_ATTN = {f"attention.w{x}.weight": f"self_attn.{x}_proj.weight" for x in "qkvo"}
_CROSS_ATTN = {
    **{f"attention.w{x}.weight": f"cross_attn.{x}_proj.weight" for x in "qkvo"},
    "attention.q_norm.weight": "cross_attn.q_norm.weight",
    "attention.k_norm.weight": "cross_attn.k_norm.weight",
    "gate_attn": "cross_attn_attn_gate",
    "gate_ffwd": "cross_attn_mlp_gate",
}
_SELF_LAYER = _TEXT_LAYER | _SELF_ATTN
_CROSS_LAYER = _TEXT_LAYER | _CROSS_ATTN
_VISION_LAYER = {
    **{f"attn.w{x}.weight": f"self_attn.{x}_proj.weight" for x in "qkvo"},
    "ln_1.weight": "input_layernorm.weight",
    "ln_1.bias": "input_layernorm.bias",
    "ln_2.weight": "post_attention_layernorm.weight",
    "ln_2.bias": "post_attention_layernorm.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
    "gate_attn": "gate_attn",
    "gate_ffn": "gate_ffn",
}
_VISION = {
    "class_embedding": "class_embedding",
    "positional_embedding": "gated_positional_embedding.embedding",
    "gated_positional_embedding_gate": "gated_positional_embedding.gate",
    "pre_tile_pos_embed.gate": "pre_tile_positional_embedding.gate",
    "post_tile_pos_embed.gate": "post_tile_positional_embedding.gate",
    "ln_pre.weight": "layernorm_pre.weight",
    "ln_pre.bias": "layernorm_pre.bias",
    "ln_post.weight": "layernorm_post.weight",
    "ln_post.bias": "layernorm_post.bias",
}


def is_meta_checkpoint(path: Path) -> bool:
    return (path / "params.json").is_file() and any(path.glob("consolidated.*.pth"))


class MergedShards(Mapping[str, torch.Tensor]):
    """Read-only view of model-parallel shards that merges a tensor when it is looked up."""

    def __init__(self, shards: list[Mapping[str, torch.Tensor]]) -> None:
        self.shards = shards
        keys = list(shards[0])
        for i, shard in enumerate(shards[1:], start=1):
            if set(shard) != set(keys):
                diff = sorted(set(shard) ^ set(keys))[:5]
                raise ValueError(f"consolidated.{i:02d}.pth holds different keys from shard 00, e.g. {diff}")
        self._keys = keys
        self._key_set = set(keys)

    def __contains__(self, key: object) -> bool:  # Mapping's default would merge the tensor to find out
        return key in self._key_set

    def __getitem__(self, key: str) -> torch.Tensor:
        """The merged tensor, copied out of the mapped files (whose pages it read are dropped)."""
        parts = [shard[key] for shard in self.shards]
        if len(parts) == 1 or _REPLICATED.search(key):
            merged = parts[0].clone()
        else:
            merged = torch.cat(parts, dim=1 if _ROW_PARALLEL.search(key) else 0)
        for part in parts:
            release_pages(part)
        return merged

    def source(self, key: str) -> Source:
        """The merged tensor as a source that is read shard by shard, never joined in memory."""
        parts = [TensorSource(shard[key], mapped=True) for shard in self.shards]
        if len(parts) == 1 or _REPLICATED.search(key):
            return parts[0]
        return Concat(parts, dim=1 if _ROW_PARALLEL.search(key) else 0)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def load_meta_shards(path: Path) -> MergedShards:
    files = sorted(path.glob("consolidated.*.pth"))
    shards = []
    for file in files:
        try:
            shards.append(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        except Exception as err:  # unpickling refused, truncated zip, ...
            raise ValueError(f"cannot read {file}: {err}") from err
    return MergedShards(shards)


def meta_tensors(
    state: MergedShards, config: LlamaVisionConfig
) -> Iterator[tuple[str, str, torch.Tensor | Source]]:
    """Yield (Meta key, our key, tensor or source) for every tensor; our key is "" for keys we do not
    know. Sources are read later, by the loader."""
    t = config.text
    cross = list(t.cross_attention_layers)
    self_layers = [i for i in range(t.num_hidden_layers) if i not in cross]
    for key in state:
        if key == "text_model.learnable_embedding.weight" or key == "text_model.rope.freqs":
            continue  # consumed with tok_embeddings / not a weight
        yield key, *_convert(key, state, config, self_layers, cross)


def _convert(
    key: str,
    state: MergedShards,
    config: LlamaVisionConfig,
    self_layers: list[int],
    cross: list[int],
) -> tuple[str, torch.Tensor | Source]:
    t, v = config.text, config.vision
    if key == "text_model.tok_embeddings.weight":
        if "text_model.learnable_embedding.weight" not in state:
            raise ValueError("Meta checkpoint: text_model.learnable_embedding.weight is missing")
        extra = state.source("text_model.learnable_embedding.weight")
        return "language_model.model.embed_tokens.weight", Concat([state.source(key), extra], dim=0)
    if key == "text_model.norm.weight":
        return "language_model.model.norm.weight", state.source(key)
    if key == "text_model.output.weight":
        return "language_model.lm_head.weight", state.source(key)
    if m := re.fullmatch(r"text_model\.layers\.(\d+)\.(.+)", key):
        i, rest = int(m[1]), m[2]
        if i >= len(self_layers) or rest not in _SELF_LAYER:
            return "", state.source(key)
        name = f"language_model.model.layers.{self_layers[i]}.{_SELF_LAYER[rest]}"
        if rest in ("attention.wq.weight", "attention.wk.weight"):
            n_heads = t.num_attention_heads if rest == "attention.wq.weight" else t.num_key_value_heads
            return name, _interleaved_to_half(state[key], n_heads)
        return name, state.source(key)
    if m := re.fullmatch(r"text_model\.cross_attention_layers\.(\d+)\.(.+)", key):
        j, rest = int(m[1]), m[2]
        name = _CROSS_LAYER.get(rest)
        if j >= len(cross) or name is None:
            return "", state.source(key)
        return f"language_model.model.layers.{cross[j]}.{name}", state.source(key)
    if key.startswith("vision_model.vision_projection."):
        return "multi_modal_projector." + key.rsplit(".", 1)[1], state.source(key)
    prefix = "vision_model.vision_encoder."
    if not key.startswith(prefix):
        return "", state.source(key)
    rest = key[len(prefix) :]
    if rest in _VISION:
        return f"vision_model.{_VISION[rest]}", state.source(key)
    if rest == "conv1._linear.weight":
        w = state[key]
        return "vision_model.patch_embedding.weight", w.reshape(
            w.shape[0], v.num_channels, v.patch_size, v.patch_size
        )
    if rest == "gated_positional_embedding":
        return "vision_model.gated_positional_embedding.tile_embedding.weight", _per_aspect_ratio(
            state[key], config
        )
    if m := re.fullmatch(r"(pre|post)_tile_pos_embed\.embedding", rest):
        return f"vision_model.{m[1]}_tile_positional_embedding.embedding.weight", _per_aspect_ratio(
            state[key], config
        )
    if m := re.fullmatch(r"(transformer|global_transformer)\.resblocks\.(\d+)\.(.+)", rest):
        if m[3] in _VISION_LAYER:
            return f"vision_model.{m[1]}.layers.{m[2]}.{_VISION_LAYER[m[3]]}", state.source(key)
    return "", state.source(key)


def _interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute q/k rows from Meta's (pairs interleaved) RoPE layout to the rotate-half layout."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _per_aspect_ratio(grid: torch.Tensor, config: LlamaVisionConfig) -> torch.Tensor:
    """[rows, cols, n, D] tile grid -> one row per aspect-ratio id (id 0 = padding, all zeros)."""
    v = config.vision
    rows, cols, n, dim = grid.shape
    table = grid.new_zeros(v.max_aspect_ratio_id + 1, v.max_num_tiles, n, dim)
    for i, (h, w) in enumerate(v.supported_aspect_ratios, start=1):
        if h > rows or w > cols:
            raise ValueError(f"Meta tile grid {tuple(grid.shape)} has no cell for aspect ratio {h}x{w}")
        table[i, : h * w] = grid[:h, :w].reshape(h * w, n, dim)
    return table.flatten(1)
