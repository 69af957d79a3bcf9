"""`deme split`: compute the N ranges of a recipe and write ranges.json; read them back for `train`."""
from __future__ import annotations

from pathlib import Path

from .errors import UsageError
from .models import num_train_timesteps, resolve_pretrained, scheduler_config
from .ranges import Range, split, validate_ranges
from .runs import RunDir, read_json, write_json


def _schedule(recipe, run: RunDir, T: int) -> dict:
    """snr: alphas_cumprod of the pipeline's noise schedule (diffusers DDPMScheduler.from_config)."""
    from diffusers import DDPMScheduler

    cfg = scheduler_config(resolve_pretrained(recipe.model.pretrained, recipe.model.revision))
    return {"alphas_cumprod": DDPMScheduler.from_config(cfg).alphas_cumprod.double().tolist()}


def gradient_matrix_file(recipe, run: RunDir) -> Path:
    """ranges.matrix if set, else the run's analysis/gradients.npz."""
    from .gradients import NPZ_FILE

    return Path(recipe.ranges.matrix).expanduser() if recipe.ranges.matrix else run.analysis / NPZ_FILE


def _gradient_matrix(recipe, run: RunDir, T: int) -> dict:
    """affinity: the matrix, its bin edges, and where it came from (recorded in ranges.json)."""
    import hashlib

    from .gradients import load_matrix

    f = gradient_matrix_file(recipe, run)
    if not f.is_file():
        raise UsageError(f"no gradient matrix at '{f}'; run `deme analyze-gradients` first or set ranges.matrix")
    m = load_matrix(f)
    s = m["settings"]
    source = {"matrix_file": str(f.resolve()), "matrix_sha256": hashlib.sha256(f.read_bytes()).hexdigest()[:16],
              **{k: s[k] for k in ("model_hash", "params", "method", "sketch_dim", "batch_size") if k in s}}
    return {"matrix": m["matrix"], "edges": m["edges"], "source": source}


EVIDENCE = {                     # strategy -> what it needs beyond (T, n)
    "uniform": lambda recipe, run, T: {},
    "snr": _schedule,
    "affinity": _gradient_matrix,
}


def split_evidence(recipe, run: RunDir, T: int) -> dict:
    """Extra inputs the recipe's strategy needs (the gradient matrix for `affinity`, the noise schedule for `snr`)."""
    provide = EVIDENCE.get(recipe.ranges.strategy)
    return provide(recipe, run, T) if provide is not None else {}


def trained_on(run: RunDir) -> list[int]:
    """Indices of the ranges with a checkpoint or a final model in the run."""
    root = run.root / "ranges"
    if not root.is_dir():
        return []
    return sorted(int(d.name) for d in root.iterdir() if d.name.isdigit()
                  and ((d / "final").is_dir() or (d / "final-raw").is_dir() or (d / "checkpoints").is_dir()))


def run_split(recipe, run: RunDir, force: bool = False) -> dict:
    """Compute the ranges and write ranges.json. A ranges.json with other ranges that range models were trained on is
    not replaced without `force` (the models would no longer match it)."""
    pipeline_dir = resolve_pretrained(recipe.model.pretrained, recipe.model.revision)
    T = num_train_timesteps(pipeline_dir)
    ranges, info = split(recipe.ranges.strategy, T, recipe.ranges.n, **split_evidence(recipe, run, T))
    result = {"strategy": recipe.ranges.strategy, "T": T, "n": len(ranges),
              "ranges": [r.as_dict() for r in ranges], **({"evidence": info} if info else {})}
    if run.ranges_json.is_file() and not force:
        try:
            old = read_json(run.ranges_json)
            same = old.get("T") == T and old.get("ranges") == result["ranges"]
        except (ValueError, AttributeError):
            same = False
        trained = trained_on(run)
        if not same and trained:
            raise UsageError(f"'{run.ranges_json}' holds other ranges, and range{'s' if len(trained) > 1 else ''} "
                             f"{', '.join(map(str, trained))} {'were' if len(trained) > 1 else 'was'} trained on them; re-run with --force to replace "
                             f"it (then 'deme train --force' retrains them), or use another --out")
    write_json(run.ranges_json, result)
    return result


def load_ranges(recipe, run: RunDir) -> list[Range]:
    """The ranges `train` uses: ranges.json when present (written by `split`), else computed now and written."""
    if not run.ranges_json.is_file():
        run_split(recipe, run)
    try:
        d = read_json(run.ranges_json)
        rs = d["ranges"]
        validate_ranges(rs, d["T"])
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"'{run.ranges_json}' is not a valid ranges file; run 'deme split' again with --force") \
            from None
    if len(rs) != recipe.ranges.n:
        raise UsageError(f"'{run.ranges_json}' holds {len(rs)} ranges but the recipe asks for ranges.n = "
                         f"{recipe.ranges.n}; run 'deme split' again")
    return [Range(int(r["index"]), int(r["lo"]), int(r["hi"])) for r in rs]
