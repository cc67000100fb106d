"""The command line: `llama-vision ask` streams what `LlamaVision.chat` answers, and every failure is one
line on stderr with the right exit code, checked before the weights load where it can be."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from reference import random_image

from llama_vision import LlamaVision
from llama_vision.cli import main

GREEDY = ["--temperature", "0", "--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Callable[[int], Path]) -> Path:
    return tiny_checkpoint(7)


@pytest.fixture(scope="module")
def lv(checkpoint: Path) -> LlamaVision:
    return LlamaVision.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = [folder / "wide.png", folder / "tall.jpg"]
    random_image(200, 50, seed=1).save(paths[0])
    random_image(30, 70, seed=2).save(paths[1])
    return paths


@pytest.fixture
def loaded(checkpoint: Path, lv: LlamaVision, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """The CLI gets the model loaded once for the module (loading takes longer than answering); the
    list collects the arguments of each load. Tests without this fixture load for real."""
    calls: list[dict] = []

    def from_pretrained(path: str, **kwargs) -> LlamaVision:
        assert Path(path) == checkpoint
        calls.append(kwargs)
        return lv

    monkeypatch.setattr(LlamaVision, "from_pretrained", from_pretrained)
    return calls


def user(text: str, images: list[Path]) -> dict:
    content = [{"type": "image", "image": str(p)} for p in images] + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def ask(checkpoint: Path, *args: str) -> int:
    return main(["ask", "--model", str(checkpoint), *args])


def test_answer_is_the_api_answer(checkpoint: Path, lv: LlamaVision, images: list[Path], capsys) -> None:
    assert ask(checkpoint, "--image", str(images[0]), *GREEDY, "What is this?") == 0
    out, err = capsys.readouterr()
    expected = lv.chat([user("What is this?", images[:1])], temperature=0, max_new_tokens=6)
    assert expected and out == expected + "\n"
    assert err == ""  # no progress when stderr is not a terminal


def test_load_options(checkpoint: Path, loaded: list[dict], capsys) -> None:
    assert ask(checkpoint, "--max-new-tokens", "1", "Hi") == 0
    assert ask(checkpoint, "--dtype", "bfloat16", "--compile", "--max-new-tokens", "1", "Hi") == 0
    assert loaded == [
        dict(device="cpu", dtype=None, progress=False, compile=False, quantize=None),
        dict(device="cpu", dtype=torch.bfloat16, progress=False, compile=True, quantize=None),
    ]
    assert ask(checkpoint, "--quantize", "int8", "--max-new-tokens", "1", "Hi") == 0
    assert loaded[-1]["quantize"] == "int8"


def test_several_images_in_order_and_system(
    checkpoint: Path,
    lv: LlamaVision,
    loaded: list[dict],
    images: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys,
) -> None:
    asked = []
    answer = lv.stream

    def stream(messages, **options):
        asked.append(messages)
        return answer(messages, **options)

    monkeypatch.setattr(lv, "stream", stream)
    args = ["--image", str(images[1]), "--image", str(images[0]), "--system", "Be terse.", "--max-tiles", "2"]
    assert ask(checkpoint, *args, *GREEDY, "Compare them.") == 0

    # greedy answers of a random model hardly depend on the images' order, so check the messages too
    [(system, question)] = asked
    assert system == {"role": "system", "content": "Be terse."} and question["role"] == "user"
    assert [item["type"] for item in question["content"]] == ["image", "image", "text"]
    assert [item["image"].size for item in question["content"][:2]] == [(30, 70), (200, 50)]
    messages = [{"role": "system", "content": "Be terse."}, user("Compare them.", [images[1], images[0]])]
    expected = lv.chat(messages, max_num_tiles=2, temperature=0, max_new_tokens=6)
    assert capsys.readouterr().out == expected + "\n"


def test_sampling_options_reach_the_model(
    checkpoint: Path, lv: LlamaVision, loaded: list[dict], capsys
) -> None:
    options = dict(temperature=1.5, top_k=50, top_p=0.95, min_p=0.01, repetition_penalty=1.3, seed=3)
    args = [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    assert ask(checkpoint, *args, "--max-new-tokens", "8", "Hello") == 0
    expected = lv.chat([user("Hello", [])], max_new_tokens=8, **options)
    assert capsys.readouterr().out == expected + "\n"


def test_stop_string_cuts_the_answer(checkpoint: Path, lv: LlamaVision, loaded: list[dict], capsys) -> None:
    full = lv.chat([user("Hello", [])], temperature=0, max_new_tokens=6)
    stop = full[len(full) // 2 :][:2]
    assert ask(checkpoint, *GREEDY, "--stop", stop, "--stop", "never seen", "Hello") == 0
    assert capsys.readouterr().out == full[: full.index(stop)] + "\n"


def test_missing_options_use_the_generation_config(checkpoint: Path, tmp_path: Path, capsys) -> None:
    path = shutil.copytree(checkpoint, tmp_path / "greedy3")
    (path / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 3}))
    assert main(["ask", "--model", str(path), "Hello"]) == 0
    answer = LlamaVision.from_pretrained(path).chat([user("Hello", [])], temperature=0, max_new_tokens=3)
    assert capsys.readouterr().out == answer + "\n"


def error_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("llama-vision: error: "), err
    return lines[0]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--temperature", "-1"], 2, "argument --temperature: temperature must be a number"),
        (["--top-p", "2"], 2, "top_p must be a number"),
        (["--max-new-tokens", "0"], 2, "max_new_tokens must be a positive integer"),
        (["--temperature", "warm"], 2, "invalid float value"),
        (["--max-tiles", "9"], 2, "--max-tiles"),
        (["--dtype", "float8"], 2, "--dtype: unknown dtype 'float8'"),
        (["--device", "gpu"], 2, "--device: unknown device 'gpu'"),
        (["--device", "quantum"], 2, "unknown device"),
        (["--image", "no/such/file.png"], 1, "no such image file"),
    ],
)
def test_bad_arguments_fail_before_loading(
    checkpoint: Path, tmp_path: Path, args, code, message, capsys
) -> None:
    path = shutil.copytree(checkpoint, tmp_path / "no_weights")
    (path / "model.safetensors").unlink()  # loading would fail: the error must come first
    assert main(["ask", "--model", str(path), *args, "Hi"]) == code
    assert message in error_line(capsys)


def test_max_tiles_above_the_models_limit(checkpoint: Path, tmp_path: Path, capsys) -> None:
    path = shutil.copytree(checkpoint, tmp_path / "two_tiles")
    (path / "model.safetensors").unlink()  # the check comes before loading (the shapes would not fit)
    config = json.loads((path / "config.json").read_text())
    config["vision_config"].update(max_num_tiles=2, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    (path / "config.json").write_text(json.dumps(config))
    assert main(["ask", "--model", str(path), "--max-tiles", "3", "Hi"]) == 2
    assert "at most 2 tiles" in error_line(capsys)


def test_non_image_file(checkpoint: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert ask(checkpoint, "--image", str(text), "Hi") == 1
    assert "notes.png" in error_line(capsys)


def test_missing_model_dir(tmp_path: Path, capsys) -> None:
    assert main(["ask", "--model", str(tmp_path / "nowhere"), "Hi"]) == 1
    assert "does not exist" in error_line(capsys)


def test_usage_errors(checkpoint: Path, capsys) -> None:
    assert main([]) == 2
    error_line(capsys)
    assert main(["ask", "-q", "Hi"]) == 0  # no --model: the embedded model answers (tests/test_bundled.py)
    assert capsys.readouterr().out.endswith("\n")
    assert main(["ask", "--help"]) == 0
    assert "--max-new-tokens" in capsys.readouterr().out


def test_prompt_too_long(checkpoint: Path, tmp_path: Path, capsys) -> None:
    path = shutil.copytree(checkpoint, tmp_path / "short_context")
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 32
    (path / "config.json").write_text(json.dumps(config))
    assert main(["ask", "--model", str(path), *GREEDY, "word " * 40]) == 1
    assert "context" in error_line(capsys)


def test_interrupt_is_quiet(
    checkpoint: Path, lv: LlamaVision, loaded: list[dict], monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    def stream(messages, **options):
        yield "Half an ans"
        raise KeyboardInterrupt

    monkeypatch.setattr(lv, "stream", stream)
    assert ask(checkpoint, "Hi") == 130
    assert capsys.readouterr() == ("Half an ans", "")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llama_vision", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow  # two interpreters that import torch
def test_subprocess(checkpoint: Path, lv: LlamaVision, images: list[Path]) -> None:
    done = run_cli("ask", "--model", str(checkpoint), "--image", str(images[0]), *GREEDY, "What is this?")
    assert done.returncode == 0, done.stderr
    assert done.stdout == lv.chat([user("What is this?", images[:1])], temperature=0, max_new_tokens=6) + "\n"
    assert done.stderr == ""

    done = run_cli("ask", "--model", str(checkpoint), "--image", "missing.jpg", "Hi")
    assert done.returncode == 1 and done.stdout == ""
    assert (
        done.stderr
        == "llama-vision: error: no such image file: 'missing.jpg' (nor an example image: shapes, row, tall, word, number)\n"
    )
