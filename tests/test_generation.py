"""The generation engine on tiny random weights: cached decoding equals the full forward at every step,
a batch equals its rows alone, streaming equals the whole answer, and stopping, sampling and errors."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from reference import random_image

from llama_vision import GenerationConfig, LlamaVision, LlamaVisionModel
from llama_vision.config import PRESETS
from llama_vision.generation import FINISHED, Engine, TextStream, answer_text

CONFIG = PRESETS["tiny"]
NEVER = (-7,)  # an end-of-turn id no model can produce: rows run to max_new_tokens


@pytest.fixture(scope="module")
def lv(tiny_checkpoint: Callable[[int], Path]) -> LlamaVision:
    return LlamaVision.from_pretrained(tiny_checkpoint(11), dtype=torch.float32)


def user(text: str, *images) -> dict:
    content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


IMAGE_A, IMAGE_B = random_image(170, 40, seed=1), random_image(60, 90, seed=2)
CHATS = {
    "one image": [user("What is this?", IMAGE_A)],
    "text only": [user("Tell me a story about a lighthouse keeper.")],
    "two images": [user("Compare them.", IMAGE_A, IMAGE_B)],
    "image in an earlier turn": [
        user("Look at this.", IMAGE_B),
        {"role": "assistant", "content": "A picture of noise."},
        user("And what colour is it mostly?"),
    ],
    "system and image": [{"role": "system", "content": "Be brief."}, user("Describe it.", IMAGE_A)],
}


def tokens(lv: LlamaVision, conversations: list, n: int, **options) -> torch.Tensor:
    inputs = lv.processor.chat_inputs(conversations)
    config = GenerationConfig(max_new_tokens=n, eos_token_ids=NEVER, **options)
    return torch.stack(list(lv.engine.tokens(inputs, config)), dim=1)  # B n


@pytest.mark.parametrize("name", ["one image", "text only", "two images", "image in an earlier turn"])
@torch.no_grad()
def test_cached_decoding_equals_the_full_forward(lv: LlamaVision, name: str) -> None:
    inputs = lv.processor.chat_inputs([CHATS[name]])
    n = 8
    new = tokens(lv, [CHATS[name]], n)
    ids = torch.cat([inputs["input_ids"], new], dim=1)
    full = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
    if "cross_attention_mask" in inputs:  # a new token sees what the last prompt token saw
        cam = inputs["cross_attention_mask"]
        full["cross_attention_mask"] = torch.cat([cam, cam[:, -1:].expand(-1, n, -1, -1)], dim=1)
    logits = lv.model(**full)[0, inputs["input_ids"].shape[1] - 1 : -1]  # n V: the logits of each new token
    assert torch.equal(logits.argmax(-1), new[0])
    # and the cached logits themselves, step by step
    config = GenerationConfig(max_new_tokens=n, eos_token_ids=NEVER)
    cached = []
    engine = lv.engine
    original = engine._step

    def record(*args):
        out = original(*args)
        cached.append(out[0])
        return out

    engine._step = record
    try:
        list(engine.tokens(inputs, config))
    finally:
        engine._step = original
    torch.testing.assert_close(torch.stack(cached), logits[1:], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_batch_equals_each_row_alone(lv: LlamaVision) -> None:
    names = ["one image", "text only", "two images", "image in an earlier turn", "system and image"]
    batch = tokens(lv, [CHATS[k] for k in names], 10)
    for row, name in zip(batch, names):
        assert torch.equal(row, tokens(lv, [CHATS[name]], 10)[0]), name


@torch.no_grad()
def test_text_only_batch_never_runs_vision_or_adapters(lv: LlamaVision, monkeypatch) -> None:
    expected = tokens(lv, [CHATS["text only"]], 4)

    def fail(*args, **kwargs):
        raise AssertionError("ran without an image")

    monkeypatch.setattr(type(lv.model.vision_model), "forward", fail)
    from llama_vision.adapters.cross_attention import CrossAttentionLayer

    monkeypatch.setattr(CrossAttentionLayer, "forward", fail)
    assert torch.equal(tokens(lv, [CHATS["text only"]], 4), expected)


def test_streaming_equals_the_whole_answer(lv: LlamaVision) -> None:
    for name in ["one image", "system and image"]:
        pieces = list(lv.stream(CHATS[name], max_new_tokens=24, temperature=0.0, eos_token_ids=NEVER))
        assert len(pieces) > 1
        assert "".join(pieces) == lv.chat(
            CHATS[name], max_new_tokens=24, temperature=0.0, eos_token_ids=NEVER
        )


def test_generate_matches_chat_per_row(lv: LlamaVision) -> None:
    convs = [CHATS["one image"], CHATS["text only"]]
    answers = lv.generate(convs, max_new_tokens=12, temperature=0.0, eos_token_ids=NEVER)
    assert answers == [lv.chat(c, max_new_tokens=12, temperature=0.0, eos_token_ids=NEVER) for c in convs]


def test_each_row_stops_on_its_own_end_of_turn(lv: LlamaVision) -> None:
    convs = [CHATS["one image"], CHATS["text only"]]
    free = tokens(lv, convs, 10)
    eos = int(free[0, 3])  # make row 0's 4th token its end of turn
    steps = list(
        lv.engine.tokens(
            lv.processor.chat_inputs(convs), GenerationConfig(max_new_tokens=10, eos_token_ids=(eos,))
        )
    )
    got = torch.stack(steps, dim=1)
    first_eos_1 = (free[1] == eos).nonzero()
    assert got[0, :4].tolist() == free[0, :4].tolist() and (got[0, 4:] == FINISHED).all()
    end_1 = int(first_eos_1[0]) + 1 if len(first_eos_1) else got.shape[1]
    assert got[1, :end_1].tolist() == free[1, :end_1].tolist()
    # the end-of-turn id is not part of the answer
    answer = lv.chat(convs[0], max_new_tokens=10, temperature=0.0, eos_token_ids=(eos,))
    assert answer == lv.tokenizer.decode(free[0, :3].tolist(), skip_special_tokens=True)


def test_stop_strings_end_the_answer(lv: LlamaVision) -> None:
    full = lv.chat(CHATS["one image"], max_new_tokens=16, temperature=0.0, eos_token_ids=NEVER)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    options = {"max_new_tokens": 16, "temperature": 0.0, "eos_token_ids": NEVER, "stop": [stop]}
    assert lv.chat(CHATS["one image"], **options) == expected
    assert "".join(lv.stream(CHATS["one image"], **options)) == expected


def test_max_new_tokens_and_the_context(lv: LlamaVision) -> None:
    assert tokens(lv, [CHATS["text only"]], 5).shape == (1, 5)
    small = CONFIG.replace(text=dataclasses.replace(CONFIG.text, max_position_embeddings=40))
    model = LlamaVisionModel(small).eval()
    model.load_state_dict(lv.model.state_dict())
    engine = Engine(model)
    config = GenerationConfig(max_new_tokens=9, eos_token_ids=NEVER)
    with pytest.raises(ValueError, match="the prompt has 40 tokens and the model's context is 40"):
        next(engine.tokens({"input_ids": torch.ones(1, 40, dtype=torch.int64)}, config))
    fits = {"input_ids": torch.ones(1, 38, dtype=torch.int64)}  # room for two tokens only
    assert len(list(engine.tokens(fits, config))) == 2


def test_sampling_is_seeded_and_varies(lv: LlamaVision) -> None:
    options = {"temperature": 1.0, "top_p": 0.95, "top_k": 50, "min_p": 0.01}
    a = tokens(lv, [CHATS["one image"]], 12, seed=3, **options)
    assert torch.equal(a, tokens(lv, [CHATS["one image"]], 12, seed=3, **options))
    assert not torch.equal(a, tokens(lv, [CHATS["one image"]], 12, seed=4, **options))
    assert not torch.equal(a, tokens(lv, [CHATS["one image"]], 12))  # greedy


def test_repetition_penalty_changes_greedy_choice(lv: LlamaVision) -> None:
    plain = tokens(lv, [CHATS["text only"]], 24)
    penalised = tokens(lv, [CHATS["text only"]], 24, repetition_penalty=1e6)
    assert len(set(penalised[0].tolist())) == 24  # nothing repeats under a huge penalty
    assert not torch.equal(plain, penalised) or len(set(plain[0].tolist())) == 24


def test_text_stream_never_splits_a_character(lv: LlamaVision) -> None:
    tok = lv.tokenizer
    text = "Größe: 東京タワー 🗼 ok"
    ids = tok.encode(text)
    # force byte-level pieces: one token per byte where the vocabulary has them
    byte_ids = [tok.token_to_id(tok.id_to_token(i)) for i in ids]
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in byte_ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    single_bytes = [tok.token_to_id(_byte_token(b)) for b in "東🗼".encode()]
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in single_bytes]
    assert pieces[:2] == ["", ""] and pieces[2] == "東" and pieces[3:6] == ["", "", ""] and pieces[6] == "🗼"


def test_text_stream_holds_back_a_possible_stop_string(lv: LlamaVision) -> None:
    tok = lv.tokenizer
    stream = TextStream(tok, stop=["END"])
    out = [stream.push(i) for i in tok.encode("one two EN")]
    assert "".join(out) == "one two "  # "EN" may begin "END"
    out += [stream.push(i) for i in tok.encode("D three")]
    assert "".join(out) == "one two " and stream.done
    assert answer_text(tok, tok.encode("one two END three"), ["END"]) == "one two "


def test_generation_config_from_hf_and_validation(tmp_path: Path) -> None:
    hf = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [128001, 128008, 128009]}
    config = GenerationConfig.from_hf(hf)
    assert (config.temperature, config.top_p, config.top_k, config.eos_token_ids) == (
        0.6,
        0.9,
        0,
        (128001, 128008, 128009),
    )
    assert GenerationConfig.from_hf({"do_sample": False, "temperature": 0.6}).greedy
    (tmp_path / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.7}')
    assert GenerationConfig.from_dir(tmp_path).temperature == 0.7
    (tmp_path / "generation_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="generation_config.json"):
        GenerationConfig.from_dir(tmp_path)
    for bad in [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"min_p": 2}, {"top_k": -1},
                {"max_new_tokens": 0}, {"repetition_penalty": 0}, {"stop": [""]}, {"seed": "x"},
                {"temperature": float("nan")}, {"max_new_tokens": True}]:  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            GenerationConfig(**bad)
    with pytest.raises(ValueError, match="unknown generation option"):
        GenerationConfig().replace(temprature=0.5)
    assert GenerationConfig(stop="###").stop == ("###",)


def test_checkpoint_generation_defaults_apply(lv: LlamaVision) -> None:
    assert lv.generation_config == GenerationConfig()  # no generation_config.json: greedy
    answer = lv.chat(CHATS["text only"], max_new_tokens=6, eos_token_ids=NEVER)
    assert answer == lv.tokenizer.decode(
        tokens(lv, [CHATS["text only"]], 6)[0].tolist(), skip_special_tokens=True
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_cached_decoding_follows_the_full_forward(lv: LlamaVision, dtype: torch.dtype) -> None:
    """In 16 bits the cached step's logits equal the full forward's within 16-bit rounding."""
    half = LlamaVision(model=LlamaVisionModel(CONFIG).to(dtype).eval(), processor=lv.processor)
    half.model.load_state_dict({k: v.to(dtype) for k, v in lv.model.state_dict().items()})
    conversation = CHATS["one image"]
    inputs = lv.processor.chat_inputs([conversation])
    n = 6
    steps = []
    original = half.engine._step
    half.engine._step = lambda *args: steps.append(original(*args)[0]) or steps[-1][None]
    new = tokens(half, [conversation], n)
    assert new.shape == (1, n) and len(steps) == n - 1
    assert half.engine._cache.layers[0].k.dtype == dtype
    ids = torch.cat([inputs["input_ids"], new], dim=1)
    cam = inputs["cross_attention_mask"]
    full = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
    full["cross_attention_mask"] = torch.cat([cam, cam[:, -1:].expand(-1, n, -1, -1)], dim=1)
    logits = half.model(**full)[0, inputs["input_ids"].shape[1] :]  # the logits after each fed new token
    torch.testing.assert_close(torch.stack(steps), logits[: n - 1], rtol=0.05, atol=0.05)
    assert torch.equal(logits[: n - 1].argmax(-1), new[0, 1:])


def test_compiled_decode_step_equals_eager_and_never_recompiles(lv: LlamaVision) -> None:
    """12 requests of different batch sizes, prompt lengths and image counts through a compiled step
    (counted with a backend that records each graph it is given): the tokens equal eager, and running
    the same mix again compiles nothing new."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = LlamaVision(
        model=lv.model,
        processor=lv.processor,
        compile=counting_backend,
        engine_options={"max_batch": 4, "max_length": 256},
    )
    mix = [
        [CHATS["one image"]],
        [CHATS["text only"], CHATS["two images"]],
        [CHATS["image in an earlier turn"], CHATS["system and image"], CHATS["text only"]],
        [CHATS["two images"]],
        [CHATS["text only"]],
        [CHATS["one image"], CHATS["text only"], CHATS["two images"], CHATS["system and image"]],
    ]
    lengths = [5, 9, 3, 7, 12, 4]
    expected = [tokens(lv, batch, n) for batch, n in zip(mix, lengths)]
    assert sum(len(b) for b in mix) >= 12
    for batch, n, want in zip(mix, lengths, expected):
        assert torch.equal(tokens(compiled, batch, n), want)
    warm = len(graphs)
    assert 0 < warm <= compiled.engine.compilations
    for batch, n, want in zip(mix, lengths, expected):
        assert torch.equal(tokens(compiled, batch, n), want)
    assert len(graphs) == warm  # no recompilation after warm-up


def _byte_token(b: int) -> str:
    from llama_vision.tokenizer import _byte_to_unicode

    return _byte_to_unicode()[b]


def test_bad_calls_fail_early_and_clearly(lv: LlamaVision) -> None:
    with pytest.raises(ValueError, match="temperature"):
        lv.stream(CHATS["one image"], temperature=-1)  # before the first piece is asked for
    with pytest.raises(ValueError, match="unknown generation option"):
        lv.chat(CHATS["one image"], temprature=0.5)
    with pytest.raises(ValueError, match="use chat"):
        lv.generate(CHATS["one image"])
    with pytest.raises(ValueError, match="non-empty list"):
        lv.generate([])
    with pytest.raises(ValueError, match="max_num_tiles"):
        lv.chat(CHATS["one image"], max_num_tiles=9)
