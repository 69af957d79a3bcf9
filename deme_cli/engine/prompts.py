"""Prompts for text-to-image sampling: a text file, a JSONL/CSV column, or a dataset column.

`load_prompts(sample)` reads recipe.sample.prompts:
    *.txt                 one prompt per line
    *.jsonl               the sample.prompt_column key of each line's object
    *.csv                 the sample.prompt_column column (header row first)
    anything else         a Hugging Face dataset (hub id, local dataset folder, or save_to_disk folder), column
                          sample.prompt_column, split sample.prompt_split (default: its only split, else "train")
Blank prompts are skipped. Image k gets prompt k mod len(prompts) (`prompt_for`), so num_images may exceed the number
of prompts (several images per prompt) or fall short of it (the first num_images prompts).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

from .errors import UsageError
from .runs import read_jsonl


def _txt(path: Path, column: str) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _jsonl(path: Path, column: str) -> list[str]:
    def lacking(n: int, have: str) -> str:
        return f"{path} line {n} has no key '{column}' (it has: {have}); set sample.prompt_column"

    return [rec[column] for _, rec in read_jsonl(path, (column,), lacking)]


def _csv(path: Path, column: str) -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return []
        if column not in reader.fieldnames:
            raise UsageError(f"{path} has no column '{column}' (columns: {', '.join(reader.fieldnames)}); set "
                             f"sample.prompt_column")
        return [row[column] for row in reader]


FILE_SOURCES: dict[str, Callable[[Path, str], list]] = {".txt": _txt, ".jsonl": _jsonl, ".csv": _csv}


def _dataset(spec: str, column: str, split: str | None) -> list:
    """A column of a hub dataset, a local dataset folder, or a save_to_disk folder."""
    import datasets

    local = Path(spec).expanduser()
    try:
        if local.is_dir() and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(local))
        else:
            ds = datasets.load_dataset(str(local) if local.exists() else spec)
    except Exception as e:  # offline, unknown repo, broken folder: the datasets library raises many kinds
        raise UsageError(f"could not load the prompts '{spec}' ({type(e).__name__}); point sample.prompts at a .txt, "
                         f".jsonl or .csv file, or a dataset available offline") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        chosen = split or (splits[0] if len(splits) == 1 else "train")
        if chosen not in ds:
            raise UsageError(f"prompt dataset '{spec}' has no split '{chosen}' (splits: {', '.join(splits)}); set "
                             f"sample.prompt_split")
        ds = ds[chosen]
    if column not in ds.column_names:
        raise UsageError(f"prompt dataset '{spec}' has no column '{column}' (columns: {', '.join(ds.column_names)}); "
                         f"set sample.prompt_column")
    return list(ds[column])


def load_prompts(sample) -> list[str]:
    """The recipe's prompts (see the module docstring); a UsageError when there are none."""
    spec = sample.prompts
    if not spec:
        raise UsageError("this is a text-to-image model: set sample.prompts to a .txt file (one prompt per line), a "
                         ".jsonl/.csv file with a sample.prompt_column, or a dataset")
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if suffix in FILE_SOURCES:
        if not path.is_file():
            raise UsageError(f"prompt file '{spec}' does not exist; set sample.prompts to an existing file")
        try:
            raw = FILE_SOURCES[suffix](path, sample.prompt_column)
        except UnicodeDecodeError:
            raise UsageError(f"prompt file '{spec}' is not UTF-8 text") from None
    else:
        raw = _dataset(spec, sample.prompt_column, getattr(sample, "prompt_split", None))
    prompts = [str(p).strip() for p in raw if p is not None and str(p).strip()]
    if not prompts:
        raise UsageError(f"prompt source '{spec}' holds no prompts; add at least one (one per line in a .txt file)")
    return prompts


def prompt_for(prompts: list[str], k: int) -> str:
    """The prompt of image k: the prompts cycle when there are more images than prompts."""
    return prompts[k % len(prompts)]
