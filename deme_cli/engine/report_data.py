"""What a run directory holds, gathered into one dict for the report (report.py writes it, report_render.py renders
it). Reading never changes the run.

What is read (runs.py has the layout): recipe.resolved.toml, run.json (the stages of `deme run`, their seconds and
environment), ranges.json, analysis/gradients.{png,npz,json}, ranges/<i>/metrics.jsonl (the training curves; elapsed_s
gives each range's training time), ranges/<i>/final/deme.json, ranges/<i>/previews/, merged/merge.json (+
merge-search.png), samples/<model>/samples.json (+ grid.png), eval/<model>.json. Eval numbers pass through
freshness.current: only those of the models and samples on disk now are shown as results; stale ones are listed apart,
each with the command that refreshes it. Whatever is missing is listed with the command that makes it.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Optional

from . import environment, freshness, take_away
from .errors import UsageError
from .gradients import HEATMAP_FILE, NPZ_FILE
from .images import GRID_FILE, SAMPLES_JSON
from .models import META_FILE
from .previews import PREVIEW_DIR
from .runs import RunDir, model_dirname
from .task_vectors import SEARCH_PLOT

FID_UNBIASED_FROM = 5000      # FID's bias is large below this many images (DESIGN.md section 9)
MODEL_ORDER = ("base", "ensemble", "merged")   # then range-I, by name


def _json(path: Path) -> Optional[Any]:
    """A JSON file's content, or None when it is missing or damaged (a report shows what it can)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _metric_lines(path: Path) -> list[dict]:
    """The lines of a metrics.jsonl that parse (the last one may be half written while a range trains)."""
    out = []
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out


def training_seconds(lines: list[dict]) -> Optional[float]:
    """A range's training time from its metrics lines' elapsed_s (seconds since the process started training): the
    sum of the last value of every process, a new one starting where elapsed_s drops. None before elapsed_s."""
    values = [x["elapsed_s"] for x in lines if isinstance(x.get("elapsed_s"), (int, float))]
    if not values:
        return None
    total = 0.0
    for prev, cur in zip(values, values[1:]):
        if cur < prev:
            total += prev
    return round(total + values[-1], 2)


def _model_key(name: str) -> tuple:
    return (MODEL_ORDER.index(name) if name in MODEL_ORDER else len(MODEL_ORDER), name)


def _latest_preview(folder: Path) -> Optional[Path]:
    steps = [(int(m.group(1)), p) for p in folder.glob("step-*.png") if (m := re.fullmatch(r"step-(\d+)\.png", p.name))]
    return max(steps)[1] if steps else None


def _training(run: RunDir, ranges: list[dict]) -> list[dict]:
    out = []
    for r in ranges:
        i = int(r["index"])
        meta = _json(run.final(i) / META_FILE)
        lines = _metric_lines(run.metrics(i))
        p = ((meta or {}).get("deme") or {}).get("p")
        T = (meta or {}).get("T")
        expected = (1 - p) + p * (r["hi"] - r["lo"]) / T if p is not None and T else None
        out.append({"index": i, "lo": r["lo"], "hi": r["hi"], "lines": lines, "finished": meta is not None,
                    "steps": (meta or {}).get("steps") or (lines[-1]["step"] if lines else 0),
                    "loss": (meta or {}).get("loss"), "seconds": training_seconds(lines),
                    "expected_fraction": expected, "environment": (meta or {}).get("environment"),
                    "preview": _latest_preview(run.range_dir(i) / PREVIEW_DIR)})
    return out


def _samples(run: RunDir) -> list[dict]:
    out = []
    for rec_file in sorted((run.root / "samples").glob(f"*/{SAMPLES_JSON}")):
        rec = _json(rec_file)
        if not isinstance(rec, dict):
            continue
        grid = rec_file.parent / GRID_FILE
        out.append({"model": rec.get("model") or rec_file.parent.name, "folder": rec_file.parent.name,
                    "grid": grid if grid.is_file() else None, "num_images": rec.get("num_images"),
                    "scheduler": rec.get("scheduler"), "steps": rec.get("steps"), "seeds": rec.get("seeds") or {},
                    "precision": rec.get("precision"), "generated": rec.get("generated"),
                    "seconds": rec.get("time_s") if rec.get("generated") else None,   # of the last call that made some
                    "complete": rec.get("complete", True)})
    return sorted(out, key=lambda s: _model_key(s["folder"]))


def _evals(run: RunDir, recipe_arg: str) -> tuple[list[dict], list[dict]]:
    """(the eval records with only their current numbers, one entry per stale part): freshness.current decides."""
    shown, stale = [], []
    for f in sorted((run.root / "eval").glob("*.json")):
        rec = _json(f)
        if not (isinstance(rec, dict) and isinstance(rec.get("metrics"), dict)):
            continue
        rec = {**rec, "model": rec.get("model") or f.stem, "file": f.name}
        now, verdicts = freshness.current(run, rec, recipe_arg)
        if any(v is not None for v in now["metrics"].values()) or now.get("loss_by_t"):
            shown.append(now)
        for part, v in verdicts.items():
            keys = freshness.SAMPLE_PART if part == "samples" else freshness.LOSS_PART
            values = {k: rec["metrics"][k] for k in keys if rec["metrics"].get(k) is not None}
            stale.append({"model": rec["model"], "part": part, "metrics": values, "why": v.why,
                          "command": v.command})
    key = lambda e: _model_key(model_dirname(e["model"]))    # noqa: E731
    return sorted(shown, key=key), sorted(stale, key=key)


def _missing(d: dict, recipe_arg: str) -> list[str]:
    """One line per missing part: what is missing and the command that makes it."""
    def cmd(name: str, *args) -> str:
        return f"`{' '.join(['deme', name, recipe_arg, *args])}`"

    if d["ranges"] is None:
        return [f"no ranges: run {cmd('split')} (or {cmd('run')} for the whole pipeline)"]
    lines, untrained = [], [t for t in d["training"] if not t["finished"]]
    if len(untrained) == len(d["training"]):
        lines.append(f"no trained range model: run {cmd('train', '--all')}")
    else:
        lines += [f"range {t['index']} is not trained (step {t['steps']} logged): run "
                  f"{cmd('train', '--range', str(t['index']))}" for t in untrained]
    if d["merge"] is None:
        lines.append(f"no merged model: run {cmd('merge')}")
    sampled = {s["folder"] for s in d["samples"]}
    for model in ("merged", "base"):
        if model not in sampled:
            why = " (the comparison every DeMe result needs)" if model == "base" else ""
            lines.append(f"no samples of the {model} model{why}: run {cmd('sample', '--model', model)}")
    for x in d["stale"]:
        what = "loss by timestep and loss ratio" if x["part"] == "loss" else "sample scores (FID, KID, CLIP score)"
        lines.append(f"{x['model']}: its {what} are stale ({x['why']}): run {x['command']}")
    scored = {model_dirname(e["model"]) for e in d["eval"] + d["stale"]}
    todo = [s["model"] for s in d["samples"] if s["folder"] not in scored]
    if todo:
        lines.append(f"no evaluation of {', '.join(todo)}: run {cmd('eval', '--models', ','.join(todo))} (with "
                     f"eval.reference set)")
    elif not d["eval"] and not d["samples"]:
        lines.append(f"no evaluation: run {cmd('eval', '--models', 'base,merged')} once they are sampled (with "
                     f"eval.reference set)")
    return lines


def collect(run: RunDir, recipe_arg: str = "RECIPE", recipe_toml: Optional[str] = None) -> dict:
    """Everything the report shows, from the run directory (see the module docstring). `recipe_arg` is how the
    commands it suggests name the recipe; `recipe_toml` the recipe to show when the run has no recipe.resolved.toml."""
    if not run.root.is_dir():
        raise UsageError(f"run directory '{run.root}' does not exist; run `deme run {recipe_arg}` (or `deme train "
                         f"{recipe_arg} --all`) first, or point --out at an existing run")
    resolved = run.resolved_recipe.read_text() if run.resolved_recipe.is_file() else None
    record = _json(run.root / "run.json") or {}
    ranges = _json(run.ranges_json)
    ranges = ranges if isinstance(ranges, dict) and isinstance(ranges.get("ranges"), list) else None
    analysis = run.analysis
    merge = _json(run.merged / "merge.json")
    d: dict = {
        "run": str(run.root), "written": time.strftime("%Y-%m-%d %H:%M:%S"),
        "recipe_toml": resolved or recipe_toml, "recipe_file": "recipe.resolved.toml" if resolved else None,
        "stages": [{"stage": k, "seconds": v.get("seconds")} for k, v in (record.get("stages") or {}).items()],
        "run_environment": record.get("environment"), "environment": environment.describe(),
        "ranges": ranges,
        "gradients": {"png": analysis / HEATMAP_FILE if (analysis / HEATMAP_FILE).is_file() else None,
                      "npz": analysis / NPZ_FILE if (analysis / NPZ_FILE).is_file() else None,
                      "summary": (_json(analysis / "gradients.json") or {}).get("summary")},
        "training": _training(run, ranges["ranges"]) if ranges else [],
        "merge": merge if isinstance(merge, dict) else None,
        "search_plot": run.merged / SEARCH_PLOT if (run.merged / SEARCH_PLOT).is_file() else None,
        "samples": _samples(run),
    }
    d["eval"], d["stale"] = _evals(run, recipe_arg)
    # the bins to compare in: the recipe `deme report` was given (resolved.toml is the last command's, --set included)
    d["loss_bins"] = _recipe_int(recipe_toml, "loss_bins") or _recipe_int(resolved, "loss_bins")
    d["take_away"] = take_away.summarize(d["eval"], d["merge"], recipe_arg)
    d["recipe_arg"] = recipe_arg
    d["name"] = ((merge or {}).get("recipe") or _recipe_name(d["recipe_toml"]) or run.root.name)
    d["missing"] = _missing(d, recipe_arg)
    return d


def _recipe_name(toml_text: Optional[str]) -> Optional[str]:
    m = re.search(r'^name\s*=\s*"([^"]*)"', toml_text or "", re.M)
    return m.group(1) if m else None


def _recipe_int(toml_text: Optional[str], key: str) -> Optional[int]:
    m = re.search(rf"^{key}\s*=\s*(\d+)\s*$", toml_text or "", re.M)
    return int(m.group(1)) if m else None


def curves(d: dict) -> dict:
    """{model: loss_by_t record} of the current evals, the base left out (its ratio is 1 by definition)."""
    return {e["model"]: e["loss_by_t"] for e in d["eval"] if isinstance(e.get("loss_by_t"), dict)
            and e["model"] != "base"}


def times(d: dict) -> list[tuple[str, float, str]]:
    """(what, seconds, where it is recorded) of every timed part of the run."""
    out = [(f"deme run: {s['stage']}", s["seconds"], "run.json") for s in d["stages"] if s["seconds"] is not None]
    out += [(f"train range {t['index']} ({t['steps']} steps)", t["seconds"], f"ranges/{t['index']}/metrics.jsonl")
            for t in d["training"] if t["seconds"] is not None]
    search = (d["merge"] or {}).get("search") or {}
    if search.get("seconds") is not None:
        out.append((f"merge weight search ({search.get('evaluations')} merges)", search["seconds"],
                    "merged/merge.json"))
    out += [(f"sample {s['model']} ({s['generated']} images, the last call)", s["seconds"],
             f"samples/{s['folder']}/samples.json")
            for s in d["samples"] if s["seconds"] is not None]
    out += [(f"eval {e['model']}", e["time_s"], f"eval/{e['file']}") for e in d["eval"] if e.get("time_s") is not None]
    return out
