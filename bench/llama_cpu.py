"""Text-only Llama on the CPU: ours vs transformers vs llama.cpp (llama-cpp-python), one process, the same
random weights, on a Llama-3.2-1B-shaped model (2048 wide, 16 layers, 32 heads / 8 KV heads, 8192 MLP,
tied 128,256-token embeddings, llama3 RoPE factor 32; 1.24 B parameters).

For each precision (float32; 16-bit: bfloat16 for ours and transformers, f16 for llama.cpp, its
16-bit CPU format; int8 and int4 weights: ours and transformers through torchao with bfloat16
activations, against llama.cpp's q8_0 and q4_0; w8a8: int8 weights and activations rounded to int8
per row, torchao's dynamic int8, against q8_0, which rounds its activations to 8 bits too) it reports
prompt tokens/s (one 64-token prompt, prefill only) and decode tokens/s at batch 1 (greedy, `--new-tokens` tokens after the first), each with
its share of the bandwidth limit: read bandwidth (bench/generate.py's `memory_bandwidth`, measured just
before each run) divided by the bytes a decode step reads (every weight once, counted from the loaded
model or, for llama.cpp, the GGUF file; a tied table once, as the output layer; an untied embedding
table, which a step reads one row of, not at all). Quantized rows also count how many greedy tokens
equal the same engine's 16-bit ones.

The checkpoint is written by transformers (`save_pretrained`), and llama.cpp's GGUF files are made from
it by llama.cpp's own converter, `convert_hf_to_gguf.py` from the llama-cpp-python source distribution
(`--convert-script`), with its gguf-py package. llama-cpp-python is a bench-only dependency
(`pip install llama-cpp-python gguf`, which compiles llama.cpp); without it that column is skipped.
Models are loaded one at a time (a float32 copy is 4.9 GB). Command:

    python bench/llama_cpu.py                       # add --layers 4 for a quick run on a shallower model
    python bench/llama_cpu.py --checkpoint DIR --precisions int8,int4   # a part, on a kept checkpoint
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
from llama_vision.quantize import CPU_INT4_GROUP, tensor_bytes  # noqa: E402
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


Run = tuple[float, float, list[int], int]  # prompt tok/s, decode tok/s, greedy tokens, bytes a step reads


def step_bytes(model: torch.nn.Module) -> int:
    """Bytes one decode step reads: every weight once (a tied table once, as the output layer; torchao's
    quantized weights with their scales), except embedding tables, of which a step reads one row."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    heads = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (id(p) in tables and id(p) not in heads):
            continue
        seen.add(id(p))
        total += tensor_bytes(p)
    return total


def bandwidth() -> float:
    return memory_bandwidth(CPU, gib=0.5, repeats=2)[0]


def run_ours(path: Path, dtype: torch.dtype, quantize: str | None, prompt: list[int], new: int) -> Run:
    lv = LlamaVision.from_pretrained(path, dtype=dtype, quantize=quantize, background=False)
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
    nbytes = step_bytes(lv.model)
    tokens = request.tokens
    del lv, request, it
    gc.collect()
    return len(prompt) / prompt_s, new / decode_s, tokens, nbytes


def hf_quantization(quantize: str | None) -> dict[str, Any]:
    """transformers' own torchao path (`TorchAoConfig`) with the CPU configs quantize.py uses."""
    if quantize is None:
        return {}
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    if quantize == "int8":
        return {"quantization_config": TorchAoConfig(Int8WeightOnlyConfig())}
    if quantize == "w8a8":
        return {"quantization_config": TorchAoConfig(Int8DynamicActivationInt8WeightConfig())}
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

    return {"quantization_config": TorchAoConfig(PrototypeInt4WeightOnlyConfig(group_size=CPU_INT4_GROUP))}


def run_hf(path: Path, dtype: torch.dtype, quantize: str | None, prompt: list[int], new: int) -> Run:
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(
        str(path), dtype=dtype, device_map="cpu", **hf_quantization(quantize)
    ).eval()
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
    nbytes = step_bytes(model)
    del model
    gc.collect()
    return len(prompt) / prompt_s, new / decode_s, out[0, len(prompt) :].tolist(), nbytes


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


def run_llamacpp(gguf: Path, prompt: list[int], new: int) -> Run:
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
    return len(prompt) / prompt_s, new / decode_s, tokens, gguf.stat().st_size  # each weight read once


def _last_argmax(llm: Any) -> int:
    """Greedy token from the logits of the last evaluated position (llama.cpp keeps only that row)."""
    import llama_cpp
    import numpy as np

    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    return int(logits.argmax())


PRECISIONS = {  # label: our dtype, our quantize, llama.cpp's GGUF type
    "float32": (torch.float32, None, "f32"),
    "16-bit": (torch.bfloat16, None, "f16"),
    "int8": (torch.bfloat16, "int8", "q8_0"),
    "w8a8": (torch.bfloat16, "w8a8", "q8_0"),
    "int4": (torch.bfloat16, "int4", "q4_0"),
}


def llamacpp_gguf(path: Path, kind: str, script: Path) -> Path:
    if kind in ("f32", "f16"):
        return convert_gguf(path, kind, script)
    return quantize_gguf(path, convert_gguf(path, "f16", script), kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (Llama 3.2 1B: 16)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--checkpoint", type=Path, help="keep the random checkpoint (and GGUFs) here")
    parser.add_argument("--convert-script", type=Path, help="llama.cpp's convert_hf_to_gguf.py")
    parser.add_argument(
        "--precisions", default=",".join(PRECISIONS), help="comma-separated, of " + ", ".join(PRECISIONS)
    )
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    precisions = args.precisions.split(",")
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown:
        parser.error(f"unknown precisions {unknown}; choose from {list(PRECISIONS)}")
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

    rows, tokens = [], {}
    for label in precisions:
        dtype, quantize, gguf_type = PRECISIONS[label]
        engines = [
            ("llama_vision", lambda d=dtype, q=quantize: run_ours(path, d, q, prompt, args.new_tokens))
        ]
        if not args.skip_hf:
            engines.append(
                ("transformers", lambda d=dtype, q=quantize: run_hf(path, d, q, prompt, args.new_tokens))
            )
        if have_llamacpp:
            gguf = llamacpp_gguf(path, gguf_type, args.convert_script)
            engines.append(("llama.cpp", lambda f=gguf: run_llamacpp(f, prompt, args.new_tokens)))
        results = {}
        for name, run in engines:
            bw = bandwidth()
            prompt_tps, decode_tps, tokens[label, name], nbytes = run()
            limit = bw / nbytes
            results[name] = (prompt_tps, decode_tps)
            engine = f"{name} {gguf_type}" if name == "llama.cpp" else name
            rows.append((label, engine, prompt_tps, decode_tps, 100 * decode_tps / limit, bw / 1e9, limit))
        ours_tokens = tokens[label, "llama_vision"]
        for name in results:
            same = sum(a == b for a, b in zip(ours_tokens, tokens[label, name]))
            print(f"{label}: {name} greedy tokens equal to ours: {same} of {len(ours_tokens)}")
            if ("16-bit", name) in tokens and quantize is not None:
                base = tokens["16-bit", name]
                same = sum(a == b for a, b in zip(base, tokens[label, name]))
                print(f"{label}: {name} greedy tokens equal to its own 16-bit ones: {same} of {len(base)}")
        for name, (p, d) in results.items():
            if name != "llama_vision":
                o = results["llama_vision"]
                print(f"{label}: ours / {name}: prompt {o[0] / p:.2f}x, decode {o[1] / d:.2f}x")

    print()
    print(
        "| precision | engine | prompt tok/s | decode tok/s | % of bandwidth limit | read GB/s | limit tok/s |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, name, p, d, pct, bw, limit in rows:
        print(f"| {label} | {name} | {p:.1f} | {d:.2f} | {pct:.0f}% | {bw:.1f} | {limit:.2f} |")


if __name__ == "__main__":
    main()
