"""Remote image URLs: refused unless allowed, and with an allow-list every check proven against a local
HTTP server on 127.0.0.1 (the only traffic these tests make): names resolving to loopback or private
addresses, redirects to them or off the list, too many redirects, oversized and slow bodies, schemes,
credentials. Names are resolved by a fake resolver, so no DNS query leaves the machine."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import openai
import pytest
from reference import random_image
from serving import ImageHost, encode, reply, running

from llama_vision import LlamaVision
from llama_vision.server import MediaLoader, Settings, create_app
from llama_vision.server.errors import APIError
from llama_vision.server.media import is_public

IMAGE = random_image(40, 30, seed=9)
PNG = encode(IMAGE)
LOOPBACK = ipaddress.ip_address("127.0.0.1")
NAMES = {
    "images.test": ["127.0.0.1"],  # the test host, let through by `loose` only
    "internal.test": ["10.20.30.40"],
    "mixed.test": ["93.184.216.34", "127.0.0.1"],  # one public, one not (a rebinding attempt)
    "metadata.test": ["169.254.169.254"],
    "mapped.test": ["::ffff:127.0.0.1"],
}
SETTINGS = Settings(
    allowed_media_domains=("images.test", "internal.test", "mixed.test", "metadata.test", "mapped.test"),
    allow_http_media=True,
    media_max_bytes=50_000,
    media_connect_timeout=0.5,
    media_read_timeout=0.5,
)


def resolve(host: str, port: int) -> list[str]:
    if host not in NAMES:
        raise OSError("no such name")
    return NAMES[host]


def chunked_body(h: BaseHTTPRequestHandler) -> None:  # no Content-Length: the cap must hold while reading
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.end_headers()
    for _ in range(100):
        h.wfile.write(b"\0" * 1000)


@pytest.fixture(scope="module")
def host() -> Iterator[ImageHost]:
    routes = {
        "/cat.png": reply(200, PNG, {"Content-Type": "image/png"}),
        "/big.png": reply(200, b"\0" * 60_000, {"Content-Type": "image/png"}),
        "/chunked.png": chunked_body,
        "/slow.png": reply(200, PNG, {"Content-Type": "image/png"}, delay=2.0),
        "/missing.png": reply(404),
        "/hop3": reply(302, headers={"Location": "/hop2"}),
        "/hop2": reply(302, headers={"Location": "/hop1"}),
        "/hop1": reply(302, headers={"Location": "/cat.png"}),
        "/hop4": reply(302, headers={"Location": "/hop3"}),
    }
    server = ImageHost(routes)
    port = server.port
    routes["/to-private"] = reply(302, headers={"Location": f"http://internal.test:{port}/cat.png"})
    routes["/to-private-ip"] = reply(302, headers={"Location": f"http://10.0.0.1:{port}/cat.png"})
    routes["/to-offlist"] = reply(302, headers={"Location": f"http://evil.example:{port}/cat.png"})
    routes["/to-file"] = reply(302, headers={"Location": "file:///etc/passwd"})
    yield server
    server.close()


def loose(settings: Settings = SETTINGS) -> MediaLoader:
    """Lets 127.0.0.1 through (our test host plays a public server); every other check as deployed."""
    return MediaLoader(settings, resolve=resolve, allowed=lambda a: a == LOOPBACK or is_public(a))


def url(host: ImageHost, path: str, name: str = "images.test") -> str:
    return f"http://{name}:{host.port}{path}"


def refused(loader: MediaLoader, target: str, match: str, status: int = 400) -> None:
    with pytest.raises(APIError, match=match) as caught:
        loader.load(target, "image")
    assert caught.value.status == status and caught.value.param == "image"


def test_fetch_through_the_checks(host: ImageHost) -> None:
    image = loose().load(url(host, "/cat.png"), "image")
    assert image.size == IMAGE.size and image.tobytes() == IMAGE.tobytes()
    assert host.seen[-1] == ("/cat.png", f"images.test:{host.port}")  # sent to the checked address, Host kept
    assert loose().load(url(host, "/hop3"), "image").size == IMAGE.size  # three redirects are allowed


def test_refused_by_default_and_off_the_list(host: ImageHost) -> None:
    seen = len(host.seen)
    refused(MediaLoader(Settings(), resolve=resolve), url(host, "/cat.png"), "remote image URLs are disabled")
    refused(loose(), url(host, "/cat.png", "other.test"), "not on this server's allowed media domains")
    https_only = Settings(allowed_media_domains=("images.test",))
    refused(loose(https_only), url(host, "/cat.png"), "must use https, got 'http'")
    for target in [
        "file:///etc/passwd",
        "ftp://images.test/x.png",
        "gopher://images.test/",
        "/etc/passwd",
        "cat.png",
    ]:
        refused(loose(), target, "must use")
    refused(loose(), f"http://user:pw@images.test:{host.port}/cat.png", "credentials")
    assert len(host.seen) == seen  # none of these reached the network


@pytest.mark.parametrize(
    "name, address",
    [("images.test", "127.0.0.1"), ("internal.test", "10.20.30.40"), ("mixed.test", "127.0.0.1"),
     ("metadata.test", "169.254.169.254"), ("mapped.test", "::ffff:7f00:1")],
)  # fmt: skip
def test_names_resolving_to_non_public_addresses(host: ImageHost, name: str, address: str) -> None:
    seen = len(host.seen)
    strict = MediaLoader(SETTINGS, resolve=resolve)  # the deployed address check
    refused(strict, url(host, "/cat.png", name), f"non-public address \\({re.escape(address)}\\)")
    assert len(host.seen) == seen  # refused before connecting


def test_redirects_are_checked_hop_by_hop(host: ImageHost) -> None:
    refused(loose(), url(host, "/to-private"), "resolves to a non-public address")
    refused(loose(), url(host, "/to-private-ip"), "'10.0.0.1' is not on this server's allowed media domains")
    refused(loose(), url(host, "/to-offlist"), "'evil.example' is not on")
    refused(loose(), url(host, "/to-file"), "must use")
    refused(loose(), url(host, "/hop4"), "redirects more than 3 times")
    assert not any(path == "/cat.png" and h.startswith("evil") for path, h in host.seen)


def test_size_and_time_limits(host: ImageHost) -> None:
    refused(loose(), url(host, "/big.png"), "larger than 50000 bytes", 413)
    refused(loose(), url(host, "/chunked.png"), "larger than 50000 bytes", 413)
    refused(loose(), url(host, "/slow.png"), "timed out")
    refused(loose(), url(host, "/missing.png"), "HTTP 404")


def test_is_public() -> None:
    for address in ["8.8.8.8", "93.184.216.34", "2606:4700::1111"]:
        assert is_public(ipaddress.ip_address(address)), address
    for address in [
        "127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
        "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "ff02::1",
        "::ffff:10.0.0.1", "2002:7f00:1::",  # 6to4 of 127.0.0.1
    ]:  # fmt: skip
        assert not is_public(ipaddress.ip_address(address)), address


def test_server_fetches_allowed_urls(tiny_checkpoint: Callable[[int], Path], host: ImageHost) -> None:
    lv = LlamaVision.from_pretrained(tiny_checkpoint(3))
    app = create_app(lv, Settings(model_name="tiny", **_media_fields()), media=loose())
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url(host, "/cat.png")}},
                                             {"type": "text", "text": "What is this?"}]}]  # fmt: skip
    with running(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
        expected = [
            {"role": "user", "content": [{"type": "image", "image": IMAGE}, messages[0]["content"][1]]}
        ]
        assert answer.choices[0].message.content == lv.chat(expected, max_new_tokens=6, temperature=0)
        messages[0]["content"][0]["image_url"]["url"] = url(host, "/to-private")
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=6)
        assert caught.value.code == "media_url_refused"
        assert caught.value.body["param"] == "messages[0].content[0].image_url.url"


def _media_fields() -> dict:
    return {
        name: getattr(SETTINGS, name)
        for name in ("allowed_media_domains", "allow_http_media", "media_max_bytes", "media_read_timeout")
    }
