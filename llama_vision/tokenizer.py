"""Llama 3 byte-level BPE tokenizer for Llama 3.2 Vision, read from either file a checkpoint ships.

- `tokenizer.json` (Hugging Face checkpoints) is run by the `tokenizers` library.
- `tokenizer.model` (Meta's checkpoints; also `llama_models/llama3/tokenizer.model`) holds base64 BPE
  ranks and is run by `tiktoken` with the Llama 3 pre-tokenizer regex and the special tokens numbered
  from the end of the ranks, as in Meta's `llama_models/llama3/tokenizer.py`.

Both backends give the same ids for every text, special-token strings included, and those ids are the
model's input ids. Non-obvious choices:
- `<|image|>` is 128256, the model's input id (the first learnable embedding row). Meta's tiktoken table
  numbers it 128011 and rewrites it to 128256 in `ChatFormat`; the Hugging Face tokenizer.json numbers it
  128256 and calls 128011 `<|reserved_special_token_2|>`. The tiktoken backend follows the Hugging Face
  table: ids 128000-128010 as Meta, 128011-128255 `<|reserved_special_token_2..246|>`, 128256
  `<|image|>`. Meta's reserved names are therefore shifted by one id (its `<|reserved_special_token_2|>`
  is 128012); reserved tokens are never used by the model.
- `encode(text, special=...)` says where the text comes from. `special=True` (the default, Meta's
  `allowed_special="all"`) parses special-token strings into their ids: for prompts written by a chat
  format or template, or by a caller who means them. `special=False` encodes every character as text,
  special-token strings included (Meta's `allowed_special=set()`, which its `ChatFormat` uses for message
  text): for anything that comes from users. Both backends agree on both; for `tokenizers` the plain path
  runs a copy of tokenizer.json without its special added tokens.
- `encode` never adds `<|begin_of_text|>` on its own (a tokenizer.json post-processor would); ask with
  `bos=True`, or let the chat template write it.
- Long inputs are cut into pieces exactly as Meta's `Tokenizer.encode` cuts them (slices of 400,000
  characters, then no more than 25,000 consecutive whitespace or non-whitespace characters per piece)
  and each piece is encoded alone, in both backends. This gives Meta's ids on every input and keeps both
  libraries inside what they handle: tiktoken's regex runs out of backtracking stack on a million spaces,
  and `tokenizers`' panics on ten million.
- Text that is not well-formed Unicode (lone surrogates, which is how Python keeps undecodable bytes) is
  encoded as tiktoken does it in both backends: lone surrogates become U+FFFD.
- `id_to_token` / `token_to_id` use the byte-level spelling of tokenizer.json (GPT-2's byte-to-unicode
  map, "Ġhello" for " hello") for both backends.
- Loading never touches the network: the ranks file is parsed here, not through tiktoken's download cache.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import tiktoken
import tokenizers

# Llama 3 pre-tokenizer: contractions, words with one leading non-letter, numbers in groups of at most
# three digits, punctuation runs, newline runs, and whitespace (a run keeps its last space for the next word).
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
EOT = "<|eot_id|>"
EOM = "<|eom_id|>"
PAD = "<|finetune_right_pad_id|>"
PYTHON_TAG = "<|python_tag|>"
IMAGE = "<|image|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"

# Special tokens in id order after the last BPE rank (Hugging Face numbering, see the module docstring).
_NAMED_SPECIAL = [
    BOS,
    EOS,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    PAD,
    "<|step_id|>",
    START_HEADER,
    END_HEADER,
    EOM,
    EOT,
    PYTHON_TAG,
]
# Meta's cutting of long inputs (llama_models/llama3/tokenizer.py): slices of this many characters ...
SLICE_CHARS = 400_000
# ... and within each, pieces of at most this many consecutive whitespace or non-whitespace characters.
MAX_RUN_CHARS = 25_000
# A run longer than MAX_RUN_CHARS, matched only from its first character (the lookbehinds) so that the
# search stays linear in the text's length.
_LONG_RUN = re.compile(rf"(?<!\s)\s{{{MAX_RUN_CHARS + 1},}}|(?<!\S)\S{{{MAX_RUN_CHARS + 1},}}")

SPECIAL_TOKENS = [*_NAMED_SPECIAL, *(f"<|reserved_special_token_{i}|>" for i in range(2, 247)), IMAGE]
_REQUIRED = (BOS, EOS, EOT, EOM, PAD, PYTHON_TAG, IMAGE, START_HEADER, END_HEADER)


@cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, the spelling of tokenizer.json vocabularies."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@cache
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in _byte_to_unicode().items()}


def _read_bpe_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken ranks file: one `base64-token rank` pair a line; ranks must be 0..n-1."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read tiktoken BPE ranks from {path}: {e}") from e
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise ValueError(f"{path} line {number}: not a `base64-token rank` pair ({e})") from e
    if not ranks:
        raise ValueError(f"{path}: no BPE ranks in the file")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: BPE ranks are not the distinct numbers 0..{len(ranks) - 1}")
    return ranks


class _TiktokenBackend:
    def __init__(self, path: Path) -> None:
        self.ranks = _read_bpe_ranks(path)
        self.special_tokens = {name: len(self.ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding(
            name=path.name,
            pat_str=PRETOKENIZE_REGEX,
            mergeable_ranks=self.ranks,
            special_tokens=self.special_tokens,
        )
        self.size = len(self.ranks) + len(self.special_tokens)
        self._bytes = {i: b for b, i in self.ranks.items()}
        self._special_names = {i: name for name, i in self.special_tokens.items()}
        self.longest_token = max(max(map(len, self.ranks)), max(map(len, self.special_tokens)))

    def encode(self, text: str, special: bool) -> list[int]:
        if special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids, errors="replace")

    def id_to_token(self, i: int) -> str | None:
        if i in self._special_names:
            return self._special_names[i]
        data = self._bytes.get(i)
        return None if data is None else "".join(_byte_to_unicode()[b] for b in data)

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        table = _unicode_to_byte()
        if any(c not in table for c in token):
            return None
        return self.ranks.get(bytes(table[c] for c in token))


class _HFBackend:
    def __init__(self, path: Path) -> None:
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for any malformed file
            raise ValueError(f"cannot read tokenizer.json {path}: {e}") from e
        added = self.tokenizer.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in sorted(added.items()) if t.special}
        self.size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        # The same model and pre-tokenizer (shared, not copied) without the special added tokens, so
        # "<|eot_id|>" in a text is encoded as the characters it is made of, as tiktoken's plain path does.
        self.plain = tokenizers.Tokenizer(self.tokenizer.model)
        self.plain.pre_tokenizer = self.tokenizer.pre_tokenizer
        if self.tokenizer.normalizer is not None:
            self.plain.normalizer = self.tokenizer.normalizer
        self.plain.add_tokens([t for t in added.values() if not t.special])
        # Byte-level spelling: one character per byte, so the longest spelling is the longest token.
        self.longest_token = max(len(t) for t in self.tokenizer.get_vocab(with_added_tokens=True))

    def encode(self, text: str, special: bool) -> list[int]:
        tokenizer = self.tokenizer if special else self.plain
        try:
            # No post-processor: a hub tokenizer.json would prepend <|begin_of_text|> on its own.
            return tokenizer.encode(text, add_special_tokens=False).ids
        except BaseException as e:
            # A Rust panic arrives as pyo3's PanicException, which is not an Exception subclass.
            if type(e).__name__ != "PanicException":
                raise
            raise ValueError(f"tokenizers failed on a text of {len(text)} characters: {e}") from None

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def id_to_token(self, i: int) -> str | None:
        return self.tokenizer.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


def well_formed(text: str) -> str:
    """`text` with lone surrogates replaced by U+FFFD and surrogate pairs joined, as tiktoken does."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def pieces(text: str) -> list[str]:
    """`text` cut where Meta's tokenizer cuts it (SLICE_CHARS, MAX_RUN_CHARS); usually `[text]`."""
    out = []
    for start in range(0, len(text), SLICE_CHARS):
        part, cut = text[start : start + SLICE_CHARS], 0
        for run in _LONG_RUN.finditer(part):
            for at in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                out.append(part[cut:at])
                cut = at
        out.append(part[cut:])
    return out


class Tokenizer:
    """Text <-> model input ids for Llama 3.2 Vision. Build with `from_file` or `from_dir`."""

    def __init__(self, backend: _TiktokenBackend | _HFBackend, path: Path) -> None:
        self._backend = backend
        self.path = path
        self.special_tokens: dict[str, int] = dict(backend.special_tokens)
        missing = [name for name in _REQUIRED if name not in self.special_tokens]
        if missing:
            raise ValueError(f"{path}: not a Llama 3.2 Vision tokenizer, missing special tokens {missing}")
        self._special_ids = frozenset(self.special_tokens.values())
        self.bos_id = self.special_tokens[BOS]
        self.eos_id = self.special_tokens[EOS]
        self.eot_id = self.special_tokens[EOT]
        self.eom_id = self.special_tokens[EOM]
        self.pad_id = self.special_tokens[PAD]
        self.python_tag_id = self.special_tokens[PYTHON_TAG]
        self.image_id = self.special_tokens[IMAGE]
        self.stop_ids: tuple[int, ...] = (self.eos_id, self.eom_id, self.eot_id)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a `*.json` file with `tokenizers`; any other file as tiktoken BPE ranks (tokenizer.model)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer file not found: {path}")
        backend = _HFBackend(path) if path.suffix == ".json" else _TiktokenBackend(path)
        return cls(backend, path)

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        """Load `tokenizer.json` if the directory has one, else `tokenizer.model` (or `original/tokenizer.model`,
        where Hugging Face repos keep Meta's files)."""
        directory = Path(directory)
        names = ("tokenizer.json", "tokenizer.model", "original/tokenizer.model")
        for name in names:
            if (directory / name).is_file():
                return cls.from_file(directory / name)
        raise ValueError(f"no tokenizer in {directory}: looked for {', '.join(names)}")

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, special: bool = True) -> list[int]:
        """Token ids of `text`. With `special` (the default) special-token strings in it become their
        special ids; without, they are text like any other: use `special=False` for text from users."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        text = well_formed(text)
        ids = [i for piece in pieces(text) for i in self._backend.encode(piece, special)]
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def fewest_tokens(self, num_chars: int) -> int:
        """A lower bound on the tokens of any text of `num_chars` characters (no token spans more
        characters than the longest token has bytes), for refusing huge texts before encoding them."""
        return -(-num_chars // self._backend.longest_token)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; bytes that do not form whole UTF-8 characters become U+FFFD."""
        ids, size = [int(i) for i in ids], len(self)
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise ValueError(f"token ids out of range [0, {size}): {bad[:5]}")
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._backend.decode(ids)

    def token_to_id(self, token: str) -> int:
        """Id of one token, spelled as in tokenizer.json (special name, or byte-level string like "Ġthe")."""
        i = self._backend.token_to_id(token)
        if i is None:
            raise KeyError(f"unknown token {token!r}")
        return i

    def id_to_token(self, i: int) -> str:
        token = self._backend.id_to_token(i) if 0 <= i < len(self) else None
        if token is None:
            raise KeyError(f"unknown token id {i}")
        return token

    def is_special(self, i: int) -> bool:
        return i in self._special_ids

    def __len__(self) -> int:
        return self._backend.size

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, {len(self)} tokens)"
