"""The one device picker and the one precision resolver (`train.device`, `train.mixed_precision`,
`sample.precision`): every stage gets its device and precision from here, through the resolved base."""
from __future__ import annotations

import os

from . import ui
from .errors import UsageError

PRECISIONS = ("fp32", "bf16", "fp16")
PRECISION_ALIASES = {"no": "fp32"}        # accelerate's name for full precision (train.mixed_precision = "no")
DEVICES = ("auto", "cpu", "cuda")


def pick_device(choice: str = "auto"):
    """The torch device for `train.device`: auto = CUDA when available, else the CPU."""
    import torch

    if choice not in DEVICES:
        raise UsageError(f"unknown device '{choice}' (known: {', '.join(DEVICES)})")
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("train.device is 'cuda' but no CUDA device is available; set train.device = \"auto\" or "
                         "\"cpu\"")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def resolve_precision(choice: str, device) -> str:
    """fp32 | bf16 | fp16 for a precision choice on `device`: auto = bf16 on a GPU that computes in bf16 natively
    (Ampere and newer), fp16 on an older one (training adds a gradient scaler: accelerate's fp16), fp32 on the CPU
    (bf16 autocast is ~13x slower on our CPUs)."""
    choice = PRECISION_ALIASES.get(choice, choice)
    if choice == "auto":
        if getattr(device, "type", str(device)) != "cuda":
            return "fp32"
        if cuda_bf16():
            return "bf16"
        _say_once("fp16", "this GPU has no native bf16 (it is older than Ampere): precision \"auto\" computes in fp16, "
                          "training with a gradient scaler")
        return "fp16"
    if choice not in PRECISIONS:
        raise UsageError(f"unknown precision '{choice}' (known: auto, {', '.join(PRECISIONS)})")
    return choice


def cuda_bf16() -> bool:
    """Whether the current CUDA device computes in bf16 natively; emulated bf16 (pre-Ampere) is slow, so it counts
    as no."""
    import torch

    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


_said: set[str] = set()


def _say_once(key: str, msg: str) -> None:
    """ui.info once per process, and only on the main one under accelerate launch (every process resolves it)."""
    if key not in _said:
        _said.add(key)
        if int(os.environ.get("RANK", "0")) == 0:
            ui.info(msg)


def gpu_names() -> list[str]:
    """The names of the visible CUDA devices (none without CUDA); imports torch."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
