"""TensorBoard logging of a training run (optional): the records that go to log.jsonl, as scalars.

Written with `torch.utils.tensorboard.SummaryWriter`, which needs the `tensorboard` package (the
`finetune` extra); it is imported only when a run asks for TensorBoard, and its absence is reported
before the model is loaded. A resumed run passes `purge_step`, so TensorBoard hides what a killed run
logged after its last checkpoint and the curves show one uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# log.jsonl key -> TensorBoard tag
TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "token_accuracy": "train/token_accuracy",
    "tags_exact": "train/tags_exact",
    "tokens_per_s": "train/tokens_per_s",
    "samples_per_s": "train/samples_per_s",
    "peak_memory_mb": "train/peak_memory_mb",
    "eval_loss": "eval/loss",
    "eval_token_accuracy": "eval/token_accuracy",
    "eval_exact_match": "eval/exact_match",
    "eval_tags_exact": "eval/tags_exact",
}


def summary_writer_class() -> type:
    """torch's SummaryWriter, or a ValueError that says what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(
            "tensorboard logging needs the tensorboard package: pip install 'llama-vision[finetune]' "
            "(or pip install tensorboard), or turn it off (tensorboard: false)"
        ) from None
    return SummaryWriter


class TensorBoard:
    """Scalars of the training and evaluation records, at their step."""

    def __init__(self, directory: Path, *, purge_step: int | None = None) -> None:
        self.writer = summary_writer_class()(log_dir=str(directory), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for key, tag in TAGS.items():
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a run can be killed at any step: what was logged stays readable

    def close(self) -> None:
        self.writer.close()
