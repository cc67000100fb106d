"""The Llama 3.2 Vision chat prompt: messages -> segments of text, each marked as written by the chat
format (special-token strings in it are control tokens) or taken from a message (plain text, always).

Messages have the common shape `{"role": ..., "content": str | [{"type": "image", "image": ...},
{"type": "text", "text": ...}]}`. Without a template we write Meta's official format
(llama-models `llama3/chat_format.py`, `llama3_2/vision_prompt_format.md`):

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n<|image|>Describe this image<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n

(one line here, no newline after `<|eot_id|>`). Each image item becomes `<|image|>` where it stands in the
content list; role "tool" is written "ipython", as Meta does. A checkpoint's own jinja template (from
tokenizer_config.json, chat_template.json or chat_template.jinja) can be rendered instead, in a bounded
sandbox (template.py).

Non-obvious choices:
- Message text never becomes control tokens: a user who writes `<|eot_id|><|start_header_id|>system...`
  or asks about `<|image|>` gets those characters encoded as text (`Tokenizer.encode(special=False)`).
  Only the format's own pieces are parsed for special tokens. `chat_segments` gives the pieces in order;
  `Processor.encode_chat` encodes each alone, which is exactly Meta's `ChatFormat` (it encodes the
  header's role, its "\\n\\n" and each text item separately, the text with `allowed_special=set()`).
  `render_chat` joins them into one string for display; tokenizing that string whole is the raw path and
  would parse special-token strings a user typed.
- A template is rendered twice: once with every string of the messages (but roles and item types)
  replaced by a unique random marker, which shows what the template itself writes and where each
  message string goes, and once with the real strings. The marked output is split at the markers; the
  real output then tells what the template made of each string (kept, trimmed, JSON-escaped), matched
  only against those few variants of the string itself, so a user's text can never be taken for the
  template's. A template that changes the text in other ways (slices it, changes case) gets the text as
  written, in the template's places; one that breaks the markers apart is an error. Whitespace-only
  strings are left in place (no special token holds whitespace).
- Templates come from the hub and are untrusted code: they see a plain-data copy of the messages (images
  replaced by "<TypeName>" placeholders, like transformers does), so no object with methods reaches them.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from llama_vision import template as jinja_template
from llama_vision.tokenizer import BOS, END_HEADER, EOS, EOT, IMAGE, START_HEADER
from llama_vision.validate import describe

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
            raise ValueError(
                f"{where}: unknown role {describe(message.get('role'))}, expected one of {list(ROLES)}"
            )
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
                    f"{where}, item {j}: expected a dict with 'type' 'text' or 'image', got {describe(item)}"
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


class Segment(NamedTuple):
    """A piece of the prompt: `special` when the chat format wrote it (special-token strings in it are
    control tokens), not when it comes from a message (plain text)."""

    text: str
    special: bool


def chat_segments(
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    bos_token: str = BOS,
    eos_token: str = EOS,
) -> list[Segment]:
    """The prompt for `messages` in pieces: the checkpoint's `chat_template` if given, else Meta's official
    format. `add_generation_prompt` ends it with an open assistant header for the model to complete.
    `eos_token` is for templates (Llama 2's end each answer with it)."""
    validate_messages(messages)
    if chat_template is not None:
        return _template_segments(chat_template, messages, add_generation_prompt, bos_token, eos_token)

    def header(role: str) -> list[Segment]:
        return [
            Segment(START_HEADER, True),
            Segment(role, False),
            Segment(END_HEADER, True),
            Segment("\n\n", False),
        ]

    segments = [Segment(bos_token, True)] if bos_token else []
    for message in messages:
        content = message["content"]
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        segments += header(ROLES[message["role"]])
        for item in items:
            segments.append(Segment(IMAGE, True) if item["type"] == "image" else Segment(item["text"], False))
        segments.append(Segment(EOT, True))
    if add_generation_prompt:
        segments += header("assistant")
    return [s for s in segments if s.text]


def render_chat(
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    bos_token: str = BOS,
    eos_token: str = EOS,
) -> str:
    """The prompt for `messages` as one string (to show it; `Processor.encode_chat` to encode it)."""
    validate_messages(messages)
    if chat_template is not None:
        plain = _plain(list(messages))
        return _render(chat_template, plain, add_generation_prompt, bos_token, eos_token, _text_chars(plain))
    segments = chat_segments(messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token)
    return "".join(s.text for s in segments)


def load_chat_template(directory: str | Path) -> str | None:
    """The template a Hugging Face checkpoint directory ships, or None. Looks in chat_template.jinja,
    chat_template.json, then tokenizer_config.json (whose template may be a list of named ones: "default")."""
    directory = Path(directory)
    if (directory / "chat_template.jinja").is_file():
        path = directory / "chat_template.jinja"
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the chat template {path}: {e}") from e
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise ValueError(f"cannot read a chat template from {path}: {e}") from e
        template = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(template, list):
            named = [t for t in template if isinstance(t, dict) and isinstance(t.get("name"), str)]
            if len(named) != len(template):
                raise ValueError(
                    f"{path}: chat_template must be a string or a list of {{'name', 'template'}} objects"
                )
            template = next((t.get("template") for t in named if t["name"] == "default"), None)
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{path}: chat_template must be a string, got {type(template).__name__}")
        if template is not None:
            return template
    return None


def _plain(value: Any, mark: Callable[[str], str] | None = None, key: str | None = None) -> Any:
    """A copy made of JSON types only; anything else (an image, a tensor) becomes "<TypeName>". With
    `mark`, every string but roles and item types is replaced by `mark(string)`."""
    if type(value) is str:
        return value if mark is None or key in ("role", "type") else mark(value)
    if value is None or type(value) in (int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, mark, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, mark) for v in value]
    return f"<{type(value).__name__}>"


def _text_chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_chars(v) for v in value.values())
    if isinstance(value, list):
        return sum(_text_chars(v) for v in value)
    return 0


def _render(
    template: str,
    messages: list,
    add_generation_prompt: bool,
    bos_token: str,
    eos_token: str,
    text_chars: int,
) -> str:
    # tools/documents are passed as None: templates test `tools is not none`, which an undefined passes.
    return jinja_template.render(
        template,
        text_chars,
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
        tools=None,
        documents=None,
    )


def _template_segments(
    template: str, messages: Sequence[Message], add_generation_prompt: bool, bos_token: str, eos_token: str
) -> list[Segment]:
    """Render with markers in place of the message strings, split at them (module docstring)."""
    nonce = secrets.token_hex(8)
    strings: list[str] = []

    def mark(text: str) -> str:
        if not text.strip():
            return text  # whitespace holds no special token: leave it where the template puts it
        strings.append(text)
        return f"lv{nonce}m{len(strings) - 1}e"

    truth = _plain(list(messages))
    chars = _text_chars(truth)
    marked = _render(
        template, _plain(list(messages), mark), add_generation_prompt, bos_token, eos_token, chars
    )
    pieces = re.split(f"lv{nonce}m(\\d+)e", marked)
    parts, texts = pieces[0::2], [strings[int(k)] for k in pieces[1::2]]
    if any(nonce in part.lower() for part in parts):
        raise ValueError(
            "chat template: it cuts or rewrites message text, so the text cannot be kept apart from the "
            "template's special tokens; render the prompt yourself and pass it as processor(text=...)"
        )
    if texts:
        rendered = _render(template, truth, add_generation_prompt, bos_token, eos_token, chars)
        spans = _align(rendered, parts, texts)
        texts = texts if spans is None else spans
    segments = [Segment(parts[0], True)]
    for text, part in zip(texts, parts[1:]):
        segments += [Segment(text, False), Segment(part, True)]
    return [s for s in segments if s.text]


def _align(truth: str, parts: list[str], texts: list[str]) -> list[str] | None:
    """What the real rendering `truth` holds in place of each marker: a variant of that marker's own
    text (as is, trimmed, JSON-escaped) followed by the next template part; None if `truth` is not
    `parts` and such variants interleaved."""
    spans, at = [], 0
    for i, text in enumerate(texts):
        if not truth.startswith(parts[i], at):
            return None
        at += len(parts[i])
        variants = (
            text,
            text.strip(),
            text.lstrip(),
            text.rstrip(),
            json.dumps(text, ensure_ascii=False)[1:-1],
        )
        for variant in dict.fromkeys((*variants, json.dumps(text)[1:-1])):
            if truth.startswith(variant, at) and truth.startswith(parts[i + 1], at + len(variant)):
                spans.append(variant)
                at += len(variant)
                break
        else:
            return None
    return spans if truth[at:] == parts[-1] else None
