"""Peak resident memory while loading a checkpoint: ours (`load_checkpoint`) against transformers'
`MllamaForConditionalGeneration.from_pretrained`, on the same random checkpoint of 1.5 B parameters
(3.0 GB in bfloat16), in three layouts: Hugging Face safetensors stored in bfloat16 and in float32,
and Meta's `consolidated.00.pth` (bfloat16; transformers does not read that layout). Every load makes
a bfloat16 model on the CPU.

Each load runs in a fresh subprocess. After its imports (torch, and transformers for its side) the
child resets the kernel's peak-RSS counter (`/proc/self/clear_refs` 5), notes its RSS, loads, and reads
the peak back (`VmHWM`): exact, no sampling. The figures are peaks minus the RSS before loading
(after torch's one-time imports for meta-device modules, which both loaders use),
against the model's weights in bfloat16 (the issue's target: at most 1.1x): the peak of the load
itself, and the peak once every weight has been read once after it (`tensor.sum()`), i.e. what a first
forward pass finds. The second matters for transformers, which leaves bfloat16 weights of a bfloat16
checkpoint in the memory-mapped file: they become resident (as file pages, counted in RSS) when first
used, not while loading. The page cache is warm for every load (each file is read once before).

    python bench/load_memory.py                  # writes the checkpoints to a temporary folder (~13 GB)
    python bench/load_memory.py --keep DIR       # ... or keeps them in DIR for the next run

The checkpoints are written from Meta's own model (llama-models, random weights), then converted to
the Hugging Face layout by our loader and `save_checkpoint`.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

# Meta's params.json for the benchmark model: text width 2048, 12 self- + 3 cross-attention layers, 16
# heads, 8 KV heads, MLP 8192, the full vocabulary; a ViT of width 512, 8 + 2 layers, 224 px tiles.
PARAMS = {
    "dim": 2048,
    "n_layers": 12,
    "n_heads": 16,
    "n_kv_heads": 8,
    "vocab_size": 128256,
    "multiple_of": 256,
    "ffn_dim_multiplier": 1.5,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "use_scaled_rope": True,
    "vision_chunk_size": 224,
    "vision_max_num_chunks": 4,
    "vision_num_cross_attention_layers": 3,
}
VISION = {
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 8,
    "num_global_layers": 2,
    "attention_heads": 8,
    "intermediate_layers_indices": [1, 3, 5, 7],
}


def write_checkpoints(root: Path) -> dict[str, Path]:
    """meta-bf16, hf-bf16, hf-fp32 under `root` (each step in its own process, so memory is returned)."""
    dirs = {name: root / name for name in ("meta-bf16", "hf-bf16", "hf-fp32")}
    for name, path in dirs.items():
        if not (path / "done").exists():
            subprocess.run([sys.executable, __file__, "--write", name, str(root)], check=True)
    return dirs


def write_one(name: str, root: Path) -> None:
    from reference import build_meta_model, save_meta_checkpoint

    from llama_vision.weights import load_checkpoint, save_checkpoint

    out = root / name
    if name == "meta-bf16":
        model = build_meta_model(PARAMS, vision=VISION, seed=0, max_seq_len=16, max_batch_size=1).bfloat16()
        save_meta_checkpoint(model, PARAMS, out, vision=VISION)
    else:
        dtype = torch.bfloat16 if name == "hf-bf16" else torch.float32
        save_checkpoint(load_checkpoint(root / "meta-bf16", dtype=dtype), out, max_shard_bytes=2 * 2**30)
    (out / "done").touch()


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(loader: str, path: Path) -> None:
    """Load once and print a JSON line: peak above the RSS before loading, seconds, weight bytes."""
    import ctypes

    if loader == "transformers":
        from transformers import MllamaForConditionalGeneration

        load = lambda: MllamaForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)  # noqa: E731
    else:
        from llama_vision.weights import load_checkpoint

        load = lambda: load_checkpoint(path, dtype=torch.bfloat16)  # noqa: E731
    with torch.device("meta"):  # torch's one-time cost of its first meta-device nn.Embedding (~150 MB of
        torch.nn.Embedding(2, 2)  # Python modules it imports), paid by both loaders; not part of loading
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    state = model.state_dict()
    weights = sum(p.numel() * p.element_size() for p in state.values())
    assert {p.dtype for p in state.values()} == {torch.bfloat16}
    peak = _status("VmHWM") - before
    with torch.no_grad():
        for p in state.values():  # a mapped weight becomes resident when first used
            p.sum()
    peak_used = _status("VmHWM") - before
    print(json.dumps({"peak": peak, "peak_used": peak_used, "seconds": seconds, "weights": weights}))


def measure(loader: str, path: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", loader, str(path)], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def warm(path: Path) -> None:
    for file in sorted(path.iterdir()):
        with open(file, "rb") as f:
            while f.read(64 * 2**20):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="write (or reuse) the checkpoints in this folder")
    parser.add_argument("--only", action="append", help="meta-bf16, hf-bf16 or hf-fp32; repeatable")
    parser.add_argument("--skip-hf", action="store_true", help="our loader only")
    parser.add_argument("--child", nargs=2, metavar=("LOADER", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--write", nargs=2, metavar=("NAME", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], Path(args.child[1]))
    if args.write:
        return write_one(args.write[0], Path(args.write[1]))

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        dirs = write_checkpoints(root)
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; RSS above the RSS before loading")
        print(
            "| checkpoint | file (GB) | loader | load peak (GB) | / bf16 weights | peak incl. first use (GB) "
            "| / bf16 weights | load (s) |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name, path in dirs.items():
            if args.only and name not in args.only:
                continue
            warm(path)
            size = sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".pth"))
            rows = {"llama_vision": measure("llama_vision", path)}
            if name.startswith("hf") and not args.skip_hf:
                rows["transformers"] = measure("transformers", path)
            for loader, r in rows.items():
                w = r["weights"]
                print(
                    f"| {name} | {size / 1e9:.2f} | {loader} | {r['peak'] / 1e9:.2f} | {r['peak'] / w:.2f}x | "
                    f"{r['peak_used'] / 1e9:.2f} | {r['peak_used'] / w:.2f}x | {r['seconds']:.1f} |"
                )
            if "transformers" in rows:
                ours, hf = rows["llama_vision"], rows["transformers"]
                print(
                    f"| {name} | | ours / transformers | {ours['peak'] / hf['peak']:.2f}x | | "
                    f"{ours['peak_used'] / hf['peak_used']:.2f}x | | {ours['seconds'] / hf['seconds']:.2f}x |"
                )


if __name__ == "__main__":
    main()
