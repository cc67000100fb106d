"""A `POST /v1/chat/completions` body -> what `LlamaVision.submit` takes, checked field by field.

OpenAI's request shape (https://platform.openai.com/docs/api-reference/chat/create) is the contract.
Every field is checked for its type and range here, and a failure names it (`param`, e.g.
"messages[1].content[0].image_url.url"). A field we do not implement is a 400 that names it, never
silently ignored; the exception is a neutral value that changes nothing (`frequency_penalty: 0`,
`logit_bias: {}`, `tools: []`, `null`), which many client libraries send on every request.

Also accepted, as vLLM does: `top_k`, `min_p` and `repetition_penalty` (the openai client sends them
through `extra_body`). Images come only as `image_url` parts; their URLs are kept here as strings and
turned into decoded images by media.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from llama_vision.server.errors import APIError
from llama_vision.server.settings import Settings

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
SUPPORTED = {
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
    "n", "logprobs", "top_logprobs", "stream", "stream_options", "response_format", "user",
    "top_k", "min_p", "repetition_penalty",
}  # fmt: skip
NEUTRAL = {  # unsupported options that may still be sent with the value that means "off"
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": ({},),
    "tools": ([],),
    "functions": ([],),
    "parallel_tool_calls": (False,),
    "store": (False,),
    "metadata": ({},),
}
MAX_STOP = 4  # OpenAI's limit on stop strings


@dataclass
class ChatRequest:
    """A checked request: OpenAI-shaped messages (image URLs still strings) and our options."""

    messages: list[dict[str, Any]]
    image_urls: list[tuple[str, str]]  # (url, param) in prompt order
    options: dict[str, Any] = field(default_factory=dict)  # GenerationConfig fields
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: off; else how many top alternatives
    response_format: dict[str, Any] | None = None  # json_object / json_schema, None for text
    max_num_tiles: int | None = None


def parse_chat(body: Any, settings: Settings) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name, value in body.items():
        if name in SUPPORTED or value is None:
            continue
        if name in NEUTRAL and any(value == v and type(value) is type(v) for v in NEUTRAL[name]):
            continue
        raise APIError(400, f"unsupported parameter {name!r}", param=name, code="unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError(400, "'model' is required and must be a string", param="model")
    if model != settings.model_name:
        raise APIError(
            404,
            f"the model {model!r} does not exist; this server has {settings.model_name!r}",
            param="model",
            code="model_not_found",
        )
    _optional(body, "user", str)

    messages, urls, tiles = _messages(body.get("messages"), settings)
    request = ChatRequest(messages, urls, max_num_tiles=tiles)
    request.options = _sampling(body, settings)
    request.n = _int(body, "n", 1, 1, settings.max_n)
    request.stream = _optional(body, "stream", bool) or False
    stream_options = _optional(body, "stream_options", dict)
    if stream_options is not None:
        if not request.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
        unknown = sorted(set(stream_options) - {"include_usage"})
        if unknown:
            raise APIError(
                400,
                f"unsupported parameter {unknown[0]!r}",
                param=f"stream_options.{unknown[0]}",
                code="unsupported_parameter",
            )
        include = stream_options.get("include_usage", False)
        if not isinstance(include, bool):
            raise APIError(
                400, "stream_options.include_usage must be a boolean", param="stream_options.include_usage"
            )
        request.include_usage = include
    if _optional(body, "logprobs", bool):
        request.logprobs = _int(body, "top_logprobs", 0, 0, 20)
    elif body.get("top_logprobs") is not None:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    request.response_format = _response_format(body.get("response_format"))
    return request


def _messages(
    messages: Any, settings: Settings
) -> tuple[list[dict[str, Any]], list[tuple[str, str]], int | None]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    out: list[dict[str, Any]] = []
    urls: list[tuple[str, str]] = []
    details: set[str] = set()
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise APIError(
                400, f"{where}.role must be one of {sorted(ROLES)}, got {_short(role)}", param=f"{where}.role"
            )
        for key, value in message.items():
            if (
                key not in ("role", "content")
                and value is not None
                and not (key == "tool_call_id" and role == "tool")
            ):
                raise APIError(
                    400,
                    f"unsupported parameter {key!r} in {where}",
                    param=f"{where}.{key}",
                    code="unsupported_parameter",
                )
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": ROLES[role], "content": content})
            continue
        if not isinstance(content, list) or not content:
            raise APIError(
                400,
                f"{where}.content must be a string or a non-empty list of parts",
                param=f"{where}.content",
            )
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise APIError(400, f"{at}.text must be a string", param=f"{at}.text")
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                if role != "user":
                    raise APIError(400, f"{at}: images are only allowed in user messages", param=at)
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, dict) else None
                if not isinstance(url, str):
                    raise APIError(400, f"{at}.image_url.url must be a string", param=f"{at}.image_url.url")
                detail = image.get("detail") or "auto"
                if detail not in ("auto", "low", "high"):
                    raise APIError(
                        400,
                        f"{at}.image_url.detail must be auto, low or high",
                        param=f"{at}.image_url.detail",
                    )
                details.add("high" if detail == "auto" else detail)
                urls.append((url, f"{at}.image_url.url"))
                parts.append({"type": "image"})  # the decoded image is put here later
            else:
                raise APIError(
                    400, f"{at}.type must be 'text' or 'image_url', got {_short(kind)}", param=f"{at}.type"
                )
        out.append({"role": ROLES[role], "content": parts})
    if len(urls) > settings.max_images_per_request:
        raise APIError(
            400,
            f"the request has {len(urls)} images; this server takes at most {settings.max_images_per_request}",
            param="messages",
            code="too_many_images",
        )
    if len(details) > 1:
        raise APIError(
            400, "all images of a request must have the same detail (low: one tile each)", param="messages"
        )
    return out, urls, (1 if details == {"low"} else None)


def _sampling(body: dict[str, Any], settings: Settings) -> dict[str, Any]:
    limit = settings.max_tokens
    max_tokens = _int(body, "max_tokens", None, 1, limit)
    max_completion = _int(body, "max_completion_tokens", None, 1, limit)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise APIError(
            400, "max_tokens and max_completion_tokens disagree; give one", param="max_completion_tokens"
        )
    options: dict[str, Any] = {
        "max_new_tokens": max_completion or max_tokens or min(settings.default_max_tokens, limit),
        "temperature": _float(body, "temperature", 0.0, 2.0),
        "top_p": _float(body, "top_p", 0.0, 1.0),
        "min_p": _float(body, "min_p", 0.0, 1.0),
        "repetition_penalty": _float(body, "repetition_penalty", 0.0, 10.0),
        "top_k": _int(body, "top_k", None, 0, 1 << 20),
        "seed": _int(body, "seed", None, -(1 << 63), (1 << 63) - 1),  # int64, as OpenAI
    }
    if options["top_p"] == 0.0:
        options["top_p"], options["temperature"] = None, 0.0  # only the most probable token survives
    if options["repetition_penalty"] == 0.0:
        raise APIError(400, "repetition_penalty must be above 0", param="repetition_penalty")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if (
            not isinstance(stop, list)
            or not all(isinstance(s, str) and s for s in stop)
            or len(stop) > MAX_STOP
        ):
            raise APIError(
                400, f"stop must be a non-empty string or a list of at most {MAX_STOP} of them", param="stop"
            )
        options["stop"] = tuple(stop)
    return {k: v for k, v in options.items() if v is not None}


def _response_format(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise APIError(
                400,
                "response_format.json_schema must be an object with a 'name'",
                param="response_format.json_schema",
            )
        if not isinstance(spec.get("schema", {}), (dict, bool)):
            raise APIError(
                400,
                "response_format.json_schema.schema must be a JSON schema object",
                param="response_format.json_schema.schema",
            )
        return {"type": "json_schema", "json_schema": spec}
    raise APIError(
        400, "response_format.type must be text, json_object or json_schema", param="response_format.type"
    )


def _optional(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise APIError(
            400,
            f"{name} must be a {kind.__name__.replace('str', 'string').replace('bool', 'boolean').replace('dict', 'object')}",
            param=name,
        )
    return value


def _int(body: dict[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise APIError(
            400, f"{name} must be an integer from {low} to {high}, got {_short(value)}", param=name
        )
    return value


def _float(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise APIError(
            400, f"{name} must be a number from {low:g} to {high:g}, got {_short(value)}", param=name
        )
    return float(value)


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."
