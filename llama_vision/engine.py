"""The serving engine: many concurrent requests on one model, with continuous batching.

After vLLM's scheduler (requests join and leave a running batch at step boundaries), nanochat's
per-row cache lengths and gpt-fast's fixed-shape compiled step, with Meta's semantics:

- Every running request owns one row of a preallocated `Cache` (`max_batch` rows of `max_length`
  tokens, an image pool of `max_images` images per row). A request joins at a step boundary: its prompt
  is prefilled into a free row (only its own, real images go through the vision tower), its first token
  is chosen, and from then on each `step()` decodes one token for every running row at once. It leaves
  the moment it ends (an end-of-turn id, `max_new_tokens`, the row's length, or a cancel), and the row
  goes to the next waiting request.
- A row's tokens sit at slots 0..length-1 of its row, so rows need no padding and each has its own
  length; sampling options and seeds are per request. A request's tokens therefore do not depend on
  what else is running (greedy and seeded sampling give the same tokens alone and under load).
- Requests that find no free row or no room in the `max_cache_tokens` budget wait in a FIFO queue
  (`max_queue` long, `queue_timeout` seconds at most); one that can never fit is refused at once.
- Prefix reuse: when a request ends, its row (keys/values of every token it fed, and its image
  keys/values) is kept in an LRU store within `prefix_cache_bytes`. A later request with the same
  images whose prompt starts with those tokens (the next turn of a conversation) copies them back and
  prefills only the rest, without running the vision tower again. The tokens equal a fresh run's.
- The decode step runs on the first n rows and the first L slots of the cache (views, no copies), with
  n and L the smallest of a few fixed sizes (powers of two) that cover the running rows, so the
  compiled step (`compile=True`) meets a bounded set of shapes and never recompiles once each was seen.
- One background thread (started by the first request) owns the model and runs the steps; any thread
  may add requests and read their tokens. `step()` can also be driven by hand (`background=False`).
"""

from __future__ import annotations

import atexit
import hashlib
import math
import queue
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llama_vision.cache import Cache, ImageContext, ImageKV, RowSnapshot
from llama_vision.memory import byte_unit, check_request
from llama_vision.model import LlamaVisionModel
from llama_vision.sampling import GenerationConfig, select

FINISHED = -1  # the token a finished row yields in `Engine.tokens` from the step after its end on
LogitsProcessor = Callable[
    [Sequence[int], torch.Tensor], torch.Tensor
]  # (tokens so far, logits (V,)) -> logits


class QueueFull(RuntimeError):
    """The engine's waiting queue is full: try again later (a server answers 429)."""


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of a chosen token under the model, and the `top` most probable tokens."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class _Images:
    """A request's real images, as the processor packs them for one row (I = real images only)."""

    pixel_values: torch.Tensor  # 1 I N 3 H W
    aspect_ratio_ids: torch.Tensor  # 1 I
    aspect_ratio_mask: torch.Tensor  # 1 I N
    cross_attention_mask: torch.Tensor  # 1 T I N
    digest: bytes


class Request:
    """One generation request. Iterate it for its token ids as they come; `cancel()` ends it early.

    After the iteration: `tokens`, `finish_reason` ("stop": an end-of-turn id, "length": max_new_tokens
    or the row's length, "cancelled"), and `logprobs` (one `TokenLogprob` per token when asked for)."""

    def __init__(
        self,
        engine: Engine,
        prompt: list[int],
        images: _Images | None,
        config: GenerationConfig,
        max_new_tokens: int,
        stop_ids: tuple[int, ...],
        logprobs: int | None,
        logits_processor: LogitsProcessor | None,
    ) -> None:
        self.engine = engine
        self.prompt = prompt
        self.images = images
        self.config = config
        self.max_new_tokens = max_new_tokens
        self.stop_ids = frozenset(stop_ids)
        self.top_logprobs = logprobs
        self.logits_processor = logits_processor
        self.prompt_tokens = len(prompt)
        self.image_tokens = (
            0 if images is None else engine.image_tokens_per_image * images.pixel_values.shape[1]
        )
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.created = time.monotonic()
        self.first_token_time: float | None = None
        # Owned by the engine's loop:
        self.row: int | None = None
        self.length = 0  # tokens whose keys/values are in the row
        self.image_kv: ImageKV | None = None
        self.seen: torch.Tensor | None = None  # (V,) bool for the repetition penalty
        self.generator: torch.Generator | None = None
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._cancelled = False

    def __iter__(self) -> Iterator[int]:
        while True:
            kind, value = self._next_event()
            if kind == "token":
                yield value
            elif kind == "error":
                raise value
            else:
                return

    def _next_event(self) -> tuple[str, Any]:
        if not self.engine.background:  # drive the engine by hand until this request has news
            while self._events.empty():
                self.engine.step()
        return self._events.get()

    def cancel(self) -> None:
        """End the request at the next step boundary; its row is freed then."""
        self._cancelled = True
        self.engine._wake_up()

    def result(self) -> list[int]:
        """Wait for the end; all the tokens."""
        for _ in self:
            pass
        return self.tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _emit(self, token: int, logprob: TokenLogprob | None) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        self._events.put(("token", token))

    def _finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self._events.put(("end", reason))

    def _fail(self, error: BaseException) -> None:
        if self.finish_reason is None:
            self.finish_reason = "error"
            self._events.put(("error", error))


class PrefixStore:
    """Finished rows by (image digest, fed token ids), least recently used first, within a byte budget."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.entries: OrderedDict[tuple[bytes, tuple[int, ...]], RowSnapshot] = OrderedDict()
        self.nbytes = 0

    def lookup(self, digest: bytes, ids: Sequence[int]) -> tuple[RowSnapshot, int] | None:
        """The entry with the same images sharing the longest prefix with `ids`, and that length (at most
        len(ids) - 1, so one token is left to prefill). A text-only prefix must share at least one token."""
        best, best_len = None, -1
        for key in self.entries:
            if key[0] != digest:
                continue
            n = _common_prefix(key[1], ids)
            if n > best_len:
                best, best_len = key, n
        if best is None or (best_len == 0 and self.entries[best].images is None):
            return None
        self.entries.move_to_end(best)
        return self.entries[best], min(best_len, len(ids) - 1)

    def insert(self, digest: bytes, ids: tuple[int, ...], snapshot: RowSnapshot) -> None:
        size = snapshot.nbytes
        if size > self.budget:
            return
        for key in [k for k in self.entries if k[0] == digest and k[1] == ids[: len(k[1])]]:
            self._drop(key)  # a shorter turn of the same conversation: the new entry covers it
        self.entries[(digest, ids)] = snapshot
        self.nbytes += size
        while self.nbytes > self.budget:
            self._drop(next(iter(self.entries)))

    def _drop(self, key: tuple[bytes, tuple[int, ...]]) -> None:
        self.nbytes -= self.entries.pop(key).nbytes


class Engine:
    """Serves generation requests on `model`; see the module docstring.

    `stop_ids` end a request unless its config names its own `eos_token_ids` (default: the checkpoint's
    `eos_token_id`). While rows are decoding, each step admits waiting requests until their prompt and
    image tokens pass `prefill_tokens_per_step` (at least one), so running rows keep decoding between
    long prefills; with no row decoding only their prompt tokens count (see `_admit`).
    `compile` is True (inductor; CUDA graphs on a GPU) or a torch.compile backend.
    `max_length` caps prompt + answer per request (default: the model's context, at most
    4,096); `max_images` is the image pool per row; `max_cache_tokens` the budget of reserved tokens
    (prompt + max_new_tokens) over all running requests (default max_batch x max_length).
    `max_request_bytes` refuses, with the estimate, a request whose memory as the planner prices it
    (memory.request_cost: its keys/values, image keys/values and prefill transient) is above it."""

    def __init__(
        self,
        model: LlamaVisionModel,
        *,
        stop_ids: Sequence[int] | None = None,
        compile: bool | str | Callable[..., Any] = False,
        max_batch: int = 8,
        max_length: int | None = None,
        max_images: int = 2,
        max_cache_tokens: int | None = None,
        max_queue: int = 1024,
        queue_timeout: float | None = None,
        prefix_cache_bytes: int = 1 << 30,
        prefill_tokens_per_step: int = 1024,
        max_request_bytes: int | None = None,
        background: bool = True,
    ) -> None:
        context = model.config.text.max_position_embeddings
        for name, value in [("max_batch", max_batch), ("max_queue", max_queue)]:
            if not _positive_int(value):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(max_images, int) and max_images >= 0):
            raise ValueError(f"max_images must be a non-negative integer, got {max_images!r}")
        if max_length is not None and not (_positive_int(max_length) and max_length >= 2):
            raise ValueError(f"max_length must be an integer of at least 2, got {max_length!r}")
        if max_request_bytes is not None:
            if not _positive_int(max_request_bytes):
                raise ValueError(f"max_request_bytes must be a positive integer, got {max_request_bytes!r}")
            if not hasattr(model, "request_cost"):
                raise ValueError(
                    "max_request_bytes needs a Llama 3.2 Vision model: the planner prices only those"
                )
        self.model = model
        self.stop_ids = tuple(model.config.text.eos_token_id if stop_ids is None else stop_ids)
        self.compiled = bool(compile)
        self.max_batch = max_batch
        self.context = context
        self.max_length = min(context, max_length or 4096)
        self.max_images = max_images
        self.max_cache_tokens = max_cache_tokens or max_batch * self.max_length
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.background = background
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.max_request_bytes = max_request_bytes
        v = model.config.vision  # None for a text-only model: no image pool
        self.image_tokens_per_image = 0 if v is None else v.max_num_tiles * v.num_patches
        self.prefixes = PrefixStore(prefix_cache_bytes)
        self.compilations = 0  # distinct step shapes met while compiled (each compiles once)
        # Totals since start, for metrics: seconds in prefills and decode steps, tokens they produced.
        self.totals = {
            "prefill_s": 0.0,
            "prefills": 0,
            "decode_s": 0.0,
            "decode_steps": 0,
            "decode_tokens": 0,
        }
        self._cache: Cache | None = None
        self._rows: list[Request | None] = [None] * max_batch
        self._waiting: deque[Request] = deque()
        self._reserved = 0
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._shapes: set[tuple[int, int, int]] = set()
        self._graphs = compile is True and model.device.type == "cuda"
        self._step = model.decode_step
        if compile:
            backend = "inductor" if compile is True else compile
            mode = "reduce-overhead" if self._graphs else None
            self._step = torch.compile(
                model.decode_step, fullgraph=True, dynamic=False, mode=mode, backend=backend
            )
            limit = len(self._sizes(self.max_batch)) * len(self._sizes(self.max_length, 128)) * 2 + 8
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, limit)
            dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, limit)

    # ---------------------------------------------------------------- requests

    def add_request(
        self,
        inputs: dict[str, torch.Tensor],
        config: GenerationConfig,
        *,
        logprobs: int | None = None,
        logits_processor: LogitsProcessor | None = None,
    ) -> Request:
        """Queue one conversation (processor outputs of one row; padding is dropped, left or right).

        `logprobs`: also record each chosen token's log-probability and this many most probable tokens.
        `logits_processor(tokens_so_far, logits)` may change a row's logits (V,) before each choice
        (constrained decoding). Raises ValueError for a request that can never fit, QueueFull when the
        queue is full."""
        prompt, images = self._split(inputs)
        if images is not None and self.model.config.vision is None:
            raise ValueError("this is a text-only model: it takes no images")
        max_new = self._budget(len(prompt), config.max_new_tokens)
        if images is not None and images.pixel_values.shape[1] > self.max_images:
            raise ValueError(
                f"the request has {images.pixel_values.shape[1]} images; this engine holds at most "
                f"{self.max_images} per request (max_images)"
            )
        if logprobs is not None and not (isinstance(logprobs, int) and 0 <= logprobs <= 20):
            raise ValueError(f"logprobs must be an integer from 0 to 20, got {logprobs!r}")
        stop_ids = self.stop_ids if config.eos_token_ids is None else config.eos_token_ids
        request = Request(self, prompt, images, config, max_new, stop_ids, logprobs, logits_processor)
        n_images = 0 if images is None else images.pixel_values.shape[1]
        if len(prompt) + max_new > self.max_cache_tokens:
            estimate = ""
            if hasattr(self.model, "request_cost"):  # the planner prices Llama 3.2 Vision models
                need = self.model.request_cost(len(prompt), max_new, n_images).kv_cache
                budget = self.model.request_cost(self.max_cache_tokens, 0, 0).kv_cache
                scale, unit = byte_unit(max(need, budget))
                estimate = (
                    f": about {need / scale:.2f} {unit} of keys/values against {budget / scale:.2f} {unit}"
                )
            raise ValueError(
                f"the request needs {len(prompt) + max_new} cache tokens, more than the engine's budget of "
                f"{self.max_cache_tokens} (max_cache_tokens){estimate}; shorten the prompt or lower "
                "max_new_tokens"
            )
        if self.max_request_bytes is not None:
            check_request(self.model.request_cost(len(prompt), max_new, n_images), self.max_request_bytes)
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(
                    f"{len(self._waiting)} requests are waiting already (max_queue); try again later"
                )
            self._waiting.append(request)
            if self.background and self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="llama-vision-engine", daemon=True)
                self._thread.start()
                _running.add(self)
            self._lock.notify()
        return request

    def tokens(self, inputs: dict[str, torch.Tensor], config: GenerationConfig) -> Iterator[torch.Tensor]:
        """A batch (B rows of processor outputs, left- or right-padded) as B requests: yields every row's
        next token (B,) per step; a row that has ended yields FINISHED (-1). A row's end-of-turn id is
        yielded, then the row has ended. Closing the iterator cancels the requests.

        The rows are queued under the engine's lock, so the loop sees them all at once and an idle engine
        prefills them together; a row that is refused cancels the rows queued before it."""
        requests: list[Request] = []
        with self._lock:
            try:
                for row in split_rows(inputs):
                    requests.append(self.add_request(row, config))
            except BaseException:
                for r in requests:
                    r.cancel()
                raise
        streams = [iter(r) for r in requests]
        try:
            while True:
                step = [next(s, FINISHED) for s in streams]
                if all(t == FINISHED for t in step):
                    return
                yield torch.tensor(step)
                if all(r.finished and r._events.empty() for r in requests):
                    return
        finally:
            for r in requests:
                r.cancel()

    def stats(self) -> dict[str, float]:
        """For metrics: running rows, waiting requests, reserved cache tokens, prefix store bytes, and the
        totals since start (seconds and counts of prefills and decode steps, decoded tokens)."""
        with self._lock:
            return {
                "running": sum(r is not None for r in self._rows),
                "waiting": len(self._waiting),
                "reserved_tokens": self._reserved,
                "prefix_cache_bytes": self.prefixes.nbytes,
                **self.totals,
            }

    # ---------------------------------------------------------------- the loop

    def step(self) -> bool:
        """Admit waiting requests into free rows (prefill), then decode one token for every running row.
        Returns whether any request is still running or waiting."""
        with torch.no_grad():
            self._retire_cancelled()
            self._admit()
            if any(r is not None for r in self._rows):
                self._decode()
        with self._lock:
            return bool(self._waiting) or any(r is not None for r in self._rows)

    def close(self) -> None:
        """Cancel everything and stop the background loop (at exit too, so no thread dies inside torch)."""
        with self._lock:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            self._lock.notify()
        for r in waiting:
            r._finish("cancelled")
        for r in self._rows:
            if r is not None:
                r.cancel()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._waiting and not any(r is not None for r in self._rows):
                    self._lock.wait()
                if self._closed and not any(r is not None for r in self._rows):
                    return
            try:
                self.step()
            except BaseException as error:  # a failed step fails what runs, never the loop
                for i, r in enumerate(self._rows):
                    if r is not None:
                        r._fail(error)
                        self._free(i, keep=False)

    def _wake_up(self) -> None:
        with self._lock:
            self._lock.notify()

    def _retire_cancelled(self) -> None:
        with self._lock:
            now = time.monotonic()
            kept: deque[Request] = deque()
            for r in self._waiting:
                if r._cancelled:
                    r._finish("cancelled")
                elif self.queue_timeout is not None and now - r.created > self.queue_timeout:
                    r._fail(
                        TimeoutError(f"the request waited more than {self.queue_timeout:g} s in the queue")
                    )
                else:
                    kept.append(r)
            self._waiting = kept
        for i, r in enumerate(self._rows):
            if r is not None and r._cancelled:
                r._finish("cancelled")
                self._free(i)

    def _admit(self) -> None:
        """Take the waiting requests that fit (a free row each, room in `max_cache_tokens`) and prefill
        them together, first in, first out.

        While rows are decoding, the admitted prompt and image tokens together stay within
        `prefill_tokens_per_step` (the first request always goes), so those rows wait for one bounded
        prefill at most between two tokens. With no row decoding nobody waits on the prefill, so only the
        prompt tokens count: requests arriving together at an idle engine (a batch, a burst of clients)
        are prefilled at once instead of one per step with decode steps between them. The vision tower
        then runs in calls of at most `prefill_tokens_per_step` image tokens each (`_encode`), so neither
        the text prefill nor a vision call grows past what a step costs while decoding."""
        with self._lock:
            free = [i for i, r in enumerate(self._rows) if r is None]
            idle = len(free) == len(self._rows)
            batch: list[tuple[int, Request]] = []
            tokens = 0
            while self._waiting and len(batch) < len(free):
                request = self._waiting[0]
                need = request.prompt_tokens + request.max_new_tokens
                cost = request.prompt_tokens + (0 if idle else request.image_tokens)
                if self._reserved + need > self.max_cache_tokens:
                    break  # first in, first out: the head waits for room
                if batch and tokens + cost > self.prefill_tokens_per_step:
                    break
                self._waiting.popleft()
                row = free[len(batch)]
                self._rows[row] = request
                self._reserved += need
                tokens += cost
                batch.append((row, request))
        if not batch:
            return
        start = time.perf_counter()
        try:
            self._prefill(batch)
        except Exception as error:
            if len(batch) == 1:  # a request that fails (bad images, ...) fails alone
                request._fail(error)
                self._free(batch[0][0], keep=False)
                return
            for one in batch:  # find the one that failed: the others run as they would alone
                try:
                    self._prefill([one])
                except Exception as error:
                    one[1]._fail(error)
                    self._free(one[0], keep=False)
        self.totals["prefill_s"] += time.perf_counter() - start
        self.totals["prefills"] += len(batch)

    def _prefill(self, batch: list[tuple[int, Request]]) -> None:
        """Prefill requests into their rows: the images of every one without a prefix hit through the
        vision tower in one call, then every prompt in one multi-row prefill; choose each first token."""
        model, cache = self.model, self._ensure_cache()
        device = model.device
        hits = [
            self.prefixes.lookup(b"" if r.images is None else r.images.digest, r.prompt) for _, r in batch
        ]
        encode = [
            r
            for (_, r), hit in zip(batch, hits)
            if r.images is not None and (hit is None or hit[0].images is None)
        ]
        encoded = iter(self._encode([r.images for r in encode]))
        contexts: list[ImageContext | None] = []
        starts = []
        for (row, r), hit in zip(batch, hits):
            context = None
            if r.images is not None:
                # the same images as the hit's: their keys/values are already there
                kv = next(encoded) if r in encode else hit[0].images
                context = ImageContext(kv, *model.image_masks(r.images.cross_attention_mask.to(device)))
                r.image_kv = kv
            contexts.append(context)
            start = 0
            if hit is not None and hit[1] > 0:
                start = hit[1]
                cache.load_row(row, hit[0], start)
            starts.append(start)
        lengths = [len(r.prompt) - s for (_, r), s in zip(batch, starts)]
        ids = torch.zeros(len(batch), max(lengths), dtype=torch.int64)  # right-padded
        for b, ((_, r), s) in enumerate(zip(batch, starts)):
            ids[b, : lengths[b]] = torch.tensor(r.prompt[s:])
        rows = [row for row, _ in batch]
        logits = model.prefill(ids.to(device), cache, rows, starts, lengths, contexts)
        for row, r in batch:
            r.row, r.length = row, len(r.prompt)
            if r.config.repetition_penalty != 1.0:
                prompt = torch.tensor(r.prompt, device=device)
                r.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=device)
                r.seen[prompt[prompt < logits.shape[-1]]] = True
            if r.config.seed is not None:
                r.generator = torch.Generator(device=device).manual_seed(r.config.seed)
        self._choose([r for _, r in batch], logits)

    def _encode(self, images: list[_Images]) -> list[ImageKV]:
        """Every request's real images through the vision tower, in as few calls as keep each call within
        `prefill_tokens_per_step` image tokens (one request's images at least); each one's image
        keys/values."""
        groups: list[list[_Images]] = []
        tokens = 0
        for im in images:
            cost = im.pixel_values.shape[1] * self.image_tokens_per_image
            if not groups or tokens + cost > self.prefill_tokens_per_step:
                groups.append([])
                tokens = 0
            groups[-1].append(im)
            tokens += cost
        return [kv for group in groups for kv in self._encode_together(group)]

    def _encode_together(self, images: list[_Images]) -> list[ImageKV]:
        """Requests' real images through the vision tower in one call; each one's image keys/values."""
        model, device = self.model, self.model.device
        pixels = torch.cat([im.pixel_values for im in images], dim=1).to(device=device, dtype=model.dtype)
        ids = torch.cat([im.aspect_ratio_ids for im in images], dim=1).to(device)
        tiles = torch.cat([im.aspect_ratio_mask for im in images], dim=1).to(device)
        kv = model.image_kv(
            model.encode_images(pixels, ids, tiles)
        )  # per layer 1 Hkv S Dh, S over all images
        if len(images) == 1:
            return [kv]
        sizes = [im.pixel_values.shape[1] * self.image_tokens_per_image for im in images]
        # copies, so a request's keys/values (kept by the prefix store) do not hold the whole batch's
        per_layer = [(k.split(sizes, dim=2), v.split(sizes, dim=2)) for k, v in kv]
        return [[(k[i].clone(), v[i].clone()) for k, v in per_layer] for i in range(len(images))]

    def _decode(self) -> None:
        cache = self._cache
        running = [(i, r) for i, r in enumerate(self._rows) if r is not None]
        last = running[-1][0] + 1
        length = max(r.length for _, r in running) + 1
        image_tokens = max((_image_slots(r) for _, r in running), default=0)
        if self.compiled:  # a bounded set of shapes: each compiles once
            n = next(s for s in self._sizes(self.max_batch) if s >= last)
            length = next(s for s in self._sizes(self.max_length, 128) if s >= length)
            image_tokens = cache.image_tokens if image_tokens else 0
        else:
            n = last
        # Rows between the running ones (freed) write a token at slot 0, which their next prefill overwrites.
        token_list, slot_list = [0] * n, [0] * n
        for i, r in running:
            token_list[i], slot_list[i] = r.tokens[-1], r.length
        tokens, slots = torch.tensor(token_list), torch.tensor(slot_list)  # one tensor each, not n writes
        device = self.model.device
        if self.compiled and (n, length, image_tokens) not in self._shapes:
            self._shapes.add((n, length, image_tokens))
            self.compilations += 1
        if self._graphs:  # the graphs may now reuse the last step's output buffers
            torch.compiler.cudagraph_mark_step_begin()
        start = time.perf_counter()
        logits = self._step(tokens.to(device), slots.to(device), cache, length, image_tokens)
        for _, r in running:
            r.length += 1
        if len(running) < n:  # rows that do not run (freed, or the compiled step's spare rows)
            logits = logits[[i for i, _ in running]]
        self._choose([r for _, r in running], logits)
        self.totals["decode_s"] += time.perf_counter() - start
        self.totals["decode_steps"] += 1
        self.totals["decode_tokens"] += len(running)

    def _choose(self, requests: list[Request], logits: torch.Tensor) -> None:
        """Pick each request's next token from its logits row (len(requests), V); emit it; end rows."""
        plain = all(r.config.greedy and r.seen is None and r.logits_processor is None for r in requests)
        if plain:
            chosen = logits.argmax(dim=-1).tolist()
        else:
            chosen = []
            for r, row in zip(requests, logits):
                if r.logits_processor is not None:
                    row = r.logits_processor(r.tokens, row)
                seen = None if r.seen is None else r.seen[None]
                chosen.append(int(select(row[None], r.config, seen, r.generator)[0]))
        top = None
        if any(r.top_logprobs is not None for r in requests):
            top = logits.log_softmax(dim=-1)
        for k, (r, token) in enumerate(zip(requests, chosen)):
            logprob = None
            if r.top_logprobs is not None:
                row = top[k]
                best = row.topk(r.top_logprobs) if r.top_logprobs else None
                pairs = () if best is None else tuple(zip(best.indices.tolist(), best.values.tolist()))
                logprob = TokenLogprob(token, float(row[token]), pairs)
            if r.seen is not None:
                r.seen[token] = True
            r._emit(token, logprob)
            if token in r.stop_ids:
                r._finish("stop")
            elif len(r.tokens) >= r.max_new_tokens:
                r._finish("length")
            if r.finished:
                self._free(r.row)

    def _free(self, row: int | None, keep: bool = True) -> None:
        """Free a row; its keys/values go to the prefix store unless `keep` is False."""
        if row is None:
            return
        r = self._rows[row]
        if r is None:
            return
        if keep and self.prefixes.budget > 0 and self._cache is not None and r.length > 0:
            fed = tuple(r.prompt + r.tokens[: r.length - len(r.prompt)])
            digest = b"" if r.images is None else r.images.digest
            self.prefixes.insert(digest, fed, self._cache.save_row(row, r.length, r.image_kv))
        with self._lock:
            self._rows[row] = None
            self._reserved -= r.prompt_tokens + r.max_new_tokens
        if self._cache is not None:
            self._cache.set_images(row, None)

    # ---------------------------------------------------------------- helpers

    def _ensure_cache(self) -> Cache:
        if self._cache is None:
            self._cache = self.model.new_cache(
                self.max_batch, self.max_length, self.max_images * self.image_tokens_per_image
            )
            if self._graphs:  # the graphs read the buffers in place
                for pair in [
                    *((c.k, c.v) for c in self._cache.layers if c is not None),
                    *self._cache.image_kv,
                ]:
                    for t in pair:
                        torch._dynamo.mark_static_address(t)
                for t in (self._cache.image_mask, self._cache.image_rows):
                    torch._dynamo.mark_static_address(t)
        return self._cache

    @staticmethod
    def _sizes(limit: int, smallest: int = 1) -> list[int]:
        """Powers of two from `smallest` below `limit`, then `limit` itself."""
        sizes = [smallest << k for k in range(max(0, math.ceil(math.log2(max(limit / smallest, 1)))))]
        return [s for s in sizes if s < limit] + [limit]

    def _budget(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """New tokens that fit after the prompt; a prompt that leaves no room is an error."""
        if prompt_tokens >= self.context:
            raise ValueError(
                f"the prompt has {prompt_tokens} tokens and the model's context is {self.context}: "
                "no room for an answer; shorten the conversation or use fewer images"
            )
        if prompt_tokens >= self.max_length:
            raise ValueError(
                f"the prompt has {prompt_tokens} tokens and this engine's rows hold {self.max_length} "
                "(max_length): no room for an answer; shorten the conversation or raise max_length"
            )
        return min(max_new_tokens, self.max_length - prompt_tokens)

    def _split(self, inputs: dict[str, torch.Tensor]) -> tuple[list[int], _Images | None]:
        ids = inputs["input_ids"]
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"add_request takes one row (input_ids of shape (1, T)), got {tuple(ids.shape)}")
        mask = inputs.get("attention_mask")
        keep = torch.ones(ids.shape[1], dtype=torch.bool) if mask is None else mask[0].bool().cpu()
        prompt = ids[0].cpu()[keep].tolist()
        if not prompt:
            raise ValueError("the prompt is empty")
        pixel_values = inputs.get("pixel_values")
        if pixel_values is None or pixel_values.shape[1] == 0:
            return prompt, None
        real = (inputs["aspect_ratio_ids"][0] > 0).nonzero()[:, 0]  # padding image slots have id 0
        if len(real) == 0:
            return prompt, None
        cam = inputs["cross_attention_mask"][:, keep.to(inputs["cross_attention_mask"].device)][:, :, real]
        images = _Images(
            pixel_values=pixel_values[:, real],
            aspect_ratio_ids=inputs["aspect_ratio_ids"][:, real],
            aspect_ratio_mask=inputs["aspect_ratio_mask"][:, real],
            cross_attention_mask=cam,
            digest=b"",
        )
        images.digest = _digest(images)
        return prompt, images


_running: weakref.WeakSet[Engine] = weakref.WeakSet()  # engines whose loop thread runs


@atexit.register
def _close_all() -> None:
    for engine in list(_running):
        engine.close()


def _image_slots(request: Request) -> int:
    """Image slots a running request uses in its row's pool."""
    return 0 if request.image_kv is None else request.image_kv[0][0].shape[2]


def split_rows(inputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The rows of a processor batch, each as a batch of one (padding is dropped by `add_request`)."""
    B = inputs["input_ids"].shape[0]
    return [{k: v[b : b + 1] for k, v in inputs.items() if isinstance(v, torch.Tensor)} for b in range(B)]


def _digest(images: _Images) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for t in (images.pixel_values, images.aspect_ratio_ids, images.aspect_ratio_mask):
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0
