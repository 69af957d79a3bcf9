"""Model folders as diffusers pipeline folders (DESIGN.md section 3): what `ranges/<i>/final/`, `final-raw/` and
`merged/` hold, how their parts are written, and where deme finds their weights, in today's layout or the older one.

A model folder:
    model_index.json    the base pipeline's, with "unet" naming this folder's UNet and no safety checker
    scheduler/          the base pipeline's scheduler config (a copy)
    vae/, text_encoder/, tokenizer/, ...   Stable Diffusion: the base's other components as hard links to the base's
                        files (no disk of their own on the base's file system; copies on another one)
    unet/               a stock diffusers UNet folder when the model is one full UNet without projections; otherwise a
                        DemeUNet folder (deme_unet.py: projections, LoRA adapters on `unet/base/` (hard links to the
                        base UNet's files), or N range models routed by t), which diffusers loads with
                        trust_remote_code=True
    pytorch_lora_weights.safetensors   Stable Diffusion LoRA range models: the adapter in diffusers' own LoRA format
    deme.json, README.md (the model card); merged/: merge.json

Hard links share bytes with the base: deme never rewrites a file in place (it writes new files and renames), but a
base pipeline overwritten in place by another program would change them too (deme checks a LoRA range model's base
hash when it loads it).

The older layout (deme before pipeline folders): unet/ (stock) + projection.safetensors at the top, or lora/ (peft's
adapter_model.safetensors) + projection.safetensors; no model_index.json. deme reads it still; exports.upgrade
rewrites such a folder in place (`deme train` does for finished ranges, `deme merge` for merged/).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import ui
from .errors import UsageError
from .runs import read_json

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"   # a stock diffusers UNet's weights
OLD_PROJECTION = "projection.safetensors"             # the older layout: projections next to unet/
OLD_LORA = Path("lora") / "adapter_model.safetensors"  # the older layout: peft's adapter
SD_LORA_FILE = "pytorch_lora_weights.safetensors"      # diffusers' LoRA file (load_lora_weights)
DEME_UNET = ["deme_unet", "DemeUNet"]                  # model_index.json's entry of a DemeUNet
NOT_SHIPPED = ("safety_checker",)                      # deme's pipelines run without a safety checker


# --- where a folder keeps its weights ------------------------------------------------------------------------------

@dataclass
class FolderFiles:
    """The weight files of a model folder. One model: `unet` (a full UNet's files, stock key names) or `lora` (an
    adapter on the base), and `projection`; a routed folder: `models`, one FolderFiles per range model."""
    folder: Path
    layout: str                                  # "pipeline" | "old"
    unet_class: str
    unet_config: dict                            # the stock UNet config
    unet: list[Path] = field(default_factory=list)
    lora: Optional[Path] = None
    projection: Optional[Path] = None
    ranges: Optional[list] = None                # routed: [[lo, hi], ...]
    models: list["FolderFiles"] = field(default_factory=list)

    @property
    def routed(self) -> bool:
        return self.ranges is not None


def unet_weight_files(unet_dir: Path) -> list[Path]:
    """The safetensors file(s) of a stock diffusers UNet folder (one file, or the shards of an index)."""
    single = unet_dir / UNET_WEIGHTS
    if single.is_file():
        return [single]
    index = unet_dir / (UNET_WEIGHTS + ".index.json")
    if index.is_file():
        return [unet_dir / f for f in sorted(set(read_json(index)["weight_map"].values()))]
    return []


def _opt(p: Path) -> Optional[Path]:
    return p if p.is_file() else None


def folder_files(folder: Path) -> FolderFiles:
    """Where the model folder `folder` keeps its weights (UsageError when it holds none)."""
    from .deme_unet import LORA_FILE, PROJECTION_FILE, UNET_FILE, model_dir

    folder = Path(folder)
    cfg_file = folder / "unet" / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else None
    layout = "pipeline" if (folder / "model_index.json").is_file() else "old"
    if cfg is not None and cfg.get("_class_name") == "DemeUNet":
        stock = {k: v for k, v in cfg.items() if k not in ("unet_class", "deme") and not k.startswith("_")}
        deme = cfg.get("deme") or {}
        ranges = deme.get("ranges")
        parts = []
        for i in range(len(ranges) if ranges else 1):
            d = folder / "unet" / model_dir(i)
            parts.append(FolderFiles(folder, layout, cfg["unet_class"], stock, [d / UNET_FILE] if not deme.get("lora")
                                     else [], d / LORA_FILE if deme.get("lora") else None,
                                     _opt(d / PROJECTION_FILE)))
        if ranges:
            return FolderFiles(folder, layout, cfg["unet_class"], stock, ranges=ranges, models=parts)
        return parts[0]
    if cfg is not None and unet_weight_files(folder / "unet"):
        stock = {k: v for k, v in cfg.items() if not k.startswith("_")}
        return FolderFiles(folder, layout, cfg["_class_name"], stock, unet_weight_files(folder / "unet"),
                           projection=_opt(folder / OLD_PROJECTION))
    if (folder / OLD_LORA).is_file():
        return FolderFiles(folder, "old", "", {}, lora=folder / OLD_LORA, projection=_opt(folder / OLD_PROJECTION))
    raise UsageError(f"'{folder}' holds no model weights (no unet/ with weights); train or merge it again")


def is_model_folder(folder: Path) -> bool:
    """Whether `folder` holds a model's weights (in either layout)."""
    try:
        folder_files(folder)
        return True
    except (UsageError, OSError, ValueError, KeyError):
        return False


_NOTED: set = set()


def note_old_layout(folder: Path, how: str) -> None:
    """Say once per folder and process that `folder` is in the older layout, and `how` to rewrite it."""
    if (Path(folder) / "model_index.json").is_file() or str(folder) in _NOTED:
        return
    _NOTED.add(str(folder))
    ui.info(f"'{folder}' is in deme's older folder layout (not a diffusers pipeline folder); deme still reads it, "
            f"and {how} rewrites it as one")


# --- writing ---------------------------------------------------------------------------------------------------------

def link_or_copy(src: Path, dest: Path) -> None:
    """A hard link to `src` at `dest` (the bytes shared), or a copy where the file system cannot link."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(Path(src).resolve(), dest)
    except OSError:
        shutil.copyfile(src, dest)


def link_tree(src: Path, dest: Path) -> None:
    for p in sorted(Path(src).rglob("*")):
        if p.is_file():
            link_or_copy(p, dest / p.relative_to(src))


def _unet_class_entry(unet_dir: Path) -> list:
    cfg = json.loads((unet_dir / "config.json").read_text())
    return DEME_UNET if cfg.get("_class_name") == "DemeUNet" else ["diffusers", cfg["_class_name"]]


def write_pipeline_parts(folder: Path, base_folder: Path) -> None:
    """model_index.json, scheduler/ and the base's other components (hard links) around `folder`/unet/ (written
    first): a pipeline folder that DiffusionPipeline.from_pretrained loads."""
    base_folder = Path(base_folder)
    index = json.loads((base_folder / "model_index.json").read_text())
    for name, value in list(index.items()):
        if name.startswith("_") or not isinstance(value, list) or name == "unet":
            continue
        if name in NOT_SHIPPED or value[0] is None or not (base_folder / name).is_dir():
            index[name] = [None, None]
        elif name == "scheduler":
            shutil.copytree(base_folder / name, folder / name)
        else:
            link_tree(base_folder / name, folder / name)
    if "requires_safety_checker" in index:
        index["requires_safety_checker"] = False
    index["unet"] = _unet_class_entry(folder / "unet")
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_tensors(tensors: dict, path: Path) -> None:
    """A safetensors file holding exactly `tensors` (on the CPU, contiguous)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})


def write_deme_config(unet_dir: Path, unet_class: str, unet_config: dict, ranges=None, projection: bool = False,
                      lora: Optional[dict] = None) -> None:
    """unet/config.json of a DemeUNet folder, as DemeUNet.save_pretrained writes it, and its code (deme_unet.py)."""
    import diffusers

    from .deme_unet import CLASS_NAME, deme_config, ship_module

    unet_dir.mkdir(parents=True, exist_ok=True)
    stock = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
    cfg = {"_class_name": CLASS_NAME, "_diffusers_version": diffusers.__version__, "unet_class": unet_class,
           "deme": deme_config(ranges, projection, lora), **stock}
    (unet_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    ship_module(unet_dir)


def unet_paths(folder: Path, projection: bool) -> tuple[Path, Optional[Path]]:
    """(UNet weights file, projection file or None) of a one-model full folder: the stock file without projections,
    model-0/ of a DemeUNet with them."""
    from .deme_unet import PROJECTION_FILE, UNET_FILE, model_dir

    if not projection:
        return folder / "unet" / UNET_WEIGHTS, None
    d = folder / "unet" / model_dir(0)
    return d / UNET_FILE, d / PROJECTION_FILE


def finish_unet(folder: Path, unet_class: str, unet_config: dict, projection: bool) -> None:
    """unet/config.json (and deme_unet.py with projections) of a one-model full folder whose weights are written."""
    if projection:
        write_deme_config(folder / "unet", unet_class, unet_config, projection=True)
    else:
        stock = {k: v for k, v in unet_config.items() if not k.startswith("_")}
        (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": unet_class, **stock}, indent=2,
                                                                sort_keys=True) + "\n")


def write_full_unet(folder: Path, unet_class: str, unet_config: dict, unet_sd: dict, proj_sd: dict) -> None:
    """unet/ of a one-model full folder holding exactly `unet_sd` (stock names) and the projections `proj_sd`."""
    unet_file, proj_file = unet_paths(folder, bool(proj_sd))
    save_tensors(unet_sd, unet_file)
    if proj_sd:
        save_tensors(proj_sd, proj_file)
    finish_unet(folder, unet_class, unet_config, bool(proj_sd))


def lora_config(pairs_shapes: dict, scales: list[float], ranks: list[int]) -> dict:
    """The "lora" entry of a DemeUNet config: the adapted layers (sorted, as deme_unet.lora_pairs orders them)."""
    return {"layers": sorted(pairs_shapes), "ranks": [int(r) for r in ranks], "scales": [float(s) for s in scales]}


def write_lora_unet(folder: Path, base_unet_dir: Path, unet_class: str, unet_config: dict, lora_sd: dict,
                    scale: float, proj_sd: dict) -> None:
    """unet/ of a LoRA range model: base/ (hard links to the base UNet's files), model-0/lora.safetensors holding
    `lora_sd` (<layer>.lora_A.weight, <layer>.lora_B.weight) and the projections `proj_sd`."""
    from .deme_unet import BASE_DIR, LORA_FILE, PROJECTION_FILE, lora_pairs, model_dir

    unet_dir = folder / "unet"
    pairs = lora_pairs(lora_sd)
    save_tensors(lora_sd, unet_dir / model_dir(0) / LORA_FILE)
    if proj_sd:
        save_tensors(proj_sd, unet_dir / model_dir(0) / PROJECTION_FILE)
    link_tree(base_unet_dir, unet_dir / BASE_DIR)
    rank = int(next(iter(pairs.values()))[0].shape[0])
    write_deme_config(unet_dir, unet_class, unet_config, projection=bool(proj_sd),
                      lora=lora_config(pairs, [scale], [rank]))


def write_sd_lora(folder: Path, lora_sd: dict, adapter: dict) -> None:
    """pytorch_lora_weights.safetensors: a Stable Diffusion range model's adapter in diffusers' own LoRA format
    (`pipe.load_lora_weights(folder)`), rank, alpha and targets in its metadata."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        str(folder), unet_lora_layers={k: v.detach().to("cpu").contiguous() for k, v in lora_sd.items()},
        unet_lora_adapter_metadata={"r": int(adapter["rank"]), "lora_alpha": float(adapter["alpha"]),
                                    "target_modules": list(adapter["target_modules"])})


# --- keys ------------------------------------------------------------------------------------------------------

def clean_lora_key(key: str) -> str:
    """'base_model.model.x.lora_A.weight' or 'x.lora_A.default.weight' -> 'x.lora_A.weight'."""
    from .deme_unet import PEFT_PREFIX

    key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    return key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


