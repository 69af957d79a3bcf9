"""`deme merge`: merge the N range models into one by task-vector arithmetic (paper section 3.3, Eq. 8).

Task vectors tau_i = theta_i - theta over every floating-point tensor of the range models (the EMA weights in
`ranges/<i>/final/` by default, the raw ones in `final-raw/` with merge.use_ema = false), projections included: their
base is the identity, so tau = W_i - I. A range model without projections counts as identity projections (tau = 0).
Non-float tensors are copied from theta. Then

    theta_merged = theta + combine_i(w_i, tau_i)                        (Eq. 8 for task_arithmetic: sum_i w_i tau_i)

Methods are data in `MERGE_METHODS` (mergekit's design: a sparsification of each tau, then a consensus across
ranges), each with its paper's link:
- task_arithmetic: no sparsification, weighted sum. The paper's merge.
- ties: per tensor and per range, keep the `density` fraction of tau's entries with the largest magnitude (at least
  one entry; ties in magnitude broken by torch.topk), scale the trimmed tau by w_i, elect each entry's sign as the
  sign of the sum of the scaled trimmed taus, and take the mean of the scaled entries whose sign agrees with the
  elected one (entries where no range agrees, or the sum is exactly 0, get 0). With one range and density 1 this is
  task arithmetic; with N ranges it averages the agreeing ranges instead of summing them (TIES' "disjoint mean").
- dare: per tensor and per range, drop each entry of tau with probability 1 - density and divide the kept ones by
  density (so E[dropped tau] = tau), then the weighted sum. The random drop of range i, tensor k is seeded by
  (merge.seed, i, k) alone, so the result does not depend on tensor order, on which other ranges take part, or on
  streaming.
Weights: `--weights`, else merge.weights, else 1/N each (the uniform soup). The release hard-codes
[0.1, 0.1, 0.2, 0.5] for N = 4 (low t first); weights need not sum to 1.

Streaming: the base UNet is loaded once (the only whole model in memory: its hash is the identity that range models
record, computed the way `train` computes it); range models are read tensor by tensor from their safetensors files and
the merged tensors are written as they are computed (`safetensors_stream`), in float64 so that weight 1 on one range
gives back that range's weights exactly. Peak memory: about one model plus a few tensors, not N + 1 models
(benchmarks/merge_memory.py measures it).

Output: `<run>/merged/` in the format of a range's `final/` (unet/ with the base UNet's config.json, projection
.safetensors, deme.json) plus merge.json (method, weights, density/seed where used, the range models and their
identities, the search log). It is written to a temporary folder and renamed, so an existing merged/ is only replaced
by a complete new one. Re-running with the same settings and unchanged range models skips the merge (merge.json's
"fingerprint"); `--force` merges again.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from . import ui
from .errors import UsageError
from .models import META_FILE, PROJECTION_FILE, UNET_WEIGHTS
from .runs import RunDir, read_json
from .safetensors_stream import TensorFileReader, TensorFileWriter, dtype_name, read_header, torch_dtype

MERGE_JSON = "merge.json"


# --- methods -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MergeMethod:
    name: str
    url: str                  # the paper
    summary: str
    sparsify: Optional[str]   # key of SPARSIFIERS, or None: every entry of tau is kept
    consensus: str            # key of CONSENSUS

    @property
    def uses_density(self) -> bool:
        return self.sparsify is not None

    @property
    def uses_seed(self) -> bool:
        return self.sparsify == "random"


def trim_by_magnitude(tau, density: float, generator=None):
    """TIES trim: keep the round(density * numel) entries (at least one) of largest |tau|, zero the others."""
    import torch

    n = tau.numel()
    k = max(1, int(density * n + 0.5)) if n else 0
    if k >= n:
        return tau
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.topk(tau.abs().reshape(-1), k, sorted=False).indices] = True
    return tau * keep.reshape(tau.shape)


def drop_and_rescale(tau, density: float, generator=None):
    """DARE: drop each entry with probability 1 - density, divide the kept ones by density."""
    import torch

    if density >= 1.0:
        return tau
    keep = torch.rand(tau.shape, generator=generator) < density
    return tau * keep / density


def weighted_sum(pairs: Iterable[tuple[Any, float]]) -> Optional[Any]:
    """sum_i w_i tau_i over (tau_i, w_i) pairs (None when no range takes part)."""
    total = None
    for tau, w in pairs:
        total = tau * w if total is None else total.add_(tau, alpha=w)
        del tau  # one task vector in flight at a time
    return total


def disjoint_mean(pairs: Iterable[tuple[Any, float]]) -> Optional[Any]:
    """TIES: elect sign(sum_i w_i tau_i) per entry, average the w_i tau_i entries that agree with it."""
    import torch

    scaled = [tau * w for tau, w in pairs]
    if not scaled:
        return None
    stacked = torch.stack(scaled)
    del scaled
    elected = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == elected) & (elected != 0)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


SPARSIFIERS: dict[str, Callable] = {"magnitude": trim_by_magnitude, "random": drop_and_rescale}
CONSENSUS: dict[str, Callable] = {"sum": weighted_sum, "sign_mean": disjoint_mean}

MERGE_METHODS: dict[str, MergeMethod] = {m.name: m for m in [
    MergeMethod("task_arithmetic", "https://arxiv.org/abs/2212.04089",
                "theta + sum_i w_i tau_i (task arithmetic; DeMe Eq. 8)", None, "sum"),
    MergeMethod("ties", "https://arxiv.org/abs/2306.01708",
                "trim each tau to the top density by magnitude, elect signs, disjoint mean (TIES-merging)",
                "magnitude", "sign_mean"),
    MergeMethod("dare", "https://arxiv.org/abs/2311.03099",
                "drop tau entries with probability 1 - density, rescale by 1/density, weighted sum (DARE)",
                "random", "sum"),
]}


def get_method(name: str) -> MergeMethod:
    try:
        return MERGE_METHODS[name]
    except KeyError:
        raise UsageError(f"unknown merge method '{name}' (known: {', '.join(MERGE_METHODS)})") from None


@dataclass(frozen=True)
class MergeSpec:
    """How to combine the task vectors (weights excluded)."""
    method: str = "task_arithmetic"
    density: float = 0.2   # ties: fraction kept by magnitude; dare: keep probability
    seed: int = 0          # dare

    @classmethod
    def from_recipe(cls, recipe) -> "MergeSpec":
        return cls(recipe.merge.method, recipe.merge.density, recipe.merge.seed)

    def describe(self) -> dict:
        m = get_method(self.method)
        d: dict = {"method": m.name, "method_url": m.url}
        if m.uses_density:
            d["density"] = self.density
        if m.uses_seed:
            d["seed"] = self.seed
        return d


def tensor_seed(seed: int, range_index: int, name: str) -> int:
    """The seed of range `range_index`'s random drop on tensor `name` (independent of order and of other ranges)."""
    digest = hashlib.sha256(f"{seed}/{range_index}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def sparsify(spec: MergeSpec, name: str, index: int, tau):
    """tau of range `index`, tensor `name`, after the method's sparsification (TIES trim, DARE drop; else as is)."""
    import torch

    method = get_method(spec.method)
    if method.sparsify is None:
        return tau
    gen = torch.Generator().manual_seed(tensor_seed(spec.seed, index, name)) if method.uses_seed else None
    return SPARSIFIERS[method.sparsify](tau, spec.density, gen)


def consensus(spec: MergeSpec, pairs: Iterable[tuple[Any, float]]):
    """The merged delta from (sparsified tau_i, w_i) pairs; None when none takes part."""
    return CONSENSUS[get_method(spec.method).consensus](pairs)


def combine(spec: MergeSpec, name: str, taus: Iterable[tuple[int, float, Any]]):
    """The merged delta of one tensor from (range index, weight, tau) triples; None when none takes part."""
    def sparsified():
        for index, w, tau in taus:
            tau = sparsify(spec, name, index, tau)
            yield tau, w
            del tau
    return consensus(spec, sparsified())


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


def resolve_weights(weights: Optional[list[float]], n: int, source: str = "--weights") -> list[float]:
    """The merge weights: the given ones (checked against N), else 1/N each."""
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise UsageError(f"{source} has {len(weights)} values but there are {n} ranges (ranges.n); give one weight "
                         f"per range, low t first")
    return [float(w) for w in weights]


# --- inputs ------------------------------------------------------------------------------------------------------

def unet_weight_files(unet_dir: Path) -> list[Path]:
    """The safetensors file(s) of a diffusers UNet folder (one file, or the shards of an index)."""
    single = unet_dir / UNET_WEIGHTS
    if single.is_file():
        return [single]
    index = unet_dir / (UNET_WEIGHTS + ".index.json")
    if index.is_file():
        return [unet_dir / f for f in sorted(set(read_json(index)["weight_map"].values()))]
    return []


@dataclass
class RangeModel:
    """One range model folder, opened lazily for tensor-by-tensor reads."""
    index: int
    folder: Path
    meta: dict
    unet_files: list[Path]
    projection_file: Optional[Path]
    unet: Optional[TensorFileReader] = None
    projection: Optional[TensorFileReader] = None

    def read(self, group: str, key: str):
        """A tensor of the model, or None for a projection the model does not have (its tau is 0)."""
        if group == "unet":
            return self.unet.get(key)
        if self.projection is None or key not in self.projection.tensors:
            return None
        return self.projection.get(key)

    def identity(self) -> dict:
        """What identifies this model's weights in merge.json (and in the skip fingerprint)."""
        files = self.unet_files + ([self.projection_file] if self.projection_file else [])
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
    base_unet_dir: Path                    # its folder (config.json is copied into merged/unet/)
    base_hash: str
    ranges: list[RangeModel]
    identity: Optional[dict]               # identity projection state, or None when no range has projections
    entries: list[tuple[str, str, str, tuple]] = field(default_factory=list)  # (group, key, dtype, shape) in order

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
                r.unet = stack.enter_context(TensorFileReader(r.unet_files))
                r.projection = stack.enter_context(TensorFileReader([r.projection_file])) \
                    if r.projection_file else None
            try:
                yield self
            finally:
                for r in self.ranges:
                    r.unet = r.projection = None


def _find_range_models(recipe, run: RunDir) -> list[RangeModel]:
    """The N range model folders, checked for presence and completeness (cheap: no tensors read)."""
    use_ema = recipe.merge.use_ema
    n = recipe.ranges.n
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
    out = []
    for i, folder in enumerate(folders):
        files = unet_weight_files(folder / "unet")
        if not files:
            raise UsageError(f"range model '{folder}' has no unet/{UNET_WEIGHTS}; run 'deme train RECIPE --range {i} "
                             f"--force' to write it again")
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
        proj = folder / PROJECTION_FILE
        out.append(RangeModel(i, folder, meta, files, proj if proj.is_file() else None))
    hashes = {r.meta["base_hash"] for r in out}
    if len(hashes) > 1:
        listing = ", ".join(f"range {r.index}: {r.meta['base_hash']}" for r in out)
        raise UsageError(f"the range models were finetuned from different base models ({listing}); retrain the odd "
                         f"ones from the same model.pretrained")
    return out


def load_inputs(recipe, run: RunDir) -> MergeInputs:
    """Find and check the range models, load theta, and plan the output tensors. Raises UsageError on bad input."""
    from .models import identity_projection_state, load_unet, resolve_pretrained, unet_folder, unet_hash

    ranges = _find_range_models(recipe, run)
    pipeline_dir = resolve_pretrained(recipe.model.pretrained, recipe.model.revision)
    base_unet = load_unet(pipeline_dir)
    base_unet.requires_grad_(False)
    base_hash = unet_hash(base_unet)
    if ranges[0].meta["base_hash"] != base_hash:
        raise UsageError(f"the range models were finetuned from a different base model (base_hash "
                         f"{ranges[0].meta['base_hash']}) than model.pretrained = '{recipe.model.pretrained}' "
                         f"(base_hash {base_hash}); point model.pretrained at their base or retrain them")
    inputs = MergeInputs(base_unet, unet_folder(pipeline_dir), base_hash, ranges, None)
    if any(r.projection_file for r in ranges):
        inputs.identity = identity_projection_state(base_unet)
    inputs.entries = _plan(inputs)
    return inputs


def _plan(inputs: MergeInputs) -> list[tuple[str, str, str, tuple]]:
    """(group, key, dtype, shape) of every output tensor, after checking that the range models fit theta."""
    base_sd = inputs.base_state
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

        def taus():
            for r, w in active:
                tau = r.read(group, key)
                if tau is not None:
                    tau = torch.sub(tau, theta)  # float32 - float64 -> float64, in one pass
                    yield r.index, w, tau
                    del tau  # keep one range's tensor in flight, not two
        delta = combine(spec, f"{group}.{key}", taus())
        out = (theta if delta is None else delta.add_(theta)).to(out_dtype)
        del delta, theta
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
    with the streamed float64 merge up to float32 rounding; the search's winner is written by the streaming path."""

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
                    t = r.read(group, key)
                    if t is not None:
                        tau = sparsify(spec, f"{group}.{key}", r.index, torch.sub(t, theta))
                        taus.append((r.index, tau.to(device, torch.float32)))
                self.entries.append((group, key, base.to(device, torch.float32), taus))

    @staticmethod
    def nbytes(inputs: MergeInputs) -> int:
        """Memory the cache takes: theta plus one task vector per range that has the tensor, float32."""
        n_proj = sum(1 for r in inputs.ranges if r.projection_file)
        return sum(4 * math.prod(shape) * (1 + (inputs.n if group == "unet" else n_proj))
                   for group, _, _, shape in inputs.entries)

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
    """Stream the merged model into `dest` (the layout of a range's final/), via a temporary folder and a rename."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", suffix=".tmp", dir=dest.parent))
    try:
        (tmp / "unet").mkdir()
        shutil.copyfile(inputs.base_unet_dir / "config.json", tmp / "unet" / "config.json")
        unet_entries = [(k, d, s) for g, k, d, s in inputs.entries if g == "unet"]
        proj_entries = [(k, d, s) for g, k, d, s in inputs.entries if g == "projection"]
        with contextlib.ExitStack() as stack:
            writers = {"unet": stack.enter_context(TensorFileWriter(tmp / "unet" / UNET_WEIGHTS, unet_entries))}
            if proj_entries:
                writers["projection"] = stack.enter_context(TensorFileWriter(tmp / PROJECTION_FILE, proj_entries))
            bar = stack.enter_context(ui.progress("merge", total=len(inputs.entries), unit="tensors", every=100))
            stack.enter_context(inputs.open())
            for group, key, t in merged_tensors(inputs, weights, spec):
                writers[group].write(key, t)
                bar.update()
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / MERGE_JSON).write_text(json.dumps(merge_json, indent=2, default=str) + "\n")
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


# --- the command -------------------------------------------------------------------------------------------------

def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _previous(run: RunDir) -> Optional[dict]:
    f = run.merged / MERGE_JSON
    if not (f.is_file() and (run.merged / "unet" / UNET_WEIGHTS).is_file() and (run.merged / META_FILE).is_file()):
        return None
    try:
        return read_json(f)
    except (OSError, ValueError):
        return None


def run_merge(recipe, run: RunDir, weights: Optional[list[float]] = None, search: bool = False,
              force: bool = False, processes: int = 1, gpus: str = "auto") -> dict:
    """Merge the range models of `run` into `run.merged`; with `search`, find the weights first (its candidates
    scored by `processes` processes on the slots of `gpus`). Returns merge.json plus "skipped" (True when merged/
    already held this merge) and "merged" (the folder)."""
    n = recipe.ranges.n
    spec = MergeSpec.from_recipe(recipe)
    get_method(spec.method)
    start = resolve_weights(weights if weights is not None else recipe.merge.weights, n,
                            "--weights" if weights is not None else "merge.weights")
    inputs = load_inputs(recipe, run)
    settings = {**spec.describe(), "use_ema": recipe.merge.use_ema, "base_hash": inputs.base_hash,
                "ranges": [r.identity() for r in inputs.ranges]}
    if search:
        from .merge_search import search_settings
        settings["search"] = search_settings(recipe, start)
    else:
        settings["weights"] = start
    fingerprint = _fingerprint(settings)
    prev = _previous(run)
    if prev is not None and prev.get("fingerprint") == fingerprint and not force:
        ui.info(f"{run.merged} already holds this merge (same settings, same range models); --force merges again")
        return {**prev, "skipped": True, "merged": str(run.merged)}

    t0 = time.time()
    log = None
    if search:
        from .merge_search import search_weights
        log = search_weights(recipe, run, inputs, spec, start, processes=processes, gpus=gpus)
        final = list(log["best"]["weights"])
    else:
        final = start
    method = get_method(spec.method)
    record = {**spec.describe(), "weights": final, "use_ema": recipe.merge.use_ema,
              "base": {"pretrained": recipe.model.pretrained, "base_hash": inputs.base_hash},
              "ranges": settings["ranges"], "projection": inputs.has_projections, "search": log,
              "recipe": recipe.name, "fingerprint": fingerprint, "summary": method.summary}
    meta = {"kind": "merged", "base_hash": inputs.base_hash, "recipe": recipe.name, **spec.describe(),
            "weights": final, "use_ema": recipe.merge.use_ema, "projection": inputs.has_projections,
            "ranges": [{"index": r.index, **({k: r.meta["range"][k] for k in ("lo", "hi")} if r.meta.get("range")
                                             else {})} for r in inputs.ranges]}
    write_merged_folder(inputs, final, spec, run.merged, meta, record)
    return {**record, "skipped": False, "merged": str(run.merged), "seconds": round(time.time() - t0, 3)}
