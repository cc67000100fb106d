"""The settings of a fine-tuning run: one frozen dataclass, read from a recipe (YAML) plus `key=value`
overrides and command-line flags, validated with messages that name the key.

Batch sizes: `batch_size` rows per forward pass on each process, `grad_accum` passes per optimizer step,
so one step sees batch_size x grad_accum x world_size rows (the global batch). The loss of a step is the
mean over every trained token of the global batch, so a step gives the same loss and gradients however
the global batch is split across passes and processes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_vision.finetune.lora import DEFAULT_LORA_MODULES, DEFAULT_LORA_PARTS, check_parts

MODES = ("adapters", "lora", "full", "qlora", "vision")  # vision: tags.py
DTYPES = ("float32", "bfloat16", "float16")
REPORT_TO = ("tensorboard", "none")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    # what to train
    model: str | None = None  # checkpoint directory; or `preset` + `tokenizer` to train from scratch
    preset: str | None = None  # a preset's name, or a config.json path
    vision_positions: str = "random"  # from scratch: "random" or "sincos" initial vision position tables
    patch_std: float | None = None  # from scratch: the patch embedding's initial std (None: as the rest)
    tokenizer: str | None = None
    mode: str = "lora"
    train_vision: bool = False  # adapters mode: also train the vision encoder
    freeze: tuple[str, ...] = ()  # full mode: parts left as they are (e.g. [vision] after mode vision)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_parts: tuple[str, ...] = DEFAULT_LORA_PARTS
    lora_modules: tuple[str, ...] = DEFAULT_LORA_MODULES
    # data
    data: str | None = None
    eval_data: str | None = None
    skip_bad: bool = False
    max_length: int = 2048
    group_by_length: bool = False  # batches of similar lengths: less padding, the same examples per epoch
    max_tiles: int | None = None  # tiles per image (default: the model's, 4)
    # optimisation
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # the cosine ends at lr x this
    max_grad_norm: float | None = 1.0
    optimizer_in_backward: bool = False  # step each parameter in backward (train.StepInBackward); no clipping
    seed: int = 0
    # numerics and memory
    device: str = "auto"  # auto: cuda (this process's local rank) when available, else cpu
    dtype: str | None = None  # weights: None keeps the checkpoint's; trained parameters stay in float32
    autocast: bool | None = None  # bf16 autocast; None: on for CUDA with bf16, off elsewhere
    activation_checkpointing: bool = False
    distributed: str = "ddp"  # under torchrun: ddp or fsdp
    # output
    output: str | None = None
    save_every: int = 0  # steps between checkpoints; 0: only final/
    keep_checkpoints: int | None = None  # keep the newest N checkpoint-* dirs
    log_every: int = 1
    eval_every: int = 0  # steps between evaluations; 0: at the end only (when eval_data is set)
    eval_max_new_tokens: int = 64
    eval_batch_size: int = 8
    resume: bool = False
    progress: bool | None = None  # None: when stderr is a terminal
    tensorboard: bool | str = False  # true: TensorBoard events in output/tensorboard; a path: there
    report_to: str | tuple[str, ...] = ()  # "tensorboard" (as tensorboard: true) or "none"

    def __post_init__(self) -> None:
        for name in ("lora_parts", "lora_modules", "betas", "freeze"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        check = _Checker()
        check.choice("mode", self.mode, MODES)
        check.choice("distributed", self.distributed, ("ddp", "fsdp"))
        check.choice("vision_positions", self.vision_positions, ("random", "sincos"))
        if self.mode == "vision" and self.group_by_length:
            check.fail("group_by_length", "mode vision trains on pictures without text; leave it false")
        if self.patch_std is not None and not (
            isinstance(self.patch_std, (int, float)) and self.patch_std > 0
        ):
            check.fail("patch_std", f"expected a number > 0 (or null), got {self.patch_std!r}")
        if self.dtype is not None:
            check.choice("dtype", self.dtype, DTYPES)
        if self.model is None and self.preset is None:
            check.fail("model", "give a checkpoint directory (model=DIR), or preset=NAME and tokenizer=PATH")
        if self.model is not None and self.preset is not None:
            check.fail("preset", "give either model or preset, not both")
        if self.preset is not None and self.tokenizer is None:
            check.fail(
                "tokenizer", "training from a preset needs a tokenizer (tokenizer.json or tokenizer.model)"
            )
        if self.preset is not None and self.mode not in ("full", "vision"):
            check.fail("mode", f"a model trained from scratch needs mode=full (or vision), got {self.mode!r}")
        for name in ("epochs", "batch_size", "grad_accum", "lora_rank", "log_every", "eval_max_new_tokens",
                     "eval_batch_size"):  # fmt: skip
            check.positive_int(name, getattr(self, name))
        for name in ("max_steps", "keep_checkpoints", "max_tiles"):
            if getattr(self, name) is not None:
                check.positive_int(name, getattr(self, name))
        for name in ("save_every", "eval_every", "warmup_steps", "seed"):
            check.int_at_least(name, getattr(self, name), 0)
        check.int_at_least("max_length", self.max_length, 8)
        check.number("lr", self.lr, low=0, low_open=True)
        check.number("weight_decay", self.weight_decay, low=0)
        check.number("min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        check.number("lora_alpha", self.lora_alpha, low=0, low_open=True)
        check.number("lora_dropout", self.lora_dropout, low=0, high=1)
        if self.max_grad_norm is not None:
            check.number("max_grad_norm", self.max_grad_norm, low=0, low_open=True)
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            check.fail("betas", f"need two numbers in [0, 1), got {list(self.betas)}")
        check_parts(self.lora_parts, "lora_parts")
        check_parts(self.freeze, "freeze")
        if self.freeze and self.mode != "full":
            check.fail(
                "freeze", f"is for mode full (the other modes choose their parts), got mode {self.mode!r}"
            )
        object.__setattr__(
            self, "report_to", (self.report_to,) if isinstance(self.report_to, str) else tuple(self.report_to)
        )
        for target in self.report_to:
            check.choice("report_to", target, REPORT_TO)
        if not isinstance(self.tensorboard, (bool, str)) or self.tensorboard == "":
            check.fail("tensorboard", f"expected true, false or a directory, got {self.tensorboard!r}")
        for name in (
            "train_vision",
            "skip_bad",
            "activation_checkpointing",
            "resume",
            "optimizer_in_backward",
        ):
            if not isinstance(getattr(self, name), bool):
                check.fail(name, f"must be true or false, got {getattr(self, name)!r}")
        if self.optimizer_in_backward and self.max_grad_norm is not None:
            check.fail(
                "max_grad_norm",
                "optimizer_in_backward steps each parameter before the global gradient norm is known, "
                "so it cannot clip; set max_grad_norm: null",
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; known keys: {sorted(known)}")
        floats = {f.name for f in dataclasses.fields(cls) if "float" in str(f.type)}
        return cls(**{k: _float(v) if k in floats else v for k, v in values.items()})

    @property
    def tensorboard_dir(self) -> Path | None:
        """Where TensorBoard events go, or None when the run does not log to TensorBoard."""
        if isinstance(self.tensorboard, str):
            return Path(self.tensorboard)
        if self.tensorboard or "tensorboard" in self.report_to:
            return Path(self.output or ".") / "tensorboard"
        return None

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _float(value: Any) -> Any:
    """YAML 1.1 reads `3e-4` (no dot) as a string; take it as the number it is meant to be."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_recipe(path: str | Path | None, overrides: list[str] = (), **flags: Any) -> TrainConfig:
    """A recipe YAML file (or none), then `key=value` overrides (values parsed as YAML), then flags
    (those not None)."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_yaml(Path(path)))
    yaml = _yaml()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key=value")
        try:
            values[key.strip()] = yaml.safe_load(text) if text else None
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: cannot parse the value: {e}") from None
    values.update({k: v for k, v in flags.items() if v is not None})
    return TrainConfig.from_dict(values, where=str(path) if path else "config")


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:
        raise ValueError("recipes need the `pyyaml` package: pip install 'llama-vision[finetune]'") from None
    return yaml


def _read_yaml(path: Path) -> dict[str, Any]:
    yaml = _yaml()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"cannot read recipe {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


@dataclass
class _Checker:
    prefix: str = field(default="TrainConfig")

    def fail(self, name: str, message: str) -> None:
        raise ValueError(f"{name}: {message}")

    def choice(self, name: str, value: Any, choices: tuple[str, ...]) -> None:
        if value not in choices:
            self.fail(name, f"expected one of {list(choices)}, got {value!r}")

    def positive_int(self, name: str, value: Any) -> None:
        self.int_at_least(name, value, 1)

    def int_at_least(self, name: str, value: Any, low: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            self.fail(name, f"expected an integer of at least {low}, got {value!r}")

    def number(
        self,
        name: str,
        value: Any,
        *,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
    ) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value <= high
        if not ok:
            bounds = f"{'>' if low_open else '>='} {low}" if low is not None else ""
            bounds += f" and <= {high}" if high is not None else ""
            self.fail(name, f"expected a number {bounds}, got {value!r}")
