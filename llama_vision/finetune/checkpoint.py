"""Training checkpoints, written atomically and read back without unpickling anything.

`output/checkpoint-N/` holds what resuming needs:
- the model: a PEFT adapter (lora, qlora) or a Hugging Face layout checkpoint (full, adapters);
- in `training_state/` (apart, so the model directory holds only the model's safetensors):
  `optimizer.safetensors` (AdamW's moments per parameter, keyed by parameter name),
  `optimizer.json` (the parameter groups and step counts) and `rng.safetensors` (each process's torch
  CPU and CUDA generator states);
- `trainer_state.json` (the step, the data position, the global batch, the run's settings).
The schedule is a pure function of the step, so the step is its whole state.

Atomicity: everything is written into `output/.tmp-checkpoint-N`, each file and the directory are
fsynced, then the directory is renamed into place, and only then is `output/latest` (a one-line file
naming the directory) replaced, itself through a fsynced temporary file and `os.replace`. A kill at any
moment leaves `latest` naming a complete checkpoint; stale `.tmp-*` directories are removed on the next
save.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"
STATE_DIR = "training_state"
TRAINER_STATE = "trainer_state.json"


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then the directories (so their entries are durable too)."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(Path(root) / name, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_dir(output: Path, name: str) -> Path:
    for stale in output.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = output / f".tmp-{name}"
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, output: Path, name: str) -> Path:
    """Move a fully written `tmp` to `output/name` and point `latest` at it."""
    fsync_tree(tmp)
    final = output / name
    if final.exists():  # final/ again after a resume: move the old one aside first
        old = output / f".tmp-old-{name}"
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(tmp, final)
    fsync_dir(output)
    pointer = output / f".tmp-{LATEST}"
    with open(pointer, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, output / LATEST)
    fsync_dir(output)
    return final


def latest_checkpoint(output: Path) -> Path | None:
    pointer = output / LATEST
    if not pointer.is_file():
        return None
    path = output / pointer.read_text().strip()
    if not (path / TRAINER_STATE).is_file():
        raise ValueError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def prune(output: Path, keep: int | None) -> None:
    """Remove all but the newest `keep` checkpoint-N directories (never the one `latest` names)."""
    if keep is None:
        return
    steps = sorted(
        int(p.name.split("-")[1]) for p in output.glob("checkpoint-*") if p.name.split("-")[1].isdigit()
    )
    for step in steps[:-keep]:
        shutil.rmtree(output / f"checkpoint-{step}", ignore_errors=True)


# ----------------------------------------------------------------------------- optimizer state


def save_optimizer(state: dict[str, Any], directory: Path) -> None:
    """`state` as `get_optimizer_state_dict` gives it: {"state": {name: {key: tensor}}, "param_groups": [...]}."""
    tensors, scalars = {}, {}
    for name, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{name}/{key}"] = value
    save_file(tensors, directory / "optimizer.safetensors", metadata={"format": "pt"})
    meta = {"param_groups": state["param_groups"], "scalars": scalars}
    (directory / "optimizer.json").write_text(json.dumps(meta))


def load_optimizer(directory: Path) -> dict[str, Any]:
    tensors = load_file(directory / "optimizer.safetensors")
    meta = json.loads((directory / "optimizer.json").read_text())
    state: dict[str, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        name, _, key = flat.rpartition("/")
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ----------------------------------------------------------------------------- random number generators


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rng(states: list[dict[str, torch.Tensor]], directory: Path) -> None:
    """One entry per process, by rank."""
    flat = {f"{rank}/{key}": t for rank, state in enumerate(states) for key, t in state.items()}
    save_file(flat, directory / "rng.safetensors")


def load_rng(directory: Path, rank: int) -> dict[str, torch.Tensor]:
    flat = load_file(directory / "rng.safetensors")
    state = {key.split("/", 1)[1]: t for key, t in flat.items() if key.split("/", 1)[0] == str(rank)}
    if "cpu" not in state:
        raise ValueError(f"{directory / 'rng.safetensors'}: no random state for process {rank}")
    return state
