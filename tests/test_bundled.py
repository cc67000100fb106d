"""The embedded model that ships with the package (llama_vision/embedded/) and the example pictures
(llama_vision/bundled.py): the defaults of the API and the command line load it, it answers questions
about pictures it has never seen, and transformers loads the same directory and answers the same."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from llama_vision import LlamaVision
from llama_vision.bundled import (
    EMBEDDED_DIR,
    EXAMPLES,
    example_path,
    model_dir,
    resolve_image,
    write_examples,
)
from llama_vision.cli import main
from llama_vision.domain import example
from llama_vision.domain.dataset import SCENE_TYPES, conversation

HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json", "generation_config.json")  # fmt: skip
# Held-out questions: the evaluation split's seed 3 is used by no training run, benchmark or example.
QUESTIONS = [example("eval", 3, i) for i in range(16)]


@pytest.fixture(scope="module")
def lv() -> LlamaVision:
    return LlamaVision.from_pretrained()


def test_ships_the_hugging_face_layout_within_25_mb() -> None:
    for name in HF_FILES:
        assert (EMBEDDED_DIR / name).is_file(), name
    size = sum(p.stat().st_size for p in EMBEDDED_DIR.rglob("*") if p.is_file())
    assert size <= 25 * 2**20, size
    config = json.loads((EMBEDDED_DIR / "config.json").read_text())
    assert config["model_type"] == "mllama" and config["text_config"]["vocab_size"] == 768


def test_example_pictures_are_the_generators_drawings(tmp_path: Path) -> None:
    for name, path in zip(EXAMPLES, write_examples(tmp_path)):
        shipped = Image.open(example_path(name))
        assert list(shipped.getdata()) == list(Image.open(path).getdata()), name


def test_names_resolve(tmp_path: Path) -> None:
    assert model_dir(None) == EMBEDDED_DIR and model_dir("embedded") == EMBEDDED_DIR
    assert model_dir(tmp_path) == tmp_path
    assert resolve_image("word") == str(example_path("word"))
    own = tmp_path / "word"
    own.write_bytes(example_path("row").read_bytes())
    assert resolve_image(str(own)) == str(own)  # a file of that name wins
    with pytest.raises(FileNotFoundError, match="nor an example image: shapes"):
        resolve_image("no-such-picture.png")


def test_answers_held_out_questions(lv: LlamaVision) -> None:
    answers = lv.generate([q.messages(q.image())[:1] for q in QUESTIONS], temperature=0.0, max_new_tokens=48)
    right = [a.strip().removesuffix(".").lower() == q.qa.answer.lower() for q, a in zip(QUESTIONS, answers)]
    assert sum(right) >= 14, list(zip([q.qa.answer for q in QUESTIONS], answers))


def test_answers_every_example_picture(lv: LlamaVision) -> None:
    for name, entry in EXAMPLES.items():
        messages = [{"role": "user", "content": [{"type": "image", "image": str(example_path(name))},
                                                 {"type": "text", "text": entry.question}]}]  # fmt: skip
        assert lv.chat(messages, temperature=0.0) == entry.answer, name


def test_ask_defaults_to_the_embedded_model(capsys: pytest.CaptureFixture) -> None:
    assert main(["ask", "--image", "word", "-q", "What is written in the picture?"]) == 0
    assert capsys.readouterr().out == "FEATHER\n"
    assert main(["ask", "--image", "nothing-here", "-q", "What is it?"]) == 1
    assert "nor an example image" in capsys.readouterr().err


def test_follow_up_turns_about_one_picture(lv: LlamaVision) -> None:
    talk = conversation("eval", 3, 1)  # a scene with a question of every type, one after another
    messages: list[dict] = []
    image = talk.image()
    for k, qa in enumerate(talk.qas[:3]):
        text = {"type": "text", "text": qa.question}
        messages.append(
            {"role": "user", "content": [{"type": "image", "image": image}, text] if k == 0 else [text]}
        )
        answer = lv.chat(messages, temperature=0.0)
        messages.append({"role": "assistant", "content": answer})
    assert len(messages) == 6 and {qa.type for qa in talk.qas} <= set(SCENE_TYPES)


def test_transformers_gives_the_same_greedy_answers(lv: LlamaVision) -> None:
    transformers = pytest.importorskip("transformers")
    model = transformers.MllamaForConditionalGeneration.from_pretrained(EMBEDDED_DIR).eval()
    processor = transformers.AutoProcessor.from_pretrained(EMBEDDED_DIR)
    stop = json.loads((EMBEDDED_DIR / "generation_config.json").read_text())["eos_token_id"]
    for q in QUESTIONS[:8]:
        image = q.image()
        messages = q.messages(image)[:1]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[image], text=prompt, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=48, eos_token_id=stop)
        theirs = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert lv.chat(messages, temperature=0.0, max_new_tokens=48) == theirs, q.qa.question
