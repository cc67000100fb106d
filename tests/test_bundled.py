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
from llama_vision.domain import COLOURS, QUESTION_TYPES, SHAPES, example
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


def well_formed(qa_type: str, question: str, answer: str) -> bool:
    """Is `answer` of the form its question type asks for (whether or not it is right)?"""
    words = answer.removesuffix(".").split()
    if qa_type == "colour":
        return answer in COLOURS
    if qa_type == "shape":
        return answer in SHAPES
    if qa_type in ("count", "count_of"):
        return answer.isdigit() and int(answer) <= 6
    if qa_type == "exists":
        return answer in ("yes", "no")
    if qa_type == "position":  # a colour and a shape
        return len(words) == 2 and words[0] in COLOURS and words[1] in SHAPES
    if qa_type == "text":
        return 1 <= len(answer) <= 8 and (answer.isdigit() or (answer.isalpha() and answer.isupper()))
    return answer.startswith(("A ", "An ", "Two ", "Three ")) and answer.endswith("background.")


def test_answers_in_the_form_each_question_asks_for(lv: LlamaVision) -> None:
    answers = lv.generate([q.messages(q.image())[:1] for q in QUESTIONS], temperature=0.0, max_new_tokens=48)
    for q, answer in zip(QUESTIONS, answers):
        assert well_formed(q.qa.type, q.qa.question, answer), (q.qa.question, answer)


def held_out_right(lv: LlamaVision, kind: str, n: int = 48) -> int:
    """How many of n held-out questions of one type (eval split, seed 3) the model answers right."""
    questions = [example("eval", 3, i) for i in range(QUESTION_TYPES.index(kind), 8 * n, 8)]
    assert {q.qa.type for q in questions} == {kind}
    answers = lv.generate([q.messages(q.image())[:1] for q in questions], temperature=0.0)
    return sum(a == q.qa.answer for q, a in zip(questions, answers))


def test_counts_better_than_chance(lv: LlamaVision) -> None:
    # 1 to 6 shapes: 1 in 6 by chance, the most common count 1 in 4; README's table: 59% over 63 questions
    right = held_out_right(lv, "count")
    assert right >= 24, right


def test_names_shapes_better_than_chance(lv: LlamaVision) -> None:
    # 6 shapes: 1 in 6 by chance; README's table: 56% over 63 questions (version 1, whose encoder had not
    # learnt shapes: 22%)
    right = held_out_right(lv, "shape")
    assert right >= 18, right


def test_ask_defaults_to_the_embedded_model(lv: LlamaVision, capsys: pytest.CaptureFixture) -> None:
    question = "How many shapes are in the picture?"
    assert main(["ask", "--image", "row", "-q", question]) == 0
    messages = [{"role": "user", "content": [{"type": "image", "image": str(example_path("row"))},
                                             {"type": "text", "text": question}]}]  # fmt: skip
    assert capsys.readouterr().out == lv.chat(messages) + "\n"
    assert main(["ask", "--image", "nothing-here", "-q", "What is it?"]) == 1
    assert "nor an example image" in capsys.readouterr().err


def test_follow_up_turns_about_one_picture(lv: LlamaVision) -> None:
    talk = conversation("eval", 3, 1)  # a scene with a question of every type, one after another
    messages: list[dict] = []
    image = talk.image()
    for k, qa in enumerate(talk.qas):
        text = {"type": "text", "text": qa.question}
        messages.append(
            {"role": "user", "content": [{"type": "image", "image": image}, text] if k == 0 else [text]}
        )
        answer = lv.chat(messages, temperature=0.0)
        assert well_formed(qa.type, qa.question, answer), (qa.question, answer)
        messages.append({"role": "assistant", "content": answer})
    assert len(talk.qas) >= 5 and {qa.type for qa in talk.qas} <= set(SCENE_TYPES)


def test_transformers_gives_the_same_greedy_answers(lv: LlamaVision) -> None:
    """transformers loads the shipped directory as it is (AutoProcessor and MllamaForConditionalGeneration)
    and, on the same inputs, generates the same greedy tokens, once its two known deviations from Meta
    are set aside (README, "Known differences"): its vision features come one layer late since 4.56 (so
    its intermediate indices are lowered by one here, as in tests/reference.py), and text before the
    first <|image|> attends to the image (so the prompts put the picture first)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.from_pretrained(EMBEDDED_DIR)
    config.vision_config.intermediate_layers_indices = [
        i - 1 for i in config.vision_config.intermediate_layers_indices
    ]
    model = transformers.MllamaForConditionalGeneration.from_pretrained(EMBEDDED_DIR, config=config).eval()
    processor = transformers.AutoProcessor.from_pretrained(EMBEDDED_DIR, backend="pil")
    stop = json.loads((EMBEDDED_DIR / "generation_config.json").read_text())["eos_token_id"]
    for q in QUESTIONS[:8]:
        image = q.image()
        chat = processor.apply_chat_template(q.messages(image)[:1], add_generation_prompt=True)
        assert chat.count("<|image|>") == 1
        prompt = "<|image|>" + chat.replace("<|image|>", "")
        theirs = processor(images=[image], text=prompt, add_special_tokens=False, return_tensors="pt")
        ours = lv.processor(text=[prompt], images=[[image]])
        assert torch.equal(ours["input_ids"], theirs["input_ids"])
        assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
        with torch.no_grad():
            out = model.generate(**theirs, do_sample=False, max_new_tokens=24, eos_token_id=stop)
        expected = out[0, theirs["input_ids"].shape[1] :].tolist()
        config = lv.generation_config.replace(temperature=0.0, max_new_tokens=24)
        tokens = [int(t[0]) for t in lv.engine.tokens(ours, config)]
        assert tokens == expected, q.qa.question
