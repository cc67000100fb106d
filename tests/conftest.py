"""Shared fixtures. Tokenizer files: Meta's tokenizer.model shipped in the `llama-models` package, and a
tokenizer.json converted from it by transformers' own `TikTokenConverter`, with the special tokens laid out
as on the Llama 3.2 Vision hub checkpoints (reserved 2..246 at 128011..128255, `<|image|>` at 128256)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from reference import meta_tokenizer_path, randomize_

from llama_vision import LlamaVisionModel, save_checkpoint
from llama_vision.config import PRESETS

REFERENCE_LIBRARIES = ("transformers", "llama_models", "fairscale", "peft")


def _missing_reference(report: pytest.TestReport | pytest.CollectReport) -> bool:
    """A skip because a reference library could not be imported (pytest.importorskip)."""
    if not report.skipped:
        return False
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
    return "could not import" in reason and any(f"'{lib}" in reason for lib in REFERENCE_LIBRARIES)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under CI a missing reference library fails the test instead of skipping it."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and _missing_reference(report):
        report.outcome = "failed"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and _missing_reference(report):
        report.outcome = "failed"


LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@pytest.fixture(scope="session")
def meta_tokenizer_model() -> Path:
    """Path of Meta's Llama 3 tokenizer.model (base64 BPE ranks) from the llama-models package, or the
    copy the environment variable LLAMA_TOKENIZER_MODEL names."""
    if not os.environ.get("LLAMA_TOKENIZER_MODEL"):
        pytest.importorskip("llama_models.llama3")
    return meta_tokenizer_path()


@pytest.fixture(scope="session")
def hf_tokenizer_json(meta_tokenizer_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tokenizer.json built from tokenizer.model the way the Hugging Face Mllama converter does (~1 s)."""
    convert = pytest.importorskip("transformers.convert_slow_tokenizer")
    from tokenizers import AddedToken

    tokenizer = convert.TikTokenConverter(
        vocab_file=str(meta_tokenizer_model), pattern=LLAMA3_PATTERN
    ).converted()
    special = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    special += [f"<|reserved_special_token_{i}|>" for i in range(2, 247)] + ["<|image|>"]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    assert tokenizer.token_to_id("<|image|>") == 128256
    path = tmp_path_factory.mktemp("hf_tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(
    hf_tokenizer_json: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[int], Path]:
    """`tiny_checkpoint(seed)`: a folder with the `tiny` preset's seeded random weights (hub layout) and the
    tokenizer.json, written once per seed and shared: a test that changes it works on a copy."""
    written: dict[int, Path] = {}

    def checkpoint(seed: int) -> Path:
        if seed not in written:
            path = tmp_path_factory.mktemp(f"tiny_seed{seed}")
            save_checkpoint(randomize_(LlamaVisionModel(PRESETS["tiny"]), seed=seed), path)
            shutil.copy(hf_tokenizer_json, path / "tokenizer.json")
            written[seed] = path
        return written[seed]

    return checkpoint
