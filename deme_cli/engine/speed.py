"""What makes training and sampling fast on a GPU, in one place: compile switches and sync-free host-to-device copies.

- `use_compile(setting, device)`: the recipe switches train.compile / sample.compile (auto = on for CUDA, off for the
  CPU, where inductor's C++ compile costs minutes and the kernels gain little).
- `compile_module(module)`: torch.compile in place (`nn.Module.compile`), so state_dict keys, parameters and the
  projections' forward hooks stay as they are (dynamo traces the hooks of submodules into the graph). The backend is
  inductor unless DEME_COMPILE_BACKEND names another (tests use "aot_eager": the same graph capture in seconds).
- `to_device(tensor, device)`: a CPU tensor to the GPU without a host sync (pinned memory, non_blocking), so the
  host can queue the next step while the GPU works on this one.
"""
from __future__ import annotations

import os
from typing import Any

BACKEND_ENV = "DEME_COMPILE_BACKEND"
COMPILE_SETTINGS = ("auto", "on", "off")


def use_compile(setting: str, device) -> bool:
    """Recipe compile switch -> whether to compile: on, off, or auto (on for CUDA only)."""
    if setting not in COMPILE_SETTINGS:
        raise ValueError(f"unknown compile setting '{setting}' (known: {', '.join(COMPILE_SETTINGS)})")
    return setting == "on" or (setting == "auto" and getattr(device, "type", str(device)) == "cuda")


def compile_backend() -> str:
    return os.environ.get(BACKEND_ENV) or "inductor"


def compile_module(module: Any) -> Any:
    """Compile `module` in place (its forward, hooks included) and return it."""
    module.compile(backend=compile_backend())
    return module


def to_device(t, device):
    """`t` on `device`; CPU -> CUDA copies go through pinned memory without blocking the host."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
