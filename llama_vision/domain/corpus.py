"""The embedded model's tokenizer: a byte-level BPE trained with `tokenizers` on the domain's text.

The corpus is every question the generator can ask (each template with each filler), every short
answer, the description's phrases plus descriptions of sampled scenes, the printed words, and the chat
format's own text (role names, the blank line after a header). The vocabulary then holds each domain
word as one token, while the 256 byte tokens keep any other text encodable, so every string round-trips.

Ids follow Llama 3's layout at a small size: BPE tokens 0..n-1, then Llama 3's special tokens in its
order (`<|begin_of_text|>` = n, ..., `<|python_tag|>` = n + 10), which together make the model's
`vocab_size` (the rows of lm_head), then `<|image|>` = vocab_size, the first learnable embedding row,
as 128256 is for 11B. The 245 reserved tokens Llama 3 keeps after `<|python_tag|>` are left out: they
are never used and would only add rows.

Non-obvious choice: the pre-tokenizer is Llama 3's regex except that numbers split into single digits
(Llama 3 groups up to three), so reading a printed number out is one token per digit.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

from llama_vision.tokenizer import BOS, END_HEADER, EOM, EOS, EOT, IMAGE, PAD, PYTHON_TAG, START_HEADER

from .dataset import example
from .questions import DIRECTIONS, NUMBER_WORDS, TEMPLATES, article
from .scenes import BACKGROUNDS, COLOURS, PLURALS, SHAPES, WORDS

SPECIAL_TOKENS = (BOS, EOS, "<|reserved_special_token_0|>", "<|reserved_special_token_1|>", PAD,
                  "<|step_id|>", START_HEADER, END_HEADER, EOM, EOT, PYTHON_TAG)  # fmt: skip
DIGIT_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Meta's official chat format (llama_vision/chat.py writes the same without a template), for
# transformers' apply_chat_template: a role "tool" is written "ipython", an image item "<|image|>".
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + ('ipython' if message['role'] == 'tool' else message['role'])"
    " + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{{- '<|image|>' if item['type'] == 'image' else item['text'] -}}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)
BPE_TOKENS = 757  # + 11 special tokens = vocab_size 768; <|image|> = 768 (the corpus allows 909)


def corpus(descriptions: int = 20000) -> Iterator[str]:
    """The domain's text: all questions and answers, the description phrases, `descriptions` sampled
    descriptions (weights the merges towards frequent phrases), the printed words, the chat format."""
    names = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    things_count = [f"{c} shapes" for c in COLOURS] + list(PLURALS.values())
    things_count += [f"{c} {PLURALS[s]}" for c in COLOURS for s in SHAPES]
    things_exist = [f"{article(c)} shape" for c in COLOURS] + [article(s) for s in SHAPES]
    things_exist += [article(n) for n in names]
    fillers = {
        "colour": [{"shape": s} for s in SHAPES],
        "shape": [{"colour": c} for c in COLOURS],
        "count_of": [{"thing": t} for t in things_count],
        "exists": [{"thing": t} for t in things_exist],
        "position": [
            {"direction": d, "a": a, "b": b} for d in DIRECTIONS for a in names for b in names[:6] if a != b
        ],
    }
    for kind, templates in TEMPLATES.items():
        for template in templates:
            for values in fillers.get(kind, [{}]):
                yield template.format(**values)
    yield from [*COLOURS, *SHAPES, *names, "yes", "no", *(str(n) for n in range(10))]
    for c in COLOURS:
        for s in SHAPES:
            yield article(f"{c} {s}")
            yield from (f"{NUMBER_WORDS[n]} {c} {PLURALS[s]}" for n in range(2, 7))
    yield from (f"on {article(b)} background." for b in BACKGROUNDS)
    for i in range(descriptions):
        yield example("train", -1, 8 * i + 7).qa.answer  # index 7 mod 8: the describe type
    yield from (w.upper() for w in WORDS)
    yield from ("user", "assistant", "system", "ipython", "\n\n")


def train_tokenizer(bpe_tokens: int = BPE_TOKENS) -> tokenizers.Tokenizer:
    """A byte-level BPE of exactly `bpe_tokens` tokens, then the special tokens, then `<|image|>`."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(DIGIT_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus(), trainer)
    if tok.get_vocab_size() != bpe_tokens:
        raise ValueError(f"the corpus gives {tok.get_vocab_size()} BPE tokens, not {bpe_tokens}")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*SPECIAL_TOKENS, IMAGE)])
    return tok


def write_tokenizer(directory: str | Path, bpe_tokens: int = BPE_TOKENS) -> Path:
    """tokenizer.json, tokenizer_config.json (with the chat template) and generation_config.json (greedy)
    in `directory` (made if missing); returns the first."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(bpe_tokens)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOT,
        "pad_token": PAD,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    # The same template where transformers' processor (AutoProcessor) looks for it.
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    ids = {name: tok.token_to_id(name) for name in (BOS, EOS, EOM, EOT, PAD)}
    generation = {  # greedy, stopping at the end of a turn or of the text, like an Instruct checkpoint
        "bos_token_id": ids[BOS],
        "eos_token_id": [ids[EOS], ids[EOM], ids[EOT]],
        "pad_token_id": ids[PAD],
        "do_sample": False,
    }
    (directory / "generation_config.json").write_text(
        json.dumps(generation, indent=2) + "\n", encoding="utf-8"
    )
    return directory / "tokenizer.json"


if __name__ == "__main__":  # python -m llama_vision.domain.corpus DIR
    import sys

    print(write_tokenizer(sys.argv[1] if len(sys.argv) > 1 else "llama_vision/embedded"))
