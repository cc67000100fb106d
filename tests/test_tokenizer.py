"""Tokenizer: both backends (tokenizer.model through tiktoken, tokenizer.json through `tokenizers`) give
Meta's reference ids, with `<|image|>` moved from Meta's 128011 to the model's 128256."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llama_vision.tokenizer import Tokenizer

META_IMAGE_ID = 128011

CORPUS = {
    "prose": "The quick brown fox jumps over the lazy dog. Llamas are domesticated South American camelids.",
    "contractions": "I'm sure they'll say we'd've DONE it; you're right, SHE'S here, it's O'Neil's car. Don't!",
    "python": 'def f(x):\n    if x > 0:\n\treturn x ** 2  # square\n    return -x\n\n\nprint(f"{f(3)=}")\n',
    "c": '#include <stdio.h>\nint main(void) {\n\tprintf("%d\\n", 42);\n\t\treturn 0;\n}\n',
    "json_url": '{"key": [1, 2, 3], "url": "https://example.com/a?b=c&d=e#frag", "ok": true}',
    "markdown": "# Title\n\n* item **bold** _it_\n> quote\n\n| a | b |\n|---|---|\n",
    "chinese": "我爱自然语言处理。今天天气很好！",
    "japanese": "こんにちは、世界。カタカナとひらがな、漢字。",
    "arabic": "مرحبا بالعالم، كيف حالك؟",
    "hindi": "नमस्ते दुनिया, आप कैसे हैं?",
    "russian": "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "emoji": "🦙🔥 llamas 👩‍👩‍👧‍👦 family 🏳️‍🌈 flag 👍🏽 ok",
    "combining": "e\u0301 vs \u00e9, n\u0303, Z\u0351\u0327a\u0300l\u0310g\u0315o",
    "letters_numbers": "ǅungla ǈ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛 ⅷ ① x²³ ٣٤٥",
    "zero_width": "a\u200bb\u200dc\ufeffd\u00a0e",
    "numbers": "1234567890123456789 3.14159 1,000,000 -42 0.000001 1e-10 2024-09-25 $9.99",
    "whitespace": "a  b   c    d\n\n\ne\r\nf \r\n\r\n  g   \t\t h   \n  ",
    "trailing_spaces": "trailing spaces   ",
    "leading_spaces": "   leading",
    "newline": "\n",
    "space": " ",
    "tab_newline": "\t \n",
    "empty": "",
    "header": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>",
    "image": "<|image|>Describe this<|image|> and <|image|>",
    "other_special": "<|python_tag|>print(1)<|eom_id|><|finetune_right_pad_id|><|step_id|> x<|end_of_text|>",
    "not_special": "<|eot_id| < |eot_id|> <|EOT_ID|> <|image> |image|",
}


def _random_texts(n: int, seed: int = 0) -> list[str]:
    alphabet = list("aZ09 \t\n\r.,'!?-_/<|>") + list("éßñ中文日本語ыйعربيहिंदी🦙👍\u0301\u200d")
    words = ["<|image|>", "<|eot_id|>", "'s", "'LL", "1000", "  ", "\r\n", "http://x.y"]
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet + words) for _ in range(rng.randint(1, 60))) for _ in range(n)]


@pytest.fixture(scope="session")
def meta(meta_tokenizer_model: Path):
    reference = pytest.importorskip("llama_models.llama3.tokenizer")
    return reference.Tokenizer(meta_tokenizer_model)


@pytest.fixture(scope="session")
def tokenizers_by_backend(meta_tokenizer_model: Path, hf_tokenizer_json: Path) -> dict[str, Tokenizer]:
    return {
        "tiktoken": Tokenizer.from_file(meta_tokenizer_model),
        "hf": Tokenizer.from_file(hf_tokenizer_json),
    }


@pytest.fixture(params=["tiktoken", "hf"])
def tok(request, tokenizers_by_backend: dict[str, Tokenizer]) -> Tokenizer:
    return tokenizers_by_backend[request.param]


def meta_ids(meta, text: str) -> list[int]:
    ids = meta.encode(text, bos=False, eos=False, allowed_special="all")
    return [128256 if i == META_IMAGE_ID else i for i in ids]


@pytest.mark.parametrize("name", CORPUS)
def test_ids_match_meta(tok: Tokenizer, meta, name: str) -> None:
    text = CORPUS[name]
    assert tok.encode(text) == meta_ids(meta, text)
    assert tok.decode(tok.encode(text)) == text


def test_random_texts_match_meta(tok: Tokenizer, meta) -> None:
    for text in _random_texts(300):
        assert tok.encode(text) == meta_ids(meta, text), repr(text)
        assert tok.decode(tok.encode(text)) == text


def test_plain_text_matches_meta(tok: Tokenizer, meta) -> None:
    # special=False: special-token strings are text, as Meta's ChatFormat encodes message text.
    for text in [*CORPUS.values(), *_random_texts(100, seed=1)]:
        ids = tok.encode(text, special=False)
        assert ids == meta.encode(text, bos=False, eos=False, allowed_special=set()), repr(text)
        assert not any(tok.is_special(i) for i in ids)
        assert tok.decode(ids) == text


def test_long_runs_cut_as_meta_cuts_them(tokenizers_by_backend: dict[str, Tokenizer], meta) -> None:
    # Meta cuts runs longer than 25,000 (non-)whitespace characters, and slices of 400,000 characters.
    text = "x " + " " * 30_000 + "y" * 30_000 + "\n" * 30_000 + "ab " * 140_000
    ids = tokenizers_by_backend["tiktoken"].encode(text)
    assert ids == tokenizers_by_backend["hf"].encode(text) == meta_ids(meta, text)
    assert tokenizers_by_backend["hf"].decode(ids) == text


def test_special_ids(tok: Tokenizer) -> None:
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eom_id, tok.eot_id) == (
        128000,
        128001,
        128004,
        128008,
        128009,
    )
    assert (tok.python_tag_id, tok.image_id) == (128010, 128256)
    assert tok.stop_ids == (128001, 128008, 128009)
    assert len(tok) == 128257
    assert len(tok.special_tokens) == 257
    assert tok.special_tokens["<|reserved_special_token_2|>"] == 128011
    assert tok.special_tokens["<|reserved_special_token_246|>"] == 128255
    assert tok.encode("hi", bos=True, eos=True) == [128000, 6151, 128001]


def test_special_tables_agree(tokenizers_by_backend: dict[str, Tokenizer], meta) -> None:
    ours = tokenizers_by_backend["tiktoken"].special_tokens
    assert ours == tokenizers_by_backend["hf"].special_tokens
    # Same ids as Meta for everything but <|image|> and the reserved names, which Meta shifts by one.
    for name, i in meta.special_tokens.items():
        if name == "<|image|>":
            assert (i, ours[name]) == (META_IMAGE_ID, 128256)
        elif name.startswith("<|reserved_special_token_") and int(name[25:-2]) >= 2:
            assert ours[name] == i - 1
        else:
            assert ours[name] == i


def test_image_token(tok: Tokenizer) -> None:
    assert tok.encode("<|image|>") == [128256]
    assert tok.decode([128256]) == "<|image|>"
    assert tok.id_to_token(128256) == "<|image|>"
    assert tok.token_to_id("<|image|>") == 128256
    assert tok.decode([128011]) == "<|reserved_special_token_2|>"


def test_decode_skip_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("<|begin_of_text|><|image|>Hello there<|eot_id|>")
    assert tok.decode(ids) == "<|begin_of_text|><|image|>Hello there<|eot_id|>"
    assert tok.decode(ids, skip_special_tokens=True) == "Hello there"
    assert tok.is_special(128009) and not tok.is_special(9906)


def test_decode_partial_character(tokenizers_by_backend: dict[str, Tokenizer]) -> None:
    # "🦙" spans several byte tokens; a prefix of them is not a whole character.
    for tok in tokenizers_by_backend.values():
        ids = tok.encode("🦙")
        assert len(ids) > 1
        assert tok.decode(ids[:-1]) == "\ufffd"
        assert tok.decode(ids) == "🦙"


def test_decode_rejects_out_of_range(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="128257"):
        tok.decode([1, 128257])
    with pytest.raises(ValueError, match="-1"):
        tok.decode([-1])


def test_token_strings_agree(tokenizers_by_backend: dict[str, Tokenizer]) -> None:
    tiktoken_tok, hf_tok = tokenizers_by_backend["tiktoken"], tokenizers_by_backend["hf"]
    for i in [*range(0, 128257, 97), 128000, 128011, 128255, 128256]:
        token = tiktoken_tok.id_to_token(i)
        assert token == hf_tok.id_to_token(i)
        assert tiktoken_tok.token_to_id(token) == hf_tok.token_to_id(token) == i
    assert tiktoken_tok.id_to_token(24748) == "Ġhello"
    for tok in tokenizers_by_backend.values():
        with pytest.raises(KeyError):
            tok.token_to_id("no such token")
        with pytest.raises(KeyError):
            tok.id_to_token(128257)


def test_from_dir_prefers_tokenizer_json(
    tmp_path: Path, meta_tokenizer_model: Path, hf_tokenizer_json: Path
) -> None:
    (tmp_path / "original").mkdir()
    (tmp_path / "original" / "tokenizer.model").symlink_to(meta_tokenizer_model)
    assert Tokenizer.from_dir(tmp_path).path.name == "tokenizer.model"
    (tmp_path / "tokenizer.model").symlink_to(meta_tokenizer_model)
    assert Tokenizer.from_dir(tmp_path).path == tmp_path / "tokenizer.model"
    (tmp_path / "tokenizer.json").symlink_to(hf_tokenizer_json)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.path == tmp_path / "tokenizer.json"
    assert tok.encode("<|image|>hi") == [128256, 6151]


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match=str(tmp_path)):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("tokenizer.json", '{"version": "1.0", "model": ', "tokenizer.json"),
        ("tokenizer.json", "not json at all", "tokenizer.json"),
        ("tokenizer.model", "", "no BPE ranks"),
        ("tokenizer.model", "IQ== 0\nIg== 1\n!!notbase64 2\n", "line 3"),
        ("tokenizer.model", "IQ== 0\nIg==\n", "line 2"),
        ("tokenizer.model", "IQ== 0\nIg== 5\n", "distinct"),
        ("tokenizer.model", '{"model": {}}', "line 1"),
    ],
)
def test_corrupt_files(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        Tokenizer.from_file(path)
    assert str(path) in str(error.value)


def test_tokenizer_json_without_image_token(tmp_path: Path, hf_tokenizer_json: Path) -> None:
    data = json.loads(hf_tokenizer_json.read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|image|>"]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"missing special tokens \['<\|image\|>'\]"):
        Tokenizer.from_file(path)
