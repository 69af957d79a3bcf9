"""`deme run`: split, train (all ranges), merge, sample, eval, in order, as one resumable job.

Each stage is the same stage function its own subcommand calls, on one base resolved once, and each already skips
work that is complete (training resumes from its latest checkpoint, sampling keeps images already written, merge and
eval reuse results whose inputs did not change). On top of that, `run.json` in the run directory records, per stage,
the recipe values the stage's output was produced from: the sections its function and the functions before it take
(read off their signatures). A later `deme run` whose recipe differs in those values refuses to mix the
old outputs with new ones: it names the stage and the difference and suggests `--force`. run.json also records the
seconds of the run that did each stage's work and the environment (versions, hardware) of the last `deme run`; the
run ends by writing its report (report/index.html and report.md: engine/report.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..engine import environment, provenance, ui
from ..engine.errors import UsageError
from ..engine.recipe import stage_keys, stage_kwargs
from ..engine.runs import RunDir, read_record, write_json
from .eval import evaluate
from .merge import merge_ranges
from .sample import sample_model
from .split import split_ranges
from .train import train_ranges


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[..., Any]          # the stage function: its signature says which recipe sections it reads
    run: Callable[..., Any]         # (recipe, base, run dir, force, models) -> status


def _split(recipe, base, run, force, models):
    if run.ranges_json.is_file() and not force:
        return "kept"
    split_ranges(base, run, force=True, **stage_kwargs(split_ranges, recipe))  # a forced run retrains every range
    return "done"


def _train(recipe, base, run, force, models):
    summaries = train_ranges(base, run, force=force, resolved=recipe.to_toml(), preview_sample=recipe.sample,
                             **stage_kwargs(train_ranges, recipe))
    return "kept" if all(r["skipped"] for r in summaries) else "done"


def _merge(recipe, base, run, force, models):
    if "merged" not in models:
        return "not needed"
    r = merge_ranges(base, run, force=force, **stage_kwargs(merge_ranges, recipe))   # merge.weights decides
    return "kept" if r.get("skipped") else "done"


def _sample(recipe, base, run, force, models):
    kw = stage_kwargs(sample_model, recipe)
    generated = [sample_model(base, run, m, force=force, **kw)["generated"] for m in models]  # every model
    return "done" if any(generated) else "kept"


def _eval(recipe, base, run, force, models):
    return evaluate(base, run, models, allow_fewer=False, force=force, **stage_kwargs(evaluate, recipe))


STAGES = [
    Stage("split", split_ranges, _split),
    Stage("train", train_ranges, _train),
    Stage("merge", merge_ranges, _merge),
    Stage("sample", sample_model, _sample),
    Stage("eval", evaluate, _eval),
]
# what a key meant before it was written out explicitly (run.json of older versions recorded None)
EARLIER_NONE = {"merge.weights": "search"}    # `deme run` searched the weights when merge.weights was unset


def stage_sections(stage: Stage) -> list[str]:
    """The recipe sections and top-level keys a stage's output depends on: those its function and the functions of
    the stages before it take (read off their signatures, recipe.stage_keys)."""
    upto = STAGES[:STAGES.index(stage) + 1]
    return list(dict.fromkeys(k for s in upto for k in stage_keys(s.fn)))


def stage_inputs(recipe, stage: Stage) -> dict:
    """The recipe values a stage's output depends on (flattened, dotted keys; provenance.SPEED_ONLY left out)."""
    return provenance.inputs(**{k: getattr(recipe, k) for k in stage_sections(stage)})


def recipe_defaults() -> dict:
    """Every recipe key's default (dotted), for comparing with run.json of versions that wrote None for them."""
    from ..engine.recipe import Recipe

    out = {}
    for name, f in Recipe.model_fields.items():
        fields = getattr(f.annotation, "model_fields", None)
        for k, g in (fields or {name: f}).items():
            if not g.is_required():
                out[f"{name}.{k}" if fields else name] = g.default
    return out


def differences(old: dict, new: dict, defaults: Optional[dict] = None) -> list[str]:
    """provenance.differences, where an old None also stands for what the key meant then (EARLIER_NONE)."""
    return provenance.differences(old, new, {**(defaults or {}), **EARLIER_NONE})


def check_provenance(recipe, run: RunDir, record: dict) -> None:
    """Refuse to continue from outputs that were produced from a different recipe."""
    for stage in STAGES:
        old = record.get("stages", {}).get(stage.name)
        if not old:
            continue
        diff = differences(old["inputs"], stage_inputs(recipe, stage), recipe_defaults())
        if diff:
            raise UsageError(provenance.changed_message(f"the '{stage.name}' stage in '{run.root}'", diff))


def check_needs(recipe, base, run: RunDir, models: list[str], force: bool = False) -> None:
    """What every stage will need, checked before the first one starts (engine/preflight.py): the device, the
    training data and the disk for the ranges' checkpoints, the weight search's settings and held-out images, the
    prompts of a text-to-image model, the eval reference and CLIP model. A missing eval.reference fails in seconds,
    not after hours of training."""
    from ..engine import preflight
    from .train import check_training_needs

    try:
        base.device          # train.device: "cuda" on a machine without CUDA is refused here
        check_training_needs(base, run, data=recipe.data, ranges=recipe.ranges, train=recipe.train, deme=recipe.deme,
                             force=force)
        if "merged" in models:
            from ..engine.routed import check_weights

            check_weights(recipe.merge)
        if "merged" in models and recipe.merge.weights == "search":
            from ..engine.search_objectives import SearchSetup
            from ..engine.weight_search import check_search

            check_search(SearchSetup.from_sections(base, **stage_kwargs(SearchSetup.from_sections, recipe)),
                         recipe.ranges.n)
        preflight.check_prompts(recipe.sample, base.kind.conditional)
        preflight.check_eval(recipe.eval, models)
    except UsageError as err:
        raise UsageError(f"{err} (checked before any stage starts)") from None


def _report(recipe, run: RunDir, recipe_arg: str) -> Optional[dict]:
    """Write the report of a finished run; a report that cannot be written is one warning, not a failed run."""
    from ..engine.report import write_report

    try:
        r = write_report(run, recipe_arg, recipe.to_toml())
    except Exception as e:      # noqa: BLE001 (the run's work is done and on disk whatever goes wrong here)
        ui.warn(f"the run finished, but its report could not be written ({type(e).__name__}: {e}); "
                f"`deme report {recipe_arg}` tries again")
        return None
    return {"html": r["html"], "markdown": r["markdown"]}


def _take_away(run: RunDir, recipe_arg: str) -> Optional[dict]:
    """Which model to take away, from the run's current eval numbers (engine/take_away.py; the report's first
    table)."""
    from ..engine.report_data import collect

    return collect(run, recipe_arg)["take_away"]


def run_pipeline(recipe, run: RunDir, force: bool = False, on_stage: Optional[Callable] = None,
                 recipe_arg: str = "RECIPE") -> dict:
    """Run every stage in order on one resolved base, then write the report; returns {"stages": [...],
    "models": {...}, "run": path, "report": {"html", "markdown"} or None}. `recipe_arg` names the recipe in the
    commands the report suggests."""
    from ..engine.base import resolve_base

    models = list(dict.fromkeys(recipe.run.models))
    if not models:
        raise UsageError("run.models is empty; list the models to sample and evaluate, e.g. [\"base\", \"merged\"]")
    for m in models:
        if not (m in ("base", "merged", "ensemble") or m.startswith("range:")):
            raise UsageError(f"run.models has '{m}'; use base, merged, ensemble or range:I")
    record_file = run.root / "run.json"
    record = read_record(record_file, "delete it to record the stages again, or re-run with --force") \
        if record_file.is_file() and not force else {"stages": {}}
    check_provenance(recipe, run, record)
    base = resolve_base(recipe.model, recipe.train.device)
    check_needs(recipe, base, run, models, force)

    stages, eval_result = [], None
    record["environment"] = environment.describe()
    for stage in STAGES:
        if on_stage:
            on_stage(stage.name)
        t0 = time.time()
        status = stage.run(recipe, base, run, force, models)
        seconds = time.time() - t0
        if stage.name == "eval":
            eval_result, status = status, "done" if status.get("scored") else "kept"
        done = (record["stages"].get(stage.name) or {}).get("seconds") if status == "kept" else None
        record["stages"][stage.name] = {"inputs": stage_inputs(recipe, stage),    # the seconds of the work
                                        "seconds": round(seconds, 2) if done is None else done}
        stages.append({"stage": stage.name, "status": status, "seconds": round(seconds, 2),
                       "work_seconds": record["stages"][stage.name]["seconds"]})
        write_json(record_file, record)  # after the stage: an interrupted stage is simply redone (and resumes)

    results = (eval_result or {}).get("results", {})      # current numbers only (evaluate passes them through
    return {"run": str(run.root), "stages": stages, "report": _report(recipe, run, recipe_arg),   # freshness)
            "stale": (eval_result or {}).get("stale", {}), "take_away": _take_away(run, recipe_arg),
            "models": {m: {"metrics": results.get(m, {}).get("metrics", {}),
                           "num_images": results.get(m, {}).get("num_images"),
                           **({"loss_by_t": results[m]["loss_by_t"]} if results.get(m, {}).get("loss_by_t") else {})}
                       for m in models},
            "reference": (eval_result or {}).get("reference"),
            **({"loss_plot": eval_result["loss_plot"]} if (eval_result or {}).get("loss_plot") else {})}
