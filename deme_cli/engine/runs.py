"""The run directory: the contract between subcommands (DESIGN.md section 3).

```
<run>/recipe.resolved.toml
<run>/ranges.json
<run>/ranges/<i>/checkpoints/step-<k>/ (+ manifest.json), <run>/ranges/<i>/checkpoints/latest
<run>/ranges/<i>/.lock, <run>/.merge.lock, <run>/samples/.<model>.lock    one writer each (locks.py)
<run>/.merge-search.jsonl      the scores of a weight search that was stopped (removed when the merge is written)
<run>/ranges/<i>/final/        EMA weights: a diffusers pipeline folder + deme.json (pipeline_folders.py)
<run>/ranges/<i>/final-raw/    the raw (non-EMA) weights, same format
<run>/ranges/<i>/metrics.jsonl
<run>/ranges/<i>/previews/step-<k>.png   preview grids (train.preview_every); logs/: the tracker's (train.log_with)
<run>/merged/                  same format as final/ (merged, or routed: the N range models), + merge.json
<run>/samples/<model>/         numbered PNGs, grid.png, samples.json
<run>/eval/<model>.json
<run>/analysis/gradients.{npz,png}
```
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import UsageError


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def resolved_recipe(self) -> Path:
        return self.root / "recipe.resolved.toml"

    @property
    def ranges_json(self) -> Path:
        return self.root / "ranges.json"

    def range_dir(self, i: int) -> Path:
        return self.root / "ranges" / str(i)

    def checkpoints(self, i: int) -> Path:
        return self.range_dir(i) / "checkpoints"

    def final(self, i: int, ema: bool = True) -> Path:
        return self.range_dir(i) / ("final" if ema else "final-raw")

    def metrics(self, i: int) -> Path:
        return self.range_dir(i) / "metrics.jsonl"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    def samples(self, model: str) -> Path:
        return self.root / "samples" / model_dirname(model)

    def eval_json(self, model: str) -> Path:
        return self.root / "eval" / f"{model_dirname(model)}.json"

    @property
    def analysis(self) -> Path:
        return self.root / "analysis"

    @property
    def cache(self) -> Path:
        """Cached latents and text embeddings of text-to-image training data (captions.py)."""
        return self.root / "cache"


def model_dirname(model: str) -> str:
    """Folder name for a model spec: `range:2` -> `range-2`."""
    return model.replace(":", "-")


def ensure_writable(root: Path) -> None:
    """Create the run directory, or say clearly why it cannot be used."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (PermissionError, FileExistsError, NotADirectoryError, OSError) as e:
        raise UsageError(f"output directory '{root}' cannot be created ({e.strerror or e}); choose another with --out") from None
    if not root.is_dir():
        raise UsageError(f"output path '{root}' is not a directory; choose another with --out")
    if not os.access(root, os.W_OK | os.X_OK):
        raise UsageError(f"output directory '{root}' is not writable; choose another with --out")


def write_atomic(path: Path, text: str) -> None:
    """Write a text file via a temporary name and a rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs should get the usual permissions
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_jsonl(path: Path, keys: Sequence[str], lacking: Callable[[int, str], str]) -> list[tuple[int, dict]]:
    """(line number, record) of every non-empty line of a JSON-lines file. A line that is not JSON is a UsageError
    naming the line; so is one that is not an object with every one of `keys`, with the message
    `lacking(line number, the keys it has)`."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise UsageError(f"{path} line {n} is not valid JSON; fix or remove it") from None
        if not isinstance(rec, dict) or any(k not in rec for k in keys):
            have = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
            raise UsageError(lacking(n, have))
        out.append((n, rec))
    return out


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def read_record(path: Path, fix: str) -> Any:
    """A JSON record deme wrote (samples.json, run.json, ...); a damaged one is a UsageError naming it and `fix`."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError):
        raise UsageError(f"'{path}' is damaged (not valid JSON); {fix}") from None
