"""The timestep-wise ensemble (paper Eq. 7) as one model: every denoising call goes to the range model that owns t.

Both the in-memory ensemble and `deme merge --method routed` are a DemeUNet (deme_unet.py, the code that ships in
model folders): full range models as N UNets, LoRA range models as the base UNet once plus N adapters (switched by
timestep, exactly), each with its channel-wise projections.
- `ensemble_unet` builds it from the range folders: what `deme sample --model ensemble`, the loss by timestep and
  `load_pipeline(..., "ensemble")` use.
- `write_routed_folder` writes merged/ as a pipeline folder whose unet/ is that DemeUNet; its weight files are hard
  links to the range folders' files (pipeline_folders.link_or_copy: no disk of their own on one file system).
So `deme sample --model merged` of a routed merge and `deme sample --model ensemble` compute the same function with the
same code and weights.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from .errors import UsageError


def check_weights(merge) -> None:
    """merge.method = "routed" keeps every range model: a weight search is refused (UsageError), before any work."""
    from .merge_methods import get_method

    if get_method(merge.method).routed and merge.weights == "search":
        raise UsageError("merge.method = \"routed\" keeps every range model and routes each step by t, so it has no "
                         "weights to search; set merge.weights = \"uniform\" or pick a merge method that combines "
                         "task vectors")


def _ranges(owned: Sequence[Any]) -> list[list[int]]:
    return [[int(r.lo), int(r.hi)] for r in owned]


def ensemble_unet(base, folders: Sequence[Path], owned: Sequence[Any], device) -> tuple[Any, list[str]]:
    """(DemeUNet routing to the range models in `folders` (range owned[i]'s first), each member's weight hash) on
    `device`. A member's hash is the state hash of the model it is (base + deltas for LoRA), as a single range model
    folder's is."""
    from .adapters import base_for, is_lora_folder, load_model, read_adapter, read_projections
    from .deme_unet import DemeUNet
    from .models import read_meta, state_hash, unet_hash

    if folders and all(is_lora_folder(f) for f in folders):
        unet = base_for(folders[0], base.folder)            # the base, checked against member 0's base hash
        h = unet_hash(unet)
        for f in folders[1:]:
            if read_meta(f).get("base_hash") not in (None, h):
                raise UsageError(f"the LoRA range model '{f}' was trained from another base model than "
                                 f"'{base.folder}'; point model.pretrained at its base or retrain it")
        adapters, scales, projections = [], [], []
        for f in folders:
            adapter, tensors = read_adapter(f)
            adapters.append(tensors)
            scales.append(float(adapter["scale"]))
            projections.append(read_projections(f, unet))
        model = DemeUNet.from_lora(unet, adapters, scales, projections, _ranges(owned)).to(device)
        return model, [lora_member_hash(model, i) for i in range(len(folders))]
    members = [load_model(f, base.folder).eval() for f in folders]
    hashes = [state_hash(m.state_dict()) for m in members]
    model = DemeUNet.from_models([m.unet for m in members], [m.projections for m in members], _ranges(owned))
    return model.to(device), hashes


def lora_member_hash(model, i: int) -> str:
    """The state hash of LoRA range model i of a routed DemeUNet: its UNet weights (the base with its deltas, as the
    model holds them while switched to i) and projections, keyed like a DemeModel's state (unet.*, projections.*)."""
    from .models import state_hash

    model.activate(i)
    state = {f"unet.{k}": v for k, v in model.unet.state_dict().items()}
    if model.projections is not None:
        state.update({f"projections.{k}": v for k, v in model.projections[i].state_dict().items()})
    h = state_hash(state)
    model.activate(None)
    return h


def write_routed_folder(inputs, owned: Sequence[Any], dest: Path, meta: dict, merge_json: dict) -> None:
    """Write `dest` (merged/) atomically as the routed pipeline folder of the range models of `inputs`
    (merge_inputs.MergeInputs: their files, the base UNet's class and config, the identity projections) for the ranges `owned`."""
    from safetensors.torch import load_file

    from . import pipeline_folders as pf
    from .deme_unet import BASE_DIR, LORA_FILE, PROJECTION_FILE, UNET_FILE, lora_keys, model_dir
    from .models import META_FILE, swap_in
    from .safetensors_stream import read_header

    for r, rng in zip(inputs.ranges, owned):
        trained = r.meta.get("range")
        if trained and (int(trained["lo"]), int(trained["hi"])) != (rng.lo, rng.hi):
            raise UsageError(f"the model in '{r.folder}' was trained for [{trained['lo']}, {trained['hi']}) but "
                             f"ranges.json says range {rng.index} is [{rng.lo}, {rng.hi}); retrain it with --force")
    kinds = {r.is_lora for r in inputs.ranges}
    if len(kinds) > 1:
        raise UsageError("the range models mix LoRA adapters and full UNets; a routed model holds one kind: retrain "
                         "the odd ones with the recipe's deme.adapter")
    lora = kinds == {True}
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unet_dir = tmp / "unet"
    try:
        for r in inputs.ranges:
            d = unet_dir / model_dir(r.index)
            if lora:
                pf.link_or_copy(r.lora_file, d / LORA_FILE)
            elif len(r.unet_files) == 1:
                pf.link_or_copy(r.unet_files[0], d / UNET_FILE)
            else:                                          # a sharded UNet: one file per range model
                state = {}
                for f in r.unet_files:
                    state.update(load_file(str(f)))
                pf.save_tensors(state, d / UNET_FILE)
            if inputs.has_projections:                     # a range model without projections: the identity
                if r.projection_file is not None:
                    pf.link_or_copy(r.projection_file, d / PROJECTION_FILE)
                else:
                    pf.save_tensors(inputs.identity, d / PROJECTION_FILE)
        lora_cfg = None
        if lora:
            keys = [lora_keys(list(read_header(r.lora_file)[0])) for r in inputs.ranges]
            heads = [read_header(r.lora_file)[0] for r in inputs.ranges]
            if any(list(k) != list(keys[0]) for k in keys):
                raise UsageError("the LoRA range models adapt different layers (deme.lora_targets changed between "
                                 "ranges); retrain them with one recipe")
            ranks = [h[next(iter(k.values()))[0]].shape[0] for h, k in zip(heads, keys)]
            lora_cfg = pf.lora_config(keys[0], [float(r.meta["adapter"]["scale"]) for r in inputs.ranges], ranks)
            pf.link_tree(inputs.base_unet_dir, unet_dir / BASE_DIR)
        pf.write_deme_config(unet_dir, inputs.unet_class, inputs.unet_config, _ranges(owned),
                             inputs.has_projections, lora_cfg)
        pf.write_pipeline_parts(tmp, inputs.base_folder)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (tmp / "merge.json").write_text(json.dumps(merge_json, indent=2, default=str) + "\n")
        swap_in(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
