"""Model cards: README.md in Hugging Face's model-card format in merged/ and in each range's final/ and final-raw/.

A card is built with huggingface_hub (`ModelCardData` with one `EvalResult` per metric, so the Hub and
`ModelCard.load` read it: library_name, pipeline_tag, tags, `base_model` when the base came from the Hub (a local base
is named in the text instead), `license` when the base's own card says it, and, once the model is evaluated, its
FID / KID / CLIP score / loss ratio in a `model-index`) and a Markdown body: what the model is (a merged model, a
routed ensemble and what it costs, or a range model), the ranges, the merge or the range's training settings, the
evaluation, the sample grid (copied into the folder as grid.png, so a folder uploaded alone shows it) and how to load
it.

Cards are written by `deme train` (each export), `deme merge`, and refreshed by `deme sample` and `deme eval` for the
model folders they used. What a card says comes from the run directory: deme.json, merge.json, ranges.json,
samples/<model>/samples.json and eval/<model>.json. The grid counts for a folder only when samples.json names that
folder and is newer than its deme.json (a folder is rewritten whole when it is retrained or merged again); eval numbers
only through freshness.current, the check the report uses too: what is stale is left out. A card never breaks a
command: `update` turns a failure into one warning.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from . import ui
from .images import GRID_FILE, SAMPLES_JSON
from .models import META_FILE
from .runs import RunDir, model_dirname, write_atomic

CARD_FILE = "README.md"
PAPER_URL = "https://arxiv.org/abs/2410.06664"      # Ma et al., "Decouple-Then-Merge", CVPR 2025
REPO_TAGS = ["diffusers", "deme", "decouple-then-merge"]
HUB_TASKS = {                                       # model kind -> (pipeline_tag, task name, what the model is)
    "unconditional": ("unconditional-image-generation", "Unconditional Image Generation",
                      "An unconditional image diffusion model"),
    "text-to-image": ("text-to-image", "Text-to-Image", "A text-to-image diffusion model"),
}
METRICS = (("fid", "FID"), ("kid", "KID"), ("kid_std", "KID std over subsets"), ("clip_score", "CLIP score"),
           ("loss_ratio", "held-out loss / base"))   # eval/<model>.json metrics key, name


# --- what the run directory says ---------------------------------------------------------------------------------

def _json(path: Path) -> Optional[Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def hub_id(base) -> Optional[str]:
    """The Hub repo id the base came from: model.pretrained when it is one (not a local folder), or the repo of a
    Hub cache snapshot folder (.../models--ORG--NAME/snapshots/REV); None for a local base."""
    p = Path(base.pretrained).expanduser()
    if not p.exists():
        return base.pretrained
    parts = p.resolve().parts
    for k, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[k + 1] == "snapshots":
            return part[len("models--"):].replace("--", "/", 1)
    return None


def base_model_id(base) -> str:
    """How the card's text names the base: its Hub id, else its local folder (absolute)."""
    return hub_id(base) or str(Path(base.pretrained).expanduser().resolve())


def base_license(base) -> Optional[str]:
    """The base's license as its own model card says it: README.md in its pipeline folder or, for a Hub base, in the
    local Hub cache (nothing is fetched); None when unknown."""
    from huggingface_hub import ModelCard

    cards = [Path(base.folder) / CARD_FILE]
    repo = hub_id(base)
    if repo is not None:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(repo, CARD_FILE, revision=getattr(base, "revision", None))
            if isinstance(cached, str):
                cards.append(Path(cached))
        except Exception:  # noqa: BLE001 - an unusual cache layout: the license is just unknown
            pass
    for card in cards:
        if card.is_file():
            try:
                if not card.read_text(errors="replace").lstrip().startswith("---"):
                    continue        # no metadata block, so no license (and no huggingface_hub warning saying so)
                lic = ModelCard.load(card).data.license
            except Exception:  # noqa: BLE001 - a base card we cannot parse says nothing we can use
                continue
            if lic:
                return lic
    return None


def _same(a, b) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, TypeError, ValueError):
        return False


def fresh_samples(folder: Path, run: RunDir, spec: str) -> Optional[dict]:
    """samples.json of `spec` when its images were made from this folder's weights (see the module docstring)."""
    f = run.samples(spec) / SAMPLES_JSON
    rec = _json(f)
    if not isinstance(rec, dict) or not _same((rec.get("model_info") or {}).get("folder"), folder):
        return None
    if f.stat().st_mtime_ns < (folder / META_FILE).stat().st_mtime_ns:
        return None
    return rec


def fresh_eval(run: RunDir, spec: str, folder: Path) -> Optional[dict]:
    """eval/<spec>.json with only its current numbers (freshness.current, as the report shows them) that were scored
    on this folder (range I's eval scores final/ or final-raw/, as merge.use_ema says), when any of METRICS is left."""
    from .freshness import SAMPLE_PART, read_current, recorded_folders

    rec, _ = read_current(run, spec)
    if rec is None:
        return None
    on, here = recorded_folders(rec, run), Path(folder).resolve()
    metrics = {k: v for k, v in rec["metrics"].items() if here in on["samples" if k in SAMPLE_PART else "loss"]}
    rec = {**rec, "metrics": metrics}
    return rec if any(metrics.get(k) is not None for k, _ in METRICS) else None


def _ranges(run: RunDir, meta: dict) -> list[dict]:
    """[{index, lo, hi, steps}] of the run (ranges.json; else what the folder records), steps from each range's
    final/deme.json when there."""
    rs = (_json(run.ranges_json) or {}).get("ranges") or meta.get("ranges") or \
        ([meta["range"]] if meta.get("range") else [])
    out = []
    for r in rs:
        m = _json(run.final(int(r["index"])) / META_FILE) or {}
        out.append({"index": int(r["index"]), "lo": r.get("lo"), "hi": r.get("hi"), "steps": m.get("steps")})
    return out


# --- the card ----------------------------------------------------------------------------------------------------

def _dataset(ev: dict) -> tuple[str, str]:
    """(type, name) of what an eval compared with: a Hub dataset id as-is; a local folder or file by its name (its
    path is in the card's text)."""
    ref = (ev.get("reference") or {}).get("path") or (ev.get("loss_by_t") or {}).get("images") \
        or (ev.get("sampler") or {}).get("prompt_source") or "samples"
    p = Path(str(ref)).expanduser()
    if p.exists() or str(ref).startswith(("/", ".", "~")):
        return "imagefolder" if p.is_dir() else "local", p.name or str(ref)
    return str(ref), str(ref)


def eval_results(kind: str, ev: dict) -> list:
    """One huggingface_hub EvalResult per metric of an evaluation (eval/<model>.json), values as they are there."""
    from huggingface_hub import EvalResult

    task_type, task_name, _ = HUB_TASKS.get(kind, HUB_TASKS["unconditional"])
    dtype, dname = _dataset(ev)
    return [EvalResult(task_type=task_type, task_name=task_name, dataset_type=dtype, dataset_name=dname,
                       metric_type=k, metric_value=ev["metrics"][k], metric_name=label)
            for k, label in METRICS if (ev.get("metrics") or {}).get(k) is not None]


def card_data(kind: str, hub_base: Optional[str], license: Optional[str], lora: bool, name: str,
              ev: Optional[dict]):
    """The card's metadata (huggingface_hub.ModelCardData): library, task, tags, the base's Hub id and license when
    known, and an evaluated model's results."""
    from huggingface_hub import ModelCardData

    tag = HUB_TASKS.get(kind, HUB_TASKS["unconditional"])[0]
    results = eval_results(kind, ev) if ev is not None else []
    return ModelCardData(library_name="diffusers", pipeline_tag=tag, base_model=hub_base, license=license,
                         tags=REPO_TAGS + [tag] + (["lora"] if lora else []),
                         model_name=name if results else None, eval_results=results or None)


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _ranges_table(ranges: list[dict], weights: Optional[list], mine: Optional[int]) -> list[str]:
    head = "| range | timesteps [lo, hi) | steps |" + (" merge weight |" if weights else "")
    lines = [head, "|" + "---|" * (4 if weights else 3)]
    for r in ranges:
        idx = f"**{r['index']}** (this model)" if r["index"] == mine else str(r["index"])
        row = f"| {idx} | [{r['lo']}, {r['hi']}) | {_fmt(r['steps']) if r['steps'] is not None else '-'} |"
        if weights:
            row += f" {_fmt(weights[r['index']]) if r['index'] < len(weights) else '-'} |"
        lines.append(row)
    return lines


TRAINING_KEYS = (("train.lr", "learning rate (AdamW)"), ("train.batch_size", "micro-batch"),
                 ("train.grad_accum", "gradient accumulation"), ("train.lr_schedule", "LR schedule"),
                 ("train.loss_weighting", "loss weighting"), ("deme.p", "p: probability of t from all of [0, T)"),
                 ("deme.consistency_weight", "consistency weight (lambda, Eq. 5)"),
                 ("deme.projection", "channel-wise projections"), ("deme.adapter", "adapter"),
                 ("train.ema_max_decay", "EMA max decay"), ("data.resolution", "resolution"), ("seed", "seed"))


def _training(meta: dict) -> list[str]:
    inputs = meta.get("inputs") or {}
    rows = [("steps", meta.get("steps")), ("weights", meta.get("weights"))]
    rows += [(label, inputs[k]) for k, label in TRAINING_KEYS if k in inputs]
    ad = meta.get("adapter") or {}
    if ad.get("kind") == "lora":
        rows += [("LoRA rank / alpha", f"{ad.get('rank')} / {_fmt(ad.get('alpha'))}"),
                 ("LoRA target modules", ", ".join(ad.get("target_modules") or []))]
    if meta.get("loss") is not None:
        rows.append(("training loss at the end", meta["loss"]))
    return ["| setting | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows if v is not None]


def _merge(merge: dict) -> list[str]:
    url = merge.get("method_url")
    method = f"[{merge.get('method')}]({url})" if url else str(merge.get("method"))
    lines = [f"- method: {method}" + (f" ({merge['summary']})" if merge.get("summary") else "")]
    if merge.get("method") == "routed":
        lines.append("- routing, low t first: " + ", ".join(f"[{lo}, {hi})" for lo, hi in merge.get("routing") or []))
    else:
        lines.append(f"- weights, low t first: [{', '.join(_fmt(w) for w in merge.get('weights') or [])}]")
    for k in ("density", "seed"):
        if k in merge:
            lines.append(f"- {k}: {merge[k]}")
    lines.append(f"- made from the range models' {'EMA' if merge.get('use_ema', True) else 'raw'} weights; "
                 f"projections {'kept' if merge.get('projection') else 'none'}")
    search = merge.get("search")
    if search:
        best = search.get("best") or {}
        lines.append(f"- weights searched ({search.get('strategy')}, objective {search.get('objective')}; best "
                     f"score {_fmt(best.get('score'))}): every candidate is in merge.json")
    return lines


def _evaluation(ev: dict, spec: str) -> list[str]:
    s, m = ev.get("sampler") or {}, ev.get("metrics") or {}
    ref = (ev.get("reference") or {}).get("path")
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {label} | {_fmt(m[k])} |" for k, label in METRICS if m.get(k) is not None]
    lines.append("")
    if any(m.get(k) is not None for k in ("fid", "kid", "clip_score")):
        lines.append(f"{ev.get('num_images')} samples ({s.get('scheduler')}, {s.get('steps')} steps, precision "
                     f"{s.get('precision')})" + (f" against `{ref}`" if ref else "") +
                     (f", mode {ev['mode']}" if ev.get("mode") else "") + ".")
    lbt = ev.get("loss_by_t")
    if m.get("loss_ratio") is not None and lbt:
        lines.append(f"Held-out loss / base: the denoising loss on {lbt.get('num_images')} images of "
                     f"`{lbt.get('images')}` in {len(lbt.get('bins') or [])} equal timestep bins, one fixed noise and "
                     f"t per image, as a ratio to the base model's, averaged over the bins (below 1: better).")
    lines.append(f"`deme eval` wrote these numbers to `eval/{model_dirname(spec)}.json` with everything needed to "
                 f"reproduce them.")
    return lines


def _custom_code(folder: Path) -> bool:
    """A pipeline folder whose components include code shipped in the folder (diffusers' custom components)."""
    index = _json(Path(folder) / "model_index.json") or {}
    return any(isinstance(v, list) and v and v[0] not in ("diffusers", "transformers", None) for v in index.values())


def _usage(folder: Path, run: RunDir, spec: str, kind: str, lora: bool, raw: bool) -> list[str]:
    call = ('pipe("a photo of a cat", num_inference_steps=50).images' if kind == "text-to-image"
            else "pipe(batch_size=4, num_inference_steps=50).images")
    lines = []
    if (Path(folder) / "model_index.json").is_file():     # a diffusers pipeline folder: loads without deme
        trust = ", trust_remote_code=True" if _custom_code(folder) else ""
        lines += ["```python", "from diffusers import DiffusionPipeline", "",
                  f'pipe = DiffusionPipeline.from_pretrained("path/to/this/folder"{trust})', f"images = {call}",
                  "```", ""]
    lines += ["From the run directory, with deme:", "", "```python", "from deme_cli import load_pipeline", "",
              f'pipe = load_pipeline("{run.root}", model="{spec}")   # the run directory, or its recipe .toml',
              f"images = {call}", "```", ""]
    if raw:
        lines += ["`load_pipeline` loads `final-raw/` (the raw, non-EMA weights) when the recipe sets "
                  "`merge.use_ema = false`, else `final/`.", ""]
    if (Path(folder) / "model_index.json").is_file():
        return lines + _without_deme(folder)
    if lora:
        lines.append("Without deme: `lora/` is a [peft](https://github.com/huggingface/peft) LoRA adapter on the "
                     "base model; the channel-wise projections (`projection.safetensors`) are not part of it.")
    else:
        lines.append("Without deme: `unet/` loads in stock diffusers (`from_pretrained(folder, subfolder=\"unet\")`), "
                     "but without the channel-wise projections in `projection.safetensors`, which deme applies "
                     "with forward hooks after every down, mid and up block: the model computes what it was trained "
                     "to only with them.")
    return lines


def _without_deme(folder: Path) -> list[str]:
    """How diffusers alone loads the folder (pipeline_folders.py), and what a LoRA file in it is and is not."""
    index = _json(Path(folder) / "model_index.json") or {}
    cfg = _json(Path(folder) / "unet" / "config.json") or {}
    if index.get("unet") != ["deme_unet", "DemeUNet"]:
        return ["Without deme: `DiffusionPipeline.from_pretrained(folder)` loads this folder (a stock diffusers "
                "pipeline)."]
    deme = cfg.get("deme") or {}
    what = ("the range models, each call routed to the one whose timesteps it was trained on" if deme.get("ranges")
            else "the LoRA adapter on the base UNet (`unet/base/`)" if deme.get("lora")
            else "the channel-wise projections after every down, mid and up block")
    lines = ["Without deme: `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads this folder "
             f"with the UNet code it ships (`unet/deme_unet.py`, torch and diffusers only: {what}); the stock "
             "`UNet2DModel.from_pretrained(folder + \"/unet\")` refuses it rather than load it without them."]
    if (Path(folder) / "pytorch_lora_weights.safetensors").is_file():
        lines += ["", "`pytorch_lora_weights.safetensors` is the adapter in diffusers' own LoRA format "
                      "(`pipe.load_lora_weights(folder)` on the base pipeline)" +
                  ("; it does not hold the channel-wise projections, so with it alone the base is not this range "
                   "model: load the folder itself." if deme.get("projection") else ".")]
    return lines


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2 ** 20:,.1f} MB"


def _disk(folder: Path) -> int:
    """Bytes of a folder's weight files."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors") if f.is_file())


def _routed(folder: Path, base, ranges: list[dict], lora: bool) -> list[str]:
    """What a routed model is and what it costs (Eq. 7 of the paper as one folder)."""
    n = len(ranges) or "N"
    owners = ", ".join(f"[{r['lo']}, {r['hi']}) → range {r['index']}" for r in ranges)
    base_bytes = _disk(Path(base.folder) / "unet")
    holds = (f"the base UNet once plus {n} LoRA adapters, one per range (switched by t, never {n} copies of the base "
             f"in memory)" if lora else f"{n} UNets, one per range")
    lines = [f"- what it is: the timestep-wise ensemble of the paper's Eq. 7 as one model. Each call of the UNet runs "
             f"the range model that owns its timestep t ({owners}); a batch that mixes timesteps is split by rows.",
             "- compute: one range model per denoising step, so sampling costs what the base costs.",
             f"- memory and disk: it holds {holds}; "
             + (f"its weight files take {_mb(_disk(folder))}, the base's UNet {_mb(base_bytes)}."
                if base_bytes else f"its weight files take {_mb(_disk(folder))}.")]
    return lines


def render(folder: Path, run: RunDir, base, spec: str, samples: Optional[dict], ev: Optional[dict],
           grid: bool) -> str:
    from huggingface_hub import ModelCard

    meta = _json(Path(folder) / META_FILE) or {}
    kind = base.kind.name
    merge = _json(Path(folder) / "merge.json") or {}        # merged/ (a merge, or the routed ensemble)
    merged = meta.get("kind") == "merged" or bool(merge)
    routed = merge.get("method") == "routed"
    hub = hub_id(base)
    base_id = base_model_id(base)
    recipe = meta.get("recipe") or "deme"
    label = model_dirname(spec) if Path(folder).name != "final-raw" else f"{model_dirname(spec)}-raw"
    ranges = _ranges(run, meta)
    lora = (meta.get("adapter") or {}).get("kind") == "lora" or (routed and any(
        ((_json(run.final(r["index"]) / META_FILE) or {}).get("adapter") or {}).get("kind") == "lora"
        for r in ranges))
    what = HUB_TASKS.get(kind, HUB_TASKS["unconditional"])[2]
    data = card_data(kind, hub, base_license(base), lora, f"{recipe}-{label}", ev)
    out = [f"# {recipe}: {label}", ""]
    paper = f"[DeMe, Decouple-then-Merge]({PAPER_URL}) (Ma et al., CVPR 2025)"
    where = "" if hub else f" (a local base model: `{base_id}`)"
    if routed:
        out += [f"{what}: `{base_id}`{where} finetuned with {paper}, its {len(ranges) or 'N'} range models kept and "
                f"routed by timestep: each denoising step runs the range model that owns t. It samples what "
                f"`deme sample --model ensemble` samples.", ""]
    elif merged:
        out += [f"{what}: `{base_id}`{where} finetuned with {paper} and merged back into one model. "
                f"{len(ranges) or 'N'} copies of the pretrained UNet were each finetuned on their own range of "
                f"timesteps (with a consistency loss to the frozen pretrained model, probabilistic sampling of "
                f"timesteps from outside the range and channel-wise projections), then merged by task-vector "
                f"arithmetic, θ_merged = θ + Σ w_i (θ_i − θ). It samples like any diffusers model.", ""]
    else:
        r, p = meta.get("range") or {}, (meta.get("deme") or {}).get("p")
        also = f" (and, with probability {_fmt(p)}, on all of [0, {meta.get('T', 'T')}))" if p else ""
        raw = "; the raw weights (final/ holds the EMA ones)" if Path(folder).name == "final-raw" else ""
        out += [f"{what}: range model {r.get('index')} of a {paper} run, `{base_id}`{where} finetuned "
                f"{'as LoRA adapters ' if lora else ''}on the timesteps [{r.get('lo')}, {r.get('hi')}){also}{raw}. "
                f"It is made to denoise its own range: sample it in the timestep-wise ensemble (`ensemble`: each "
                f"step by the range model that owns t) or merge it with the other ranges (`deme merge`).", ""]
    if ranges:
        mine = (meta.get("range") or {}).get("index")
        out += ["## Ranges", ""] + _ranges_table(ranges, None if routed else merge.get("weights"), mine) + [""]
    if routed:
        out += ["## Routing and its cost", ""] + _routed(folder, base, ranges, lora) + [""]
    elif merge:
        out += ["## Merge", ""] + _merge(merge) + [""]
    elif meta.get("range"):
        out += ["## Training", ""] + _training(meta) + [""]
    if ev is not None:
        out += ["## Evaluation", ""] + _evaluation(ev, spec) + [""]
    if grid:
        s = samples or {}
        how = (f": `deme sample --model {spec}`, {s.get('scheduler')}, {s.get('steps')} steps, image k with seed "
               f"{(s.get('seeds') or {}).get('base')} + k" if s else "")
        out += ["## Samples", "", f"![samples]({GRID_FILE})", "", f"The first samples{how}.", ""]
    out += ["## Use it", ""] + _usage(folder, run, spec, kind, lora, Path(folder).name == "final-raw") + [""]
    out += ["## Citation", "", "Ma, Ning, Liu, Niu, Zhang. Decouple-Then-Merge: Finetune Diffusion Models as "
            f"Multi-Task Learning. CVPR 2025. {PAPER_URL}", ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(out)))


def write_card(folder: Path, run: RunDir, base, spec: str) -> Path:
    """Write `folder`/README.md for model spec `spec` (merged, range:I); copies the samples' grid.png into the folder
    when the samples are this folder's. Returns the card's path."""
    folder = Path(folder)
    samples = fresh_samples(folder, run, spec)
    grid_src = run.samples(spec) / GRID_FILE
    if samples is not None and grid_src.is_file():
        _copy_atomic(grid_src, folder / GRID_FILE)
    text = render(folder, run, base, spec, samples, fresh_eval(run, spec, folder), (folder / GRID_FILE).is_file())
    write_atomic(folder / CARD_FILE, text)
    return folder / CARD_FILE


def _copy_atomic(src: Path, dest: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    shutil.copyfile(src, tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)


def update(run: RunDir, base, specs: Sequence[str]) -> list[Path]:
    """Write the cards of the model folders of `specs`: merged/, range I's final/ and final-raw/ (base and ensemble
    have none; folders not there are skipped). A failure is one warning: a card never breaks a command."""
    from .model_specs import parse_model_spec

    todo: list[tuple[Path, str]] = []
    for spec in specs:
        kind, i = parse_model_spec(spec)
        if kind == "merged":
            todo.append((run.merged, spec))
        elif kind == "range":
            todo += [(run.final(i), spec), (run.final(i, ema=False), spec)]
    written = []
    for folder, spec in todo:
        if not (folder / META_FILE).is_file():
            continue
        try:
            written.append(write_card(folder, run, base, spec))
        except Exception as e:  # noqa: BLE001 - a card is a by-product; the command's own work is done
            ui.warn(f"could not write the model card {folder / CARD_FILE} ({type(e).__name__}: {e})")
    return written
