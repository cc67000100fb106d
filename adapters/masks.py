"""Which text tokens may attend to which image: Meta's `create_vision_mask` intervals, the processor's
dense (B, T, I, N) tile mask, and the boolean attention mask the cross-attention layers use.

Semantics (identical in Meta's chat_format, HF's processor and torchtune):
- each `<|image|>` token opens an interval that runs up to the next `<|image|>` token, the last one to
  the end of the sequence; the image token itself is inside its interval;
- a run of adjacent image tokens is attended jointly: each image of the run extends to the end of the
  interval of the run's last image;
- tokens before the first image see no image at all; their cross-attention output is zeroed (see
  cross_attention.py), and so are padding tiles of each image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def vision_token_intervals(token_ids: Sequence[int], image_token_id: int) -> list[list[int]]:
    """[start, end) text positions for each image token, end -1 meaning "to the end"."""
    locations = [i for i, t in enumerate(token_ids) if t == image_token_id]
    if not locations:
        return []
    if len(locations) == 1:
        return [[locations[0], -1]]
    intervals = [[a, b] for a, b in zip(locations[:-1], locations[1:])]
    intervals.append([locations[-1], len(token_ids)])
    last_end = intervals[-1][1]
    for interval in reversed(intervals):  # adjacent images share the end of the last one
        if interval[0] == interval[1] - 1:
            interval[1] = last_end
        last_end = interval[1]
    return intervals


def cross_attention_mask(
    token_rows: Sequence[Sequence[int]],
    num_tiles: Sequence[Sequence[int]],
    image_token_id: int,
    max_num_tiles: int,
) -> torch.Tensor:
    """Dense int64 mask (B, T, I, N): 1 where text token t may see tile n of image i.

    `token_rows` are the (padded) id rows, `num_tiles[b][i]` the real tiles of each image of row b.
    """
    B, T = len(token_rows), max((len(r) for r in token_rows), default=0)
    n_images = max((len(n) for n in num_tiles), default=0)
    mask = torch.zeros(B, T, n_images, max_num_tiles, dtype=torch.int64)
    for b, row in enumerate(token_rows):
        intervals = vision_token_intervals(row, image_token_id)
        if len(intervals) != len(num_tiles[b]):
            raise ValueError(
                f"row {b}: {len(intervals)} <|image|> tokens but {len(num_tiles[b])} images were given"
            )
        for i, ((start, end), tiles) in enumerate(zip(intervals, num_tiles[b])):
            mask[b, start : len(row) if end == -1 else end, i, :tiles] = 1
    return mask


def image_attention_mask(
    cross_attention_mask: torch.Tensor, num_patches: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand the (B, T, I, N) tile mask to the image tokens.

    Returns a boolean attention mask (B, 1, T, I*N*P) and the row mask (B, 1, T, 1) in `dtype` that is
    0 for text rows that see no image. Those rows are allowed to see everything in the attention mask
    (so softmax has something to normalise, no NaN) and are zeroed afterwards by the row mask.
    """
    allowed = cross_attention_mask.bool().repeat_interleave(num_patches, dim=-1)  # B T I N*P
    allowed = allowed.flatten(2)  # B T S
    row = allowed.any(dim=-1, keepdim=True)  # B T 1
    mask = allowed | ~row
    return mask[:, None], row[:, None].to(dtype)
