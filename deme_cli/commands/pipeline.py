"""`deme run`: split, train (all ranges), merge, sample, eval, in order, as one resumable job.

Each stage is the same engine function its own subcommand calls, and each already skips work that is complete
(training resumes from its latest checkpoint, sampling keeps images already written, merge and eval reuse results
whose inputs did not change). On top of that, `run.json` in the run directory records, per stage, the recipe values
the stage's output was produced from. A later `deme run` whose recipe differs in those values refuses to mix the
old outputs with new ones: it names the stage and the difference and suggests `--force`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..engine.errors import UsageError
from ..engine.runs import RunDir, read_json, write_json


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple  # recipe sections (and top-level keys) the stage's output depends on, upstream ones included
    run: Callable[..., Any]


def _split(recipe, run, force, models):
    from ..engine.splitting import run_split

    if run.ranges_json.is_file() and not force:
        return "kept"
    run_split(recipe, run, force=True)    # a forced run retrains every range on the new ranges
    return "done"


def _train(recipe, run, force, models):
    from ..engine.train import train_ranges

    summaries = train_ranges(recipe, run, None, force=force)
    return "kept" if all(r["skipped"] for r in summaries) else "done"


def _merge(recipe, run, force, models):
    from ..engine.merge import run_merge

    if "merged" not in models:
        return "not needed"
    # weights from the recipe; a recipe without weights gets them searched (merge.search / merge.objective)
    r = run_merge(recipe, run, search=recipe.merge.weights is None, force=force)
    return "kept" if r.get("skipped") else "done"


def _sample(recipe, run, force, models):
    from ..engine.sample import run_sample

    generated = [run_sample(recipe, run, m, force=force)["generated"] for m in models]  # every model, no short cut
    return "done" if any(generated) else "kept"


def _eval(recipe, run, force, models):
    from ..engine.metrics import run_eval

    return run_eval(recipe, run, models, allow_fewer=False, force=force)


_UP_TO_TRAIN = ("model", "data", "ranges", "train", "deme", "seed")
STAGES = [
    Stage("split", ("model", "ranges"), _split),
    Stage("train", _UP_TO_TRAIN, _train),
    Stage("merge", _UP_TO_TRAIN + ("merge",), _merge),
    Stage("sample", _UP_TO_TRAIN + ("merge", "sample"), _sample),
    Stage("eval", _UP_TO_TRAIN + ("merge", "sample", "eval"), _eval),
]


def _flatten(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}"))
    return out


def stage_inputs(recipe, stage: Stage) -> dict:
    """The recipe values a stage's output depends on (flattened, dotted keys)."""
    full = recipe.model_dump(mode="json")
    full["model"] = {k: v for k, v in full["model"].items()}
    full["data"] = {k: v for k, v in full["data"].items() if k != "num_workers"}  # speed only
    return _flatten({k: full[k] for k in stage.sections})


def differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def check_provenance(recipe, run: RunDir, record: dict) -> None:
    """Refuse to continue from outputs that were produced from a different recipe."""
    for stage in STAGES:
        old = record.get("stages", {}).get(stage.name)
        if not old:
            continue
        diff = differences(old["inputs"], stage_inputs(recipe, stage))
        if diff:
            more = f" (and {len(diff) - 2} more)" if len(diff) > 2 else ""
            raise UsageError(f"the '{stage.name}' stage in '{run.root}' was produced from a different recipe "
                             f"({'; '.join(diff[:2])}{more}); re-run with --force to redo it, or use another --out")


def preflight_eval(recipe) -> None:
    """What the eval stage will need, checked before any training: a reference for FID/KID (and an image folder for
    the loss by timestep), a CLIP model for CLIP score. A missing eval.reference fails in seconds, not after hours."""
    from ..engine import loss_by_t
    from ..engine.metrics import reference_kind

    e = recipe.eval
    if any(m in e.metrics for m in ("fid", "kid")):
        try:
            reference_kind(e.reference)
        except UsageError as err:
            raise UsageError(f"{err} (checked before training: `deme run` ends with eval)") from None
    if "loss" in e.metrics:
        loss_by_t.check_reference(recipe)
    if "clip" in e.metrics and not e.clip_model:
        raise UsageError("eval.metrics has \"clip\" but eval.clip_model is not set; set it to a CLIP folder or hub id "
                         "(checked before training: `deme run` ends with eval)")


def run_pipeline(recipe, run: RunDir, force: bool = False, on_stage: Optional[Callable] = None) -> dict:
    """Run every stage in order; returns {"stages": [...], "models": {...}, "run": path}."""
    models = list(dict.fromkeys(recipe.run.models))
    if not models:
        raise UsageError("run.models is empty; list the models to sample and evaluate, e.g. [\"base\", \"merged\"]")
    for m in models:
        if not (m in ("base", "merged", "ensemble") or m.startswith("range:")):
            raise UsageError(f"run.models has '{m}'; use base, merged, ensemble or range:I")
    preflight_eval(recipe)
    record_file = run.root / "run.json"
    record = read_json(record_file) if record_file.is_file() and not force else {"stages": {}}
    check_provenance(recipe, run, record)

    stages, eval_result = [], None
    for stage in STAGES:
        if on_stage:
            on_stage(stage.name)
        t0 = time.time()
        status = stage.run(recipe, run, force, models)
        seconds = time.time() - t0
        if stage.name == "eval":
            eval_result, status = status, "done" if status.get("scored") else "kept"
        stages.append({"stage": stage.name, "status": status, "seconds": round(seconds, 2)})
        record["stages"][stage.name] = {"inputs": stage_inputs(recipe, stage), "seconds": round(seconds, 2)}
        write_json(record_file, record)  # after the stage: an interrupted stage is simply redone (and resumes)

    results = (eval_result or {}).get("results", {})
    return {"run": str(run.root), "stages": stages,
            "models": {m: {"metrics": results.get(m, {}).get("metrics", {}),
                           "num_images": results.get(m, {}).get("num_images"),
                           **({"loss_by_t": results[m]["loss_by_t"]} if results.get(m, {}).get("loss_by_t") else {})}
                       for m in models},
            "reference": (eval_result or {}).get("reference"),
            **({"loss_plot": eval_result["loss_plot"]} if (eval_result or {}).get("loss_plot") else {})}
