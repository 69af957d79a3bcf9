"""The one device picker and the one precision resolver (`train.device`, `train.mixed_precision`,
`sample.precision`): every stage gets its device and precision from here, through the resolved base."""
from __future__ import annotations

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
    """fp32 | bf16 | fp16 for a precision choice on `device`: auto = bf16 on CUDA, fp32 on the CPU (bf16 autocast is
    ~13x slower on our CPUs)."""
    choice = PRECISION_ALIASES.get(choice, choice)
    if choice == "auto":
        return "bf16" if getattr(device, "type", str(device)) == "cuda" else "fp32"
    if choice not in PRECISIONS:
        raise UsageError(f"unknown precision '{choice}' (known: auto, {', '.join(PRECISIONS)})")
    return choice


def gpu_names() -> list[str]:
    """The names of the visible CUDA devices (none without CUDA); imports torch."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
