"""The Llama 3.2 Vision chat prompt: messages -> prompt string (tokenize it with `Tokenizer.encode`).

Messages have the common shape `{"role": ..., "content": str | [{"type": "image", "image": ...},
{"type": "text", "text": ...}]}`. Without a template we write Meta's official format
(llama-models `llama3/chat_format.py`, `llama3_2/vision_prompt_format.md`):

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n<|image|>Describe this image<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n

(one line here, no newline after `<|eot_id|>`). Each image item becomes `<|image|>` where it stands in the
content list; role "tool" is written "ipython", as Meta does. A checkpoint's own jinja template (from
tokenizer_config.json, chat_template.json or chat_template.jinja) can be rendered instead, in jinja2's
immutable sandbox with the helpers transformers gives templates (`raise_exception`, `strftime_now`, a
non-escaping `tojson`, `loopcontrols`, trimmed blocks).

Non-obvious choices:
- We render a string and tokenize it once; Meta tokenizes each header, text item and "\\n\\n" separately.
  The ids agree except where two pieces would merge across a boundary: a content that starts with a
  newline (it joins the header's "\\n\\n"), or two adjacent text items (their edges are tokenized together).
- Templates come from the hub and are untrusted code: they see a plain-data copy of the messages (images
  replaced by "<TypeName>" placeholders, like transformers does), so no object with methods reaches them,
  and every template failure surfaces as ValueError. Touching an unsafe attribute (`''.__class__`) fails
  instead of printing nothing, as jinja's sandbox would.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tokenizer import BOS, END_HEADER, EOS, EOT, IMAGE, START_HEADER

# Role in the messages -> role written in the header.
ROLES = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "ipython",
    "ipython": "ipython",
}

Message = Mapping[str, Any]


def validate_messages(messages: Sequence[Message]) -> None:
    """Raise ValueError naming the first malformed message (by index) and what is wrong with it."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        where = f"message {i}"
        if not isinstance(message, Mapping):
            raise ValueError(
                f"{where}: expected a dict with 'role' and 'content', got {type(message).__name__}"
            )
        if message.get("role") not in ROLES:
            raise ValueError(f"{where}: unknown role {message.get('role')!r}, expected one of {list(ROLES)}")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise ValueError(
                f"{where}: content must be a str or a list of items, got {type(content).__name__}"
            )
        for j, item in enumerate(content):
            kind = item.get("type") if isinstance(item, Mapping) else None
            if kind == "text" and not isinstance(item.get("text"), str):
                raise ValueError(f"{where}, item {j}: a text item needs a 'text' string")
            if kind not in ("text", "image"):
                raise ValueError(
                    f"{where}, item {j}: expected a dict with 'type' 'text' or 'image', got {item!r}"
                )


def collect_images(messages: Sequence[Message]) -> list[Any]:
    """The objects of the image items that carry an "image" key, in prompt order."""
    validate_messages(messages)
    return [
        item["image"]
        for message in messages
        if isinstance(message["content"], list)
        for item in message["content"]
        if item["type"] == "image" and "image" in item
    ]


def render_chat(
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    bos_token: str = BOS,
    eos_token: str = EOS,
) -> str:
    """The prompt for `messages`: the checkpoint's `chat_template` if given, else Meta's official format.
    `add_generation_prompt` ends it with an open assistant header for the model to complete."""
    validate_messages(messages)
    if chat_template is not None:
        return _render_template(chat_template, messages, add_generation_prompt, bos_token, eos_token)

    def header(role: str) -> str:
        return f"{START_HEADER}{role}{END_HEADER}\n\n"

    parts = [bos_token]
    for message in messages:
        content = message["content"]
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        parts.append(header(ROLES[message["role"]]))
        parts.extend(IMAGE if item["type"] == "image" else item["text"] for item in items)
        parts.append(EOT)
    if add_generation_prompt:
        parts.append(header("assistant"))
    return "".join(parts)


def load_chat_template(directory: str | Path) -> str | None:
    """The template a Hugging Face checkpoint directory ships, or None. Looks in chat_template.jinja,
    chat_template.json, then tokenizer_config.json (whose template may be a list of named ones: "default")."""
    directory = Path(directory)
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = directory / name
        if not path.is_file():
            continue
        try:
            template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except (ValueError, AttributeError) as e:
            raise ValueError(f"cannot read a chat template from {path}: {e}") from e
        if isinstance(template, list):
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if template is not None:
            return template
    return None


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kwargs: Any) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kwargs)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Sandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # Jinja returns an undefined that prints as "" (`{{ ''.__class__ }}` renders nothing); fail loudly instead.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


@cache
def _compile(template: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env.from_string(template)


def _plain(value: Any) -> Any:
    """A copy made of JSON types only; anything else (an image, a tensor) becomes "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def _render_template(
    template: str,
    messages: Sequence[Message],
    add_generation_prompt: bool,
    bos_token: str,
    eos_token: str = EOS,  # Llama 2 templates end each answer with it
) -> str:
    try:
        # tools/documents are passed as None: templates test `tools is not none`, which an undefined passes.
        return _compile(template).render(
            messages=_plain(list(messages)),
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            tools=None,
            documents=None,
        )
    except jinja2.TemplateError as e:  # syntax errors, raise_exception, sandbox SecurityError
        raise ValueError(f"chat template: {e}") from e
    except Exception as e:  # a template can also fail inside Python operations (a str + a list, ...)
        raise ValueError(f"chat template failed: {type(e).__name__}: {e}") from e
