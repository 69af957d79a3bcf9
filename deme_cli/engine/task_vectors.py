"""Task vectors (paper section 3.3, Eq. 8): the range models as merge inputs, and the merged weights
theta + combine_i(w_i, tau_i), tau_i = theta_i - theta on float tensors (projections: base = identity; a range without
projections: tau = 0; non-float tensors from theta; methods in merge_methods.py). Streamed tensor by tensor in float64
(safetensors_stream; theta is the only whole model in memory); CandidateMerger keeps them in memory for the search.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from . import ui
from .errors import UsageError
from .exports import refuse_stale
from .merge_methods import MergeSpec, combine, consensus, get_method, sparsify
from .adapters import delta_shape, lora_modules
from .models import META_FILE
from .pipeline_folders import folder_files, note_old_layout
from .runs import RunDir
from .safetensors_stream import TensorFileReader, TensorFileWriter, dtype_name, read_header, torch_dtype

MERGE_JSON = "merge.json"
SEARCH_PLOT = "merge-search.png"          # every candidate of a weight search and its score


# --- weights -----------------------------------------------------------------------------------------------------

def parse_weights(text: str) -> list[float]:
    """'0.1,0.1,0.2,0.5' -> [0.1, 0.1, 0.2, 0.5]."""
    parts = [p.strip() for p in text.strip().strip("[]").split(",")]
    try:
        values = [float(p) for p in parts if p]
    except ValueError:
        raise UsageError(f"--weights expects comma-separated numbers, one per range (like 0.1,0.1,0.2,0.5), "
                         f"got '{text}'") from None
    if not values or any(v != v or v in (float("inf"), float("-inf")) for v in values):
        raise UsageError(f"--weights expects comma-separated finite numbers, got '{text}'")
    return values


def resolve_weights(weights, n: int, source: str = "--weights") -> list[float]:
    """The merge weights for n ranges: a list (checked against N), or "uniform" / "search" / None: 1/N each (the
    search starts from the uniform average)."""
    if weights is None or isinstance(weights, str):
        return [1.0 / n] * n
    if len(weights) != n:
        raise UsageError(f"{source} has {len(weights)} values but there are {n} ranges (ranges.n); give one weight "
                         f"per range, low t first")
    return [float(w) for w in weights]


# --- inputs ------------------------------------------------------------------------------------------------------

@dataclass
class RangeModel:
    """One range model folder, opened lazily for tensor-by-tensor reads: a full UNet (`unet_files`), or LoRA adapters
    on theta (`lora_file`: the task vector of an adapted weight W is scale * B @ A, of every other tensor 0)."""
    index: int
    folder: Path
    meta: dict
    unet_files: list[Path]
    projection_file: Optional[Path]
    lora_file: Optional[Path] = None
    lora_pairs: dict = field(default_factory=dict)   # theta's weight key -> (A key, B key) in lora_file
    unet: Optional[TensorFileReader] = None
    projection: Optional[TensorFileReader] = None

    @property
    def is_lora(self) -> bool:
        return self.lora_file is not None

    def task_vector(self, group: str, key: str, theta):
        """tau = theta_i - theta of one tensor in float64 (`theta` float64), or None where the model leaves theta as
        it is (a projection it does not have, a weight its adapters do not touch): tau is 0 there."""
        import torch

        from .adapters import delta

        if group == "unet" and self.is_lora:
            if key not in self.lora_pairs:
                return None
            ka, kb = self.lora_pairs[key]
            return delta(self.unet.get(ka), self.unet.get(kb), float(self.meta["adapter"]["scale"]))
        if group == "unet":
            return torch.sub(self.unet.get(key), theta)  # float32 - float64 -> float64, in one pass
        if self.projection is None or key not in self.projection.tensors:
            return None
        return torch.sub(self.projection.get(key), theta)

    def identity(self) -> dict:
        """What identifies this model's weights in merge.json (and in the skip fingerprint)."""
        files = self.unet_files + ([self.lora_file] if self.lora_file else []) + \
            ([self.projection_file] if self.projection_file else [])
        return {"index": self.index, "path": str(self.folder),
                "lo": (self.meta.get("range") or {}).get("lo"), "hi": (self.meta.get("range") or {}).get("hi"),
                "base_hash": self.meta.get("base_hash"),
                "deme_json_sha256": hashlib.sha256((self.folder / META_FILE).read_bytes()).hexdigest()[:16],
                "files": [{"name": str(f.relative_to(self.folder)), "bytes": f.stat().st_size,
                           "mtime_ns": f.stat().st_mtime_ns} for f in files]}


@dataclass
class MergeInputs:
    """theta (in memory), the range models (on disk) and the plan of output tensors."""
    base_unet: Any                         # the pretrained UNet (diffusers module), fp32
    base_unet_dir: Path                    # its folder
    base_hash: str
    ranges: list[RangeModel]
    identity: Optional[dict]               # identity projection state, or None when no range has projections
    entries: list[tuple[str, str, str, tuple]] = field(default_factory=list)  # (group, key, dtype, shape) in order
    base_folder: Optional[Path] = None     # the base pipeline (merged/ gets its scheduler and other components)

    @property
    def n(self) -> int:
        return len(self.ranges)

    @property
    def has_projections(self) -> bool:
        return self.identity is not None

    @functools.cached_property
    def base_state(self) -> dict:
        return self.base_unet.state_dict()

    def base_tensor(self, group: str, key: str):
        return self.base_state[key] if group == "unet" else self.identity[key]

    @contextlib.contextmanager
    def open(self) -> Iterator["MergeInputs"]:
        """Open every range model's files for reading (plain file handles, nothing memory-mapped)."""
        with contextlib.ExitStack() as stack:
            for r in self.ranges:
                r.unet = stack.enter_context(TensorFileReader([r.lora_file] if r.is_lora else r.unet_files))
                r.projection = stack.enter_context(TensorFileReader([r.projection_file])) \
                    if r.projection_file else None
            try:
                yield self
            finally:
                for r in self.ranges:
                    r.unet = r.projection = None


def _find_range_models(run: RunDir, n: int, use_ema: bool) -> list[RangeModel]:
    """The N range model folders, checked for presence and completeness (cheap: no tensors read)."""
    folders = [run.final(i, ema=use_ema) for i in range(n)]
    missing = [i for i, f in enumerate(folders) if not (f / META_FILE).is_file()]
    if missing:
        which = ", ".join(str(i) for i in missing)
        cmd = "deme train RECIPE --all" if len(missing) == n else \
            " and ".join(f"deme train RECIPE --range {i}" for i in missing)
        other = [i for i in missing if (run.final(i, ema=not use_ema) / META_FILE).is_file()]
        hint = f" (the {'raw' if use_ema else 'EMA'} weights exist: set merge.use_ema = {str(not use_ema).lower()} " \
               f"to merge those)" if other else ""
        raise UsageError(f"range model{'s' if len(missing) > 1 else ''} {which} not found in "
                         f"'{folders[missing[0]].parent.parent}'{hint}; run '{cmd}' first")
    if use_ema:
        refuse_stale(run, range(n))
    out = []
    for i, folder in enumerate(folders):
        try:
            found = folder_files(folder)
        except UsageError:
            found = None
        if found is None or found.routed or not (found.unet or found.lora):
            raise UsageError(f"range model '{folder}' holds no UNet weights; run 'deme train RECIPE --range {i} "
                             f"--force' to write it again")
        note_old_layout(folder, "'deme train RECIPE --all' (no training)")
        files, lora = found.unet, found.lora
        try:
            meta = json.loads((folder / META_FILE).read_text())
        except (OSError, ValueError):
            raise UsageError(f"'{folder / META_FILE}' is not valid JSON; run 'deme train RECIPE --range {i} --force'") \
                from None
        idx = (meta.get("range") or {}).get("index", i)
        if idx != i:
            raise UsageError(f"'{folder}' holds the model of range {idx}, not range {i}; move it back to "
                             f"ranges/{idx}/ or retrain range {i}")
        if not meta.get("base_hash"):
            raise UsageError(f"'{folder / META_FILE}' does not record base_hash, so its base model is unknown; "
                             f"retrain range {i}")
        model = RangeModel(i, folder, meta, files, found.projection)
        if lora is not None:
            if not (meta.get("adapter") or {}).get("scale"):
                raise UsageError(f"'{folder / META_FILE}' does not describe the LoRA adapter in '{lora.parent}'; "
                                 f"run 'deme train RECIPE --range {i} --force'")
            model.lora_file = lora
            pairs = lora_modules({k: info.shape for k, info in read_header(lora)[0].items()})
            model.lora_pairs = {mod + ".weight": pair for mod, pair in pairs.items()}
        out.append(model)
    hashes = {r.meta["base_hash"] for r in out}
    if len(hashes) > 1:
        listing = ", ".join(f"range {r.index}: {r.meta['base_hash']}" for r in out)
        raise UsageError(f"the range models were finetuned from different base models ({listing}); retrain the odd "
                         f"ones from the same model.pretrained")
    return out


def load_inputs(base, run: RunDir, *, n: int, use_ema: bool) -> MergeInputs:
    """Find and check the n range models of the run (final/, or final-raw/ without `use_ema`), load theta (the
    base's UNet), and plan the output tensors. Raises UsageError on bad input."""
    from .models import identity_projection_state, unet_folder, unet_hash

    ranges = _find_range_models(run, n, use_ema)
    base_unet = base.load_unet()
    base_unet.requires_grad_(False)
    base_hash = unet_hash(base_unet)
    if ranges[0].meta["base_hash"] != base_hash:
        raise UsageError(f"the range models were finetuned from a different base model (base_hash "
                         f"{ranges[0].meta['base_hash']}) than model.pretrained = '{base.pretrained}' "
                         f"(base_hash {base_hash}); point model.pretrained at their base or retrain them")
    inputs = MergeInputs(base_unet, unet_folder(base.folder), base_hash, ranges, None, base_folder=Path(base.folder))
    if any(r.projection_file for r in ranges):
        inputs.identity = identity_projection_state(base_unet)
    inputs.entries = _plan(inputs)
    return inputs


def _plan(inputs: MergeInputs) -> list[tuple[str, str, str, tuple]]:
    """(group, key, dtype, shape) of every output tensor, after checking that the range models fit theta."""
    base_sd = inputs.base_state
    _check_adapters(inputs)
    groups = [("unet", {k: tuple(v.shape) for k, v in base_sd.items()}, lambda r: r.unet_files)]
    if inputs.identity is not None:
        groups.append(("projection", {k: tuple(v.shape) for k, v in inputs.identity.items()},
                       lambda r: [r.projection_file] if r.projection_file else []))
    entries = []
    for group, shapes, files_of in groups:
        dtypes: dict[str, str] = {}
        for r in inputs.ranges:
            files = files_of(r)
            if not files:
                continue  # a range model without projections: identity, tau = 0
            infos = {}
            for f in files:
                infos.update(read_header(f)[0])
            what = "UNet" if group == "unet" else "projections"
            diff = sorted(set(infos) ^ set(shapes))
            if diff:
                raise UsageError(f"range model {r.index} ('{r.folder}') has a different {what} architecture than "
                                 f"model.pretrained ({len(diff)} tensor names differ, e.g. '{diff[0]}'); retrain it "
                                 f"from this base")
            for k, info in infos.items():
                if info.shape != shapes[k]:
                    raise UsageError(f"range model {r.index} ('{r.folder}'): tensor '{k}' has shape {info.shape} but "
                                     f"model.pretrained has {shapes[k]}; retrain it from this base")
                dtypes.setdefault(k, info.dtype)
        for k in sorted(shapes):
            base_dtype = dtype_name(base_sd[k].dtype) if group == "unet" else dtype_name(inputs.identity[k].dtype)
            entries.append((group, k, dtypes.get(k, base_dtype), shapes[k]))
    return entries


def _check_adapters(inputs: MergeInputs) -> None:
    """Every LoRA range's adapted layers exist in theta, with the shape of B @ A."""
    base_sd = inputs.base_state
    for r in inputs.ranges:
        if not r.is_lora:
            continue
        infos = read_header(r.lora_file)[0]
        for key, (ka, kb) in r.lora_pairs.items():
            want = delta_shape(infos[ka].shape, infos[kb].shape)
            if key not in base_sd or tuple(base_sd[key].shape) != want:
                raise UsageError(f"range model {r.index} ('{r.folder}') adapts layer '{key[:-len('.weight')]}', which "
                                 f"model.pretrained does not have in that shape; retrain it from this base")


# --- merging -----------------------------------------------------------------------------------------------------

def merged_tensors(inputs: MergeInputs, weights: list[float], spec: MergeSpec) -> Iterator[tuple[str, str, Any]]:
    """(group, key, merged tensor) for every planned tensor, in plan order; `inputs` must be open.

    Float tensors: theta + combine(w_i, tau_i), computed in float64 and stored in the range models' dtype. Ranges with
    weight 0 are not read (their contribution is 0 for every method)."""
    import torch

    get_method(spec.method)  # fail early on an unknown method
    active = [(r, float(w)) for r, w in zip(inputs.ranges, weights) if w != 0]
    for group, key, dtype, _ in inputs.entries:
        base = inputs.base_tensor(group, key)
        out_dtype = torch_dtype(dtype)
        if not base.is_floating_point():
            yield group, key, base.to(out_dtype)
            continue
        theta = base.to(torch.float64)

        def taus(theta=theta):
            for r, w in active:
                tau = r.task_vector(group, key, theta)
                if tau is not None:
                    yield r.index, w, tau
                    del tau  # keep one range's tensor in flight, not two
        delta = combine(spec, f"{group}.{key}", taus())
        out = (theta if delta is None else delta.add_(theta)).to(out_dtype)
        del delta, theta, taus  # taus' default holds theta too
        yield group, key, out


def merged_state(inputs: MergeInputs, weights: list[float], spec: MergeSpec) -> dict:
    """The merged weights in memory, keyed like DemeModel.state_dict() (`unet.*`, `projections.*`)."""
    with inputs.open():
        return {("unet." if g == "unet" else "projections.") + k: t for g, k, t in merged_tensors(inputs, weights, spec)}


def _targets(model) -> dict:
    return {"unet": model.unet.state_dict(),
            "projection": model.projections.state_dict() if model.projections is not None else {}}


def load_merged_into(model, inputs: MergeInputs, weights: list[float], spec: MergeSpec) -> None:
    """Copy the merged weights into `model` (a DemeModel shaped like theta) tensor by tensor, wherever it lives."""
    import torch

    targets = _targets(model)
    with inputs.open(), torch.no_grad():
        for group, key, t in merged_tensors(inputs, weights, spec):
            targets[group][key].copy_(t)


class StreamingMerger:
    """Candidate merges read from disk each time (`load_merged_into`): about one model of memory, slow per merge."""

    kind = "streaming from the range model files"

    def __init__(self, inputs: MergeInputs, spec: MergeSpec):
        self.inputs, self.spec = inputs, spec

    def load_into(self, model, weights: list[float]) -> None:
        load_merged_into(model, self.inputs, weights, self.spec)


class CandidateMerger:
    """Many merges of the same range models, fast: theta and each range's sparsified task vector stay on `device`
    in float32 (about N + 1 models of memory), so a candidate costs one combination per tensor and no file reads.
    For the weight search: TIES trims and DARE drops do not depend on the weights, so they are done once. Results agree
    with the streamed float64 merge up to float32 rounding; the search's winner is written by the streaming path.
    What it holds, in bytes: search_pool.cache_bytes."""

    kind = "task vectors held in memory (float32)"

    def __init__(self, inputs: MergeInputs, spec: MergeSpec, device="cpu"):
        import torch

        self.spec, self.entries = spec, []   # (group, key, theta, [(range index, sparsified tau)])
        with inputs.open(), torch.no_grad():
            for group, key, _, _ in inputs.entries:
                base = inputs.base_tensor(group, key)
                if not base.is_floating_point():
                    self.entries.append((group, key, base.to(device), []))
                    continue
                theta, taus = base.to(torch.float64), []
                for r in inputs.ranges:
                    t = r.task_vector(group, key, theta)
                    if t is not None:
                        tau = sparsify(spec, f"{group}.{key}", r.index, t)
                        taus.append((r.index, tau.to(device, torch.float32)))
                self.entries.append((group, key, base.to(device, torch.float32), taus))

    def load_into(self, model, weights: list[float]) -> None:
        import torch

        targets = _targets(model)
        with torch.no_grad():
            for group, key, theta, taus in self.entries:
                delta = consensus(self.spec, ((tau, weights[i]) for i, tau in taus if weights[i] != 0))
                targets[group][key].copy_(theta if delta is None else delta.add_(theta))


def new_candidate_model(inputs: MergeInputs):
    """A DemeModel with theta's architecture (and projections if the merge has them) to load merges into."""
    import copy

    from .models import DemeModel, make_projections

    unet = copy.deepcopy(inputs.base_unet)
    return DemeModel(unet, make_projections(unet) if inputs.has_projections else None)


def write_merged_folder(inputs: MergeInputs, weights: list[float], spec: MergeSpec, dest: Path, meta: dict,
                        merge_json: dict) -> None:
    """Stream the merged model into `dest` (a pipeline folder, as a range's final/), via a temporary folder and a
    rename."""
    from .pipeline_folders import finish_unet, unet_paths, write_pipeline_parts

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", suffix=".tmp", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)      # mkdtemp makes 0700 folders; merged/ gets the usual permissions
    try:
        unet_entries = [(k, d, s) for g, k, d, s in inputs.entries if g == "unet"]
        proj_entries = [(k, d, s) for g, k, d, s in inputs.entries if g == "projection"]
        unet_file, proj_file = unet_paths(tmp, bool(proj_entries))      # a stock unet/, or a DemeUNet's model-0/
        unet_file.parent.mkdir(parents=True)
        with contextlib.ExitStack() as stack:
            writers = {"unet": stack.enter_context(TensorFileWriter(unet_file, unet_entries))}
            if proj_entries:
                writers["projection"] = stack.enter_context(TensorFileWriter(proj_file, proj_entries))
            bar = stack.enter_context(ui.progress("merge", total=len(inputs.entries), unit="tensors", every=100))
            stack.enter_context(inputs.open())
            for group, key, t in merged_tensors(inputs, weights, spec):
                writers[group].write(key, t)
                bar.update()
        base_unet = inputs.base_unet
        finish_unet(tmp, type(base_unet).__name__, dict(base_unet.config), bool(proj_entries))
        if inputs.base_folder is not None:
            write_pipeline_parts(tmp, inputs.base_folder)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / MERGE_JSON).write_text(json.dumps(merge_json, indent=2, default=str) + "\n")
        if merge_json.get("search"):
            from .plots import search_plot
            search_plot(merge_json["search"], tmp / SEARCH_PLOT)
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: Path, dest: Path) -> None:
    """Put folder `new` at `dest`; an existing `dest` is moved aside first and removed only once `new` is in place."""
    if not dest.exists():
        new.rename(dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}-old-", dir=dest.parent))
    old.rmdir()
    dest.rename(old)
    try:
        new.rename(dest)
    except BaseException:
        old.rename(dest)
        raise
    shutil.rmtree(old, ignore_errors=True)
