"""Constrained decoding for `response_format` (JSON mode and JSON schema) through llguidance.

`JsonConstraint(grammars, schema)` is a `logits_processor` for `LlamaVision.submit`: before each choice
it feeds the grammar matcher the tokens chosen since its last call, asks it which tokens may come next
(a bitmask over the vocabulary) and sets every other logit to -inf. Once the JSON value is complete
the matcher allows only the end-of-turn ids, so the answer ends right after it.

Why llguidance and not xgrammar: xgrammar 0.2.9 requires and imports transformers at runtime, which
this project keeps a test-only dependency; llguidance (Microsoft's, the engine behind vLLM's and
llama.cpp's structured output) needs nothing but itself. Its tokenizer is built from ours: each id's
bytes (the byte-level spelling of `tokenizer.id_to_token(i)` mapped back to bytes), the special ids
and our stop ids; building it takes about a second, so `Grammars` builds it once, on first use.

Whitespace between JSON tokens is not allowed (`whitespace_flexible: False`): a model, above all a
random one, could otherwise emit spaces until max_tokens and never close the value.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from llama_vision.server.errors import APIError
from llama_vision.tokenizer import Tokenizer, _unicode_to_byte


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise APIError(
            400,
            "response_format needs the llguidance package on the server (pip install 'llama-vision[serve]')",
            param="response_format",
            code="unsupported_parameter",
        ) from None
    return llguidance


def token_bytes(tokenizer: Tokenizer, i: int) -> bytes:
    """The bytes a token stands for (a special token: its name)."""
    spelling = tokenizer.id_to_token(i)
    if tokenizer.is_special(i):
        return spelling.encode()
    table = _unicode_to_byte()
    return bytes(table[c] for c in spelling)


class Grammars:
    """The llguidance tokenizer of one `Tokenizer`, built on first use; compiles response formats."""

    def __init__(self, tokenizer: Tokenizer, stop_ids: Sequence[int]) -> None:
        self.tokenizer, self.stop_ids = tokenizer, list(stop_ids)
        self._lock = threading.Lock()
        self._ll_tokenizer: Any = None

    def ll_tokenizer(self) -> Any:
        with self._lock:
            if self._ll_tokenizer is None:
                llg, tok = _llguidance(), self.tokenizer

                class Spelling:  # what llguidance's TokenizerWrapper reads
                    eos_token_id = tok.eot_id
                    bos_token_id = tok.bos_id
                    tokens = [token_bytes(tok, i) for i in range(len(tok))]
                    special_token_ids = sorted(tok.special_tokens.values())

                    def __call__(self, text: str) -> list[int]:
                        if not isinstance(text, str):
                            raise TypeError("text")  # tells the wrapper to pass str, not bytes
                        return tok.encode(text)

                wrapper = llg.TokenizerWrapper(Spelling())
                self._ll_tokenizer = llg.LLTokenizer(wrapper, eos_token=self.stop_ids)
            return self._ll_tokenizer

    def constraint(self, response_format: dict[str, Any]) -> JsonConstraint:
        """The logits processor for a parsed `response_format` of type json_object or json_schema."""
        llg = _llguidance()
        if response_format["type"] == "json_object":
            schema: Any = {"type": "object"}
        else:
            schema = response_format["json_schema"].get("schema", {})
        options = {"whitespace_flexible": False}
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=options)
        except (ValueError, TypeError) as e:
            raise APIError(
                400, f"response_format: invalid JSON schema ({e})", param="response_format"
            ) from None
        tokenizer = self.ll_tokenizer()
        error = llg.LLMatcher.validate_grammar(grammar, tokenizer)
        if error:
            raise APIError(
                400, f"response_format: unsupported JSON schema ({error})", param="response_format"
            )
        return JsonConstraint(llg.LLMatcher(tokenizer, grammar, log_level=0), self.stop_ids)


class JsonConstraint:
    """`logits_processor(tokens, logits)`: logits (V,) with every token the grammar forbids at -inf."""

    def __init__(self, matcher: Any, stop_ids: Sequence[int]) -> None:
        self.matcher, self.stop_ids = matcher, list(stop_ids)
        self.fed = 0  # tokens already given to the matcher

    def __call__(self, tokens: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        m = self.matcher
        for token in tokens[self.fed :]:
            m.consume_token(token)
        self.fed = len(tokens)
        if m.is_error():  # not for tokens it allowed; should it happen, end the answer, never go on free
            allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
            allowed[self.stop_ids] = True
        else:
            bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")
            allowed = torch.from_numpy(bits[: logits.shape[-1]].view(bool))
        # torch.where: several times faster than masked_fill(~allowed) on a (V,) CPU row here
        return torch.where(allowed.to(logits.device), logits, float("-inf"))
