"""Generation caches: preallocated buffers, never saved with the weights.

- `KVCache`: the keys and values (B, Hkv, L, Dh) of one self-attention layer. Every row of the batch
  is one request with its own length: a row's tokens sit at slots 0..length-1 (no padding inside a
  row), so a token's slot is also its RoPE position.
- `ImageContext`: what the cross-attention layers need, computed once per image: image keys/values
  of every cross-attention layer (B, Hkv, S, Dh), the boolean (B, 1, T, S) mask of which image tokens
  each text row may see, and the (B, 1, T, 1) row mask that zeroes rows that see no image. During
  decoding T is 1: the next token sees what the last prompt token saw.
- `Cache`: both, for `max_batch` rows: one `KVCache` per self-attention layer (None for the
  cross-attention layers) and an image pool of `image_tokens` slots per row. The model writes into it
  (`LlamaVisionModel.prefill` / `decode_step`); the engine only assigns rows and moves whole rows in
  and out (`save_row` / `load_row`, for prefix reuse).
- `RowsKV`: several rows of one layer's `KVCache` for a prefill of several requests at once (rows in any
  order, each with its own start and length): it writes only their real tokens, and gives the rows
  gathered when the prompts continue a reused prefix and must attend over the cache.

A decode step works on views of the first n rows and the first L slots (`Cache.view`), so the batch
and the attention span grow and shrink without reallocating, and the compiled step sees the same
buffers every time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVCache:
    """Keys and values (B, Hkv, L, Dh) of one self-attention layer."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v

    @classmethod
    def empty(
        cls, batch: int, n_kv_heads: int, length: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> KVCache:
        shape = (batch, n_kv_heads, length, head_dim)
        return cls(
            torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
        )

    def view(self, rows: slice, length: int) -> KVCache:
        """Rows and the first `length` slots, as views: writes land in this cache."""
        return KVCache(self.k[rows, :, :length], self.v[rows, :, :length])

    def update(
        self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, Dh) at `slots` and return the whole buffers (B, Hkv, L, Dh).

        One new token per row (T == 1, a decode step): `slots` (B,) holds each row's own slot, as rows
        have their own lengths. Several tokens (a prompt): `slots` (T,) are the same for every row."""
        if k.shape[2] == 1:  # a scatter along the slots: one light kernel, no advanced-index machinery
            index = slots.view(-1, 1, 1, 1).expand(-1, k.shape[1], 1, k.shape[3])  # B Hkv 1 Dh
            self.k.scatter_(2, index, k)
            self.v.scatter_(2, index, v)
        else:
            self.k.index_copy_(2, slots, k)
            self.v.index_copy_(2, slots, v)
        return self.k, self.v


class RowsKV:
    """Rows `rows` (B,) of `cache` for a multi-row prefill of right-padded prompts (B, T): token t of row
    b is real when t < lengths[b] and goes to slot starts[b] + t. `span` is the slots the prompts attend
    over (the longest start + length), or 0 when every start is 0 and the prompts attend to themselves
    alone (then nothing is gathered)."""

    def __init__(
        self, cache: KVCache, rows: torch.Tensor, writes: tuple[torch.Tensor, ...], span: int
    ) -> None:
        self.cache, self.rows, self.span = cache, rows, span
        self.b, self.t, self.slots = writes  # (M,) each: the batch row, position and slot of each real token

    def update(
        self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the real tokens of k, v (B, Hkv, T, Dh); the rows' first `span` slots (B, Hkv, span, Dh),
        copies, or k, v themselves when span is 0."""
        rows = self.rows[self.b]
        self.cache.k[rows, :, self.slots] = k[self.b, :, self.t]  # M Hkv Dh
        self.cache.v[rows, :, self.slots] = v[self.b, :, self.t]
        if not self.span:
            return k, v
        return self.cache.k[:, :, : self.span][self.rows], self.cache.v[:, :, : self.span][self.rows]


ImageKV = list[tuple[torch.Tensor, torch.Tensor]]  # per cross-attention layer: k, v (B, Hkv, S, Dh)


@dataclass
class ImageContext:
    """Image keys/values of every cross-attention layer, the boolean (B, 1, T, S) mask of which image
    tokens each text row may see, and the (B, 1, T, 1) row mask that zeroes rows seeing no image."""

    kv: ImageKV
    mask: torch.Tensor
    row_mask: torch.Tensor

    def rows(self, start: int, end: int) -> ImageContext:
        """The context of text positions start..end-1."""
        return ImageContext(self.kv, self.mask[:, :, start:end], self.row_mask[:, :, start:end])

    def last_row(self) -> ImageContext:
        """The context of a token appended after the last one: it sees what the last token saw."""
        return self.rows(self.mask.shape[2] - 1, self.mask.shape[2])

    @property
    def tokens(self) -> int:
        """S, the image tokens (images x tiles x patches, padding tiles included)."""
        return self.mask.shape[-1]


@dataclass
class RowSnapshot:
    """A copy of one row: the keys/values of its first `length` slots and its images (or None)."""

    kv: list[tuple[torch.Tensor, torch.Tensor] | None]
    length: int
    images: ImageKV | None

    @property
    def nbytes(self) -> int:
        tensors = [t for pair in self.kv if pair for t in pair]
        tensors += [t for pair in self.images or [] for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)


class Cache:
    """Keys/values of `batch` rows of up to `length` tokens each, and an image pool of `image_tokens`
    slots per row, for a model's layers (`layers[i]` None for a cross-attention layer)."""

    def __init__(
        self,
        layers: list[KVCache | None],
        image_kv: ImageKV,
        dtype: torch.dtype,
    ) -> None:
        self.layers = layers
        self.image_kv = image_kv
        first = next(c for c in layers if c is not None).k
        self.batch, self.length = first.shape[0], first.shape[2]
        self.image_tokens = image_kv[0][0].shape[2] if image_kv else 0
        device = first.device
        # Rows without images see every (zero) image token, so attention has something to normalise,
        # and their row mask zeroes the result.
        self.image_mask = torch.ones(self.batch, 1, 1, self.image_tokens, dtype=torch.bool, device=device)
        self.image_rows = torch.zeros(self.batch, 1, 1, 1, dtype=dtype, device=device)

    def view(
        self, n: int, length: int, image_tokens: int
    ) -> tuple[list[KVCache | None], ImageContext | None]:
        """The first n rows, L = `length` slots and S = `image_tokens` image slots; no images when S is 0."""
        rows = slice(0, n)
        layers = [None if c is None else c.view(rows, length) for c in self.layers]
        if image_tokens == 0:
            return layers, None
        kv = [(k[rows, :, :image_tokens], v[rows, :, :image_tokens]) for k, v in self.image_kv]
        return layers, ImageContext(kv, self.image_mask[rows, :, :, :image_tokens], self.image_rows[rows])

    def rows(
        self, rows: list[int], starts: list[int], lengths: list[int]
    ) -> tuple[list[RowsKV | None], torch.Tensor]:
        """The layers of a multi-row prefill (see `RowsKV`) and the positions (B, T) of its tokens."""
        device = self.image_mask.device
        T, span = max(lengths), max(s + n for s, n in zip(starts, lengths))
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)  # B T
        real = torch.arange(T, device=device)[None] < torch.tensor(lengths, device=device)[:, None]
        b, t = real.nonzero(as_tuple=True)
        writes = (b, t, positions[b, t])
        index = torch.tensor(rows, device=device)
        span = span if any(starts) else 0
        layers = [None if c is None else RowsKV(c, index, writes, span) for c in self.layers]
        return layers, positions

    def prefill_images(
        self, rows: list[int], contexts: list[ImageContext | None], T: int
    ) -> ImageContext | None:
        """The image context of a multi-row prefill, after `set_images` put each row's images in the pool:
        the rows' pool keys/values over the widest row's S slots, and each row's mask rows (contexts of its
        new tokens), right-padded to T. None when no row has images."""
        S = max((c.tokens for c in contexts if c is not None), default=0)
        if S == 0:
            return None
        B, device = len(rows), self.image_mask.device
        index = torch.tensor(rows, device=device)
        kv = [(k[:, :, :S][index], v[:, :, :S][index]) for k, v in self.image_kv]  # B Hkv S Dh
        # Padding positions and rows without images see every slot, zeroed by their row mask (as in decoding).
        mask = torch.ones(B, 1, T, S, dtype=torch.bool, device=device)
        row_mask = torch.zeros(B, 1, T, 1, dtype=self.image_rows.dtype, device=device)
        for b, c in enumerate(contexts):
            if c is not None:
                n = c.mask.shape[2]
                mask[b, :, :n, : c.tokens] = c.mask[0]
                mask[b, :, :n, c.tokens :] = False
                row_mask[b, :, :n] = c.row_mask[0]
        return ImageContext(kv, mask, row_mask)

    def set_images(self, row: int, images: ImageContext | None) -> None:
        """Put a request's image keys/values (1, Hkv, S_row, Dh) and its next token's image mask into `row`."""
        self.image_mask[row] = True
        self.image_rows[row] = 0
        if images is None:
            return
        S = images.tokens
        if S > self.image_tokens:
            raise ValueError(
                f"the request has {S} image tokens but the cache holds {self.image_tokens} per row"
            )
        for (k, v), (ik, iv) in zip(self.image_kv, images.kv):
            k[row, :, :S] = ik[0]
            v[row, :, :S] = iv[0]
        last = images.last_row()
        self.image_mask[row, :, :, S:] = False  # the pool's spare slots are never seen
        self.image_mask[row, :, :, :S] = last.mask[0]
        self.image_rows[row] = last.row_mask[0]

    def save_row(self, row: int, length: int, images: ImageKV | None) -> RowSnapshot:
        """Copies of the row's first `length` slots; `images` (the request's own image kv) are kept as they are."""
        kv = [
            None if c is None else (c.k[row, :, :length].clone(), c.v[row, :, :length].clone())
            for c in self.layers
        ]
        return RowSnapshot(kv, length, images)

    def load_row(self, row: int, snapshot: RowSnapshot, length: int) -> None:
        """Write the first `length` slots of a snapshot back into `row`."""
        for c, pair in zip(self.layers, snapshot.kv):
            if c is not None and pair is not None:
                c.k[row, :, :length] = pair[0][:, :length]
                c.v[row, :, :length] = pair[1][:, :length]
