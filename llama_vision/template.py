"""Rendering a checkpoint's jinja chat template, which is untrusted code from the hub, in a sandbox with
limits on time, loop steps and sizes, so that a hostile template fails fast with a ValueError.

The environment is jinja2's immutable sandbox with the helpers transformers gives templates
(`raise_exception`, `strftime_now`, a non-escaping `tojson`, `loopcontrols`, trimmed blocks). On top:
- every `{% for %}` iterates through `_loop`, every `~` joins through `_concat` (both put into the
  template's syntax tree before compiling, as imported names a template cannot shadow), every call,
  filter and `+ * ** %` goes through a check: together they count steps against `MAX_STEPS` and the
  clock against `MAX_SECONDS`, and refuse to build a string or list longer than the render's size cap
  (4 Mi characters plus 4x the messages' text) before building it. Three nested `range(99999)` loops
  fail after a second or two instead of running for days;
- integer arguments above `MAX_INT` (a width, a repeat count) and format strings with 7-digit widths
  are refused, as no chat template needs them and they are the cheap way to ask for gigabytes;
- `lipsum` is removed; `range` is the sandbox's own (at most 100,000 items);
- touching an unsafe attribute (`''.__class__`) fails instead of printing nothing, as jinja's sandbox
  would.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from functools import cache, wraps
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

MAX_SECONDS = 2.0  # hub templates render in about a millisecond
MAX_STEPS = 1_000_000  # loop iterations, calls and checked operations per render
MAX_INT = 1_000_000  # larger integer arguments (widths, counts) are refused
BASE_CHARS = 4 * 2**20  # size cap of any string or list built, plus 4x the text the messages hold
_WIDE_FORMAT = re.compile(r"\d{7,}")


@dataclass
class _Budget:
    deadline: float
    max_len: int
    steps: int = 0

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise SecurityError(f"the template ran more than {MAX_STEPS:,} loop steps and calls")
        if time.monotonic() > self.deadline:
            raise SecurityError(f"rendering took more than {MAX_SECONDS} s")

    def size(self, n: int) -> None:
        if n > self.max_len:
            raise SecurityError(
                f"the template built a value of more than {self.max_len:,} characters or items"
            )


_budget: ContextVar[_Budget] = ContextVar("template_budget")


def render(template: str, text_chars: int, **context: Any) -> str:
    """Render `template` with `context` (plain data) under the limits; any failure is a ValueError.
    `text_chars` is the length of the text in the messages, which the output may legitimately repeat."""
    compiled = _compile(template)
    budget = _Budget(time.monotonic() + MAX_SECONDS, BASE_CHARS + 4 * text_chars)
    token = _budget.set(budget)
    try:
        out, length = [], 0
        for chunk in compiled.generate(**context):
            length += len(chunk)
            budget.size(length)
            budget.step()
            out.append(chunk)
        return "".join(out)
    except jinja2.TemplateError as e:  # syntax errors, raise_exception, SecurityError (the limits)
        raise ValueError(f"chat template: {e}") from e
    except Exception as e:  # a template can also fail inside Python operations (a str + a list, ...)
        raise ValueError(f"chat template failed: {type(e).__name__}: {e}") from e
    finally:
        _budget.reset(token)


def _sized(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict)):
        _budget.get().size(len(value))
    return value


def _check_args(args: Iterable[Any]) -> None:
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_INT:
            raise SecurityError(f"integer argument {a} is larger than a chat template needs ({MAX_INT:,})")


def _loop(iterable: Any) -> Iterator[Any]:
    budget = _budget.get()
    for item in iterable:
        budget.step()
        yield item


def _concat(*values: Any) -> str:
    texts = [str(v) for v in values]
    _budget.get().size(sum(map(len, texts)))
    return "".join(texts)


def _guard_filter(f: Any) -> Any:
    @wraps(f)  # keeps jinja's pass_context / pass_eval_context marks
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _budget.get().step()
        _check_args([*args[1:], *kwargs.values()])
        if f.__name__ == "do_format" and args and isinstance(args[0], str):
            _check_format(args[0])
        return _sized(f(*args, **kwargs))

    return guarded


def _check_format(text: str) -> None:
    if _WIDE_FORMAT.search(text):
        raise SecurityError("format strings with 7-digit widths are refused")


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["+", "*", "**", "%"])

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # Jinja returns an undefined that prints as "" (`{{ ''.__class__ }}` renders nothing); fail loudly instead.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _budget.get().step()
        if __obj not in (_loop, _concat):
            _check_args([*args, *kwargs.values()])
        return _sized(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Any:
        # `'{:>1000000000}'.format(1)`: checked when the method is looked up, before any call.
        if getattr(value, "__name__", None) in ("format", "format_map"):
            if isinstance(getattr(value, "__self__", None), str):
                _check_format(value.__self__)
        return super().wrap_str_format(value)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget.get()
        budget.step()
        sequences = (str, list, tuple)
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, sequences) and isinstance(n, int):
                    budget.size(len(seq) * max(n, 0))
        elif operator == "+" and isinstance(left, sequences) and isinstance(right, sequences):
            budget.size(len(left) + len(right))
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 64 and abs(left) > 1:
                raise SecurityError(f"{left} ** {right} is larger than a chat template needs")
        elif operator == "%" and isinstance(left, str):
            _check_format(left)
            _check_args(right if isinstance(right, tuple) else [right])
        return _sized(super().call_binop(context, operator, left, right))


class _Bounded(NodeTransformer):
    """Routes every loop through `_loop` and every `~` through `_concat`."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = nodes.Call(nodes.ImportedName(f"{__name__}._loop"), [node.iter], [], None, None)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        node = self.generic_visit(node)
        return nodes.Call(nodes.ImportedName(f"{__name__}._concat"), node.nodes, [], None, None)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kwargs: Any) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kwargs)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@cache
def _compile(template: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(f) for name, f in env.filters.items()}
    env.globals.pop("lipsum", None)
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    try:
        tree = env.parse(template)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template: {e}") from e
    return env.template_class.from_code(
        env, env.compile(_Bounded().visit(tree)), env.make_globals(None), None
    )
