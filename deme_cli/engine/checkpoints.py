"""Training checkpoints: complete, atomic, verified, and found again through a `latest` pointer.

```
ranges/<i>/checkpoints/step-<k>/
    student.safetensors      the student's weights (unet.* and projections.*)
    ema.safetensors          the EMA weights, same keys (when EMA is on)
    optimizer.pt             {"optimizer", "lr_scheduler", "scaler"} plain state dicts (read with weights_only=True)
    rng.safetensors          torch / cuda / trainer-generator states per process (uint8 tensors, rank<r>.*)
    state.json               step, data position (epoch, batch), EMA update count, python and numpy RNG states, range
    manifest.json            {"files": {name: {"bytes", "sha256"}}} of every other file; written last
ranges/<i>/checkpoints/latest    one line: the folder name of the newest complete checkpoint
```
A checkpoint is written to `.step-<k>.tmp` and renamed; `latest` is replaced (atomically) only after that, and old
checkpoints are deleted last, so a process killed at any moment leaves `latest` pointing at a complete checkpoint,
though maybe not the newest (killed between the rename and the pointer's update): resume does not trust `latest` for
that, it takes the newest intact folder.

Verification and fallback: a complete folder can still be damaged afterwards (a machine crash before the data
reached the disk, a copy cut short, a file emptied by hand). `verify(folder)` compares every file with the manifest
(sizes first, then sha256) and says what is wrong; a folder written before manifests existed is checked by parsing
state.json and each .safetensors header and opening optimizer.pt's zip directory (nothing is unpickled).
`resume_point` (old name: `latest`) tries every step-<k> folder newest first, whatever `latest` names, and returns
the first intact one, warning once per process (on the main one only) for each damaged one it skips, and when
`latest` names another folder (an older one, or one that is missing). No step folders: None; step folders but none
intact: a UsageError (start the range over with --force). An intact verdict is remembered per process while the
files' sizes, mtimes and inodes stay the same (train.py asks twice before training). `load` turns any read failure
that gets past verification into a UsageError naming the folder.

Pruning after a save keeps the `keep` newest folders up to the one just written and deletes every step folder newer
than it: those are what a resume fell back from (damaged) or skipped past, and training rewrites those steps anyway.
Damaged folders older than the one just written are not looked for (that would mean hashing every checkpoint on every
save); they age out like intact ones, and resume_point skips them.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np

from . import ui
from .errors import UsageError
from .runs import write_atomic

LATEST = "latest"
PREFIX = "step-"
MANIFEST = "manifest.json"
REQUIRED = ("state.json", "student.safetensors", "optimizer.pt", "rng.safetensors")   # what load() reads
_CHUNK = 4 << 20
_warned: set[tuple[str, str]] = set()       # (folder, reason) already warned about in this process
_intact: dict[str, tuple] = {}              # folder -> the files' (name, size, mtime_ns, inode) when verified intact


def step_dirname(step: int) -> str:
    return f"{PREFIX}{step}"


def _step_of(p: Path) -> Optional[int]:
    if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit():
        return int(p.name[len(PREFIX):])
    return None


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """The step-<k> folders (intact or not: see verify), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [(_step_of(p), p) for p in ckpt_dir.iterdir()]
    return sorted((s, p) for s, p in found if s is not None)


# --- verification --------------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """manifest.json: the size and sha256 of every other file in `folder` (call it after the last of them)."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"version": 1, "files": files}, indent=1) + "\n")


def _signature(folder: Path) -> tuple:
    return tuple((p.name, st.st_size, st.st_mtime_ns, st.st_ino)
                 for p in sorted(folder.iterdir()) if p.is_file() for st in [p.stat()])


def _verify_manifest(folder: Path) -> Optional[str]:
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        sizes = {name: int(rec["bytes"]) for name, rec in files.items()}
        hashes = {name: str(rec["sha256"]) for name, rec in files.items()}
    except Exception:
        return f"{MANIFEST} is missing or unreadable"
    for name in REQUIRED:
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    for name, size in sizes.items():                 # sizes first: cheap
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if (got := f.stat().st_size) != size:
            return f"{name} is {got} bytes, {size} when written"
    for name, digest in hashes.items():
        if _sha256(folder / name) != digest:
            return f"{name} does not match its recorded sha256"
    return None


def _verify_old_format(folder: Path) -> Optional[str]:
    """A checkpoint written before manifests: the files load() reads exist and their headers parse."""
    from safetensors import safe_open

    for name in REQUIRED:
        if not (folder / name).is_file():
            return f"{name} is missing (and there is no {MANIFEST})"
    try:
        if not isinstance(json.loads((folder / "state.json").read_text()).get("step"), int):
            return "state.json has no step"
    except Exception:
        return "state.json cannot be parsed"
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception:
            return f"{f.name} is {f.stat().st_size} bytes and its header does not parse"
    try:
        with zipfile.ZipFile(folder / "optimizer.pt"):      # torch.save's zip directory sits at the end of the file
            pass
    except Exception:
        return f"optimizer.pt is {(folder / 'optimizer.pt').stat().st_size} bytes and not a complete torch file"
    return None


def verify(folder: Path) -> Optional[str]:
    """None when checkpoint `folder` is intact, else a short reason (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        return "the folder is missing"
    if not (folder / "state.json").is_file():
        return "state.json is missing"
    key = str(folder.resolve())
    sig = _signature(folder)
    if _intact.get(key) == sig:
        return None
    reason = _verify_manifest(folder) if (folder / MANIFEST).exists() else _verify_old_format(folder)
    if reason is None:
        _intact[key] = sig
    else:
        _intact.pop(key, None)
    return reason


def _warn_once(key: tuple[str, str], msg: str) -> None:
    """ui.warn once per process, and only on the main one under accelerate launch (every process resumes)."""
    if key not in _warned:
        _warned.add(key)
        if int(os.environ.get("RANK", "0")) == 0:
            ui.warn(msg)


def resume_point(ckpt_dir: Path) -> Optional[Path]:
    """The intact checkpoint to resume from: the newest intact step-<k> folder, whatever `latest` says, warning once
    for each damaged one skipped and when `latest` names another folder. None when there are no step folders;
    UsageError when none is intact."""
    ckpt_dir = Path(ckpt_dir)
    folders = [p for _, p in reversed(list_checkpoints(ckpt_dir))]       # newest first
    ptr = ckpt_dir / LATEST
    named = ptr.read_text(errors="replace").strip() if ptr.is_file() else None
    if not folders:
        if named is not None:
            _warn_once((str(ptr), named), f"'{ptr}' names '{named}', which is missing or not a step-<k> folder, and "
                                          f"no checkpoint is left; training starts from step 0")
        return None
    damaged = []
    for folder in folders:
        reason = verify(folder)
        if reason is None:
            for d, why in damaged:
                _warn_once((str(d), why), f"checkpoint '{d}' is damaged ({why}); resuming from {folder.name}")
            if named is not None and named != folder.name and not any(d.name == named for d, _ in damaged):
                _warn_once((str(ptr), named), _pointer_note(ptr, named, folder))
            return folder
        damaged.append((folder, reason))
    first, why = damaged[0]
    more = f", as are the other {len(damaged) - 1}" if len(damaged) > 1 else ""
    raise UsageError(f"no intact checkpoint is left in '{ckpt_dir}': {first.name} is damaged ({why}){more}; start "
                     f"the range over with --force")


def _pointer_note(ptr: Path, named: str, chosen: Path) -> str:
    """Why resume does not take the folder `latest` names."""
    there = ptr.parent / named
    if named and Path(named).name == named and _step_of(there) is not None:
        return (f"'{ptr}' names {named}, but {chosen.name} is newer and intact (stopped between writing it and "
                f"updating '{LATEST}'); resuming from {chosen.name}")
    return f"'{ptr}' names '{named}', which is missing or not a step-<k> folder; resuming from {chosen.name}"


def latest(ckpt_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from, or None when there is none (the old name of resume_point)."""
    return resume_point(ckpt_dir)


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
    write_manifest(tmp)                                 # last: a folder with a manifest is complete
    if final.exists():  # a checkpoint of this step from an interrupted earlier attempt
        shutil.rmtree(final)
    tmp.rename(final)
    write_atomic(ckpt_dir / LATEST, final.name + "\n")
    prune(ckpt_dir, keep)
    return final


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete every step folder newer than the one `latest` names (left behind by a resume that fell back past them),
    all but the `keep` newest of the rest (never the one `latest` names), and stale temporary folders."""
    pointed = (ckpt_dir / LATEST).read_text().strip() if (ckpt_dir / LATEST).is_file() else None
    found = list_checkpoints(ckpt_dir)
    at = next((s for s, p in found if p.name == pointed), None)
    if at is not None:
        for s, p in found:
            if s > at:
                shutil.rmtree(p, ignore_errors=True)
        found = [(s, p) for s, p in found if s <= at]
    for _, p in found[:-keep]:
        if p.name != pointed:
            shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_dir.glob(f".{PREFIX}*.tmp"):
        shutil.rmtree(p, ignore_errors=True)


def load(folder: Path, generators: dict, rank: int = 0) -> dict[str, Any]:
    """Read a checkpoint: {"student", "ema", "optim", "state"}; restores process `rank`'s RNG states.

    UsageError (naming the folder) when any of it cannot be read."""
    try:
        return _load(folder, generators, rank)
    except Exception as e:
        why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise UsageError(f"checkpoint '{folder}' cannot be read ({why}); start the range over with --force") from None


def _load(folder: Path, generators: dict, rank: int) -> dict[str, Any]:
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
