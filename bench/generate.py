"""Generation benchmark: our engine and Hugging Face transformers side by side, in one process, on the
same random checkpoint, with the same prompts and images.

    python bench/generate.py                       # bench-small, float32, CPU, batch 1 and 8, ours and HF
    python bench/generate.py --device cuda --dtype bfloat16 --compile \\
        --preset llama-3.2-11b-vision-instruct --skip-hf

What is measured, per engine and batch size (median of --repeats runs, after one warm-up run):
- TTFT: from the raw prompt strings and PIL images to the first generated token on the host, each engine
  running its own preprocessing (ours: `lv.processor`; HF: `MllamaProcessor` with the torchvision-backed
  `MllamaImageProcessor`, the hub's settings). "Of which vision tower": that engine's vision encoder alone
  on its preprocessed inputs (timed after each run), the work both implementations share.
- decode tokens/s: tokens after the first, per second; "per sequence" and "all" (per sequence x batch).
- % of the bandwidth limit: decode tokens/s over what the measured memory bandwidth allows when every
  decode step reads its weights and caches once (`decode_bytes_per_step`); the bandwidth is measured
  just before and after each timed run and each run is set against its own, the median shown.
- peak memory: the highest resident memory (RSS, sampled every 5 ms from /proc/self/statm; on CUDA the
  allocator's peak) above what was resident before the run: caches and activations, not weights.
- load: everything each engine needs before its first prompt, from the same files, page cache warm, best
  of two: ours `LlamaVision.from_pretrained` (model and processor); HF `MllamaForConditionalGeneration`
  and `MllamaProcessor.from_pretrained`, the processor from a folder saved beside the checkpoint.

Both engines decode greedily and exactly --new-tokens tokens (end-of-turn ids never stop a row), so the
two sides do the same work; the table reports how many generated tokens are equal as a sanity check.

Non-obvious choices:
- The checkpoint is written by `save_checkpoint` (hub layout) with Meta's tokenizer.model beside it. HF is
  loaded from it with `intermediate_layers_indices` each lowered by one: transformers >= 4.56 takes the
  *output* of vision layer i where Meta (and we) take its input (README, "Known differences").
- Prompts begin with `<|image|><|begin_of_text|>`: on image-first prompts HF and Meta agree (HF lets text
  before the image attend to it, transformers issue #39379). Rows of a batch hold different words and
  different images, all of the same token length and tile count, so nothing is padded.
- Random weights: matrices N(0, 1/fan_in), embeddings N(0, 1), norm weights 1 + N(0, 0.1^2), biases
  N(0, 0.1^2), gates U(0.3, 1) so the image changes the text (the scheme of tests/reference.py).
- `--skip-hf` without `--checkpoint` builds the random model directly on --device in --dtype (meta device,
  `to_empty`, fill), with no files and so no load time: an 11B model is never written or read.
- `--compile` applies to our engine only; HF runs its default eager path with SDPA attention.
- The streaming bandwidth of a virtual machine can differ from one process to the next and within one
  (28 to 50 GB/s on the 2-core VM this was written on, within seconds), hence the measurements between
  runs. The last line says how much CPU other processes took while generating; above a few %, rerun.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from reference import meta_tokenizer_path, random_image, randomize_  # noqa: E402  as the tests make them

from llama_vision import (
    GenerationConfig,
    LlamaVision,
    LlamaVisionConfig,
    LlamaVisionModel,
    Processor,
    get_preset,
    read_config,
    save_checkpoint,
)
from llama_vision.config import IMAGE_TOKEN_ID
from llama_vision.cpu_linear import use_blocked_linears
from llama_vision.engine import Engine as OurEngine
from llama_vision.tokenizer import PRETOKENIZE_REGEX, SPECIAL_TOKENS, Tokenizer

HF_PROCESSOR = "hf_processor"  # checkpoint subfolder with HF's processor files (our side never reads it)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WORDS = (
    "the cat sat on a red mat and looked at blue sky while birds sang in green trees near old house by "
    "river where children played with small dog under warm sun"
).split()


# --------------------------------------------------------------------------------------- the machine
def machine_line(device: torch.device) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    line = f"{cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"
    if device.type == "cuda":
        line += f", {torch.cuda.get_device_name(device)}"
    return f"{line}; torch {torch.__version__}, transformers {_transformers_version()}"


def _transformers_version() -> str:
    try:
        import transformers
    except ImportError:
        return "not installed"
    return transformers.__version__


def cpu_seconds() -> tuple[float, float, float]:
    """(wall clock, CPU seconds used by every process since boot, CPU seconds used by this process)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # user nice system [idle iowait] irq softirq steal
    own = os.times()
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def others_share(start: tuple[float, float, float]) -> float:
    """The fraction of all CPUs that other processes used since `start` (a `cpu_seconds()`)."""
    wall, busy, own = (b - a for a, b in zip(start, cpu_seconds()))
    return max(0.0, busy - own) / (wall * (os.cpu_count() or 1))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory() -> None:
    """Collect garbage and give freed heap back to the OS, so the next run starts from a low baseline."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@contextmanager
def peak_memory(device: torch.device) -> Iterator[list[float]]:
    """Yields a list that holds, after the block, the peak memory in MB above the level before it: the CUDA
    allocator's peak, or on the CPU the process RSS sampled every 5 ms by a background thread."""
    result: list[float] = []
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        sync(device)
        result.append((torch.cuda.max_memory_allocated(device) - base) / 2**20)
        return
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base = peak = rss()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.005):
            peak = max(peak, rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        result.append((max(peak, rss()) - base) / 2**20)


def memory_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 5) -> tuple[float, float]:
    """(read, copy) bandwidth in bytes/s, best of `repeats`. Read: the faster of two streaming reads of a
    `gib` GiB float32 buffer on all threads, `torch.sum` and a matrix-vector product over it in blocks of
    256 x 512 (on this VM the second streams up to a fifth faster, and a limit must not be beaten).
    Copy: `copy_` of half the buffer into a second one (read + write)."""
    n = int(gib * 2**30) // 4
    src = torch.ones(n, device=device)
    dst = torch.empty(n // 2, device=device)
    blocks = src[: n // (256 * 512) * 256 * 512].view(-1, 256, 512)
    vector = torch.ones(512, 1, device=device).expand(blocks.shape[0], 512, 1)
    read = copy = 0.0
    for _ in range(repeats):
        for kernel, nbytes in ((src.sum, n * 4), (lambda: torch.bmm(blocks, vector), blocks.numel() * 4)):
            sync(device)
            t = time.perf_counter()
            kernel()
            sync(device)
            read = max(read, nbytes / (time.perf_counter() - t))
        t = time.perf_counter()
        dst.copy_(src[: n // 2])
        sync(device)
        copy = max(copy, n * 4 / (time.perf_counter() - t))
    return read, copy


def decode_bytes_per_step(
    config: LlamaVisionConfig, *, batch: int, context: float, image_tokens: int, dtype_bytes: int
) -> float:
    """Bytes one decode step must read from memory at the least, for `batch` rows.

    Read once per step, whatever the batch: every parameter of the text decoder that a new token passes
    through, i.e. each self-attention layer (norms, q/k/v/o, MLP), each cross-attention layer except its
    k_proj, v_proj and k_norm (image keys/values are computed once, at prefill), the final norm and lm_head.
    Read per row: one embedding row; the cached image keys and values (cross layers x 2 x Hkv x S x Dh,
    S = `image_tokens` per row, padding tiles included as both engines keep them); the self-attention KV
    cache (self layers x 2 x Hkv x `context` x Dh). `context` is the mean cache length over the decoded
    tokens, prompt + new tokens / 2. Activations (kilobytes) and the vision tower (unused) are left out.
    """
    t = config.text
    D, F = t.hidden_size, t.intermediate_size
    H, Hkv, Dh = t.num_attention_heads, t.num_key_value_heads, t.head_dim
    n_cross = len(t.cross_attention_layers)
    n_self = t.num_hidden_layers - n_cross
    mlp = 3 * D * F
    self_layer = 2 * D + D * H * Dh + 2 * D * Hkv * Dh + H * Dh * D + mlp
    cross_layer = 2 * D + D * H * Dh + Dh + H * Dh * D + mlp + 2  # q_norm, two gates
    weights = n_self * self_layer + n_cross * cross_layer + D + t.vocab_size * D
    per_row = D + n_cross * 2 * Hkv * image_tokens * Dh + n_self * 2 * Hkv * context * Dh
    return (weights + batch * per_row) * dtype_bytes


# ---------------------------------------------------------------------------------- checkpoint, inputs
def write_checkpoint(config: LlamaVisionConfig, path: Path, seed: int) -> None:
    """A random float32 checkpoint in the hub layout, with Meta's tokenizer.model."""
    model = randomize_(LlamaVisionModel(config), seed)
    save_checkpoint(model, path)
    shutil.copyfile(meta_tokenizer_path(), path / "tokenizer.model")
    del model
    release_memory()


def random_model(
    config: LlamaVisionConfig, device: torch.device, dtype: torch.dtype, seed: int, compile: bool
) -> LlamaVision:
    """Our model with random weights built directly on `device` in `dtype` (no checkpoint files)."""
    with torch.device("meta"):
        model = LlamaVisionModel(config).to(dtype)
    model = randomize_(model.to_empty(device=device), seed).eval()
    processor = Processor(Tokenizer.from_file(meta_tokenizer_path()), config)
    if device.type == "cpu":
        use_blocked_linears(model)
    return LlamaVision(model=model, processor=processor, compile=compile)


def write_hf_processor(config: LlamaVisionConfig, out: Path) -> None:
    """Save an `MllamaProcessor` to `out`: a tokenizer.json converted from Meta's tokenizer.model with the
    hub's special tokens (as tests/conftest.py builds it), and the hub's image processor settings."""
    from tokenizers import AddedToken
    from transformers import MllamaImageProcessor, MllamaProcessor, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(meta_tokenizer_path()), pattern=PRETOKENIZE_REGEX).converted()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
    )
    if tokenizer.convert_tokens_to_ids("<|image|>") != IMAGE_TOKEN_ID:
        raise RuntimeError("converted tokenizer does not number <|image|> 128256")
    v = config.vision
    images = MllamaImageProcessor(
        size={"height": v.image_size, "width": v.image_size},
        max_image_tiles=v.max_num_tiles,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    MllamaProcessor(images, tokenizer).save_pretrained(out)


def make_prompts(tokenizer: Tokenizer, batch: int, prompt_tokens: int) -> list[str]:
    """`batch` different prompts of exactly `prompt_tokens` tokens: `<|image|><|begin_of_text|>` and then
    single-token words, each row starting at a different word."""
    words = [w for w in WORDS if len(tokenizer.encode(" " + w)) == 1]
    head = "<|image|><|begin_of_text|>"
    n = prompt_tokens - 2
    prompts = ["".join(" " + words[(b + i) % len(words)] for i in range(n)) for b in range(batch)]
    prompts = [head + p for p in prompts]
    for p in prompts:
        got = len(tokenizer.encode(p))
        if got != prompt_tokens:
            raise RuntimeError(f"prompt has {got} tokens, wanted {prompt_tokens}: {p!r}")
    return prompts


# --------------------------------------------------------------------------------------------- engines
@dataclass
class Run:
    ttft: float  # s, raw inputs to the first token on the host
    decode: float  # s, first token to last token
    peak_mb: float  # nan: timed runs do not sample memory
    tokens: torch.Tensor  # B N generated ids
    bandwidth: float = float("nan")  # read bytes/s, the mean of what was measured just before and after


class Engine:
    name: str

    def load(self, path: Path) -> None:
        raise NotImplementedError

    def generate(self, prompts: list[str], images: list[Image.Image], new_tokens: int) -> Run:
        """Time one generation of exactly `new_tokens` greedy tokens per row (no memory sampling). The heap
        is not trimmed first: like a long-running process, each run reuses memory the allocator already
        holds instead of faulting in fresh pages (that is the memory run's business)."""
        gc.collect()
        t0 = time.perf_counter()
        tokens, times = self._generate(prompts, images, new_tokens)
        return Run(times[0] - t0, times[-1] - times[0], float("nan"), tokens)

    def peak_memory_mb(self, prompts: list[str], images: list[Image.Image], new_tokens: int) -> float:
        """Peak memory of one generation, in a run of its own: the sampling thread would slow a timed one."""
        release_memory()
        with peak_memory(self.device) as peak:
            self._generate(prompts, images, new_tokens)
        return peak[0]

    def _generate(
        self, prompts: list[str], images: list[Image.Image], new_tokens: int
    ) -> tuple[torch.Tensor, list[float]]:
        """Generated ids (B, N) and the perf_counter time each step's tokens reached the host."""
        raise NotImplementedError

    def vision_seconds(self, prompts: list[str], images: list[Image.Image]) -> float:
        """Time of the vision tower alone (its share of TTFT) on this engine's preprocessed inputs."""
        pixel_values, aspect_ratio_ids, aspect_ratio_mask = self._vision_inputs(prompts, images)
        with torch.no_grad():
            sync(self.device)
            t0 = time.perf_counter()
            self._vision_model()(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
            sync(self.device)
        return time.perf_counter() - t0

    def _vision_inputs(self, prompts: list[str], images: list[Image.Image]) -> list[torch.Tensor]:
        raise NotImplementedError

    def _vision_model(self) -> torch.nn.Module:
        raise NotImplementedError


class Ours(Engine):
    name = "llama_vision"

    def __init__(self, device: torch.device, dtype: torch.dtype, compile: bool) -> None:
        self.device, self.dtype, self.compile = device, dtype, compile
        self.lv: LlamaVision | None = None

    def load(self, path: Path) -> None:
        self.lv = None
        release_memory()
        self.lv = LlamaVision.from_pretrained(
            path, device=self.device, dtype=self.dtype, compile=self.compile
        )

    def _generate(
        self, prompts: list[str], images: list[Image.Image], new_tokens: int
    ) -> tuple[torch.Tensor, list[float]]:
        config = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, eos_token_ids=())
        inputs = self.lv.processor(text=prompts, images=[[im] for im in images])
        self._size_engine(len(prompts), inputs["input_ids"].shape[1] + new_tokens)
        tokens, times = [], []
        for step in self.lv.engine.tokens(inputs, config):
            tokens.append(step.cpu())
            times.append(time.perf_counter())
        return torch.stack(tokens, dim=1), times

    def _size_engine(self, batch: int, length: int) -> None:
        """An engine for exactly this batch: `batch` rows of `length` tokens, one image each, and no
        prefix store (the timed runs repeat the same prompts, which it would serve from memory)."""
        shape = (batch, length)
        if getattr(self, "_shape", None) != shape:
            self.lv.engine.close()
            self.lv.engine = OurEngine(
                self.lv.model,
                stop_ids=(),
                compile=self.compile,
                max_batch=batch,
                max_length=length,
                max_images=1,
                prefix_cache_bytes=0,
            )
            self._shape = shape

    def _vision_inputs(self, prompts: list[str], images: list[Image.Image]) -> list[torch.Tensor]:
        inputs = self.lv.processor(text=prompts, images=[[im] for im in images])
        return [inputs[k].to(self.device) for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")]

    def _vision_model(self) -> torch.nn.Module:
        return self.lv.model.vision_model


class HF(Engine):
    """transformers' `MllamaForConditionalGeneration` with SDPA attention and its own processor."""

    name = "transformers"

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.model = None
        self.processor = None

    def load(self, path: Path) -> None:
        from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor

        self.model = self.processor = None
        release_memory()
        self.processor = MllamaProcessor.from_pretrained(path / HF_PROCESSOR)
        config = MllamaConfig.from_pretrained(path)
        vision = config.vision_config
        vision.intermediate_layers_indices = [i - 1 for i in vision.intermediate_layers_indices]
        model = MllamaForConditionalGeneration.from_pretrained(
            path, config=config, dtype=self.dtype, attn_implementation="sdpa"
        )
        self.model = model.to(self.device).eval()

    def _generate(
        self, prompts: list[str], images: list[Image.Image], new_tokens: int
    ) -> tuple[torch.Tensor, list[float]]:
        from transformers.generation.streamers import BaseStreamer

        times: list[float] = []

        class Clock(BaseStreamer):  # put() gets the prompt once, then each step's tokens on the host
            def put(self, value: torch.Tensor) -> None:
                times.append(time.perf_counter())

            def end(self) -> None:
                pass

        inputs = self.processor(text=prompts, images=[[im] for im in images], return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        with torch.no_grad():
            out = self.model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=self.processor.tokenizer.pad_token_id,
                streamer=Clock(),
            )
        return out[:, inputs["input_ids"].shape[1] :].cpu(), times[1:]

    def _vision_inputs(self, prompts: list[str], images: list[Image.Image]) -> list[torch.Tensor]:
        inputs = self.processor(text=prompts, images=[[im] for im in images], return_tensors="pt")
        return [inputs[k].to(self.device) for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")]

    def _vision_model(self) -> torch.nn.Module:
        return self.model.model.vision_model


# ------------------------------------------------------------------------------------------------ main
@dataclass
class Figures:
    ttft: float  # s
    vision: float  # s, the vision tower alone
    per_seq: float  # decode tokens/s per row
    total: float  # decode tokens/s, all rows
    of_limit: float  # decode speed over the bandwidth limit of its own run, median over the runs
    bandwidth: tuple[float, float, float]  # read bytes/s around the runs: min, median, max
    peak_mb: float
    tokens: torch.Tensor  # B N


def measure(
    engines: Sequence[Engine],
    prompts: list[str],
    images: list[Image.Image],
    step_bytes: float,
    args: argparse.Namespace,
) -> dict[str, Figures]:
    """One warm-up run per engine (full length when compiling, so the timed runs reuse the compiled
    step), then `args.repeats` timed runs, the engines taking turns so that whatever else the machine
    does slows both alike; each figure is the median over the runs. The read bandwidth is measured
    between runs (the VM's drifts within seconds), so each run's decode speed is set against the limit
    of its own moment; after each run its vision tower is timed alone. Peak memory comes from one more
    run per engine, sampled."""
    device = engines[0].device
    for engine in engines:
        engine.generate(prompts, images, args.new_tokens if args.compile else min(4, args.new_tokens))
    runs: dict[str, list[Run]] = {e.name: [] for e in engines}
    vision: dict[str, list[float]] = {e.name: [] for e in engines}
    before = memory_bandwidth(device, gib=0.5, repeats=3)[0]
    for _ in range(args.repeats):
        for engine in engines:
            run = engine.generate(prompts, images, args.new_tokens)
            after = memory_bandwidth(device, gib=0.5, repeats=3)[0]
            run.bandwidth, before = (before + after) / 2, after
            runs[engine.name].append(run)
            vision[engine.name].append(engine.vision_seconds(prompts, images))
    peaks = {e.name: e.peak_memory_mb(prompts, images, args.new_tokens) for e in engines}
    results = {}
    for name, rs in runs.items():
        B, N = rs[0].tokens.shape
        if N != args.new_tokens:
            raise RuntimeError(f"{name} generated {N} tokens, not {args.new_tokens}")
        per_seq = statistics.median((N - 1) / r.decode for r in rs)
        bandwidth = sorted(r.bandwidth for r in rs)
        results[name] = Figures(
            ttft=statistics.median(r.ttft for r in rs),
            vision=statistics.median(vision[name]),
            per_seq=per_seq,
            total=per_seq * B,
            of_limit=statistics.median((N - 1) / r.decode * step_bytes / r.bandwidth for r in rs),
            bandwidth=(bandwidth[0], statistics.median(bandwidth), bandwidth[-1]),
            peak_mb=peaks[name],
            tokens=rs[0].tokens,
        )
    return results


def best_load_time(load: Callable[[], None], times: int = 2) -> float:
    best = float("inf")
    for _ in range(times):
        t = time.perf_counter()
        load()
        best = min(best, time.perf_counter() - t)
    return best


def load_engines(
    args: argparse.Namespace, path: Path | None, device: torch.device, dtype: torch.dtype
) -> tuple[Ours, HF | None, dict[str, float]]:
    """Both engines loaded from `path` (timed, page cache warm), or ours built in memory when `path` is None."""
    ours = Ours(device, dtype, args.compile)
    hf = None if args.skip_hf else HF(device, dtype)
    if path is None:
        ours.lv = random_model(get_preset(args.preset), device, dtype, args.seed, args.compile)
        return ours, hf, {}
    if hf is not None and not (path / HF_PROCESSOR).is_dir():
        write_hf_processor(read_config(path), path / HF_PROCESSOR)
    for f in path.rglob("*"):  # warm the page cache: both loads read from memory
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    load_s = {ours.name: best_load_time(lambda: ours.load(path))}
    if hf is not None:
        load_s[hf.name] = best_load_time(lambda: hf.load(path))
    return ours, hf, load_s


def ratio(ours: float, hf: float) -> str:
    return f"{ours / hf:.2f}x" if hf else "-"


def check(what: str, value: float, target: float, *, below: bool = False, pct: bool = False) -> str:
    ok = value <= target if below else value >= target
    shown = f"{100 * value:.0f}%" if pct else f"{value:.2f}x"
    return f"- {what}: {shown} {'PASS' if ok else 'FAIL'}"


def bench_batch(B: int, ours: Ours, hf: HF | None, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Table rows and target checks for batch size B."""
    config = ours.lv.config
    prompts = make_prompts(ours.lv.tokenizer, B, args.prompt_tokens)
    size = 2 * config.vision.image_size
    images = [random_image(size, size, seed=b) for b in range(B)]  # 2 x 2 tiles each
    step = decode_bytes_per_step(
        config,
        batch=B,
        context=args.prompt_tokens + args.new_tokens / 2,
        image_tokens=config.vision.max_num_tiles * config.vision.num_patches,
        dtype_bytes=torch.finfo(ours.dtype).bits // 8,
    )
    results = measure([ours] if hf is None else [ours, hf], prompts, images, step, args)
    o = results[ours.name]
    low, mid, high = o.bandwidth
    print(
        f"batch {B}: read bandwidth around our runs {low / 1e9:.1f} to {high / 1e9:.1f} GB/s, median "
        f"{mid / 1e9:.1f} -> limit {B * mid / step:.1f} tokens/s"
    )
    rows = [
        f"| {B} | {name} | {f.ttft:.3f} | {f.vision:.3f} | {f.per_seq:.1f} | {f.total:.1f} | "
        f"{100 * f.of_limit:.0f}% | {f.peak_mb:.0f} |"
        for name, f in results.items()
    ]
    checks = []
    if B == 1:
        checks.append(check("batch 1 decode >= 90% of the bandwidth limit", o.of_limit, 0.9, pct=True))
    if hf is not None:
        h = results[hf.name]
        rows.append(
            f"| {B} | ours / HF | {ratio(o.ttft, h.ttft)} | {ratio(o.vision, h.vision)} | "
            f"{ratio(o.per_seq, h.per_seq)} | "
            f"{ratio(o.total, h.total)} | | {ratio(o.peak_mb, h.peak_mb)} |"
        )
        if B == 1:
            checks.append(check("batch 1 decode >= 1.2x HF tokens/s", o.per_seq / h.per_seq, 1.2))
        checks.append(check(f"batch {B} TTFT <= 1.0x HF", o.ttft / h.ttft, 1.0, below=True))
        outside = (o.ttft - o.vision) / (h.ttft - h.vision)
        checks.append(
            check(f"batch {B} TTFT outside the vision tower <= 0.8x HF's", outside, 0.8, below=True)
        )
        same = (o.tokens == h.tokens).sum().item()
        checks.append(f"- batch {B}: generated tokens equal to HF's: {same} of {o.tokens.numel()}")
    release_memory()
    return rows, checks


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--compile", action="store_true", help="torch.compile our decode step (HF stays eager)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=64, help="including <|image|> and <|begin_of_text|>")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the median is shown")
    p.add_argument("--preset", default="bench-small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="checkpoint directory to reuse, or to fill with random weights when missing or empty "
        "(default: a temporary one)",
    )
    p.add_argument("--skip-hf", action="store_true", help="run our engine only")
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.prompt_tokens < 3 or args.repeats < 1:
        p.error("need --new-tokens >= 2, --prompt-tokens >= 3 and --repeats >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    print(f"machine: {machine_line(device)}")
    read_bw, copy_bw = memory_bandwidth(device)
    print(
        f"memory bandwidth: read {read_bw / 1e9:.1f} GB/s (best of torch.sum and a blocked matrix-vector "
        f"product over 1 GiB), copy {copy_bw / 1e9:.1f} GB/s"
    )

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        path = args.checkpoint
        if path is None and not args.skip_hf:
            path = Path(tmp)
        if path is not None and not (path.is_dir() and any(path.iterdir())):
            path.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            write_checkpoint(get_preset(args.preset), path, args.seed)
            print(f"checkpoint: random {args.preset} written to {path} in {time.perf_counter() - t:.1f} s")
        ours, hf, load_s = load_engines(args, path, device, dtype)

        config = ours.lv.config
        n_params = sum(p.numel() for p in ours.lv.model.parameters())
        image_tokens = config.vision.max_num_tiles * config.vision.num_patches
        step = decode_bytes_per_step(
            config,
            batch=1,
            context=args.prompt_tokens + args.new_tokens / 2,
            image_tokens=image_tokens,
            dtype_bytes=torch.finfo(dtype).bits // 8,
        )
        print(
            f"model: {args.preset} ({n_params / 1e6:.1f} M parameters, random weights, "
            f"{path or 'in memory'}), {args.dtype} on {device}"
            f"{', our decode step compiled' if args.compile else ''}; prompt {args.prompt_tokens} tokens + "
            f"1 image of {config.vision.max_num_tiles} tiles ({image_tokens} image tokens) per row; "
            f"{args.new_tokens} greedy new tokens; median of {args.repeats} runs"
        )
        print(
            f"decode at batch 1 reads {step / 1e6:.1f} MB per token -> {read_bw / step:.1f} tokens/s at most"
        )
        rows, checks = [], []
        start = cpu_seconds()
        for B in args.batch_sizes:
            r, c = bench_batch(B, ours, hf, args)
            rows += r
            checks += c
        others = others_share(start)

    print()
    print(
        "| batch | engine | TTFT (s) | of which vision tower (s) | decode tok/s per sequence "
        "| decode tok/s all sequences | % of bandwidth limit | peak memory (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if load_s:
        names = list(load_s)
        cells = [f"{load_s[n]:.2f}" for n in names]
        if len(names) == 2:
            names.append("ours / HF")
            cells.append(ratio(*load_s.values()))
        print()
        print("| load: model + processor (s, warm page cache, best of 2) | " + " | ".join(names) + " |")
        print("|---" * (len(names) + 1) + "|")
        print(f"| {args.preset} | " + " | ".join(cells) + " |")
    print()
    print("\n".join(checks))
    busy = " (above a few %, the figures are unreliable: rerun on a quiet machine)" if others > 0.03 else ""
    print(f"- other processes used {100 * others:.0f}% of the CPUs while generating{busy}")


if __name__ == "__main__":
    main()
