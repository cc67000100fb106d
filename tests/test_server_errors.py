"""Malformed and hostile requests: each gets the right status and an OpenAI-shaped error that leaks
nothing (no addresses, paths, reprs, tracebacks), and the server keeps answering afterwards."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from reference import random_image
from serving import data_url, running

from llama_vision import LlamaVision
from llama_vision.server import Settings, create_app
from llama_vision.server.errors import clean

KEY = "sk-hostile-test"
MODEL = "tiny"
SETTINGS = Settings(
    model_name=MODEL, api_keys=(KEY,), max_body_bytes=256 << 10, max_prompt_tokens=200, max_tokens=64, max_n=4
)


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Callable[[int], Path]) -> Iterator[str]:
    lv = LlamaVision.from_pretrained(tiny_checkpoint(3), max_batch=4)
    with running(create_app(lv, SETTINGS)) as url:
        yield url


def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A valid 1x1 PNG whose header claims width x height pixels (a few hundred bytes on the wire)."""
    out = io.BytesIO()
    random_image(1, 1).save(out, format="PNG")
    data = bytearray(out.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def b64(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, **fields}


def image_message(url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}],
        }
    ]


GOOD_IMAGE = data_url(random_image(20, 20))
AUTH = {"Authorization": f"Bearer {KEY}"}
# (name, body (dict, or bytes sent raw), headers, status, param)
CASES = [
    ("bad JSON", b'{"model": "tiny", "messages": [', AUTH, 400, None),
    ("body not an object", b"[1, 2, 3]", AUTH, 400, None),
    ("not UTF-8", b"\xff\xfe{}", AUTH, 400, None),
    ("deeply nested JSON", b"[" * 100_000 + b"]" * 100_000, AUTH, 400, None),
    ("NaN temperature", b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', AUTH, 400, "temperature"),
    ("no messages", {"model": MODEL}, AUTH, 400, "messages"),
    ("empty messages", chat(messages=[]), AUTH, 400, "messages"),
    ("messages a string", chat(messages="hi"), AUTH, 400, "messages"),
    ("message not an object", chat(messages=["hi"]), AUTH, 400, "messages[0]"),
    ("unknown role", chat(messages=[{"role": "wizard", "content": "x"}]), AUTH, 400, "messages[0].role"),
    ("content a number", chat(messages=[{"role": "user", "content": 5}]), AUTH, 400, "messages[0].content"),
    ("unknown part type", chat(messages=[{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]), AUTH, 400, "messages[0].content[0].type"),
    ("text not a string", chat(messages=[{"role": "user", "content": [{"type": "text", "text": 3}]}]), AUTH, 400, "messages[0].content[0].text"),
    ("image in an assistant turn", chat(messages=[{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": GOOD_IMAGE}}]}]), AUTH, 400, "messages[0].content[0]"),
    ("too many images", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": GOOD_IMAGE}}] * 3}]), AUTH, 400, "messages"),
    ("message name", chat(messages=[{"role": "user", "content": "x", "name": "bob"}]), AUTH, 400, "messages[0].name"),
    ("huge body", chat(messages=[{"role": "user", "content": "x" * (300 << 10)}]), AUTH, 413, None),
    ("decompression bomb", chat(messages=image_message(b64(png_bomb()))), AUTH, 413, "messages[0].content[0].image_url.url"),
    ("non-image data URL", chat(messages=image_message(b64(b"hello", "text/plain"))), AUTH, 400, "messages[0].content[0].image_url.url"),
    ("bad base64", chat(messages=image_message("data:image/png;base64,***not base64***")), AUTH, 422, "messages[0].content[0].image_url.url"),
    ("not an image", chat(messages=image_message(b64(b"\x89PNG but not really"))), AUTH, 422, "messages[0].content[0].image_url.url"),
    ("remote URL refused by default", chat(messages=image_message("https://example.com/cat.png")), AUTH, 400, "messages[0].content[0].image_url.url"),
    ("file URL", chat(messages=image_message("file:///etc/passwd")), AUTH, 400, "messages[0].content[0].image_url.url"),
    ("local path", chat(messages=image_message("/etc/passwd")), AUTH, 400, "messages[0].content[0].image_url.url"),
    ("temperature out of range", chat(temperature=5), AUTH, 400, "temperature"),
    ("temperature a string", chat(temperature="hot"), AUTH, 400, "temperature"),
    ("max_tokens zero", chat(max_tokens=0), AUTH, 400, "max_tokens"),
    ("max_tokens over the limit", chat(max_tokens=65), AUTH, 400, "max_tokens"),
    ("max_tokens and max_completion_tokens disagree", chat(max_completion_tokens=3), AUTH, 400, "max_completion_tokens"),
    ("n too large", chat(n=5), AUTH, 400, "n"),
    ("top_logprobs too large", chat(logprobs=True, top_logprobs=21), AUTH, 400, "top_logprobs"),
    ("top_logprobs without logprobs", chat(top_logprobs=2), AUTH, 400, "top_logprobs"),
    ("seed a float", chat(seed=1.5), AUTH, 400, "seed"),
    ("five stop strings", chat(stop=["a", "b", "c", "d", "e"]), AUTH, 400, "stop"),
    ("stream_options without stream", chat(stream_options={"include_usage": True}), AUTH, 400, "stream_options"),
    ("unsupported option", chat(tools=[{"type": "function", "function": {"name": "f"}}]), AUTH, 400, "tools"),
    ("unsupported value of a neutral option", chat(frequency_penalty=0.5), AUTH, 400, "frequency_penalty"),
    ("unknown response_format", chat(response_format={"type": "xml"}), AUTH, 400, "response_format.type"),
    ("invalid JSON schema", chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}), AUTH, 400, "response_format"),
    ("unknown model", chat(model="gpt-4o"), AUTH, 404, "model"),
    ("over-long prompt", chat(messages=[{"role": "user", "content": "word " * 400}]), AUTH, 400, "messages"),
    ("missing API key", chat(), {}, 401, None),
    ("wrong API key", chat(), {"Authorization": "Bearer sk-wrong"}, 401, None),
    ("key without Bearer", chat(), {"Authorization": KEY}, 401, None),
]  # fmt: skip


@pytest.mark.parametrize("name, body, headers, status, param", CASES, ids=[c[0] for c in CASES])
def test_hostile_request(server: str, name: str, body, headers: dict, status: int, param: str | None) -> None:
    url = f"{server}/v1/chat/completions"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={**headers, "Content-Type": "application/json"}, timeout=30)
    else:
        r = httpx.post(url, json=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert error["param"] == param
    assert_clean(error["message"])


def test_other_routes_and_methods(server: str) -> None:
    for method, path, status in [("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405), ("GET", "/docs", 404), ("GET", "/openapi.json", 404)]:  # fmt: skip
        r = httpx.request(method, f"{server}{path}", headers=AUTH)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{server}/v1/nothing").status_code == 401  # unknown routes are behind the key too
    assert httpx.get(f"{server}/metrics").status_code == 401


def test_chunked_body_over_the_limit(server: str) -> None:
    def chunks():  # no Content-Length: the limit is enforced while the bytes arrive
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(300):
            yield b"x" * 1024
        yield b'"}]}'

    r = httpx.post(f"{server}/v1/chat/completions", content=chunks(), headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_still_serving_after_the_hostile_requests(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(
        model=MODEL, messages=image_message(GOOD_IMAGE), max_tokens=4, temperature=0
    )
    assert reply.usage.completion_tokens == 4
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="unsupported parameter 'presence_penalty'"):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], presence_penalty=1.0
        )


def test_queue_full_is_429(tiny_checkpoint: Callable[[int], Path]) -> None:
    lv = LlamaVision.from_pretrained(tiny_checkpoint(3), max_batch=1, max_queue=1)
    with running(create_app(lv, Settings(model_name=MODEL))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        long = dict(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2000, stream=True)
        first = client.chat.completions.create(**long)  # holds the one row
        next(iter(first))
        second = client.chat.completions.create(**long)  # waits in the one queue slot
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2
            )
        assert caught.value.status_code == 429 and caught.value.code == "queue_full"
        first.close()
        second.close()


def assert_clean(message: str) -> None:
    assert (
        "0x" not in message
        and "Traceback" not in message
        and "/tmp" not in message
        and "/work" not in message
    )
    assert "<" not in message.replace("<path>", "") and len(message) <= 300


def test_clean_strips_internals() -> None:
    raw = "cannot use <PIL.Image.Image image mode=RGB size=2x2 at 0x7F3A2B1C> from /home/me/secret/file.py line 3"
    assert clean(raw) == "cannot use <PIL.Image.Image image mode=RGB size=2x2> from <path> line 3"
    assert clean("see https://example.com/a/b.png") == "see https://example.com/a/b.png"
    assert len(clean("x" * 1000)) == 300
