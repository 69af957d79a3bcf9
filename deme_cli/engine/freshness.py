"""Which numbers are current: an eval result counts only while the model and the samples it scored are on disk now.

eval/<model>.json holds two parts, each checked on its own:
- the sample metrics (FID, KID and its std, CLIP score), scored on samples/<model>/. The eval records the samples'
  identity (`samples_key`: samples.json without its per-call bookkeeping, and the names and sizes of the images it
  scored) and the files of the model folder(s) the samples were made from (`model_files`); before scoring, `deme eval`
  checks that the samples' model hash is the hash of the model in those folders now.
- the loss by timestep (metrics.loss_ratio), scored on the models themselves: its record carries the files of the
  model folder(s) and of the base it was computed with (`model_files`).

`model_files` lists, per folder, each file's size, mtime and sha256. A part is current while every recorded file is
there with the same content and no file was added (a file with the same size and mtime is taken as unchanged; any
other is hashed again, so a run directory copied elsewhere stays current, and one merged or retrained again does not)
and, for the sample part, while the samples are the ones scored. `status` says per part: current, or stale with why
and the command that refreshes it; the report, the model cards, `deme run`'s table and the CI step summary show
numbers only through `current`. Results written before deme recorded these are judged as the model cards did: the
samples' model hash equals the eval's, and the model folder was not rewritten after the samples were made.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .images import SAMPLES_JSON, existing_images
from .runs import RunDir, model_dirname

SAMPLE_PART = ("fid", "kid", "kid_std", "clip_score")     # metrics of the samples
LOSS_PART = ("loss_ratio",)                               # metrics of the loss by timestep
PER_CALL = ("time_s", "images_per_s", "created", "generated", "skipped")   # samples.json keys of one sample call
META_FILE = "deme.json"                      # models.META_FILE (not imported: models.py imports torch helpers)
# a model folder's records and pictures, not the model: the card, its grid, the search plot, and how it was made
# (deme.json, merge.json name paths and times; the same weights written again are the same model)
RECORDS = (META_FILE, "merge.json")
RECORD_SUFFIXES = (".md", ".png")


# --- identities ----------------------------------------------------------------------------------------------------

def samples_key(record: dict, files: Iterable[Path]) -> str:
    """The identity of scored samples: samples.json without the bookkeeping of the last `deme sample` call (how many
    images it made or kept, how long it took, the ensemble's calls per range), and each image's name and size."""
    rec = {k: v for k, v in (record or {}).items() if k not in PER_CALL}
    if isinstance(rec.get("model_info"), dict):
        rec["model_info"] = {k: v for k, v in rec["model_info"].items() if k != "calls_per_range"}
    blob = {"samples": rec, "images": [[Path(f).name, Path(f).stat().st_size] for f in files]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


def model_folders(run: RunDir, spec: str, base_folder: Path, use_ema: bool, n: int) -> list[Path]:
    """The folders a model spec is loaded from: the base's pipeline folder, merged/, range I's final/ (final-raw/ when
    merge.use_ema is false), or every range's for the ensemble."""
    if spec == "base":
        return [Path(base_folder)]
    if spec == "merged":
        return [run.merged]
    if spec == "ensemble":
        return [run.final(i, ema=use_ema) for i in range(n)]
    if spec.startswith("range:"):
        return [run.final(int(spec.split(":", 1)[1]), ema=use_ema)]
    raise ValueError(f"Unknown model spec '{spec}'")


def _files(folder: Path) -> list[Path]:
    """The files that make a model folder: all but hidden ones and its records (RECORDS, and the top level's Markdown
    and PNGs); in a pretrained pipeline folder with model_index.json, only it and the components it names (a base
    cloned from the Hub may hold other checkpoints)."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if index.is_file() and not (folder / META_FILE).is_file():       # a pretrained pipeline, not a deme folder
        try:
            parts = [k for k, v in json.loads(index.read_text()).items() if isinstance(v, list)]
        except ValueError:
            parts = []
        roots = [folder / p for p in parts if (folder / p).is_dir()]
        found = [index] + [f for r in roots for f in r.rglob("*")]
    else:
        found = [f for f in folder.rglob("*") if f.parent != folder or
                 (f.name not in RECORDS and f.suffix not in RECORD_SUFFIXES)]
    return sorted(f for f in found if f.is_file() and not any(p.startswith(".") for p in f.relative_to(folder).parts))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _key(folder: Path, root: Path) -> str:
    """How a folder is named in a record: relative to the run directory when inside it (the run can be moved)."""
    folder = Path(folder).resolve()
    try:
        return folder.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(folder)


def _path(key: str, root: Path) -> Path:
    return Path(key) if Path(key).is_absolute() else Path(root) / key


def signature(folders: Iterable[Path], root: Path, previous: Optional[dict] = None) -> dict:
    """{folder: {file: [size, mtime_ns, sha256]}} of the model folders that exist (see _files); a file whose size and
    mtime equal those in `previous` (an earlier signature) keeps its recorded sha256 instead of being read again."""
    out = {}
    for folder in (f for f in folders if Path(f).is_dir()):
        key, old = _key(folder, root), (previous or {}).get(_key(folder, root)) or {}
        files = {}
        for f in _files(folder):
            rel, st = f.relative_to(folder).as_posix(), f.stat()
            was = old.get(rel)
            same = was and was[0] == st.st_size and was[1] == st.st_mtime_ns
            files[rel] = [st.st_size, st.st_mtime_ns, was[2] if same else _sha256(f)]
        out[key] = files
    return out


def changed(recorded: dict, root: Path) -> Optional[str]:
    """None when every folder of a signature holds the same files with the same content now; else what differs."""
    for key, files in recorded.items():
        folder = _path(key, root)
        if not folder.is_dir():
            return f"{key}/ is gone"
        now = {f.relative_to(folder).as_posix(): f for f in _files(folder)}
        if set(now) != set(files):
            return f"{key}/ holds other files"
        for rel, (size, mtime, sha) in files.items():
            st = now[rel].stat()
            if st.st_size != size or (st.st_mtime_ns != mtime and _sha256(now[rel]) != sha):
                return f"{key}/ was written again"
    return None


# --- the verdict ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    current: bool
    why: str = ""           # what changed since the eval (stale only)
    command: str = ""       # what makes it current again


CURRENT = Verdict(True)


def _read(path: Path) -> Optional[dict]:
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) else None


def _cmd(name: str, recipe_arg: str, *args: str) -> str:
    return f"`{' '.join(['deme', name, recipe_arg, *args])}`"


def _legacy_folder_rewritten(samples_file: Path, info: dict) -> bool:
    """A result of a deme that recorded no model_files: was a model folder the samples name rewritten after them?"""
    folders = [info.get("folder")] + [m.get("folder") for m in info.get("members") or []]
    for f in folders:
        meta = Path(f) / META_FILE if f else None
        if meta is not None and meta.is_file() and meta.stat().st_mtime_ns > samples_file.stat().st_mtime_ns:
            return True
    return False


def _sample_part(run: RunDir, rec: dict, spec: str, recipe_arg: str) -> Verdict:
    sample, evaluate = (_cmd("sample", recipe_arg, "--model", spec), _cmd("eval", recipe_arg, "--models", spec))
    resample = _cmd("sample", recipe_arg, "--model", spec, "--force")
    name = f"samples/{model_dirname(spec)}/"
    folder = run.samples(spec)
    samples = _read(folder / SAMPLES_JSON) if (folder / SAMPLES_JSON).exists() else {}   # {}: images deme did not make
    have = existing_images(folder)
    if samples is None or not have:
        return Verdict(False, f"{name} is gone", f"{sample}, then {evaluate}")
    incomplete = Verdict(False, f"{name} is incomplete (a `deme sample` was stopped)", f"{sample}, then {evaluate}")
    if "samples_key" in rec:
        why = changed(rec.get("model_files") or {}, run.root)
        if why is not None:
            return Verdict(False, f"{why} since the samples were scored", f"{resample}, then {evaluate}")
        requested = rec.get("num_images_requested") or len(have)
        if samples_key(samples, [have[k] for k in sorted(have) if k < requested]) != rec["samples_key"]:
            return incomplete if not samples.get("complete", True) else \
                Verdict(False, f"{name} was made again since it was scored", evaluate)
        return CURRENT
    # written before deme recorded samples_key and model_files
    if not samples.get("complete", True):
        return incomplete
    if rec.get("model_hash") is None or rec["model_hash"] != (samples.get("settings") or {}).get("model_hash"):
        return Verdict(False, f"{name} was made again since it was scored", evaluate)
    if _legacy_folder_rewritten(folder / SAMPLES_JSON, samples.get("model_info") or {}):
        return Verdict(False, "the model was written again since it was sampled", f"{resample}, then {evaluate}")
    return CURRENT


def _loss_part(run: RunDir, rec: dict, spec: str, recipe_arg: str) -> Verdict:
    lbt = rec["loss_by_t"]
    evaluate = _cmd("eval", recipe_arg, "--models", spec)
    if "model_files" in lbt:
        why = changed(lbt["model_files"], run.root)
        return CURRENT if why is None else Verdict(False, f"{why} since its loss was scored", evaluate)
    # written before deme recorded model_files: a model folder rewritten after the eval
    eval_file = run.eval_json(spec)
    folders = [run.merged] if spec == "merged" else [run.final(int(spec.split(":")[1]))] \
        if spec.startswith("range:") else sorted(run.root.glob("ranges/*/final")) if spec == "ensemble" else []
    for f in folders:
        if (f / META_FILE).is_file() and (f / META_FILE).stat().st_mtime_ns > eval_file.stat().st_mtime_ns:
            return Verdict(False, f"{_key(f, run.root)}/ was written again since its loss was scored", evaluate)
    return CURRENT


def status(run: RunDir, rec: dict, recipe_arg: str = "RECIPE") -> dict[str, Verdict]:
    """{"samples": Verdict, "loss": Verdict} for the parts an eval record (eval/<model>.json) holds."""
    spec = rec.get("model") or ""
    out = {}
    metrics = rec.get("metrics") or {}
    if any(metrics.get(k) is not None for k in SAMPLE_PART):
        out["samples"] = _sample_part(run, rec, spec, recipe_arg)
    if isinstance(rec.get("loss_by_t"), dict):
        out["loss"] = _loss_part(run, rec, spec, recipe_arg)
    return out


def current(run: RunDir, rec: dict, recipe_arg: str = "RECIPE") -> tuple[dict, dict]:
    """(the record with only its current parts, {part: stale Verdict}): the one way numbers reach a reader."""
    verdicts = status(run, rec, recipe_arg)
    stale = {part: v for part, v in verdicts.items() if not v.current}
    drop = (SAMPLE_PART if "samples" in stale else ()) + (LOSS_PART if "loss" in stale else ())
    out = {**rec, "metrics": {k: v for k, v in (rec.get("metrics") or {}).items() if k not in drop}}
    if "loss" in stale:
        out.pop("loss_by_t", None)
    return out, stale


def read_current(run: RunDir, spec: str, recipe_arg: str = "RECIPE") -> tuple[Optional[dict], dict]:
    """eval/<spec>.json through `current`; (None, {}) when there is none."""
    rec = _read(run.eval_json(spec))
    if rec is None or not isinstance(rec.get("metrics"), dict):
        return None, {}
    return current(run, {**rec, "model": rec.get("model") or spec}, recipe_arg)


def recorded_folders(rec: dict, run: RunDir) -> dict[str, set]:
    """{"samples": {folder}, "loss": {folder}}: the model folders (resolved paths) each part of an eval record was
    scored on; for records without model_files, the folders samples.json names, and range I's final/."""
    def folders(sig: Optional[dict]) -> set:
        return {_path(k, run.root).resolve() for k in sig or {}}

    samples = folders(rec.get("model_files"))
    if "model_files" not in rec:
        info = (_read(run.samples(rec.get("model") or "") / SAMPLES_JSON) or {}).get("model_info") or {}
        samples = {Path(f).resolve() for f in [info.get("folder")] + [m.get("folder") for m in
                                                                      info.get("members") or []] if f}
    lbt = rec.get("loss_by_t") or {}
    loss = folders(lbt.get("model_files"))
    if lbt and "model_files" not in lbt:
        spec = rec.get("model") or ""
        loss = {run.merged.resolve()} if spec == "merged" else \
            {run.final(int(spec.split(":")[1])).resolve()} if spec.startswith("range:") else set()
    return {"samples": samples, "loss": loss}
