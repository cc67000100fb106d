"""The embedded model's pieces before training: its tokenizer (llama_vision/embedded/tokenizer.json,
trained by llama_vision/domain/corpus.py), the `embedded` preset, the recipe and the accuracy script."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from llama_vision import LlamaVisionModel, save_checkpoint
from llama_vision.chat import load_chat_template, render_chat
from llama_vision.config import get_preset
from llama_vision.domain import QUESTION_TYPES, VARIANTS, example
from llama_vision.domain.corpus import SPECIAL_TOKENS, corpus, write_tokenizer
from llama_vision.processor import Processor
from llama_vision.sampling import GenerationConfig
from llama_vision.tokenizer import IMAGE, Tokenizer

ROOT = Path(__file__).parents[1]
EMBEDDED = ROOT / "llama_vision" / "embedded"
CONFIG = get_preset("embedded")


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(EMBEDDED)


def test_special_tokens_at_the_declared_ids(tokenizer: Tokenizer) -> None:
    t = CONFIG.text
    assert len(tokenizer) == t.vocab_size + 1  # BPE + special tokens, then <|image|>
    assert tokenizer.image_id == CONFIG.image_token_id == t.vocab_size
    assert tokenizer.bos_id == t.bos_token_id and tokenizer.pad_id == t.pad_token_id
    assert set(tokenizer.stop_ids) == set(t.eos_token_id)
    first = t.vocab_size - len(SPECIAL_TOKENS)
    for i, name in enumerate(SPECIAL_TOKENS):  # Llama 3's order, after the BPE tokens
        assert tokenizer.token_to_id(name) == first + i and tokenizer.is_special(first + i)
    assert tokenizer.token_to_id(IMAGE) == t.vocab_size
    config = json.loads((EMBEDDED / "tokenizer_config.json").read_text())
    assert tokenizer.token_to_id(config["eos_token"]) in t.eos_token_id
    generation = GenerationConfig.from_dir(EMBEDDED)
    assert generation.temperature == 0.0 and set(generation.eos_token_ids) == set(t.eos_token_id)


def test_round_trips_every_domain_string(tokenizer: Tokenizer) -> None:
    processor = Processor(tokenizer, CONFIG)
    texts = list(corpus(descriptions=300))
    for i in range(400):
        ex = example("eval", 5, i)
        texts += [ex.qa.question, ex.qa.answer]
        texts.append(processor.apply_chat_template(ex.messages("x.png")[:1]) + ex.qa.answer + "<|eot_id|>")
    texts += ["12345678", "ÜBER café ☃", "\t two  spaces \n"]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text, text
    words = tokenizer.encode(" red circle", bos=False)
    assert len(words) == 2  # domain words are single tokens
    assert len(tokenizer.encode("2133945")) == 7  # one token per digit
    prompt = tokenizer.encode("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>")
    assert prompt[0] == tokenizer.bos_id and prompt[-1] == tokenizer.image_id


def test_preset_builds_fits_and_runs_a_domain_example(tokenizer: Tokenizer) -> None:
    torch.manual_seed(0)
    model = LlamaVisionModel(CONFIG).eval()
    params = sum(p.numel() for p in model.parameters())
    assert params * 4 <= 25 * 10**6  # the checkpoint in float32 stays under 25 MB
    assert CONFIG.vision.image_size == 112 and CONFIG.vision.max_num_tiles == 4
    assert CONFIG.text.num_attention_heads > CONFIG.text.num_key_value_heads  # GQA, as 11B
    processor = Processor(tokenizer, CONFIG)
    conversations = [ex.messages(ex.image())[:1] for ex in (example("train", 0, i) for i in range(3))]
    inputs = processor.chat_inputs(conversations)
    with torch.no_grad():
        logits = model(**inputs)
    assert logits.shape == (3, inputs["input_ids"].shape[1], CONFIG.text.vocab_size)
    assert torch.isfinite(logits).all()


def test_recipe_trains_the_preset_with_its_tokenizer_in_two_stages() -> None:
    """Stage 1 pretrains the vision encoder of a new model (mode vision); stage 2 trains the rest from it."""
    yaml = pytest.importorskip("yaml")
    first = yaml.safe_load((ROOT / "recipes" / "embedded-vision.yaml").read_text())
    assert first["preset"] == "embedded" and first["mode"] == "vision" and "model" not in first
    assert Tokenizer.from_file(ROOT / first["tokenizer"]).image_id == CONFIG.image_token_id
    second = yaml.safe_load((ROOT / "recipes" / "embedded.yaml").read_text())
    assert second["model"] == first["output"] + "/final" and second["mode"] == "full"
    assert second["freeze"] == ["vision"] and "preset" not in second
    assert first["max_tiles"] == second["max_tiles"] == CONFIG.vision.max_num_tiles


def test_from_scratch_opens_every_gate() -> None:
    from llama_vision.finetune.train import GATES, init_weights

    model = LlamaVisionModel(CONFIG)
    init_weights(model, seed=0)
    gates = {n: float(p.detach()) for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in GATES}
    # two cross-attention layers (attention and MLP), two global vision layers (attention and FFN), and
    # the three gated position embeddings
    assert len(gates) == 2 * 2 + 2 * 2 + 3 and set(gates.values()) == {0.5}
    assert all(p.numel() == 1 for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in GATES)


def _accuracy_script():
    spec = importlib.util.spec_from_file_location(
        "embedded_accuracy", ROOT / "bench" / "embedded_accuracy.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_accuracy_judges() -> None:
    acc = _accuracy_script()
    assert acc.short_match("red", "Red.") and not acc.short_match("red", "dark red")
    assert not acc.short_match("LAMP", "lamp", keep_case=True)
    ex = next(
        example("eval", 0, i) for i in range(7, 400, 8) if len(example("eval", 0, i).picture.shapes) > 2
    )
    assert acc.correct(ex, ex.qa.answer)
    assert acc.correct(ex, ex.qa.answer.replace(" and ", ", ").upper())  # names everything, other words
    missing = ex.picture.shapes[0].colour
    assert not acc.correct(ex, ex.qa.answer.replace(missing, "grey"))


@pytest.mark.slow
def test_accuracy_script_runs_on_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    save_checkpoint(LlamaVisionModel(CONFIG), tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((EMBEDDED / "tokenizer.json").read_bytes())
    _accuracy_script().main(["--model", str(tmp_path), "--n", "8", "--robust-n", "1", "--batch", "8"])
    out = capsys.readouterr().out
    for name in [*QUESTION_TYPES, *(f"robust: {v}" for v in VARIANTS)]:
        assert f"| {name}" in out
    assert "| colour | 1 |" in out


MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {
        "role": "user",
        "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "How many stars?"}],
    },
    {"role": "assistant", "content": "2"},
    {"role": "tool", "content": "ok"},
    {"role": "user", "content": "And circles?"},
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_writes_the_official_format(add_generation_prompt: bool) -> None:
    template = load_chat_template(EMBEDDED)
    assert template is not None
    ours = render_chat(MESSAGES, add_generation_prompt=add_generation_prompt, chat_template=template)
    assert ours == render_chat(MESSAGES, add_generation_prompt=add_generation_prompt)


def test_transformers_reads_the_same_tokenizer(tokenizer: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(EMBEDDED)
    assert len(theirs) == len(tokenizer) and theirs.pad_token_id == tokenizer.pad_id
    prompt = theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt == render_chat(MESSAGES)
    for i in range(40):
        qa = example("eval", 1, i).qa
        for text in (qa.question, qa.answer, prompt):
            assert theirs(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)


@pytest.mark.slow
def test_tokenizer_file_is_what_the_corpus_trains(tmp_path: Path) -> None:
    write_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads((EMBEDDED / name).read_text()), name
    assert (tmp_path / "chat_template.jinja").read_text() == (EMBEDDED / "chat_template.jinja").read_text()
