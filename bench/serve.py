"""Serving benchmark: the OpenAI-compatible server driven by the official `openai` client at several
concurrency levels, with one image per request, then text only.

    python bench/serve.py                                  # bench-small, float32, CPU, in-process server
    python bench/serve.py --device cuda --dtype bfloat16 --compile --preset llama-3.2-11b-vision-instruct
    python bench/serve.py --url http://127.0.0.1:8000 --model NAME      # a server that runs already
    python bench/serve.py --hf                             # also `transformers serve` on the same weights

Per concurrency level C: C client threads each send streamed requests back to back until --requests
requests (default 2 x C, at least 4) have finished. Reported: requests/s and aggregate completion
tokens/s over the wall time of the level; time to first token (request sent -> first content chunk
received) and per-token latency ((last chunk - first chunk) / (tokens - 1)) p50 and p95 over requests.
Token counts come from the server's `usage` (stream_options.include_usage; `transformers serve` ignores
it, so there an answer that ends by length counts max_tokens, as it has). Requests are greedy with
`max_tokens` --max-tokens; a random model rarely emits an end-of-turn id, so answers are full length
(the table shows the mean tokens per request).

Built in-process, the model has random weights (the tests' scheme) made directly on --device in --dtype:
an 11B model is never written or read. The engine gets `max_batch` = the highest concurrency, so every
client's request decodes in one batch. `--hf` writes the same random weights as a hub checkpoint with
HF's processor files and runs `transformers serve` (transformers 5.23, its default settings:
continuous batching off, not tried here with Mllama) in a subprocess with the same client loop, then
prints the ratios; it needs the `test` extra and `accelerate` (transformers loads with it).
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import openai
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import meta_tokenizer_path, random_image, randomize_  # noqa: E402  as the tests make them
from serving import running  # noqa: E402

from llama_vision import LlamaVision, LlamaVisionModel, Processor, get_preset  # noqa: E402
from llama_vision.cpu_linear import use_blocked_linears  # noqa: E402
from llama_vision.server import Settings, create_app  # noqa: E402
from llama_vision.tokenizer import Tokenizer  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Meta's chat format (llama_vision/chat.py) as a jinja template, for `transformers serve`'s processor.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|image|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@dataclass
class Result:
    ttft: float
    per_token: float | None
    tokens: int


def image_url(seed: int, size: int) -> str:
    out = io.BytesIO()
    random_image(size, size * 3 // 4, seed=seed).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def one_request(client: openai.OpenAI, model: str, i: int, image: str | None, max_tokens: int) -> Result:
    text = {"type": "text", "text": f"Request {i}: describe what you see in a few words."}
    content = [text] if image is None else [{"type": "image_url", "image_url": {"url": image}}, text]
    sent = time.perf_counter()
    stamps: list[float] = []
    tokens, finish = 0, None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if not tokens:  # a server that ignores include_usage (transformers serve): a full-length answer
        tokens = max_tokens if finish == "length" else len(stamps)
    if not stamps:
        raise RuntimeError(f"request {i} produced no text")
    per_token = (stamps[-1] - stamps[0]) / (tokens - 1) if tokens > 1 else None
    return Result(stamps[0] - sent, per_token, tokens)


def level(client: openai.OpenAI, model: str, concurrency: int, total: int, images: list[str] | None,
          max_tokens: int) -> dict[str, float]:  # fmt: skip
    results: list[Result] = []
    errors: list[BaseException] = []
    counter = iter(range(total))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                image = None if images is None else images[i]
                r = one_request(client, model, i, image, max_tokens)
            except BaseException as e:  # reported after the level
                errors.append(e)
                return
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]!r}")
    ttft = [r.ttft for r in results]
    per_token = [r.per_token for r in results if r.per_token is not None]
    tokens = sum(r.tokens for r in results)
    return {
        "requests/s": len(results) / wall,
        "tokens/s": tokens / wall,
        "tokens/request": tokens / len(results),
        "ttft p50": percentile(ttft, 50),
        "ttft p95": percentile(ttft, 95),
        "per-token p50": percentile(per_token, 50) if per_token else float("nan"),
        "per-token p95": percentile(per_token, 95) if per_token else float("nan"),
    }


def percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def run_all(base_url: str, model: str, args: argparse.Namespace, label: str) -> dict[tuple[str, int], dict]:
    client = openai.OpenAI(
        base_url=f"{base_url}/v1", api_key=args.api_key or "none", max_retries=0, timeout=600
    )
    one_request(client, model, -1, image_url(10_000, args.image_size), 4)  # warm-up: first shapes
    one_request(client, model, -2, None, 4)
    table = {}
    for kind in ("image", "text"):
        for c in args.concurrency:
            total = args.requests or max(4, 2 * c)
            # a new image for every request: a repeated one would skip the vision tower (prefix cache)
            imgs = (
                [image_url(1000 * c + i, args.image_size) for i in range(total)] if kind == "image" else None
            )
            table[kind, c] = row = level(client, model, c, total, imgs, args.max_tokens)
            print(
                f"{label:>14} {kind:>5} C={c:<3} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()),
                flush=True,
            )
    return table


def build(args: argparse.Namespace) -> LlamaVision:
    config = get_preset(args.preset)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    with torch.device("meta"):
        model = LlamaVisionModel(config).to(dtype)
    model = randomize_(model.to_empty(device=device), args.seed).eval()
    if device.type == "cpu":
        use_blocked_linears(model)  # as from_pretrained does on the CPU
    processor = Processor(Tokenizer.from_file(meta_tokenizer_path()), config)
    options = {"max_batch": max(args.concurrency), "max_length": 1024}
    return LlamaVision(model=model, processor=processor, compile=args.compile, engine_options=options)


def hf_server(args: argparse.Namespace, folder: Path, port: int) -> subprocess.Popen:
    """`transformers serve` on the same random weights, written as a hub checkpoint with HF's processor."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from generate import HF_PROCESSOR, write_checkpoint, write_hf_processor

    config = get_preset(args.preset)
    write_checkpoint(config, folder, args.seed)
    write_hf_processor(config, folder / HF_PROCESSOR)
    for f in (folder / HF_PROCESSOR).iterdir():  # one folder: weights, config, processor and tokenizer
        if not (folder / f.name).exists() or f.suffix == ".json":
            (folder / f.name).write_bytes(f.read_bytes())
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)  # HF's processor needs one to chat
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder), "--port", str(port),
               "--device", args.device, "--dtype", args.dtype, "--host", "127.0.0.1"]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(folder / "hf.log", "w"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="benchmark a running server instead of building one")
    parser.add_argument("--model", default="bench", help="the model id to send")
    parser.add_argument("--api-key")
    parser.add_argument("--preset", default="bench-small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 16])
    parser.add_argument("--requests", type=int, help="requests per level (default 2 x concurrency, >= 4)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=320, help="image width in pixels (height 3/4)")
    parser.add_argument("--hf", action="store_true", help="also run `transformers serve` and print ratios")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
          f"preset {args.preset}, {args.device} {args.dtype}{' compiled' if args.compile else ''}, "
          f"max_tokens {args.max_tokens}, image {args.image_size}x{args.image_size * 3 // 4}", flush=True)  # fmt: skip
    if args.url:
        run_all(args.url.rstrip("/"), args.model, args, "server")
        return
    lv = build(args)
    with running(
        create_app(lv, Settings(model_name=args.model, max_tokens=max(4096, args.max_tokens)))
    ) as url:
        ours = run_all(url, args.model, args, "llama_vision")
    if not args.hf:
        return
    del lv
    with tempfile.TemporaryDirectory() as tmp:
        port = 18000 + os.getpid() % 1000
        process = hf_server(args, Path(tmp), port)
        try:
            wait_ready(f"http://127.0.0.1:{port}", process, Path(tmp) / "hf.log")
            theirs = run_all(f"http://127.0.0.1:{port}", tmp, args, "transformers")
        except Exception:
            print((Path(tmp) / "hf.log").read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            process.terminate()
            process.wait(30)
    print("\nours / transformers:")
    for key, row in ours.items():
        ratio = {k: row[k] / theirs[key][k] for k in ("requests/s", "tokens/s", "ttft p50", "per-token p50")}
        print(f"{key[0]:>5} C={key[1]:<3} " + "  ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))


def wait_ready(base: str, process: subprocess.Popen, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"transformers serve exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("transformers serve did not start")


if __name__ == "__main__":
    main()
