"""Tokenizers of the text-only Llama family: the 32,000-piece SentencePiece model of Llama 1 and 2 and the
128,256-token tiktoken vocabulary of Llama 3 (3.0 to 3.3), behind one `TextTokenizer` with the interface
the engine and the streaming code use (`encode`, `decode`, `is_special`, `stop_ids`, ...).

Files read, in this order: `tokenizer.json` (the `tokenizers` library; every hub Llama repo ships one),
else `tokenizer.model`, which is Meta's SentencePiece protobuf for Llama 1/2 (read by `sentencepiece`,
an optional dependency: `pip install llama-vision[sentencepiece]`) or base64 BPE ranks for Llama 3 (read
by tiktoken, as tokenizer.py does for the vision model).

Non-obvious choices:
- `encode` treats its text as plain text by default: a user who types `</s>` or `<|eot_id|>` gets those
  characters, not a control token. `parse_special=True` is for prompts rendered from a chat template.
- SentencePiece ids equal `SentencePieceProcessor.encode` (and HF's LlamaTokenizer): each text segment
  gets the dummy-prefix space `▁`, as Meta encodes each dialog turn separately.
- SentencePiece-style vocabularies (Llama 1/2, either file) are decoded piece by piece (`▁` -> space,
  `<0xNN>` -> byte), keeping every token's leading space: the streaming code decodes a few tokens at a
  time, and SentencePiece's own decode drops the leading space of every call. `decode` drops one space
  at the start only when asked (`strip_prefix_space`), the way SentencePiece decodes a whole answer.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llama_vision.tokenizer import Tokenizer, _HFBackend, _TiktokenBackend

SP_BOS, SP_EOS, SP_UNK = "<s>", "</s>", "<unk>"
_LLAMA3_STOPS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
_LLAMA3_PAD = "<|finetune_right_pad_id|>"


def load_sentencepiece(path: Path) -> Any:  # -> sentencepiece.SentencePieceProcessor
    try:
        import sentencepiece
    except ImportError:
        raise ValueError(
            f"{path} is a SentencePiece model (Llama 1/2); reading it needs the sentencepiece package: "
            "pip install 'llama-vision[sentencepiece]' (or give the checkpoint's tokenizer.json)"
        ) from None
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except Exception as e:  # OSError or RuntimeError from the C++ side, for a corrupt file
        raise ValueError(f"cannot read SentencePiece model {path}: {e}") from e
    return processor


class _SentencePieceBackend:
    def __init__(self, path: Path) -> None:
        self.sp = load_sentencepiece(path)
        self.size = self.sp.get_piece_size()
        special = [i for i in range(self.size) if self.sp.is_control(i) or self.sp.is_unknown(i)]
        self.special_tokens = {self.sp.id_to_piece(i): i for i in special}

    def encode(self, text: str, parse_special: bool) -> list[int]:
        if not parse_special:
            return self.sp.encode(text) if text else []
        ids: list[int] = []
        for piece in _split_special(text, self.special_tokens):
            ids += [self.special_tokens[piece]] if piece in self.special_tokens else self.sp.encode(piece)
        return ids

    def id_to_token(self, i: int) -> str | None:
        return self.sp.id_to_piece(i) if 0 <= i < self.size else None

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != SP_UNK else i


def _split_special(text: str, special: dict[str, int]) -> list[str]:
    """`text` cut into special-token strings and the plain segments between them (empty ones dropped)."""
    names = sorted(special, key=len, reverse=True)
    out, start, i = [], 0, 0
    while i < len(text):
        hit = next((n for n in names if text.startswith(n, i)), None)
        if hit is None:
            i += 1
            continue
        if i > start:
            out.append(text[start:i])
        out.append(hit)
        i = start = i + len(hit)
    if start < len(text):
        out.append(text[start:])
    return out


class TextTokenizer(Tokenizer):
    """Text <-> ids for a text-only Llama checkpoint. Build with `from_dir` (tokenizer.json, else
    tokenizer.model) or `from_file`. Shares `Tokenizer`'s lookups (`token_to_id`, `id_to_token`,
    `is_special`, `len`); has its own files, special tokens, `encode` and `decode`."""

    def __init__(self, backend: _SentencePieceBackend | _HFBackend | _TiktokenBackend, path: Path) -> None:
        # Not Tokenizer.__init__: that one requires the vision model's special tokens.
        self._backend = backend
        self.path = path
        self.special_tokens: dict[str, int] = dict(backend.special_tokens)
        self._special_ids = frozenset(self.special_tokens.values())
        self._lock = threading.Lock()  # the tokenizers backend switches special parsing per call
        self.sentencepiece = SP_BOS in self.special_tokens  # Llama 1/2 vocabulary, from either file
        names = (SP_BOS, SP_EOS) if self.sentencepiece else ("<|begin_of_text|>", "<|end_of_text|>")
        missing = [n for n in names if n not in self.special_tokens]
        if missing:
            raise ValueError(f"{path}: not a Llama tokenizer, missing special tokens {missing}")
        self.bos_id, self.eos_id = (self.special_tokens[n] for n in names)
        stops = (SP_EOS,) if self.sentencepiece else _LLAMA3_STOPS
        self.stop_ids: tuple[int, ...] = tuple(
            self.special_tokens[n] for n in stops if n in self.special_tokens
        )
        self.pad_id = self.special_tokens.get(_LLAMA3_PAD, self.eos_id)  # padding is masked: any id works

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        """A `*.json` file with `tokenizers`; a tokenizer.model as SentencePiece or tiktoken ranks."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer file not found: {path}")
        if path.suffix == ".json":
            return cls(_HFBackend(path), path)
        if is_sentencepiece_file(path):
            return cls(_SentencePieceBackend(path), path)
        return cls(_TiktokenBackend(path), path)

    def encode(
        self, text: str, *, bos: bool = False, eos: bool = False, parse_special: bool = False
    ) -> list[int]:
        """Ids of `text`, plain text unless `parse_special` (then special-token strings become their ids)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        backend = self._backend
        if isinstance(backend, _SentencePieceBackend):
            ids = backend.encode(text, parse_special)
        elif isinstance(backend, _TiktokenBackend):
            ids = (
                backend.encoding.encode(text, allowed_special="all")
                if parse_special
                else backend.encoding.encode(text, disallowed_special=())
            )
        else:
            with self._lock:
                backend.tokenizer.encode_special_tokens = not parse_special
                ids = backend.tokenizer.encode(text, add_special_tokens=False).ids
                backend.tokenizer.encode_special_tokens = False
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(
        self, ids: Sequence[int], *, skip_special_tokens: bool = False, strip_prefix_space: bool = False
    ) -> str:
        """Text of `ids`; bytes that do not form whole UTF-8 characters become U+FFFD."""
        ids, size = [int(i) for i in ids], len(self)
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise ValueError(f"token ids out of range [0, {size}): {bad[:5]}")
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        if not self.sentencepiece:
            return self._backend.decode(ids)
        text = _pieces_to_text([self._backend.id_to_token(i) or "" for i in ids])
        return text[1:] if strip_prefix_space and text.startswith(" ") else text

    def __repr__(self) -> str:
        return f"TextTokenizer({str(self.path)!r}, {len(self)} tokens)"


def _pieces_to_text(pieces: Sequence[str]) -> str:
    """SentencePiece pieces to text: `▁` is a space, `<0xNN>` one byte (byte fallback)."""
    data = bytearray()
    for piece in pieces:
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            data.append(int(piece[3:5], 16))
        else:
            data += piece.replace("\u2581", " ").encode("utf-8")
    return data.decode("utf-8", errors="replace")


def is_sentencepiece_file(path: Path) -> bool:
    """Whether a tokenizer.model is SentencePiece's binary protobuf rather than tiktoken's text lines
    (`base64-token rank`, Llama 3)."""
    with open(path, "rb") as f:
        first = f.readline(1024)
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", first) is None
