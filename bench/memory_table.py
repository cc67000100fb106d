"""The README's memory table: the planner's estimates (llama_vision/memory.py) for the 11B and 90B
Instruct models, inference and fine-tuning, bfloat16 / int8 / int4, against 16, 24, 48, 80 and 141 GB
GPUs. Estimates, not measurements: tests/test_memory.py checks the planner against measured CPU peaks.
Fine-tuning rows come from finetune/memory.py's `training_estimate` (FSDP over the TP column's devices).

    python bench/memory_table.py
"""

from __future__ import annotations

from llama_vision.config import get_preset
from llama_vision.finetune.memory import training_estimate
from llama_vision.memory import GPU_SIZES_GB, GiB, estimate

MODELS = {"11B": "llama-3.2-11b-vision-instruct", "90B": "llama-3.2-90b-vision-instruct"}
INFERENCE = dict(images=1, max_tiles=4, context=8192, batch=1)
TRAINING = dict(images=1, max_tiles=4, context=2048, batch=1)


def main() -> None:
    sizes = " | ".join(f"{gb} GB" for gb in GPU_SIZES_GB)
    print(f"| model | use | weights | TP | weights / device (GiB) | total / device (GiB) | {sizes} |")
    print("|---|---|---|---|---|---|" + "---|" * len(GPU_SIZES_GB))
    rows = []
    for label, preset in MODELS.items():
        config = get_preset(preset)
        tps = (1,) if label == "11B" else (1, 2, 4, 8)
        for quant in (None, "int8", "int4"):
            for tp in tps:
                rows.append(
                    (label, "inference", quant, tp, estimate(config, quant=quant, tp=tp, **INFERENCE))
                )
        for mode in ("lora", "qlora", "adapters", "full"):
            for tp in tps:
                rows.append(
                    (
                        label,
                        f"fine-tune: {mode}",
                        "int4" if mode == "qlora" else None,
                        tp,
                        training_estimate(config, mode, world=tp, **TRAINING),
                    )
                )
    for label, use, quant, tp, e in rows:
        fits = " | ".join("yes" if e.fits(gb * GiB) else "no" for gb in GPU_SIZES_GB)
        print(
            f"| {label} | {use} | {quant or 'bf16'} | {tp} | {e.weights / GiB:.1f} | {e.total / GiB:.1f} | {fits} |"
        )


if __name__ == "__main__":
    main()
