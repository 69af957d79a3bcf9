"""Model folders of older deme versions: range models exported before the EMA fix (re-exported from their last
checkpoint), and folders of the layout before pipeline folders (rewritten in place by `upgrade`, pipeline_folders.py).

deme 0.1.0 wrote `ranges/<i>/final/` with `unet.save_pretrained(..., state_dict=ema)`; diffusers has no such
parameter, ignored it, and saved the live (raw) UNet. So such a final/ paired the raw UNet with the EMA projections.
Folders written since carry `"export_format": 2` in deme.json (models.EXPORT_FORMAT). An older final/ that says it
holds EMA weights is stale: `deme train` re-exports it from the last checkpoint (no training), and `deme merge` and
`deme sample` refuse it with the command that repairs it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from . import checkpoints
from .errors import UsageError
from .models import EXPORT_FORMAT, META_FILE, split_state, swap_in
from .runs import RunDir


def is_stale(final: Path) -> bool:
    """True when `final` (a range's final/ folder) claims EMA weights but was written before EXPORT_FORMAT 2."""
    f = Path(final) / META_FILE
    if not f.is_file():
        return False
    try:
        meta = json.loads(f.read_text())
    except ValueError:
        return False              # unreadable deme.json: the loaders say what is wrong with it
    return meta.get("weights") == "ema" and int(meta.get("export_format", 1)) < EXPORT_FORMAT


def _checkpoint_for(run: RunDir, i: int, steps: Optional[int]) -> Optional[Path]:
    """The latest checkpoint of range i when it is at `steps` and holds the EMA, else None."""
    try:
        ck = checkpoints.latest(run.checkpoints(i))
    except UsageError:
        return None
    if ck is None or not (ck / "ema.safetensors").is_file():
        return None
    step = json.loads((ck / "state.json").read_text()).get("step")
    return ck if steps is None or step == steps else None


def repair_hint(run: RunDir, i: int) -> str:
    """The command that repairs a stale final/ of range i."""
    meta = json.loads((run.final(i) / META_FILE).read_text())
    if _checkpoint_for(run, i, meta.get("steps")) is not None:
        return f"run 'deme train RECIPE --range {i}' to re-export it from its last checkpoint (no training)"
    return f"its last checkpoint is gone, so retrain it with 'deme train RECIPE --range {i} --force'"


def refuse_stale(run: RunDir, indices) -> None:
    """UsageError naming the first range among `indices` whose final/ is stale (merge and sample call this)."""
    for i in indices:
        if is_stale(run.final(i)):
            raise UsageError(f"range {i}'s final/ ('{run.final(i)}') holds the raw UNet weights, not the EMA ones it "
                             f"claims (written before deme fixed the EMA export); {repair_hint(run, i)}")


def reexport(run: RunDir, i: int, base_folder: Path) -> Path:
    """Rewrite range i's final/ (EMA) and final-raw/ from its last checkpoint as pipeline folders (the other parts from
    `base_folder`, the pretrained pipeline), keeping their UNet config and metadata.

    Returns the checkpoint used. Raises UsageError when there is no checkpoint at the final step."""
    from safetensors.torch import load_file

    from .pipeline_folders import folder_files, write_full_unet, write_pipeline_parts

    final = run.final(i)
    meta = json.loads((final / META_FILE).read_text())
    ck = _checkpoint_for(run, i, meta.get("steps"))
    if ck is None:
        raise UsageError(f"range {i}'s final/ ('{final}') holds the raw UNet weights, not the EMA ones it claims "
                         f"(written before deme fixed the EMA export), and no checkpoint at step {meta.get('steps')} "
                         f"is left to re-export it from; retrain it with 'deme train RECIPE --range {i} --force'")
    for name, folder, weights in (("ema.safetensors", final, "ema"),
                                  ("student.safetensors", run.final(i, ema=False), "raw")):
        state = load_file(str(ck / name))
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        files = folder_files(final)
        write_full_unet(tmp, files.unet_class, files.unet_config, *split_state(state))
        write_pipeline_parts(tmp, base_folder)
        old_meta = json.loads((folder / META_FILE).read_text()) if (folder / META_FILE).is_file() else meta
        (tmp / META_FILE).write_text(json.dumps({**old_meta, "weights": weights, "export_format": EXPORT_FORMAT,
                                                 "reexported_from": f"checkpoints/{ck.name}"}, indent=2) + "\n")
        swap_in(tmp, folder)
    return ck


def upgrade(folder: Path, base_folder: Path) -> bool:
    """Rewrite a one-model folder of the older layout as a pipeline folder, in place (via folder.tmp and a rename),
    keeping its weights, deme.json and README.md. False when it already is one."""
    from safetensors.torch import load_file

    from . import pipeline_folders as pf
    from .models import unet_folder

    folder = Path(folder)
    f = pf.folder_files(folder)
    if f.layout != "old":
        return False
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    proj = load_file(str(f.projection)) if f.projection else {}
    if f.lora is not None:
        meta = json.loads((folder / META_FILE).read_text())
        base_unet = unet_folder(base_folder)
        cfg = json.loads((base_unet / "config.json").read_text())
        lora = {pf.clean_lora_key(k): v for k, v in load_file(str(f.lora)).items()}
        pf.write_lora_unet(tmp, base_unet, cfg["_class_name"], cfg, lora, float(meta["adapter"]["scale"]), proj)
        if cfg["_class_name"] == "UNet2DConditionModel":
            pf.write_sd_lora(tmp, lora, meta["adapter"])
    else:
        state = {}
        for p in f.unet:
            state.update(load_file(str(p)))
        pf.write_full_unet(tmp, f.unet_class, f.unet_config, state, proj)
    pf.write_pipeline_parts(tmp, base_folder)
    for name in os.listdir(folder):
        src = folder / name
        if src.is_file() and name != pf.OLD_PROJECTION and not (tmp / name).exists():
            shutil.copy2(src, tmp / name)          # deme.json, README.md, grid.png, merge.json, ...
    swap_in(tmp, folder)
    return True
