"""Chat prompts and model inputs for the text-only Llama family: Llama 2's `[INST]` / `<<SYS>>` format,
Llama 3's headers, or the checkpoint's own chat template; `TextProcessor` turns messages into
`input_ids` / `attention_mask` as the vision `Processor` does, and refuses images.

The two built-in formats build token ids piece by piece, as Meta's references do, so text inside a
message is always plain text (a `</s>` or `<|eot_id|>` typed by a user stays characters):
- Llama 2 (Meta's `llama/generation.py` `chat_completion`): a first system message is folded into the
  first user message as `<<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user}`; then every user/assistant pair is
  `<s>[INST] {user} [/INST] {answer} </s>` and the last user message `<s>[INST] {user} [/INST]`, each
  piece encoded separately (so each gets SentencePiece's dummy-prefix space), contents stripped.
  Roles must alternate user, assistant, ..., ending with user.
- Llama 3 (llama-models `llama3/chat_format.py` `encode_dialog_prompt`): `<|begin_of_text|>`, then per
  message `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`, then the open assistant
  header. Contents are not stripped (Meta does not).

A checkpoint's template (chat.py's sandboxed jinja, with `bos_token` and `eos_token` of this
vocabulary) is rendered to a string and tokenized with special tokens parsed, as transformers does;
without one, the family's format is used: Llama 2's for a SentencePiece vocabulary, else Llama 3's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llama_vision.chat import (
    ROLES,
    Message,
    Segment,
    chat_segments,
    load_chat_template,
    render_chat,
    validate_messages,
)
from llama_vision.processor import Processor
from llama_vision.sentencepiece_tokenizer import TextTokenizer, _split_special

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def message_texts(messages: Sequence[Message]) -> list[tuple[str, str]]:
    """(role, text) of each message; an image item is an error (these models read text only)."""
    validate_messages(messages)
    out = []
    for i, message in enumerate(messages):
        content = message["content"]
        if isinstance(content, list):
            if any(item["type"] == "image" for item in content):
                raise ValueError(f"message {i}: this is a text-only model, it takes no images")
            content = "".join(item["text"] for item in content)
        out.append((message["role"], content))
    return out


def llama2_prompt_ids(messages: Sequence[Message], tokenizer: TextTokenizer) -> list[int]:
    """Llama 2's chat prompt as token ids (see the module docstring)."""
    turns = message_texts(messages)
    if turns and turns[0][0] == "system":
        if len(turns) < 2 or turns[1][0] != "user":
            raise ValueError("Llama 2 chat: a system message must be followed by a user message")
        turns = [("user", B_SYS + turns[0][1] + E_SYS + turns[1][1]), *turns[2:]]
    for i, (role, _) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(
                f"Llama 2 chat: message {i} has role {role!r}; after an optional system message, roles must "
                "alternate user, assistant, user, ... (a system message only first)"
            )
    if turns[-1][0] != "user":
        raise ValueError("Llama 2 chat: the last message must be the user's")
    ids: list[int] = []
    for (_, question), (_, answer) in zip(turns[::2], turns[1::2]):
        text = f"{B_INST} {question.strip()} {E_INST} {answer.strip()} "
        ids += tokenizer.encode(text, bos=True, eos=True)
    ids += tokenizer.encode(f"{B_INST} {turns[-1][1].strip()} {E_INST}", bos=True)
    return ids


def llama3_prompt_ids(
    messages: Sequence[Message], tokenizer: TextTokenizer, add_generation_prompt: bool = True
) -> list[int]:
    """Llama 3's chat prompt as token ids (see the module docstring)."""
    special = tokenizer.special_tokens

    def header(role: str) -> list[int]:
        return [
            special["<|start_header_id|>"],
            *tokenizer.encode(role),
            special["<|end_header_id|>"],
            *tokenizer.encode("\n\n"),
        ]

    ids = [tokenizer.bos_id]
    for role, text in message_texts(messages):
        ids += header(ROLES[role]) + tokenizer.encode(text) + [special["<|eot_id|>"]]
    if add_generation_prompt:
        ids += header("assistant")
    return ids


class TextProcessor:
    """Prompts and chat messages to `input_ids` / `attention_mask` (B, T) for a text-only Llama, rows
    left-padded by default; images are refused with a clear error."""

    def __init__(self, tokenizer: TextTokenizer, config: Any, *, chat_template: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, directory: str | Path, config: Any) -> TextProcessor:
        return cls(TextTokenizer.from_dir(directory), config, chat_template=load_chat_template(directory))

    @property
    def format(self) -> str:
        """Which prompt format chat messages get: "template", "llama2" or "llama3"."""
        if self.chat_template is not None:
            return "template"
        return "llama2" if self.tokenizer.sentencepiece else "llama3"

    def chat_ids(self, messages: Sequence[Message]) -> list[int]:
        """The prompt's token ids for chat `messages`, ending where the assistant's answer begins."""
        if self.format == "template":  # message text stays plain text; special tokens come from the template
            tok = self.tokenizer
            segments = chat_segments(
                _string_contents(messages),
                chat_template=self.chat_template,
                bos_token=tok.id_to_token(tok.bos_id),
                eos_token=tok.id_to_token(tok.eos_id),
            )
            ids = _encode_segments(tok, segments)
            return ids if ids[:1] == [tok.bos_id] else [tok.bos_id, *ids]
        if self.format == "llama2":
            return llama2_prompt_ids(messages, self.tokenizer)
        return llama3_prompt_ids(messages, self.tokenizer)

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt as a string (special tokens spelled out)."""
        if self.format == "template":
            tok = self.tokenizer
            return render_chat(
                _string_contents(messages),
                add_generation_prompt=add_generation_prompt,
                chat_template=self.chat_template,
                bos_token=tok.id_to_token(tok.bos_id),
                eos_token=tok.id_to_token(tok.eos_id),
            )
        if self.format == "llama2":
            ids = llama2_prompt_ids(messages, self.tokenizer)
            return self.tokenizer.decode(ids, strip_prefix_space=False)
        return self.tokenizer.decode(llama3_prompt_ids(messages, self.tokenizer, add_generation_prompt))

    def chat_inputs(
        self,
        conversations: Sequence[Sequence[Message]],
        *,
        max_num_tiles: int | None = None,
        padding_side: str = "left",
    ) -> dict[str, torch.Tensor]:
        """Model inputs for a batch of conversations."""
        _no_tiles(max_num_tiles)
        return self._pad([self._check_length(self.chat_ids(m)) for m in conversations], padding_side)

    def __call__(
        self,
        text: str | Sequence[str],
        images: Any = None,
        *,
        max_num_tiles: int | None = None,
        padding_side: str = "left",
    ) -> dict[str, torch.Tensor]:
        """Inputs for prompt strings (special-token strings in them are parsed, as a rendered template has
        them); `<s>` / `<|begin_of_text|>` is put first when a prompt lacks it."""
        if images is not None and images != []:
            raise ValueError("this is a text-only model: it takes no images")
        _no_tiles(max_num_tiles)
        prompts = [text] if isinstance(text, str) else list(text)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("text must be a string or a non-empty list of strings")
        return self._pad([self._check_length(self._encode(p)) for p in prompts], padding_side)

    def _encode(self, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt, parse_special=True)
        return ids if ids[:1] == [self.tokenizer.bos_id] else [self.tokenizer.bos_id, *ids]

    def _check_length(self, ids: list[int]) -> list[int]:
        limit = self.config.text.max_position_embeddings
        if len(ids) > limit:
            raise ValueError(f"prompt has {len(ids)} tokens, more than the model's context of {limit}")
        return ids

    def _pad(self, rows: list[list[int]], side: str) -> dict[str, torch.Tensor]:
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        return Processor._pad(
            self, rows, side
        )  # the vision processor's padding: it reads only tokenizer.pad_id


def _no_tiles(max_num_tiles: int | None) -> None:
    if max_num_tiles is not None:
        raise ValueError("max_num_tiles applies to images; this is a text-only model")


def _string_contents(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """The messages with their text as one string each: hub templates of text models expect that."""
    return [{**m, "content": text} for m, (_, text) in zip(messages, message_texts(messages))]


def _encode_segments(tok: TextTokenizer, segments: Sequence[Segment]) -> list[int]:
    """Ids of a rendered template's pieces: special-token strings only where the template wrote them.

    With SentencePiece, each `encode` call starts a word ("▁"), so the plain text between two special
    tokens is encoded in one call, template text and message text together, as a whole-string encode
    would; the BPE vocabularies encode piece by piece, as Meta's ChatFormat does."""
    if not tok.sentencepiece:
        return [i for s in segments for i in tok.encode(s.text, parse_special=s.special)]
    ids: list[int] = []
    text = ""
    for segment in segments:
        pieces = _split_special(segment.text, tok.special_tokens) if segment.special else [segment.text]
        for piece in pieces:
            if segment.special and piece in tok.special_tokens:
                ids += tok.encode(text) if text else []
                ids.append(tok.special_tokens[piece])
                text = ""
            else:
                text += piece
    return ids + (tok.encode(text) if text else [])
