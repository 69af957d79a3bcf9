"""`deme split`: compute the N ranges of a recipe and write ranges.json; read them back for `train`."""
from __future__ import annotations

from pathlib import Path

from .errors import UsageError
from .models import num_train_timesteps, resolve_pretrained
from .ranges import Range, split, validate_ranges
from .runs import RunDir, read_json, write_json


def split_evidence(recipe, run: RunDir, T: int) -> dict:
    """Extra inputs a strategy needs (e.g. the gradient matrix for `affinity`, the noise schedule for `snr`)."""
    return {"recipe": recipe, "run": run}


def run_split(recipe, run: RunDir) -> dict:
    pipeline_dir = resolve_pretrained(recipe.model.pretrained, recipe.model.revision)
    T = num_train_timesteps(pipeline_dir)
    ranges, info = split(recipe.ranges.strategy, T, recipe.ranges.n, **split_evidence(recipe, run, T))
    result = {"strategy": recipe.ranges.strategy, "T": T, "n": len(ranges),
              "ranges": [r.as_dict() for r in ranges], **({"evidence": info} if info else {})}
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
