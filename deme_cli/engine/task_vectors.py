"""Task vectors (paper section 3.3, Eq. 8): the merged weights theta + combine_i(w_i, tau_i), tau_i = theta_i - theta
on float tensors (projections: base = identity; a range without projections: tau = 0; non-float tensors from theta;
methods in merge_methods.py), of the inputs merge_inputs.py finds and opens. Streamed tensor by tensor in float64
(safetensors_stream): theta and the range models are read one tensor at a time and each merged tensor is written as it
is computed, so a merge holds a few tensors, not models (benchmarks/merge_memory.py: about one model of memory above
the imports for N = 2 to 8). CandidateMerger keeps them in memory for the search.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from . import ui
from .errors import UsageError
from .merge_inputs import MergeInputs, release_free_memory
from .merge_inputs import load_inputs  # noqa: F401  (re-exported: `deme merge` and the search import it from here)
from .merge_methods import MergeSpec, combine, consensus, get_method, sparsify
from .models import META_FILE
from .safetensors_stream import TensorFileWriter, torch_dtype

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
        del base

        def taus(theta=theta):
            for r, w in active:
                tau = r.task_vector(group, key, theta)
                if tau is not None:
                    yield r.index, w, tau
                    del tau  # keep one range's tensor in flight, not two
                    release_free_memory()
        delta = combine(spec, f"{group}.{key}", taus)
        out = (theta if delta is None else delta.add_(theta)).to(out_dtype)
        del delta, theta, taus  # taus' default holds theta too
        yield group, key, out
        del out
        release_free_memory()


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
                delta = consensus(self.spec, lambda taus=taus: ((tau, weights[i]) for i, tau in taus
                                                                if weights[i] != 0))
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
        finish_unet(tmp, inputs.unet_class, inputs.unet_config, bool(proj_entries))
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
