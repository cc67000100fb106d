"""Images of a request: `data:` URLs, and remote URLs only when an operator allows their hosts.

`MediaLoader.load(url, param)` returns a decoded RGB PIL image or raises an `APIError`; the model
only ever receives that image, never a string (the Python API would open a string as a local path).

Data URLs: `data:image/<type>;base64,<data>`; the encoded length is checked against the byte cap before
decoding the base64, and the pixel count is read from the image header before any pixel is decoded
(`load_image(..., max_pixels=...)`), so neither a huge body nor a decompression bomb ever allocates.

Remote URLs follow the lessons of vLLM's CVE-2025-6242 (server-side request forgery):
- refused unless `allowed_media_domains` is set; then only hosts on that list (exact names), https only
  unless `allow_http_media`; `file://`, other schemes, user:password@ and odd ports' schemes are refused;
- every hop is checked, redirects are never followed by httpx itself: each Location is checked like the
  first URL (scheme, host on the list), at most `media_max_redirects` of them;
- the host's addresses are resolved here and each one must be public (not loopback, private, link-local,
  multicast, reserved, unspecified, shared/CGNAT, nor an IPv4-mapped/6to4 form of those); the connection
  then goes to the address that was checked (the URL is rewritten to it, with the Host header and TLS
  server name kept), so a second DNS answer cannot point it elsewhere (DNS rebinding);
- a byte cap enforced while downloading (and on Content-Length up front), connect and read timeouts and a
  deadline for the whole download; proxies and .netrc from the environment are ignored.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
import time
from collections.abc import Callable

import httpx
from PIL import Image

from llama_vision.encoders.image_transform import load_image
from llama_vision.server.errors import APIError
from llama_vision.server.settings import Settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]  # (host, port) -> IP addresses as strings

IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp")
_DATA_URL = re.compile(
    r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I
)
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: not "private" to Python, not public


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def is_public(address: Address) -> bool:
    """Whether an address may be fetched from: globally routable, and no mapped form of one that is not."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if embedded is not None and not is_public(embedded):
            return False
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED:
        return False
    bad = (
        address.is_loopback
        or address.is_private
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )
    return address.is_global and not bad


class _CheckedTransport(httpx.HTTPTransport):
    """Resolves the host itself, refuses non-public addresses, and connects to the address it checked."""

    def __init__(self, resolve: Resolver, allowed: Callable[[Address], bool], **kwargs) -> None:
        super().__init__(**kwargs)
        self.resolve, self.allowed = resolve, allowed

    def _resolve(self, host: str, port: int) -> list[Address]:
        try:
            addresses = [ipaddress.ip_address(a.split("%")[0]) for a in self.resolve(host, port)]
        except (OSError, UnicodeError, ValueError):
            addresses = []
        if not addresses:
            raise _Refused(f"cannot resolve the image host {host!r}")
        return addresses

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        port = request.url.port or (443 if request.url.scheme == "https" else 80)
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            addresses = self._resolve(host, port)
        refused = [str(a) for a in addresses if not self.allowed(a)]
        if refused:
            raise _Refused(
                f"the image host {host!r} resolves to a non-public address ({refused[0]}): refused"
            )
        request.url = request.url.copy_with(host=str(addresses[0]))
        request.headers["Host"] = host if request.url.port is None else f"{host}:{request.url.port}"
        if request.url.scheme == "https":
            request.extensions = {**request.extensions, "sni_hostname": host}
        return super().handle_request(request)


class _Refused(Exception):
    """A remote image refused by a check (raised inside the transport, where no APIError belongs)."""


class MediaLoader:
    """Turns a request's image URLs into images, under the settings' limits. `resolve` and `allowed`
    (which addresses may be fetched from) are the system resolver and `is_public` unless a test
    replaces them."""

    def __init__(
        self,
        settings: Settings,
        resolve: Resolver = system_resolver,
        allowed: Callable[[Address], bool] = is_public,
    ) -> None:
        self.settings = settings
        timeout = httpx.Timeout(settings.media_read_timeout, connect=settings.media_connect_timeout)
        self.client = httpx.Client(
            transport=_CheckedTransport(resolve, allowed),
            timeout=timeout,
            follow_redirects=False,
            trust_env=False,  # no proxy or .netrc from the environment
            headers={"User-Agent": "llama-vision-server", "Accept": "image/*"},
        )

    def close(self) -> None:
        self.client.close()

    def load(self, url: str, param: str) -> Image.Image:
        if url[:5].lower() == "data:":
            return self.decode(self.data_url_bytes(url, param), param)
        return self.decode(self.fetch(url, param), param)

    def data_url_bytes(self, url: str, param: str) -> bytes:
        header = _DATA_URL.match(url)
        if header is None or not header.group("b64"):
            raise APIError(
                400,
                "an image data URL must look like data:image/png;base64,<data>",
                param=param,
                code="invalid_image_url",
            )
        kind = (header.group("type") or "").lower()
        if kind not in IMAGE_TYPES:
            raise APIError(
                400,
                f"the data URL holds {kind or 'no media type'!r}, not an image ({', '.join(IMAGE_TYPES)})",
                param=param,
                code="invalid_image_format",
            )
        data = url[header.end() :]
        if len(data) * 3 // 4 > self.settings.media_max_bytes:
            raise APIError(
                413,
                f"the image is larger than {self.settings.media_max_bytes} bytes",
                param=param,
                code="image_too_large",
            )
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(
                422, "the image data URL is not valid base64", param=param, code="invalid_base64"
            ) from None

    def decode(self, data: bytes, param: str) -> Image.Image:
        try:
            return load_image(data, max_pixels=self.settings.max_image_pixels)
        except ValueError as e:
            status = 413 if "exceeds max_pixels" in str(e) or "decompression bomb" in str(e) else 422
            message = str(e).replace("image bytes: ", "the image: ")
            raise APIError(status, message, param=param, code="invalid_image") from None

    # ------------------------------------------------------------------ remote URLs

    def fetch(self, url: str, param: str) -> bytes:
        s = self.settings
        if not s.allowed_media_domains:
            raise APIError(
                400,
                "remote image URLs are disabled on this server: send the image as a data URL",
                param=param,
                code="media_url_refused",
            )
        deadline = time.monotonic() + s.media_read_timeout
        for _ in range(s.media_max_redirects + 1):
            target = self._check_url(url, param)
            try:
                with self.client.stream("GET", target) as response:
                    if response.is_redirect:
                        location = response.headers.get("Location", "")
                        url = str(target.join(location))
                        continue
                    if response.status_code != 200:
                        raise APIError(
                            400,
                            f"fetching the image gave HTTP {response.status_code}",
                            param=param,
                            code="media_fetch_failed",
                        )
                    return self._read(response, deadline, param)
            except _Refused as e:
                raise APIError(400, str(e), param=param, code="media_url_refused") from None
            except httpx.TimeoutException:
                raise APIError(
                    400, "fetching the image timed out", param=param, code="media_fetch_timeout"
                ) from None
            except httpx.HTTPError as e:
                raise APIError(
                    400,
                    f"fetching the image failed ({type(e).__name__})",
                    param=param,
                    code="media_fetch_failed",
                ) from None
        raise APIError(
            400,
            f"the image URL redirects more than {s.media_max_redirects} times",
            param=param,
            code="media_url_refused",
        )

    def _check_url(self, url: str, param: str) -> httpx.URL:
        try:
            target = httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError):
            raise APIError(
                400, "the image URL is not a valid URL", param=param, code="invalid_image_url"
            ) from None
        schemes = ("https", "http") if self.settings.allow_http_media else ("https",)
        if target.scheme not in schemes:
            raise APIError(
                400,
                f"image URLs must use {' or '.join(schemes)}, got {target.scheme or 'no scheme'!r}",
                param=param,
                code="media_url_refused",
            )
        if target.userinfo:
            raise APIError(
                400, "image URLs must not carry credentials", param=param, code="media_url_refused"
            )
        host = (target.host or "").lower().rstrip(".")
        if host not in self.settings.allowed_media_domains:
            raise APIError(
                400,
                f"the image host {host!r} is not on this server's allowed media domains",
                param=param,
                code="media_url_refused",
            )
        return target

    def _read(self, response: httpx.Response, deadline: float, param: str) -> bytes:
        cap = self.settings.media_max_bytes
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            raise APIError(413, f"the image is larger than {cap} bytes", param=param, code="image_too_large")
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > cap:
                raise APIError(
                    413, f"the image is larger than {cap} bytes", param=param, code="image_too_large"
                )
            if time.monotonic() > deadline:
                raise APIError(400, "fetching the image timed out", param=param, code="media_fetch_timeout")
            chunks.append(chunk)
        return b"".join(chunks)
