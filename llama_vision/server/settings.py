"""What a server allows: API keys, CORS origins, remote media, and every limit, with safe defaults.

One frozen dataclass that `llama-vision serve` fills from its flags and `create_app` reads. The
defaults are the secure ones: no remote image URLs (only data URLs), CORS closed, bind to 127.0.0.1 (in
the command), limits on everything a client controls. Sizes are checked before the work they bound:
the body before it is parsed, an image's bytes before they are decoded, its pixel count from the header
before its pixels are, the prompt's tokens before it is queued.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Settings:
    model_name: str = "llama-vision"  # the id /v1/models lists and requests must name
    api_keys: tuple[str, ...] = ()  # empty: no key needed (the command warns when it also binds publicly)
    cors_origins: tuple[str, ...] = ()  # empty: no CORS headers at all
    # Remote images: refused unless the host is listed here; then https only unless allow_http_media.
    allowed_media_domains: tuple[str, ...] = ()
    allow_http_media: bool = False
    media_max_bytes: int = 20 << 20  # an image's encoded bytes, data URL or download
    media_max_redirects: int = 3
    media_connect_timeout: float = 5.0
    media_read_timeout: float = 10.0  # also the whole download's deadline
    # Requests
    max_body_bytes: int = 32 << 20
    max_images_per_request: int = 2
    max_image_pixels: int = 40_000_000  # width x height, read from the header before decoding
    max_prompt_tokens: int = 32_768
    max_tokens: int = 4096  # the most a request may ask for (max_tokens / max_completion_tokens)
    default_max_tokens: int = 512  # when the request gives none (at most max_tokens)
    max_n: int = 8
    request_timeout: float = 600.0  # seconds from arrival to the last token
    grace_period: float = 30.0  # on SIGTERM: how long running requests may take to finish

    def __post_init__(self) -> None:
        for name in (
            "media_max_bytes",
            "max_body_bytes",
            "max_image_pixels",
            "max_prompt_tokens",
            "max_tokens",
            "default_max_tokens",
            "max_n",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_images_per_request < 0 or self.media_max_redirects < 0:
            raise ValueError("max_images_per_request and media_max_redirects must not be negative")
        for name in ("media_connect_timeout", "media_read_timeout", "request_timeout", "grace_period"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {getattr(self, name)!r}")
        if any(not key for key in self.api_keys):
            raise ValueError("an API key must not be empty")
        object.__setattr__(
            self, "allowed_media_domains", tuple(d.lower().strip(".") for d in self.allowed_media_domains)
        )
