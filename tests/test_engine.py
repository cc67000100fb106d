"""The serving engine on tiny random weights: concurrent requests equal the same requests alone, seeded
sampling under load, cancelling, prefix reuse, only real images encoded, right padding, limits."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from reference import random_image

from llama_vision import GenerationConfig, LlamaVision
from llama_vision.engine import Engine, QueueFull
from llama_vision.memory import RequestTooLarge

NEVER = (-7,)  # an end-of-turn id no model can produce: rows run to max_new_tokens
IMAGE_A, IMAGE_B = random_image(170, 40, seed=1), random_image(60, 90, seed=2)


def user(text: str, *images) -> dict:
    content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


CHATS = [
    [user("What is this?", IMAGE_A)],
    [user("Tell me a story about a lighthouse keeper and the sea.")],
    [user("Compare them.", IMAGE_A, IMAGE_B)],
    [user("Look at this.", IMAGE_B), {"role": "assistant", "content": "Noise."}, user("What colour?")],
    [{"role": "system", "content": "Be brief."}, user("Describe it.", IMAGE_B)],
    [user("Hi")],
    [user("Count from one to twenty, please, slowly and clearly.")],
    [user("Two of the same?", IMAGE_B, IMAGE_B)],
]
OPTIONS = [  # different lengths and options per request
    {"max_new_tokens": 9},
    {"max_new_tokens": 14, "repetition_penalty": 1.3},
    {"max_new_tokens": 5},
    {"max_new_tokens": 11, "top_k": 5, "temperature": 0.0},
    {"max_new_tokens": 7},
    {"max_new_tokens": 16},
    {"max_new_tokens": 3},
    {"max_new_tokens": 12, "min_p": 0.5, "temperature": 0.0},
]


@pytest.fixture(scope="module")
def lv(tiny_checkpoint: Callable[[int], Path]) -> LlamaVision:
    return LlamaVision.from_pretrained(tiny_checkpoint(11), dtype=torch.float32, prefix_cache_bytes=0)


def fresh(lv: LlamaVision, **engine_options) -> LlamaVision:
    """The same model and processor behind an engine of its own."""
    return LlamaVision(lv.model, lv.processor, lv.generation_config, engine_options=engine_options)


def solo(lv: LlamaVision, chat: list, **options) -> str:
    return fresh(lv, prefix_cache_bytes=0).chat(chat, eos_token_ids=NEVER, **options)


def test_concurrent_requests_equal_each_request_alone(lv: LlamaVision) -> None:
    expected = [solo(lv, c, **o) for c, o in zip(CHATS, OPTIONS)]
    shared = fresh(lv, prefix_cache_bytes=0)
    start = threading.Barrier(len(CHATS))

    def ask(i: int) -> str:
        start.wait()
        return shared.chat(CHATS[i], eos_token_ids=NEVER, **OPTIONS[i])

    with ThreadPoolExecutor(len(CHATS)) as pool:
        got = list(pool.map(ask, range(len(CHATS))))
    assert got == expected
    assert shared.engine.stats()["running"] == 0


def test_requests_share_decode_steps(lv: LlamaVision) -> None:
    """Requests added together are decoded together: one step advances every running row."""
    engine = Engine(lv.model, background=False, prefix_cache_bytes=0)
    config = GenerationConfig(max_new_tokens=6, eos_token_ids=NEVER)
    requests = [engine.add_request(lv.processor.chat_inputs([c]), config) for c in CHATS[:4]]
    steps = 1
    while engine.step():  # False once nothing runs or waits any more
        steps += 1
    assert steps == 5  # the first token of each comes from its prefill, then 5 shared steps
    assert all(len(r.tokens) == 6 and r.finish_reason == "length" for r in requests)


def alone(lv: LlamaVision, inputs: dict[str, torch.Tensor], config: GenerationConfig) -> list[int]:
    """The tokens of one request on an engine of its own, without prefix reuse."""
    return Engine(lv.model, background=False, prefix_cache_bytes=0).add_request(inputs, config).result()


def test_requests_arriving_together_are_prefilled_together(lv: LlamaVision, monkeypatch) -> None:
    """8 requests at once, image and text, different lengths, follow-up turns (prefix hits) among fresh
    ones: one vision call with only the fresh requests' real images, one multi-row prefill, and each
    request's tokens equal to its run alone."""
    engine = Engine(lv.model, background=False, prefix_cache_bytes=64 << 20)
    first_turns = [CHATS[0], CHATS[4], CHATS[1]]  # image A, image B, text: they go to the prefix store
    follow_ups = []
    for chat in first_turns:
        answer = engine.add_request(lv.processor.chat_inputs([chat]), GenerationConfig(max_new_tokens=4))
        text = lv.tokenizer.decode(answer.result(), skip_special_tokens=True)
        follow_ups.append([*chat, {"role": "assistant", "content": text}, user("And then?")])
    chats = [
        *follow_ups,
        CHATS[2],
        CHATS[5],
        CHATS[7],
        [user("New.", random_image(80, 80, seed=3))],
        CHATS[6],
    ]
    configs = [
        GenerationConfig(max_new_tokens=n, eos_token_ids=NEVER, repetition_penalty=p)
        for n, p in zip([6, 9, 4, 7, 12, 5, 8, 3], [1.0, 1.0, 1.3, 1.0, 1.0, 1.2, 1.0, 1.0])
    ]
    inputs = [lv.processor.chat_inputs([c]) for c in chats]
    expected = [alone(lv, i, c) for i, c in zip(inputs, configs)]
    prefills, encoded = [], []
    real_prefill, real_encode = lv.model.prefill, lv.model.encode_images

    def prefill(ids, cache, rows, starts, lengths, images):
        prefills.append((ids.shape, starts, lengths))
        return real_prefill(ids, cache, rows, starts, lengths, images)

    monkeypatch.setattr(lv.model, "prefill", prefill)
    monkeypatch.setattr(
        lv.model, "encode_images", lambda px, *a: encoded.append(px.shape[1]) or real_encode(px, *a)
    )
    requests = [engine.add_request(i, c) for i, c in zip(inputs, configs)]
    while engine.step():
        pass
    assert [r.tokens for r in requests] == expected
    assert len(prefills) == 1 and prefills[0][0][0] == 8  # one prefill of 8 rows
    shape, starts, lengths = prefills[0]
    assert shape[1] == max(lengths) and len(set(lengths)) > 1  # right-padded to the longest
    assert all(s > 0 for s in starts[:3]) and 0 in starts[3:]  # the follow-ups continue their prefixes
    assert encoded == [2 + 2 + 1]  # the fresh requests' real images only: A+B, B+B, the new one


def test_an_idle_engine_prefills_a_burst_at_once_a_busy_one_within_its_budget(
    lv: LlamaVision, monkeypatch
) -> None:
    """`prefill_tokens_per_step` protects rows that decode. With none decoding, waiting image requests
    are prefilled together (only their prompt tokens count, the vision tower runs in calls within the
    budget); while rows decode, image requests over the budget join one per step. Tokens equal alone."""
    burst = [CHATS[0], CHATS[4], [user("And this one?", IMAGE_B)], [user("Once more.", IMAGE_A)]]
    late = [[user("Late.", IMAGE_A)], [user("Later.", IMAGE_B)]]
    inputs = [lv.processor.chat_inputs([c]) for c in burst + late]
    budget = sum(i["input_ids"].shape[1] for i in inputs[:4])  # the burst's prompts, under 2 images
    assert budget < 2 * lv.engine.image_tokens_per_image + min(i["input_ids"].shape[1] for i in inputs)
    config = GenerationConfig(max_new_tokens=6, eos_token_ids=NEVER)
    expected = [alone(lv, i, config) for i in inputs]
    prefills, encoded = [], []
    real_prefill, real_encode = lv.model.prefill, lv.model.encode_images
    monkeypatch.setattr(
        lv.model, "prefill", lambda ids, *a: prefills.append(ids.shape[0]) or real_prefill(ids, *a)
    )
    monkeypatch.setattr(
        lv.model, "encode_images", lambda px, *a: encoded.append(px.shape[1]) or real_encode(px, *a)
    )
    engine = Engine(lv.model, background=False, prefix_cache_bytes=0, prefill_tokens_per_step=budget)
    requests = [engine.add_request(i, config) for i in inputs[:4]]
    engine.step()
    assert prefills == [4] and encoded == [1, 1, 1, 1]  # one prefill; each vision call within the budget
    requests += [engine.add_request(i, config) for i in inputs[4:]]
    engine.step()
    engine.step()
    assert prefills == [4, 1, 1]  # the burst decodes meanwhile: one late image request per step
    while engine.step():
        pass
    assert [r.tokens for r in requests] == expected


def test_a_batch_reaches_an_idle_engine_at_once(lv: LlamaVision, monkeypatch) -> None:
    """`Engine.tokens` queues its rows together, so the background loop prefills them in one go."""
    inputs = lv.processor.chat_inputs([CHATS[0], CHATS[4], CHATS[1], CHATS[2]])
    prefills = []
    real_prefill = lv.model.prefill
    monkeypatch.setattr(
        lv.model, "prefill", lambda ids, *a: prefills.append(ids.shape[0]) or real_prefill(ids, *a)
    )
    engine = Engine(lv.model, prefix_cache_bytes=0)
    try:
        steps = list(engine.tokens(inputs, GenerationConfig(max_new_tokens=3, eos_token_ids=NEVER)))
    finally:
        engine.close()
    assert len(steps) == 3 and prefills == [4]


def test_a_failing_request_in_a_batched_prefill_fails_alone(lv: LlamaVision) -> None:
    engine = Engine(lv.model, background=False, prefix_cache_bytes=0)
    config = GenerationConfig(max_new_tokens=5, eos_token_ids=NEVER)
    good = [lv.processor.chat_inputs([c]) for c in (CHATS[0], CHATS[1])]
    bad_inputs = lv.processor.chat_inputs([CHATS[4]])
    bad_inputs["aspect_ratio_ids"] = torch.full_like(bad_inputs["aspect_ratio_ids"], 99)  # no such row
    first, bad, second = (engine.add_request(i, config) for i in (good[0], bad_inputs, good[1]))
    engine.step()  # all three admitted together; the batch fails, then each runs alone
    with pytest.raises(IndexError):
        bad.result()
    assert [first.result(), second.result()] == [alone(lv, i, config) for i in good]


def test_seeded_sampling_is_the_same_under_load(lv: LlamaVision) -> None:
    sampled = {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 12, "seed": 5}
    alone = solo(lv, CHATS[0], **sampled)
    assert alone != solo(lv, CHATS[0], **dict(sampled, seed=6))
    shared = fresh(lv, prefix_cache_bytes=0)
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(shared.chat, c, eos_token_ids=NEVER, max_new_tokens=10) for c in CHATS[1:4]]
        mine = shared.chat(CHATS[0], eos_token_ids=NEVER, **sampled)
        [f.result() for f in others]
    assert mine == alone


def test_cancelling_a_stream_frees_its_row_and_leaves_the_others_unchanged(lv: LlamaVision) -> None:
    expected = [solo(lv, c, max_new_tokens=20) for c in CHATS[:3]]
    shared = fresh(lv, prefix_cache_bytes=0)
    answers = [shared.submit(c, eos_token_ids=NEVER, max_new_tokens=20) for c in CHATS[:3]]
    victim = iter(answers[1])
    next(victim)
    victim.close()  # the client went away mid-answer
    deadline = time.monotonic() + 10
    while answers[1].finish_reason is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert answers[1].finish_reason == "cancelled"  # at the next step boundary, its row freed
    assert (
        answers[1].request.row is not None
        and shared.engine._rows[answers[1].request.row] is not answers[1].request
    )
    assert answers[1].completion_tokens < 20
    assert [answers[0].result(), answers[2].result()] == [expected[0], expected[2]]


def test_follow_up_turns_reuse_the_prefix_and_equal_fresh_runs(lv: LlamaVision, monkeypatch) -> None:
    reusing = fresh(lv, prefix_cache_bytes=64 << 20)
    options = {"max_new_tokens": 8, "eos_token_ids": NEVER}
    conversation = [user("What is in this picture?", IMAGE_A)]
    prefilled: list[int] = []
    encoded: list[int] = []
    model = lv.model
    real_prefill, real_encode = model.prefill, model.encode_images

    def prefill(ids, cache, *args, **kwargs):
        if cache is reusing.engine._cache:  # this engine's work only (the fresh runs share the model)
            prefilled.append(ids.shape[1])
        return real_prefill(ids, cache, *args, **kwargs)

    def encode(pixels, *args):
        encoded.append(pixels.shape[1])
        return real_encode(pixels, *args)

    monkeypatch.setattr(model, "prefill", prefill)
    for turn, question in enumerate(["What is in this picture?", "And its colour?", "Is it big?"]):
        if turn:
            conversation = [*conversation, user(question)]
        prefilled.clear()
        encoded.clear()
        monkeypatch.setattr(model, "encode_images", encode)
        running = reusing.submit(conversation, **options)
        answer = running.result()
        monkeypatch.setattr(model, "encode_images", real_encode)
        assert len(prefilled) == 1 and encoded == (
            [1] if turn == 0 else []
        )  # follow-ups skip the vision tower
        if turn:
            assert prefilled[0] < running.prompt_tokens / 2  # only the new part of the prompt ran
        assert answer == solo(lv, conversation, max_new_tokens=8)
        conversation = [*conversation, {"role": "assistant", "content": answer}]
    assert reusing.engine.prefixes.nbytes <= 64 << 20


def test_the_prefix_store_keeps_to_its_budget(lv: LlamaVision) -> None:
    tiny_budget = fresh(lv, prefix_cache_bytes=300_000)
    for chat in CHATS[:6]:
        tiny_budget.chat(chat, max_new_tokens=4, eos_token_ids=NEVER)
        store = tiny_budget.engine.prefixes
        assert store.nbytes <= 300_000
        assert store.nbytes == sum(s.nbytes for s in store.entries.values())
    assert 0 < len(store.entries) < 6  # some were evicted, least recently used first


def test_only_real_images_are_encoded_and_logits_are_unchanged(lv: LlamaVision, monkeypatch) -> None:
    """1 image row + 7 text rows: the vision tower sees one image, not eight; each row's first-token
    distribution equals the full batch forward's (which encodes the padding images and masks them)."""
    chats = [CHATS[0]] + [[user(f"Question number {i} about nothing.")] for i in range(7)]
    inputs = lv.processor.chat_inputs(chats)
    with torch.no_grad():
        full = lv.model(**inputs)[:, -1].log_softmax(-1)  # B V, padding images encoded
    seen = []
    real = lv.model.vision_model.forward
    monkeypatch.setattr(
        lv.model.vision_model, "forward", lambda px, *a: seen.append(tuple(px.shape[:2])) or real(px, *a)
    )
    engine = Engine(lv.model, prefix_cache_bytes=0)
    config = GenerationConfig(max_new_tokens=1, eos_token_ids=NEVER)
    from llama_vision.engine import split_rows

    requests = [engine.add_request(row, config, logprobs=3) for row in split_rows(inputs)]
    for b, r in enumerate(requests):
        r.result()
        token, logprob = r.logprobs[0].token, r.logprobs[0].logprob
        assert token == int(full[b].argmax())
        torch.testing.assert_close(torch.tensor(logprob), full[b, token], rtol=1e-4, atol=1e-4)
        assert [t for t, _ in r.logprobs[0].top] == full[b].topk(3).indices.tolist()
    assert seen == [(1, 1)]


def test_right_padding_decodes_each_rows_last_token(lv: LlamaVision) -> None:
    config = GenerationConfig(max_new_tokens=6, eos_token_ids=NEVER)
    prompts = [lv.processor.apply_chat_template(c) for c in (CHATS[0], CHATS[1])]
    images = [[IMAGE_A], []]
    left = lv.processor(text=prompts, images=images)
    right = lv.processor(text=prompts, images=images, padding_side="right")
    assert not torch.equal(left["input_ids"], right["input_ids"])
    assert torch.equal(
        torch.stack(list(lv.engine.tokens(right, config)), 1),
        torch.stack(list(lv.engine.tokens(left, config)), 1),
    )


def test_limits_queue_and_requests_that_never_fit(lv: LlamaVision) -> None:
    inputs = lv.processor.chat_inputs([CHATS[1]])
    T = inputs["input_ids"].shape[1]
    engine = Engine(lv.model, background=False, max_queue=2, max_length=T + 4, max_images=1)
    config = GenerationConfig(max_new_tokens=50, eos_token_ids=NEVER)
    first = engine.add_request(inputs, config)
    assert first.max_new_tokens == 4  # capped by the row's length
    engine.add_request(inputs, config)
    with pytest.raises(QueueFull, match="max_queue"):
        engine.add_request(inputs, config)
    with pytest.raises(ValueError, match=r"this engine's rows hold \d+ \(max_length\)"):
        engine.add_request(lv.processor.chat_inputs([CHATS[6] * 3]), config)
    with pytest.raises(ValueError, match="at most 1 per request"):
        engine.add_request(lv.processor.chat_inputs([CHATS[2]]), config)
    with pytest.raises(ValueError, match="one row"):
        engine.add_request(lv.processor.chat_inputs(CHATS[:2]), config)
    while engine.step():
        pass
    assert first.finish_reason == "length"


def test_a_request_over_the_memory_limits_is_refused_with_its_estimate(lv: LlamaVision) -> None:
    inputs = lv.processor.chat_inputs([CHATS[0]])  # one image
    T = inputs["input_ids"].shape[1]
    config = GenerationConfig(max_new_tokens=20, eos_token_ids=NEVER)
    cost = lv.model.request_cost(T, 20, images=1)
    assert cost.kv_cache > 0 and cost.image_kv > 0 and cost.activations > 0
    fits = Engine(lv.model, background=False, max_request_bytes=cost.total)
    assert len(fits.add_request(inputs, config).result()) == 20  # exactly the estimate: accepted
    tight = Engine(lv.model, background=False, max_request_bytes=cost.total - 1)
    mib = cost.total / 2**20  # about 1 MiB on the tiny model
    with pytest.raises(RequestTooLarge, match=rf"needs about {mib:.2f} MiB \(KV cache .* image keys/values"):
        tight.add_request(inputs, config)
    assert tight.stats()["waiting"] == 0
    small_budget = Engine(lv.model, background=False, max_cache_tokens=T + 10)
    with pytest.raises(
        ValueError,
        match=rf"needs {T + 20} cache tokens.*budget of {T + 10} \(max_cache_tokens\): about "
        r"\d+\.\d\d [KM]iB of keys/values against \d+\.\d\d [KM]iB",
    ):
        small_budget.add_request(inputs, config)
    with pytest.raises(ValueError, match="max_request_bytes must be a positive integer"):
        Engine(lv.model, max_request_bytes=0)


def test_a_request_waits_for_cache_room_then_runs(lv: LlamaVision) -> None:
    """A cache-token budget for one request at a time: the second waits in the queue (first in, first out)."""
    inputs = [lv.processor.chat_inputs([c]) for c in CHATS[:2]]
    need = max(i["input_ids"].shape[1] for i in inputs) + 6
    engine = Engine(lv.model, background=False, max_cache_tokens=need, prefix_cache_bytes=0)
    config = GenerationConfig(max_new_tokens=6, eos_token_ids=NEVER)
    a, b = (engine.add_request(i, config) for i in inputs)
    engine.step()
    assert engine.stats()["running"] == 1 and engine.stats()["waiting"] == 1
    while engine.step():
        pass
    expected = [torch.stack(list(lv.engine.tokens(i, config)))[:, 0].tolist() for i in inputs]
    assert [a.tokens, b.tokens] == expected


def test_queue_timeout_fails_a_request_that_waited_too_long(lv: LlamaVision) -> None:
    engine = Engine(lv.model, background=False, max_batch=1, queue_timeout=0.05)
    config = GenerationConfig(max_new_tokens=3, eos_token_ids=NEVER)
    inputs = lv.processor.chat_inputs([CHATS[5]])
    first, late = engine.add_request(inputs, config), engine.add_request(inputs, config)
    engine.step()
    time.sleep(0.1)
    with pytest.raises(TimeoutError, match="waited more than 0.05 s"):
        late.result()
    assert first.result() and first.finish_reason == "length"


def test_a_failing_request_fails_alone(lv: LlamaVision) -> None:
    shared = fresh(lv)
    good = shared.submit(CHATS[1], max_new_tokens=5, eos_token_ids=NEVER)
    bad_inputs = lv.processor.chat_inputs([CHATS[0]])
    bad_inputs["aspect_ratio_ids"] = torch.full_like(
        bad_inputs["aspect_ratio_ids"], 99
    )  # no such embedding row
    bad = shared.engine.add_request(bad_inputs, GenerationConfig(max_new_tokens=5))
    with pytest.raises(IndexError):
        bad.result()
    assert good.result() == solo(lv, CHATS[1], max_new_tokens=5)
