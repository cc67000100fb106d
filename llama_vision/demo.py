"""The Gradio demo: chat about images with a loaded `LlamaVision`, in the browser.

    lv = LlamaVision.from_pretrained(path)
    launch(build_demo(lv, model_name="my-model"), host="127.0.0.1", port=7860)

or `llama-vision demo --model DIR` (llama_vision/cli_demo.py), or `python demos/app.py --model DIR`.

The page is Gradio 6's `ChatInterface` in multimodal mode (messages format): upload images, ask, follow
up. Only the public API is used: every turn sends the whole conversation to `lv.submit`, so the engine's
prefix store finds the previous turn's keys/values (images included) and prefills only the new text;
answers stream piece by piece. Non-obvious choices:

- One `LlamaVision` serves every browser session: concurrent turns are requests of one engine, decoded
  together (continuous batching). Gradio's queue runs at most `max_batch` turns at once (more would only
  wait inside the engine while holding a worker thread) and holds `queue_size` more before it refuses.
- Stop: Gradio cancels the event and closes this generator; closing an `Answer`'s iteration cancels
  its engine request, so the row is free at the next step.
- Under each answer, a collapsed "thought" message carries its figures: time to first token (from the
  moment the conversation goes to `lv.submit`: image preprocessing, waiting for a row and prefill
  included), decode tokens/s
  (tokens after the first over the time after the first), prompt tokens and image tokens (as the
  cross-attention layers see them, padding tiles included).
- Messages the demo adds (figures, errors) are tagged in their metadata and left out of the
  conversation the model sees; a turn that failed (a bad upload, a bad setting) is left out whole, so
  the next question works as if it had not been asked.
- Uploads: a picture over `MAX_IMAGE_BYTES` (10 MB), or one that does not decode (a text file named
  .png), gets its reason in the chat. Gradio itself refuses, with a pop-up, files over `MAX_FILE_SIZE`
  (50 MB, so the server never stores huge uploads) and types outside `IMAGE_TYPES` (the browser's file
  picker offers only those).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_vision.api import LlamaVision
from llama_vision.cli import main as cli_main
from llama_vision.encoders.image_transform import load_image
from llama_vision.engine import QueueFull
from llama_vision.generation import Answer

if TYPE_CHECKING:
    import gradio as gr

IMAGE_TYPES = [".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"]
MAX_IMAGE_BYTES = 10 * 2**20  # a bigger upload gets a message in the chat
MAX_FILE_SIZE = "50mb"  # Gradio refuses anything bigger before it reaches the chat (a pop-up)
MAX_IMAGE_PIXELS = 40_000_000  # about 6,300 x 6,300: far beyond any tile grid, far below a decompression bomb
DEFAULT_MAX_NEW_TOKENS = 512
# Metadata ids of the messages the demo adds (Gradio shows a message with an id but no title as usual).
FIGURES, ERROR, EMPTY = "llama-vision-figures", "llama-vision-error", "llama-vision-empty"


def build_demo(
    lv: LlamaVision,
    *,
    model_name: str = "model",
    examples: Sequence[tuple[str | Path, str]] = (),
    queue_size: int = 64,
) -> gr.Blocks:
    """The demo's app, not launched: a chat about images with `lv`, settings, a model panel and
    `examples` (image path, question) shown on the page."""
    import gradio as gr

    generation, vision = lv.generation_config, lv.config.vision
    max_length = lv.engine.max_length
    settings = [
        gr.Textbox("", label="System prompt", placeholder="none", lines=2),
        gr.Slider(0.0, 2.0, value=generation.temperature, step=0.05, label="Temperature (0: greedy)"),
        gr.Slider(0.05, 1.0, value=generation.top_p, step=0.05, label="Top-p (1: off)"),
        gr.Slider(0, max(200, generation.top_k), value=generation.top_k, step=1, label="Top-k (0: off)"),
        gr.Slider(
            1,
            max_length - 1,
            value=min(DEFAULT_MAX_NEW_TOKENS, max_length - 1),
            step=1,
            label="Max new tokens",
        ),
        gr.Slider(
            min(1.0, generation.repetition_penalty),
            max(2.0, generation.repetition_penalty),
            value=generation.repetition_penalty,
            step=0.05,
            label="Repetition penalty (1: off)",
        ),
        gr.Number(-1, precision=0, minimum=-1, label="Seed (-1: a fresh one each answer)"),
    ]
    if vision is not None:  # text-only Llamas have no tiles, and no use for the example pictures
        n = vision.max_num_tiles
        settings.append(gr.Slider(1, n, value=n, step=1, label="Max tiles per image"))
    else:
        examples = ()

    chatbot = gr.Chatbot(label=model_name, height=520, placeholder="Upload a picture and ask about it.")
    textbox = gr.MultimodalTextbox(
        file_types=IMAGE_TYPES,
        file_count="multiple",
        placeholder="Ask about an image, or anything...",
        sources=["upload"],
        autofocus=True,
        stop_btn=True,
    )
    with gr.Blocks(title=f"llama-vision: {model_name}") as demo:
        gr.Markdown(f"## llama-vision demo\n{model_panel(lv, model_name)}")
        gr.ChatInterface(
            functools.partial(respond, lv),
            multimodal=True,
            chatbot=chatbot,
            textbox=textbox,
            additional_inputs=settings,
            additional_inputs_accordion=gr.Accordion(
                "Settings", open=False, render=False, elem_id="settings"
            ),
            examples=[[{"text": q, "files": [str(p)]}] + [None] * len(settings) for p, q in examples] or None,
            api_name="chat",
            fill_height=True,
        )
    return demo.queue(default_concurrency_limit=lv.engine.max_batch, max_size=queue_size)


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           **options: Any) -> Any:  # fmt: skip
    """Start the server with the demo's upload limit (`options` go to `gr.Blocks.launch`)."""
    return demo.launch(
        server_name=host, server_port=port, share=share, max_file_size=MAX_FILE_SIZE, **options
    )


def model_panel(lv: LlamaVision, name: str) -> str:
    """The model's name, kind, parameter count, weight bytes, dtype and device, in one Markdown line."""
    parameters = list(lv.model.parameters())
    count = sum(p.numel() for p in parameters)
    size = sum(p.numel() * p.element_size() for p in parameters)
    kind = "vision" if lv.config.vision is not None else "text-only"
    dtype = str(parameters[0].dtype).removeprefix("torch.")
    return (
        f"**Model** `{name}` ({kind}) · **{count:,}** parameters ({size / 1e6:,.1f} MB) · **{dtype}**"
        f" · **{lv.model.device}** · up to {lv.engine.max_batch} answers decoded together"
    )


def respond(
    lv: LlamaVision,
    message: dict[str, Any],
    history: list[dict[str, Any]],
    system: str,
    temperature: float,
    top_p: float,
    top_k: float,
    max_new_tokens: float,
    repetition_penalty: float,
    seed: float,
    max_tiles: float | None = None,
) -> Iterator[str | list[dict[str, Any]]]:
    """The chat function: the answer so far while it streams, then the answer and its figures."""
    try:
        turn = user_content(message.get("text") or "", message.get("files") or [])
        messages = ([{"role": "system", "content": system}] if system.strip() else []) + conversation(history)
        if messages and messages[-1]["role"] == "user":  # the last turn was stopped before its answer
            messages[-1] = {"role": "user", "content": messages[-1]["content"] + turn}
        else:
            messages.append({"role": "user", "content": turn})
        start = time.monotonic()
        answer = lv.submit(
            messages,
            max_num_tiles=None if max_tiles is None else int(max_tiles),
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            max_new_tokens=int(max_new_tokens),
            repetition_penalty=float(repetition_penalty),
            seed=None if seed is None or seed < 0 else int(seed),
        )
    except QueueFull:
        yield error("The model is busy with other people's questions; try again in a moment.")
        return
    except ValueError as e:  # bad image, bad setting, prompt too long: the message says which
        yield error(str(e))
        return
    try:
        for _ in answer:  # closing this generator (Stop) closes the iteration, which cancels the request
            yield answer.text
    except Exception as e:  # a failed engine step fails its requests; the session goes on
        yield error(f"generation failed: {e}")
        return
    text = {"role": "assistant", "content": answer.text}
    if not answer.text:  # an end-of-turn token came first: say so (the note is not part of the conversation)
        text = {**text, "content": "(empty answer)", "metadata": {"id": EMPTY}}
    yield [text, figures(answer, start)]


def user_content(text: str, files: Sequence[Any]) -> list[dict[str, Any]]:
    """One user turn as message content: its images (decoded and checked here), then its text."""
    content: list[dict[str, Any]] = [{"type": "image", "image": image(f)} for f in files]
    if text.strip() or not content:
        content.append({"type": "text", "text": text})
    return content


@functools.lru_cache(maxsize=64)
def _decode(path: str) -> Any:
    return load_image(path, max_pixels=MAX_IMAGE_PIXELS)


def image(file: Any) -> Any:
    """A decoded upload; a ValueError naming the file (by its own name, not Gradio's cache path)."""
    path = file.get("path") if isinstance(file, dict) else str(file)
    name = os.path.basename(path)
    if Path(path).suffix.lower() not in IMAGE_TYPES:
        raise ValueError(f"{name} is not an image this demo takes ({', '.join(IMAGE_TYPES)})")
    size = os.path.getsize(path)
    if size > MAX_IMAGE_BYTES:
        raise ValueError(
            f"{name} is {size / 2**20:.1f} MB; this demo takes pictures of up to {MAX_IMAGE_BYTES / 2**20:.0f} MB"
        )
    try:
        return _decode(path)
    except ValueError as e:
        raise ValueError(str(e).replace(repr(path), name).replace(path, name)) from None


def conversation(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat so far as model messages: each user turn with the answer after it. Consecutive user
    entries (a turn stopped before its answer began, then the next) form one user turn. Turns answered
    with an error, or whose images no longer decode, are left out with their answers; the messages the
    demo adds (figures, the empty-answer note) are not the model's words."""
    messages: list[dict[str, Any]] = []
    for users, answers in _exchanges(history):
        if any(_tag(m) == ERROR for m in answers):
            continue
        try:
            content = [item for m in users for item in _user_items(m)]
        except ValueError:
            continue
        messages.append({"role": "user", "content": content})
        if answers:
            messages.append(
                {"role": "assistant", "content": "".join(_text(m) for m in answers if not _tag(m))}
            )
    return messages


def _exchanges(history: list[dict[str, Any]]) -> Iterator[tuple[list[dict], list[dict]]]:
    users: list[dict] = []
    answers: list[dict] = []
    for m in history:
        if m["role"] == "user" and answers:
            yield users, answers
            users, answers = [], []
        (users if m["role"] == "user" else answers).append(m)
    if users:
        yield users, answers


def _user_items(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message["content"]
    parts = content if isinstance(content, list) else [content]
    items = []
    for part in parts:
        if isinstance(part, str):
            items.append({"type": "text", "text": part})
        elif part.get("type") == "text":
            items.append({"type": "text", "text": part["text"]})
        elif part.get("type") == "file" or "path" in part:
            items.append({"type": "image", "image": image(part.get("file", part))})
    return items


def _text(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def _tag(message: dict[str, Any]) -> str | None:
    return (message.get("metadata") or {}).get("id")


def error(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": f"⚠️ {text}", "metadata": {"id": ERROR}}


def figures(answer: Answer, start: float) -> dict[str, Any]:
    """The figures message under an answer: shown as a collapsed thought with the numbers in its title."""
    first, end = answer.request.first_token_time, time.monotonic()
    n = answer.completion_tokens
    parts = []
    if first is not None:
        parts.append(f"first token {first - start:.2f} s")
        if n > 1 and end > first:
            parts.append(f"{(n - 1) / (end - first):.1f} tokens/s")
    parts += [f"{answer.prompt_tokens:,} prompt tokens", f"{answer.image_tokens:,} image tokens"]
    details = f"{n:,} tokens generated in {end - start:.2f} s, finish reason: {answer.finish_reason}"
    return {
        "role": "assistant",
        "content": details,
        "metadata": {"id": FIGURES, "title": " · ".join(parts), "status": "done"},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """`python demos/app.py ...`: the same options and errors as `llama-vision demo ...`."""
    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


def bundled_examples() -> list[tuple[Path, str]]:
    """The package's example pictures (llama_vision/bundled.py) with their questions: (path, question)."""
    from llama_vision.bundled import EXAMPLES, example_path

    return [(example_path(name), entry.question) for name, entry in EXAMPLES.items()]
