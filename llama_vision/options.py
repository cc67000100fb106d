"""Device and dtype options as users write them, parsed once for the API, the command line, the server
and the demo, with one-line errors.

    parse_dtype("bf16") -> torch.bfloat16        parse_dtype(torch.float16) -> torch.float16
    parse_device("cuda:1") -> device("cuda:1")   usable_device("cuda") fails here without a GPU

Non-obvious choices:
- Names are case-insensitive and may carry the "torch." prefix ("torch.bfloat16", "BF16").
- "gpu" is refused with a hint rather than guessed: it could mean CUDA, ROCm (also "cuda" in PyTorch)
  or Apple's "mps".
- `parse_device` checks only the spelling (for argument parsing, exit code 2 on the command line);
  `usable_device` also checks that this machine has the device, by its own API (CUDA, MPS) or by making
  an empty tensor there, before any weight is read.
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
DTYPE_NAMES = "float32 (fp32), bfloat16 (bf16), float16 (fp16)"
DEVICE_NAMES = "cpu, cuda, cuda:N, mps"


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """A floating dtype from a torch dtype or a name; None stays None (keep the stored dtype)."""
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise ValueError(f"dtype {value} is not supported; use one of {DTYPE_NAMES}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"dtype must be a torch dtype or a name ({DTYPE_NAMES}), got {type(value).__name__}")
    name = value.strip().lower().removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use one of {DTYPE_NAMES}")
    return DTYPES[name]


def parse_device(value: str | torch.device) -> torch.device:
    """A torch device from a device or a name such as "cpu", "cuda", "cuda:1", "mps" (spelling only)."""
    if isinstance(value, torch.device):
        device = value
    elif isinstance(value, str):
        name = value.strip().lower()
        if name.split(":")[0] == "gpu":
            raise ValueError(
                f"unknown device {value!r}: PyTorch calls NVIDIA and AMD GPUs 'cuda' and Apple's 'mps'"
            )
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ValueError(f"unknown device {value!r}; use one of {DEVICE_NAMES}") from None
    else:
        raise ValueError(
            f"device must be a torch device or a name ({DEVICE_NAMES}), got {type(value).__name__}"
        )
    if device.type == "meta":
        raise ValueError("the meta device holds no weights; pick one that computes")
    return device


def usable_device(value: str | torch.device) -> torch.device:
    """`parse_device`, then a ValueError unless this machine can run on the device."""
    device = parse_device(value)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(value)!r}: PyTorch sees no CUDA GPU on this machine")
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"device {str(value)!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
            )
        return device
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(value)!r}: Apple's MPS is not available on this machine")
    try:
        torch.empty(0, device=device)
    except NotImplementedError:  # its message lists every dispatch key
        raise ValueError(f"device {str(value)!r}: this PyTorch build cannot run on it") from None
    except RuntimeError as e:
        raise ValueError(f"device {str(value)!r} is not usable here: {_first_line(e)}") from None
    return device


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
