"""Vision pretraining on image tags (`mode: vision`, llama_vision/finetune/tags.py): it trains only the
vision encoder and the projector, learns tags it is shown, resumes exactly, names bad records by file
and line, and writes a checkpoint that the next stage (and from_pretrained) loads."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from llama_vision import LlamaVision
from llama_vision.domain.dataset import generate_tagged, shape_tags, tagged_picture
from llama_vision.finetune import train as T
from llama_vision.finetune.config import TrainConfig
from llama_vision.finetune.tags import HEAD_FILE, TAGS_FILE, load_tagged, pooled


def quiet(message: str) -> None:
    pass


@pytest.fixture(scope="module")
def tagged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 pictures: red ones tagged "red", blue ones "blue", half of them also "wide" (2 tiles)."""
    d = tmp_path_factory.mktemp("tags")
    (d / "img").mkdir()
    lines = []
    for i in range(8):
        colour = (220, 30, 30) if i % 2 else (30, 30, 220)
        size = (200, 90) if i % 4 < 2 else (90, 90)
        Image.new("RGB", size, colour).save(d / "img" / f"{i}.png")
        names = ["red" if i % 2 else "blue"] + (["wide"] if i % 4 < 2 else [])
        lines.append(json.dumps({"image": f"img/{i}.png", "tags": names}))
    (d / "tags.jsonl").write_text("\n".join(lines) + "\n")
    return d / "tags.jsonl"


def config(checkpoint: Path, data: Path, output: Path, **changes: object) -> TrainConfig:
    base = dict(model=str(checkpoint), data=str(data), output=str(output), mode="vision", max_steps=2,
                batch_size=4, lr=1e-3)  # fmt: skip
    return TrainConfig(**{**base, **changes})


def test_vision_mode_trains_the_encoder_and_projector_only(
    tiny_checkpoint: Callable[[int], Path], tagged: Path, tmp_path: Path
) -> None:
    checkpoint = tiny_checkpoint(31)
    result = T.train(config(checkpoint, tagged, tmp_path, max_steps=3), log=quiet)
    assert sorted(result.losses) == [1, 2, 3]
    before = load_file(checkpoint / "model.safetensors")
    after = load_file(result.final / "model.safetensors")
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"vision_model", "multi_modal_projector"}, changed
    assert json.loads((result.final / TAGS_FILE).read_text()) == ["blue", "red", "wide"]
    assert load_file(result.final / HEAD_FILE)["tags.weight"].shape == (3, 2 * 128)
    lv = LlamaVision.from_pretrained(result.final)  # a full checkpoint: the next stage starts from it
    assert lv.config.text.hidden_size == 128


def test_vision_mode_learns_the_tags(
    tiny_checkpoint: Callable[[int], Path], tagged: Path, tmp_path: Path
) -> None:
    c = config(
        tiny_checkpoint(31), tagged, tmp_path, max_steps=40, batch_size=8, lr=3e-3, eval_data=str(tagged)
    )
    result = T.train(c, log=quiet)
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert result.losses[40] < 0.5 * result.losses[1], (result.losses[1], result.losses[40])
    assert logs[-1]["eval_tags_exact"] == 1.0  # every picture's whole tag set right


def test_vision_mode_resume_equals_uninterrupted(
    tiny_checkpoint: Callable[[int], Path], tagged: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = tiny_checkpoint(31)
    settings = dict(max_steps=4, save_every=2, batch_size=2, grad_accum=2)
    whole = T.train(config(checkpoint, tagged, tmp_path / "a", **settings), log=quiet).losses
    real_step = T.Trainer.train_step

    def crash(self: T.Trainer, step: int) -> dict:
        if step == 2:
            raise KeyboardInterrupt
        return real_step(self, step)

    with monkeypatch.context() as m:
        m.setattr(T.Trainer, "train_step", crash)
        with pytest.raises(KeyboardInterrupt):
            T.train(config(checkpoint, tagged, tmp_path / "b", **settings), log=quiet)
    assert (tmp_path / "b" / "checkpoint-2" / HEAD_FILE).is_file()
    resumed = T.train(config(checkpoint, tagged, tmp_path / "b", resume=True, **settings), log=quiet).losses
    assert sorted(resumed) == [3, 4] and all(resumed[s] == whole[s] for s in resumed)


def test_pooling_leaves_out_padding_tiles(tiny_checkpoint: Callable[[int], Path]) -> None:
    """The mean and max run over the real tiles' tokens only (a 1-tile and a 2-tile picture in a batch)."""
    model = LlamaVision.from_pretrained(tiny_checkpoint(31)).model
    v = model.config.vision
    pixels = torch.randn(2, 1, v.max_num_tiles, 3, v.image_size, v.image_size)
    mask = torch.zeros(2, 1, v.max_num_tiles, dtype=torch.int64)
    mask[0, 0, 0] = 1
    mask[1, 0, :2] = 1
    pixels[mask == 0] = 0.0  # as the processor pads
    batch = {"pixel_values": pixels, "aspect_ratio_ids": torch.tensor([[1], [2]]), "aspect_ratio_mask": mask}
    with torch.no_grad():
        got = pooled(model, batch)
        tokens = model.encode_images(pixels, batch["aspect_ratio_ids"], mask)
    per_tile = tokens.shape[1] // v.max_num_tiles
    for row, tiles in enumerate((1, 2)):
        real = tokens[row, : tiles * per_tile]
        assert torch.allclose(got[row], torch.cat([real.mean(0), real.amax(0)]), atol=1e-5)
    assert not torch.allclose(got[0], torch.cat([tokens[0].mean(0), tokens[0].amax(0)]), atol=1e-3)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"image": "img/0.png"}', r"tags\.jsonl:2: mode vision: expected \{"),
        ('{"image": "img/0.png", "tags": "red"}', r"tags\.jsonl:2: tags must be a list"),
        ('{"image": "img/none.png", "tags": ["red"]}', r"tags\.jsonl:2: image file '.*none\.png' not found"),
        ("{not json", r"tags\.jsonl:2: invalid JSON"),
    ],
)
def test_bad_tag_records_name_file_and_line(tagged: Path, tmp_path: Path, line: str, message: str) -> None:
    first = tagged.read_text().splitlines()[0]
    bad = tmp_path / "tags.jsonl"
    (tmp_path / "img").symlink_to(tagged.parent / "img")
    bad.write_text(first + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_tagged(bad)
    assert len(load_tagged(bad, skip_bad=True)) == 1


def test_full_mode_can_freeze_the_vision_encoder(
    tiny_checkpoint: Callable[[int], Path], tagged: Path, tmp_path: Path
) -> None:
    """Stage 2 of the embedded recipe: full training that keeps stage 1's vision encoder as it is."""
    chat = tmp_path / "chat.jsonl"
    records = [json.loads(x) for x in tagged.read_text().splitlines()]
    chat.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image", "image": str(tagged.parent / r["image"])},
                                     {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": r["tags"][0]}]}) + "\n" for r in records))  # fmt: skip
    checkpoint = tiny_checkpoint(31)
    c = config(checkpoint, chat, tmp_path / "out", mode="full", freeze=["vision"])
    final = T.train(c, log=quiet).final
    before, after = load_file(checkpoint / "model.safetensors"), load_file(final / "model.safetensors")
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"multi_modal_projector", "language_model"}, changed
    with pytest.raises(ValueError, match="freeze: is for mode full"):
        config(checkpoint, chat, tmp_path, mode="lora", freeze=["vision"])


def test_group_by_length_is_refused_in_vision_mode() -> None:
    with pytest.raises(ValueError, match="group_by_length"):
        TrainConfig(preset="embedded", tokenizer="t.json", mode="vision", group_by_length=True)


def test_domain_writes_tagged_scenes_deterministically(tmp_path: Path) -> None:
    path = generate_tagged(tmp_path / "a", 6, split="eval", max_shapes=2)
    again = generate_tagged(tmp_path / "b", 6, split="eval", max_shapes=2)
    assert path.read_text() == again.read_text()
    assert (tmp_path / "a" / "img" / "eval-tags-000003.png").read_bytes() == (
        tmp_path / "b" / "img" / "eval-tags-000003.png"
    ).read_bytes()
    for i, record in enumerate(load_tagged(path)):
        scene = tagged_picture("eval", 0, i, max_shapes=2)
        assert 1 <= len(scene.shapes) <= 2
        assert list(record.tags) == shape_tags(scene) == sorted({s.kind for s in scene.shapes})
    with pytest.raises(ValueError, match="max_shapes"):
        tagged_picture("train", 0, 0, max_shapes=7)


# ----------------------------------------------------------------------------- label maps


def test_label_map_lies_on_the_picture() -> None:
    """Each shape's centre pixel holds its colour and kind; every inked pixel of a text picture lies in
    a character's cell, and the cells name the text's characters in order."""
    import random

    import numpy as np

    from llama_vision.domain.scenes import (
        CHARACTERS,
        COLOURS,
        SHAPES,
        label_map,
        render,
        sample_scene,
        sample_text_picture,
    )  # fmt: skip

    for seed in range(6):
        scene = sample_scene(random.Random(seed))
        labels = label_map(scene)
        for s in scene.shapes:
            assert tuple(labels[int(s.y), int(s.x), :2]) == (
                list(COLOURS).index(s.colour) + 1,
                SHAPES.index(s.kind) + 1,
            )
        picture = sample_text_picture(random.Random(seed))
        labels, pixels = label_map(picture), np.asarray(render(picture)).astype(int)
        ink = pixels.sum(-1) < 500
        assert ink.any() and (labels[..., 2][ink] > 0).all()
        order = [labels[..., 2][labels[..., 3] == k + 1] for k in range(len(picture.text))]
        assert all(np.all(o == CHARACTERS.index(c) + 1) for o, c in zip(order, picture.text))


def test_patch_targets_are_cut_like_the_picture(tiny_checkpoint: Callable[[int], Path]) -> None:
    """A white rectangle on black and its label map, through transform_image and patch_targets: each
    patch's share of the rectangle's class follows the patch's brightness, on 1, 2 and 4 tiles."""
    import numpy as np

    from llama_vision.encoders.image_transform import transform_image
    from llama_vision.finetune.tags import patch_targets

    config = LlamaVision.from_pretrained(tiny_checkpoint(31)).config
    v = config.vision
    for width, height, box in (
        (90, 90, (10, 20, 50, 70)),
        (300, 140, (150, 30, 290, 80)),
        (400, 380, (5, 200, 120, 370)),
    ):
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        labels = np.zeros((height, width, 1), dtype=np.uint8)
        x0, y0, x1, y1 = box
        pixels[y0:y1, x0:x1], labels[y0:y1, x0:x1] = 255, 1
        tiles, _ = transform_image(Image.fromarray(pixels), tile_size=v.image_size, max_num_tiles=4)
        (shares,), place, on_picture = patch_targets(labels, [1], config, 4)
        p = v.patch_size
        bright = tiles[:, 0].unfold(1, p, p).unfold(2, p, p).flatten(1, 2).flatten(2).mean(-1)  # N patches
        bright = (bright - bright.min()) / (bright.max() - bright.min())
        assert shares.shape[:2] == bright.shape and torch.allclose(shares.sum(-1), torch.ones(()))
        assert (shares[..., 1] - bright).abs().max() < 0.35, (width, height)
        assert (shares[..., 1] > 0.5).sum() > 0
        inside = place[on_picture]
        assert inside.min() >= 0 and inside.max() <= 1 and on_picture.float().mean() > 0.3


def test_vision_mode_learns_what_is_at_each_patch(
    tiny_checkpoint: Callable[[int], Path], tmp_path: Path
) -> None:
    """Pictures half red and half blue (the split at a different place in each), with label maps:
    after training, the patch head names the colour of nearly every patch and places them."""
    import numpy as np

    from llama_vision.finetune.tags import image_tokens

    (tmp_path / "img").mkdir()
    (tmp_path / "labels.json").write_text(json.dumps({"colour": ["red", "blue"]}))
    lines = []
    for i in range(8):
        pixels = np.zeros((96, 96 + 24 * (i % 3), 3), dtype=np.uint8)
        labels = np.zeros(pixels.shape[:2], dtype=np.uint8)
        split = 20 + 8 * i
        pixels[:, :split], labels[:, :split] = (220, 30, 30), 1
        pixels[:, split:], labels[:, split:] = (30, 30, 220), 2
        Image.fromarray(pixels).save(tmp_path / "img" / f"{i}.png")
        Image.fromarray(labels).save(tmp_path / "img" / f"{i}-labels.png")
        lines.append(
            json.dumps({"image": f"img/{i}.png", "tags": ["both"], "label_map": f"img/{i}-labels.png"})
        )
    data = tmp_path / "dense.jsonl"
    data.write_text("\n".join(lines) + "\n")
    trainer = T.Trainer(
        config(tiny_checkpoint(31), data, tmp_path / "out", max_steps=60, batch_size=8, lr=3e-3), log=quiet
    )
    trainer.prepare()
    trainer.run()
    batch = trainer.collator(trainer.examples)
    with torch.no_grad():
        tokens = image_tokens(trainer.model, batch)
        out = trainer.head.patches(
            tokens.view(8, -1, batch["patch_real"].shape[2] + 1, tokens.shape[-1])[:, :, 1:]
        )
    real = batch["aspect_ratio_mask"][:, 0].bool()[:, :, None] & (batch["patch_shares"][..., 0] < 0.5)
    wanted = batch["patch_shares"][..., 1:3].argmax(-1)
    assert (out[..., 1:3].argmax(-1) == wanted)[real].float().mean() > 0.9
    assert ((out[..., 3:5] - batch["patch_places"]).abs() < 0.2)[batch["patch_real"]].float().mean() > 0.8


def test_label_maps_must_be_named_and_complete(tmp_path: Path) -> None:
    import numpy as np

    from llama_vision.config import get_preset
    from llama_vision.finetune.tags import TagCollator, label_channels

    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "img" / "0.png")
    Image.new("L", (40, 40)).save(tmp_path / "img" / "0-labels.png")
    rows = [
        '{"image": "img/0.png", "tags": ["a"], "label_map": "img/0-labels.png"}',
        '{"image": "img/0.png", "tags": ["a"]}',
    ]
    data = tmp_path / "d.jsonl"
    data.write_text(rows[0] + "\n")
    with pytest.raises(ValueError, match=r"labels\.json: not found"):
        label_channels(data, load_tagged(data))
    (tmp_path / "labels.json").write_text('{"colour": "red"}')
    with pytest.raises(ValueError, match=r"labels\.json: expected"):
        label_channels(data, load_tagged(data))
    data.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"d\.jsonl:2: no label_map, but other records have one"):
        label_channels(data, load_tagged(data))
    Image.fromarray(np.full((40, 40), 3, dtype=np.uint8)).save(tmp_path / "img" / "0-labels.png")
    (tmp_path / "labels.json").write_text('{"colour": ["red", "blue"]}')
    data.write_text(rows[0] + "\n")
    collator = TagCollator(
        get_preset("embedded"), ["a"], max_num_tiles=4, channels={"colour": ["red", "blue"]}
    )
    with pytest.raises(
        ValueError,
        match=r"d\.jsonl:1: label map '.*0-labels\.png': channel 'colour' holds class 3, but labels\.json names 2",
    ):
        collator(load_tagged(data))
    data.write_text('{"image": "img/0.png", "tags": ["a"], "label_map": "img/none.png"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:1: label map file '.*none\.png' not found"):
        load_tagged(data)
