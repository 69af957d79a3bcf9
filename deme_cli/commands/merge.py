"""`deme merge`: merge the N range models into one by task-vector arithmetic (paper section 3.3, Eq. 8).

Task vectors tau_i = theta_i - theta over every floating-point tensor of the range models (the EMA weights in
`ranges/<i>/final/` by default, the raw ones in `final-raw/` with merge.use_ema = false), projections included: their
base is the identity, so tau = W_i - I. A range model without projections counts as identity projections (tau = 0).
Non-float tensors are copied from theta. Then

    theta_merged = theta + combine_i(w_i, tau_i)                        (Eq. 8 for task_arithmetic: sum_i w_i tau_i)

Methods (task_arithmetic, ties, dare) are in engine/merge_methods.py; inputs and merging in engine/task_vectors.py.
Weights: merge.weights, one meaning everywhere (`deme merge`, `deme run`, the SLURM scripts): "uniform" (1/N each,
the uniform soup; the default), "search" (searched by merge.search with merge.objective: engine/weight_search.py;
`--search` sets it) or a list, one per range, low t first (`--weights` sets it). The release hard-codes
[0.1, 0.1, 0.2, 0.5] for N = 4; weights need not sum to 1.

Streaming: the base UNet is loaded once (the only whole model in memory: its hash is the identity that range models
record, computed the way `train` computes it); range models are read tensor by tensor from their safetensors files and
the merged tensors are written as they are computed (`safetensors_stream`), in float64 so that weight 1 on one range
gives back that range's weights exactly. Peak memory: about one model plus a few tensors, not N + 1 models
(benchmarks/merge_memory.py measures it).

merge.method = "routed" (`--method routed`) combines no task vectors: merged/ keeps the N range models as one model
that routes each call to the range model owning t (the timestep-wise ensemble, Eq. 7; engine/routed.py); weights do
not apply (a search is refused, a weight list ignored with a note).

Output: `<run>/merged/`, a diffusers pipeline folder like a range's `final/` (engine/pipeline_folders.py), plus
merge.json (method, weights, density/seed where used, the range models and their
identities, the search log) and, once it is in place, README.md (a model card: engine/model_card.py). merged/ is written
to a temporary folder and renamed, so an existing merged/ is only replaced by a complete new one. Re-running with the
same settings and unchanged range models skips the merge (merge.json's "fingerprint"); the same settings on retrained
range models merge again; other recipe values (method, weights, density, the search's settings: merge.json's "settings")
are refused naming them, so that a merge is never replaced by surprise; `--force` merges again. One process at a time
merges a run (locks.py); a weight search stopped by a signal keeps its scores in `<run>/.merge-search.jsonl` and a
re-run continues it.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Optional

from ..engine import locks, model_card, provenance, ui
from ..engine.base import Base, resolve_base
from ..engine.merge_methods import MergeSpec, get_method
from ..engine.models import META_FILE
from ..engine.pipeline_folders import is_model_folder
from ..engine.recipe import (DataSection, EvalSection, MergeSection, RangesSection, SampleSection, TrainSection,
                             stage_kwargs)
from ..engine.exports import upgrade
from ..engine.ranges import Range
from ..engine.routed import check_weights, write_routed_folder
from ..engine.runs import RunDir, read_json
from ..engine.weight_search import DEFAULT_ROUNDS
from ..engine.splitting import load_ranges
from ..engine.task_vectors import MERGE_JSON, load_inputs, resolve_weights, write_merged_folder


MERGE_LOCK = ".merge.lock"      # in the run directory: merged/ itself is replaced by a rename
SEARCH_JOURNAL = ".merge-search.jsonl"   # the scores of a search so far (weight_search.Journal)


def _fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _scores_fingerprint(settings: dict) -> str:
    """What the search journal's scores depend on: the merge's settings without merge.search_rounds (a coordinate
    descent stopped after fewer or more rounds scores the same merges the same), so a search whose round limit changed
    continues from the scores it has."""
    search = {k: v for k, v in settings["search"].items() if k != "rounds"}
    return _fingerprint({**settings, "search": search})


def _previous(run: RunDir) -> Optional[dict]:
    f = run.merged / MERGE_JSON
    if not (f.is_file() and is_model_folder(run.merged) and (run.merged / META_FILE).is_file()):
        return None
    try:
        return read_json(f)
    except (OSError, ValueError):
        return None


def run_merge(recipe, run: RunDir, weights: Optional[list[float]] = None, search: bool = False,
              force: bool = False, processes: int = 1, gpus: str = "auto") -> dict:
    """`deme merge RECIPE` for a recipe: `weights` (--weights) or `search` (--search) set merge.weights; with both,
    the weights are where a coordinate search starts."""
    start = None
    if weights is not None or search:
        update = {"weights": "search" if search else [float(w) for w in weights]}
        recipe = recipe.model_copy(update={"merge": recipe.merge.model_copy(update=update)})
        start = [float(w) for w in weights] if search and weights is not None else None
    return merge_ranges(resolve_base(recipe.model, recipe.train.device), run, force=force, processes=processes,
                        gpus=gpus, start=start, **stage_kwargs(merge_ranges, recipe))


def merge_ranges(base: Base,                       # theta: the task vectors' base
                 run: RunDir,                      # the run directory: ranges/<i>/final*/ in, merged/ out
                 *,
                 merge: MergeSection,              # weights ("uniform", "search" or a list), method, search settings
                 ranges: RangesSection,            # N
                 sample: SampleSection,            # search: the kid/fid objectives' sampler
                 eval: EvalSection,                # search: their feature extractor and mode; eval.reference refused
                 data: DataSection,                # search: how the loss objectives read held-out images
                 train: TrainSection,              # search: train.batch_size, the loss objectives' batch
                 seed: int,                        # search: KID's subsets
                 name: str,                        # the recipe name merged/ records
                 force: bool = False,              # merge again even if merged/ holds this merge
                 processes: int = 1,               # search: score candidates in P processes
                 gpus: str = "auto",               # search: the device slots of those processes
                 start: Optional[list[float]] = None,  # search: where a coordinate search starts (default 1/N)
                 ) -> dict:
    """Merge the range models into run.merged with merge.weights, searching them first for "search". Returns
    merge.json plus "skipped" (True when merged/ already held this merge) and "merged" (the folder)."""
    from ..engine.search_objectives import SearchSetup

    n = ranges.n
    spec = MergeSpec.from_section(merge)
    routed = get_method(spec.method).routed
    search = merge.weights == "search"
    check_weights(merge)
    if routed and isinstance(merge.weights, list):
        ui.info("merge.weights is ignored by merge.method = \"routed\": each denoising step uses the one range "
                "model that owns t")
    start = resolve_weights(start if search and start is not None else merge.weights, n,
                            "--weights" if start is not None else "merge.weights")
    setup = SearchSetup.from_sections(base, merge=merge, sample=sample, eval=eval, data=data, train=train, seed=seed)
    inputs = load_inputs(base, run, n=n, use_ema=merge.use_ema)
    settings = {**spec.describe(), "use_ema": merge.use_ema, "base_hash": inputs.base_hash,
                "ranges": [r.identity() for r in inputs.ranges]}
    if search:
        from ..engine.weight_search import check_search, search_settings
        check_search(setup, n)
        settings["search"] = search_settings(setup, n, start)
    elif routed:
        settings["routing"] = [[r.lo, r.hi] for r in load_ranges(base, ranges, run)]
    else:
        settings["weights"] = start
    fingerprint = _fingerprint(settings)
    main = int(os.environ.get("RANK", "0")) == 0
    with locks.hold(run.root / MERGE_LOCK, f"the merge in '{run.root}'", main=main):
        prev = _previous(run)
        if prev is not None and not force:
            if prev.get("fingerprint") == fingerprint:
                if main and upgrade(run.merged, base.folder):
                    ui.info(f"rewrote {run.merged} as a diffusers pipeline folder (the same weights; deme's older "
                            f"folder layout)")
                ui.info(f"{run.merged} already holds this merge (same settings, same range models); --force merges "
                        f"again")
                return {**prev, "skipped": True, "merged": str(run.merged)}
            # other recipe values: refused; the same values on retrained range models: merged again
            provenance.refuse_changed(f"'{run.merged}'", _with_rounds(_recorded_choice(prev)),
                                      _with_rounds(provenance.flatten(_chosen(settings), "merge.")))
        t0 = time.time()
        log, final = None, (None if routed else start)
        journal = None
        if search:
            from ..engine.weight_search import Journal, search_weights
            # a stopped search continues from the scores journalled so far
            journal = Journal(run.root / SEARCH_JOURNAL, _scores_fingerprint(settings))
            log = search_weights(setup, ranges, run, inputs, spec, start, processes=processes, gpus=gpus,
                                 journal=journal)
            final = list(log["best"]["weights"])
        record = _write(base, run, inputs, spec, final, log, settings, fingerprint, merge.use_ema, name)
        if journal is not None:
            journal.remove()
    return {**record, "skipped": False, "merged": str(run.merged), "seconds": round(time.time() - t0, 3)}


def _chosen(settings: dict) -> dict:
    """The part of a merge's settings the recipe chose (not the identities of the base and the range models, nor the
    method's reference link, which follows from the method)."""
    return {k: v for k, v in settings.items() if k not in ("base_hash", "ranges", "method_url")}


def _with_rounds(choice: dict) -> dict:
    """A flattened choice with merge.search.rounds filled in for a coordinate search: it is recorded only when not the
    default (so merges recorded before the key existed stay current), and compared like every other value."""
    if choice.get("merge.search.strategy") == "coordinate":
        return {"merge.search.rounds": DEFAULT_ROUNDS, **choice}
    return choice


def _recorded_choice(prev: dict) -> dict:
    """The recipe values an existing merge.json records (flattened like `provenance.flatten(chosen, "merge.")`); for
    a merge.json of an older version, which has no "settings", what it records at its top level."""
    if "settings" in prev:
        return provenance.flatten(prev["settings"], "merge.")
    old = {k: prev[k] for k in ("method", "use_ema", "density", "seed") if k in prev}
    if not prev.get("search") and "weights" in prev:
        old["weights"] = prev["weights"]
    return provenance.flatten(old, "merge.")


def _write(base: Base, run: RunDir, inputs, spec, final: list[float], log: Optional[dict], settings: dict,
           fingerprint: str, use_ema: bool, name: str) -> dict:
    """Write merged/ with the weights `final` (and the search `log`); returns merge.json."""
    method = get_method(spec.method)
    record = {**spec.describe(), "weights": final, "use_ema": use_ema,
              **({"routing": settings["routing"], "adapter": "lora" if inputs.ranges[0].is_lora else "full"}
                 if method.routed else {}),
              "base": {"pretrained": base.pretrained, "base_hash": inputs.base_hash},
              "ranges": settings["ranges"], "projection": inputs.has_projections, "search": log,
              "recipe": name, "fingerprint": fingerprint, "settings": _chosen(settings), "summary": method.summary}
    meta = {"kind": "merged", "base_hash": inputs.base_hash, "recipe": name, **spec.describe(),
            "weights": final, "use_ema": use_ema, "projection": inputs.has_projections,
            "ranges": [{"index": r.index, **({k: r.meta["range"][k] for k in ("lo", "hi")} if r.meta.get("range")
                                             else {})} for r in inputs.ranges]}
    if method.routed:
        owned = [Range(i, lo, hi) for i, (lo, hi) in enumerate(settings["routing"])]
        write_routed_folder(inputs, owned, run.merged, {**meta, "routing": settings["routing"]}, record)
    else:
        write_merged_folder(inputs, final, spec, run.merged, meta, record)
    model_card.update(run, base, ["merged"])            # merged/README.md
    return record
