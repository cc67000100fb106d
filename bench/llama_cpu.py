"""Text-only Llama on the CPU: ours vs transformers vs llama.cpp (llama-cpp-python), one process, the same
random weights, on a Llama-3.2-1B-shaped model (2048 wide, 16 layers, 32 heads / 8 KV heads, 8192 MLP,
tied 128,256-token embeddings, llama3 RoPE factor 32; 1.24 B parameters).

For each precision (float32, and 16-bit: bfloat16 for ours and transformers, f16 for llama.cpp, its
16-bit CPU format) it reports prompt tokens/s (one 64-token prompt, prefill only) and decode tokens/s at
batch 1 (greedy, `--new-tokens` tokens after the first), each with its share of the bandwidth limit:
read bandwidth (bench/generate.py's `memory_bandwidth`, measured just before each run) divided by the
bytes a decode step reads (every weight once; the tied table once, as the output layer).

The checkpoint is written by transformers (`save_pretrained`), and llama.cpp's GGUF files are made from
it by llama.cpp's own converter, `convert_hf_to_gguf.py` from the llama-cpp-python source distribution
(`--convert-script`), with its gguf-py package. llama-cpp-python is a bench-only dependency
(`pip install llama-cpp-python gguf`, which compiles llama.cpp); without it that column is skipped.
Models are loaded one at a time (a float32 copy is 4.9 GB). Command:

    python bench/llama_cpu.py                       # add --layers 4 for a quick run on a shallower model
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from generate import memory_bandwidth  # noqa: E402  the same bandwidth measurement as the vision benchmark
from reference import meta_tokenizer_path, randomize_  # noqa: E402

from llama_vision import LlamaVision  # noqa: E402
from llama_vision.llama import LLAMA_PRESETS  # noqa: E402
from llama_vision.tokenizer import PRETOKENIZE_REGEX, SPECIAL_TOKENS  # noqa: E402

CPU = torch.device("cpu")


def write_checkpoint(out: Path, layers: int) -> None:
    import transformers

    config = LLAMA_PRESETS["llama-3.2-1b"].replace(num_hidden_layers=layers).to_hf()
    config["torch_dtype"] = "float32"
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    randomize_(model, seed=0)
    model.tie_weights()
    model.save_pretrained(str(out))
    write_tokenizer_json(out)
    del model
    gc.collect()


def write_tokenizer_json(out: Path) -> None:
    """Llama 3's tokenizer.json, converted from Meta's tokenizer.model by transformers' TikTokenConverter,
    with the 256 special tokens of Llama 3.1+ (llama.cpp's converter reads this file)."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tokenizer = TikTokenConverter(
        vocab_file=str(meta_tokenizer_path()), pattern=PRETOKENIZE_REGEX
    ).converted()
    special = [*SPECIAL_TOKENS[:11], *(f"<|reserved_special_token_{i}|>" for i in range(2, 247))]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|end_of_text|>",
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )


def step_bytes(layers: int, element: int) -> int:
    """Bytes one decode step reads: every weight once (the tied table once, as the head)."""
    c = LLAMA_PRESETS["llama-3.2-1b"]
    d, f, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d
    return (layers * per_layer + c.vocab_size * d + d) * element


def bandwidth() -> float:
    return memory_bandwidth(CPU, gib=0.5, repeats=2)[0]


def run_ours(path: Path, dtype: torch.dtype, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
    lv = LlamaVision.from_pretrained(path, dtype=dtype, background=False)
    inputs = {
        "input_ids": torch.tensor([prompt]),
        "attention_mask": torch.ones(1, len(prompt), dtype=torch.long),
    }
    greedy = lv.generation_config.replace(temperature=0.0, eos_token_ids=[])
    lv.engine.add_request(inputs, greedy.replace(max_new_tokens=2)).result()  # warm-up
    t = time.perf_counter()
    lv.engine.add_request(inputs, greedy.replace(max_new_tokens=1)).result()
    prompt_s = time.perf_counter() - t
    request = lv.engine.add_request(inputs, greedy.replace(max_new_tokens=new + 1))
    it = iter(request)
    next(it)
    t = time.perf_counter()
    for _ in it:
        pass
    decode_s = time.perf_counter() - t
    del lv
    gc.collect()
    return len(prompt) / prompt_s, new / decode_s, request.tokens


def run_hf(path: Path, dtype: torch.dtype, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    ids = torch.tensor([prompt])
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, **kwargs)  # warm-up
        t = time.perf_counter()
        model(ids)
        prompt_s = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        first = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new + 1, min_new_tokens=new + 1, **kwargs)
        decode_s = time.perf_counter() - t - first
    del model
    gc.collect()
    return len(prompt) / prompt_s, new / decode_s, out[0, len(prompt) :].tolist()


def convert_gguf(path: Path, outtype: str, script: Path) -> Path:
    out = path / f"model-{outtype}.gguf"
    if not out.exists():
        subprocess.run(
            [sys.executable, str(script), str(path), "--outtype", outtype, "--outfile", str(out)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return out


def quantize_gguf(path: Path, source: Path, kind: str) -> Path:
    """llama.cpp's own quantizer (`llama_model_quantize`) from the f16 GGUF: q8_0 or q4_0."""
    import ctypes

    import llama_cpp

    out = path / f"model-{kind}.gguf"
    if not out.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[
            kind
        ]
        if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {source} to {kind}")
    return out


def run_llamacpp(gguf: Path, prompt: list[int], new: int) -> tuple[float, float, list[int]]:
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(gguf), n_ctx=256, n_batch=len(prompt), n_threads=torch.get_num_threads(), verbose=False
    )
    llm.eval(prompt[:8])  # warm-up
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    prompt_s = time.perf_counter() - t
    tokens = [_last_argmax(llm)]
    t = time.perf_counter()
    for _ in range(new):
        llm.eval([tokens[-1]])
        tokens.append(_last_argmax(llm))
    decode_s = time.perf_counter() - t
    del llm
    gc.collect()
    return len(prompt) / prompt_s, new / decode_s, tokens


def _last_argmax(llm: Any) -> int:
    """Greedy token from the logits of the last evaluated position (llama.cpp keeps only that row)."""
    import llama_cpp
    import numpy as np

    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    return int(logits.argmax())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (Llama 3.2 1B: 16)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--checkpoint", type=Path, help="keep the random checkpoint (and GGUFs) here")
    parser.add_argument("--convert-script", type=Path, help="llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", torch.get_num_threads())))

    path = args.checkpoint or Path(tempfile.mkdtemp(prefix="llama_cpu_"))
    if not (path / "config.json").exists():
        write_checkpoint(path, args.layers)
    layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    g = torch.Generator().manual_seed(0)
    prompt = [128000, *torch.randint(0, 128000, (args.prompt_tokens - 1,), generator=g).tolist()]
    try:
        import llama_cpp  # noqa: F401

        have_llamacpp = args.convert_script is not None and args.convert_script.is_file()
    except ImportError:
        have_llamacpp = False
    print(
        f"Llama-3.2-1B shape with {layers} layers; {torch.get_num_threads()} threads; torch {torch.__version__}"
    )
    if not have_llamacpp:
        print("llama.cpp: skipped (needs llama-cpp-python and --convert-script convert_hf_to_gguf.py)")

    rows = []
    for label, dtype, gguf_type in (("float32", torch.float32, "f32"), ("16-bit", torch.bfloat16, "f16")):
        element = 4 if dtype == torch.float32 else 2
        nbytes = step_bytes(layers, element)
        engines = [("llama_vision", lambda d=dtype: run_ours(path, d, prompt, args.new_tokens))]
        if not args.skip_hf:
            engines.append(("transformers", lambda d=dtype: run_hf(path, d, prompt, args.new_tokens)))
        if have_llamacpp:
            gguf = convert_gguf(path, gguf_type, args.convert_script)
            engines.append(
                (f"llama.cpp {gguf_type}", lambda f=gguf: run_llamacpp(f, prompt, args.new_tokens))
            )
        results = {}
        for name, run in engines:
            bw = bandwidth()
            prompt_tps, decode_tps, tokens = run()
            limit = bw / nbytes
            results[name] = (prompt_tps, decode_tps, tokens)
            rows.append((label, name, prompt_tps, decode_tps, 100 * decode_tps / limit, bw / 1e9, limit))
        ours_tokens = results["llama_vision"][2]
        for name, (_, _, tokens) in results.items():
            same = sum(a == b for a, b in zip(ours_tokens, tokens))
            print(f"{label}: {name} greedy tokens equal to ours: {same} of {len(ours_tokens)}")
        for name, (p, d, _) in results.items():
            if name != "llama_vision":
                o = results["llama_vision"]
                print(f"{label}: ours / {name}: prompt {o[0] / p:.2f}x, decode {o[1] / d:.2f}x")

    if have_llamacpp:  # no int8 / int4 path of ours on this branch: llama.cpp's alone, for reference
        f16 = convert_gguf(path, "f16", args.convert_script)
        for kind in ("q8_0", "q4_0"):
            gguf = quantize_gguf(path, f16, kind)
            bw = bandwidth()
            prompt_tps, decode_tps, _ = run_llamacpp(gguf, prompt, args.new_tokens)
            limit = bw / gguf.stat().st_size  # the file is the weights, each read once per step
            rows.append(
                (kind, f"llama.cpp {kind}", prompt_tps, decode_tps, 100 * decode_tps / limit, bw / 1e9, limit)
            )

    print()
    print(
        "| precision | engine | prompt tok/s | decode tok/s | % of bandwidth limit | read GB/s | limit tok/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, name, p, d, pct, bw, limit in rows:
        print(f"| {label} | {name} | {p:.1f} | {d:.2f} | {pct:.0f}% | {bw:.1f} | {limit:.2f} |")


if __name__ == "__main__":
    main()
