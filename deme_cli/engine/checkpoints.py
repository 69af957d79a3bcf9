"""Training checkpoints: complete, atomic, and found again through a `latest` pointer.

```
ranges/<i>/checkpoints/step-<k>/
    student.safetensors      the student's weights (unet.* and projections.*)
    ema.safetensors          the EMA weights, same keys (when EMA is on)
    optimizer.pt             {"optimizer", "lr_scheduler", "scaler"} plain state dicts (read with weights_only=True)
    rng.safetensors          torch / cuda / trainer-generator states per process (uint8 tensors, rank<r>.*)
    state.json               step, data position (epoch, batch), EMA update count, python and numpy RNG states, range
ranges/<i>/checkpoints/latest    one line: the folder name of the newest complete checkpoint
```
A checkpoint is written to `.step-<k>.tmp` and renamed; `latest` is replaced (atomically) only after that, and old
checkpoints are deleted last, so a process killed at any moment leaves `latest` pointing at a complete checkpoint.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .errors import UsageError
from .runs import write_atomic

LATEST = "latest"
PREFIX = "step-"


def step_dirname(step: int) -> str:
    return f"{PREFIX}{step}"


def _step_of(p: Path) -> Optional[int]:
    if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit():
        return int(p.name[len(PREFIX):])
    return None


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint folders, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(_step_of(p), p) for p in ckpt_dir.iterdir()]
    return sorted((s, p) for s, p in found if s is not None)


def latest(ckpt_dir: Path) -> Optional[Path]:
    """The checkpoint `latest` points at, or None when there is none."""
    ptr = ckpt_dir / LATEST
    if not ptr.is_file():
        return None
    name = ptr.read_text().strip()
    folder = ckpt_dir / name
    if _step_of(folder) is None or not (folder / "state.json").is_file():
        raise UsageError(f"'{ptr}' points at '{name}', which is not a complete checkpoint; start the range over "
                         f"with --force")
    return folder


# --- RNG states ----------------------------------------------------------------------------------------------------

def rng_state(generators: dict) -> tuple[dict, dict]:
    """(tensors, json) capturing torch, cuda, python, numpy and the named torch.Generators' states."""
    import torch

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for k, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{k}"] = s
    for name, g in generators.items():
        tensors[f"gen.{name}"] = g.get_state()
    v, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    js = {"python": [v, list(internal), gauss],
          "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)]}
    return tensors, js


def set_rng_state(tensors: dict, js: dict, generators: dict) -> None:
    import torch

    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    for name, g in generators.items():
        g.set_state(tensors[f"gen.{name}"])
    v, internal, gauss = js["python"]
    random.setstate((v, tuple(internal), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = js["numpy"]
    np.random.set_state((np_name, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))


# --- save / load ---------------------------------------------------------------------------------------------------

def _contiguous_cpu(state: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save(ckpt_dir: Path, step: int, *, student: dict, ema: Optional[dict], optim: dict, rng: list, state: dict,
         keep: int) -> Path:
    """Write checkpoint `step`, point `latest` at it, then delete all but the `keep` newest.

    `rng` holds one `rng_state(...)` per process, in rank order.
    """
    import torch
    from safetensors.torch import save_file

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / step_dirname(step)
    tmp = ckpt_dir / f".{step_dirname(step)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_contiguous_cpu(student), str(tmp / "student.safetensors"))
    if ema is not None:
        save_file(_contiguous_cpu(ema), str(tmp / "ema.safetensors"))
    torch.save(optim, tmp / "optimizer.pt")
    rng_tensors = {f"rank{r}.{k}": v for r, (tensors, _) in enumerate(rng) for k, v in tensors.items()}
    save_file(_contiguous_cpu(rng_tensors), str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "rng": [js for _, js in rng]}) + "\n")
    if final.exists():  # a checkpoint of this step from an interrupted earlier attempt
        shutil.rmtree(final)
    tmp.rename(final)
    write_atomic(ckpt_dir / LATEST, final.name + "\n")
    prune(ckpt_dir, keep)
    return final


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints (never the one `latest` names) and stale temporary folders."""
    pointed = (ckpt_dir / LATEST).read_text().strip() if (ckpt_dir / LATEST).is_file() else None
    for _, p in list_checkpoints(ckpt_dir)[:-keep]:
        if p.name != pointed:
            shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_dir.glob(f".{PREFIX}*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def load(folder: Path, generators: dict, rank: int = 0) -> dict[str, Any]:
    """Read a checkpoint: {"student", "ema", "optim", "state"}; restores process `rank`'s RNG states."""
    import torch
    from safetensors.torch import load_file

    state = json.loads((folder / "state.json").read_text())
    out = {"student": load_file(str(folder / "student.safetensors")),
           "ema": load_file(str(folder / "ema.safetensors")) if (folder / "ema.safetensors").is_file() else None,
           "optim": torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True),
           "state": state}
    rng_js = state.pop("rng")
    if rank < len(rng_js):
        prefix = f"rank{rank}."
        tensors = {k[len(prefix):]: v for k, v in load_file(str(folder / "rng.safetensors")).items()
                   if k.startswith(prefix)}
        set_rng_state(tensors, rng_js[rank], generators)
    return out
