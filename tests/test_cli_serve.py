"""`llama-vision serve`: flags checked before loading, keys from a file, and a real process stopped with
SIGTERM while a request streams: the request finishes, the process exits 0."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from llama_vision.cli import main
from llama_vision.cli_serve import read_keys


def test_bad_flags_fail_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["serve", "--port", "70000"]) == 2  # no --model is the embedded model; a bad port is not
    assert "--port" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llama-vision: error: ") and err.count("\n") == 1
    empty = tmp_path / "keys"
    empty.write_text("# no keys here\n\n")
    assert main(["serve", "--model", str(tmp_path), "--api-key-file", str(empty)]) == 1
    assert "holds no key" in capsys.readouterr().err


def test_a_bad_adapter_fails_before_loading(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_checkpoint: Callable[[int], Path]
) -> None:
    assert main(["serve", "--model", str(tiny_checkpoint(3)), "--adapter", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        f"llama-vision: error: {tmp_path}: not a PEFT adapter directory (no adapter_config.json)\n"
    )


def test_read_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("sk-one\n  sk-two  # the second\n# a comment\n\n")
    assert read_keys(path) == ["sk-one", "sk-two"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_lets_the_running_request_finish(
    tiny_checkpoint: Callable[[int], Path], tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-file-key\n")
    port = free_port()
    command = [sys.executable, "-m", "llama_vision.cli", "serve", "--model", str(tiny_checkpoint(3)),
               "--port", str(port), "--api-key-file", str(keys), "--model-name", "tiny", "--grace-period", "60",
               "--log-level", "warning"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer sk-file-key"}
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                if httpx.get(f"{base}/ready", headers=auth).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 24,
            "stream": True,
        }
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, headers=auth, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)  # the request is running
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
        assert process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has stopped
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/health")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
