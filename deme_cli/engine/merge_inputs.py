"""The inputs of a merge (paper section 3.3): theta, the base's UNet, and the N range models, found, checked against
each other and opened for tensor-by-tensor reads (safetensors_stream), plus the plan of the output tensors.

theta is read one tensor at a time from the base's safetensors file(s) when they hold exactly the tensors diffusers
would load (checked against the UNet built from its config on the meta device: `streamable_theta`), so a merge holds a
few tensors, not a model; otherwise (a .bin base, other dtypes or key names) the base UNet is loaded whole. Its hash,
the identity the range models record, is computed either way as `train` computes it on the loaded UNet.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from .adapters import delta_shape, lora_modules
from .errors import UsageError
from .exports import refuse_stale
from .models import META_FILE
from .pipeline_folders import folder_files, note_old_layout, unet_weight_files
from .runs import RunDir
from .safetensors_stream import TensorFileReader, dtype_name, read_header


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
    """theta (streamed from its files, or in memory), the range models (on disk) and the plan of output tensors."""
    base: Any                              # base.Base: theta's pipeline (merged/ gets its scheduler and other parts)
    base_unet_dir: Path                    # its UNet folder
    unet_class: str                        # theta's UNet class and config (merged/unet/config.json), from the
    unet_config: dict                      # folder's config, so writing merged/ never loads theta
    base_hash: str
    ranges: list[RangeModel]
    identity: Optional[dict]               # identity projection state, or None when no range has projections
    theta_files: list[Path]                # theta's safetensors file(s) when streamed; [] = theta from base_unet
    theta_infos: dict                      # theta's tensors: key -> (safetensors dtype name, shape), in key order
    entries: list[tuple[str, str, str, tuple]] = field(default_factory=list)  # (group, key, dtype, shape) in order
    theta: Optional[TensorFileReader] = None  # theta's files while open(), when streamed

    @property
    def n(self) -> int:
        return len(self.ranges)

    @property
    def has_projections(self) -> bool:
        return self.identity is not None

    @property
    def base_folder(self) -> Path:
        return Path(self.base.folder)

    @functools.cached_property
    def base_unet(self):
        """The pretrained UNet (diffusers module, fp32), loaded on first use: a streamed merge never loads it; the
        weight search does, for its candidate models."""
        unet = self.base.load_unet()
        unet.requires_grad_(False)
        return unet

    @functools.cached_property
    def base_state(self) -> dict:
        return self.base_unet.state_dict()

    def base_tensor(self, group: str, key: str):
        """theta's tensor `key` (read from its file while open(), when streamed)."""
        if group != "unet":
            return self.identity[key]
        return self.theta.get(key) if self.theta is not None else self.base_state[key]

    @contextlib.contextmanager
    def open(self) -> Iterator["MergeInputs"]:
        """Open theta's and every range model's files for reading (plain file handles, nothing memory-mapped)."""
        with contextlib.ExitStack() as stack:
            if self.theta_files:
                self.theta = stack.enter_context(TensorFileReader(self.theta_files))
            for r in self.ranges:
                r.unet = stack.enter_context(TensorFileReader([r.lora_file] if r.is_lora else r.unet_files))
                r.projection = stack.enter_context(TensorFileReader([r.projection_file])) \
                    if r.projection_file else None
            try:
                yield self
            finally:
                self.theta = None
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
    """Find and check the n range models of the run (final/, or final-raw/ without `use_ema`), check theta (the
    base's UNet) by its hash, and plan the output tensors. Raises UsageError on bad input."""
    from .models import empty_unet, identity_projection_state, state_hash, unet_folder

    ranges = _find_range_models(run, n, use_ema)
    unet_dir = unet_folder(base.folder)
    skeleton = empty_unet(unet_dir)               # theta's architecture, no weights
    files = streamable_theta(unet_dir, skeleton)
    inputs = MergeInputs(base, unet_dir, type(skeleton).__name__, dict(skeleton.config), "", ranges, None, files, {})
    if files:
        with TensorFileReader(files) as theta:    # the hash `train` computes on the loaded UNet, a tensor at a time
            inputs.base_hash = state_hash(_Tensors(theta))
            inputs.theta_infos = {k: (theta.info(k).dtype, theta.info(k).shape) for k in theta.keys()}
        release_free_memory()
    else:
        inputs.base_hash = state_hash(inputs.base_state)
        inputs.theta_infos = {k: (dtype_name(v.dtype), tuple(v.shape)) for k, v in sorted(inputs.base_state.items())}
    if ranges[0].meta["base_hash"] != inputs.base_hash:
        raise UsageError(f"the range models were finetuned from a different base model (base_hash "
                         f"{ranges[0].meta['base_hash']}) than model.pretrained = '{base.pretrained}' "
                         f"(base_hash {inputs.base_hash}); point model.pretrained at their base or retrain them")
    if any(r.projection_file for r in ranges):
        inputs.identity = identity_projection_state(skeleton, device="cpu")
    inputs.entries = _plan(inputs)
    return inputs


def streamable_theta(unet_dir: Path, skeleton) -> list[Path]:
    """The UNet folder's safetensors file(s) if they hold exactly the tensors (names, dtypes, shapes) that loading
    the UNet gives `skeleton` (the UNet built from its config on the meta device): diffusers then loads their bytes
    unchanged, and theta can be read tensor by tensor. [] otherwise (a .bin file, fp16 weights, renamed keys)."""
    files = unet_weight_files(unet_dir)
    if not files:
        return []
    infos: dict = {}
    for f in files:
        infos.update(read_header(f)[0])
    want = {k: (dtype_name(v.dtype), tuple(v.shape)) for k, v in skeleton.state_dict().items()}
    return files if want == {k: (i.dtype, i.shape) for k, i in infos.items()} else []


class _Tensors(Mapping):
    """A TensorFileReader as a read-only mapping of tensors (each read when asked for), for models.state_hash."""

    def __init__(self, reader: TensorFileReader):
        self.reader = reader

    def __getitem__(self, key: str):
        return self.reader.get(key)

    def __iter__(self):
        return iter(self.reader.keys())

    def __len__(self) -> int:
        return len(self.reader.tensors)


def _plan(inputs: MergeInputs) -> list[tuple[str, str, str, tuple]]:
    """(group, key, dtype, shape) of every output tensor, after checking that the range models fit theta."""
    _check_adapters(inputs)
    groups = [("unet", inputs.theta_infos, lambda r: r.unet_files)]
    if inputs.identity is not None:
        groups.append(("projection", {k: (dtype_name(v.dtype), tuple(v.shape)) for k, v in inputs.identity.items()},
                       lambda r: [r.projection_file] if r.projection_file else []))
    entries = []
    for group, theta_infos, files_of in groups:
        shapes = {k: shape for k, (_, shape) in theta_infos.items()}
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
            entries.append((group, k, dtypes.get(k, theta_infos[k][0]), shapes[k]))
    return entries


def _check_adapters(inputs: MergeInputs) -> None:
    """Every LoRA range's adapted layers exist in theta, with the shape of B @ A."""
    for r in inputs.ranges:
        if not r.is_lora:
            continue
        infos = read_header(r.lora_file)[0]
        for key, (ka, kb) in r.lora_pairs.items():
            want = delta_shape(infos[ka].shape, infos[kb].shape)
            if key not in inputs.theta_infos or inputs.theta_infos[key][1] != want:
                raise UsageError(f"range model {r.index} ('{r.folder}') adapts layer '{key[:-len('.weight')]}', which "
                                 f"model.pretrained does not have in that shape; retrain it from this base")



@functools.lru_cache(maxsize=None)
def _malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim). A merged tensor frees a few float64
    tensors of its size; glibc keeps such blocks (up to 32 MB) in the heap for reuse, and over hundreds of tensors of
    varying sizes the heap fragments into free memory that still counts in the process's resident set."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
