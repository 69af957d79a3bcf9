"""`deme split`: cut [0, T) into the recipe's N timestep ranges and write ranges.json (engine: splitting.py)."""
from __future__ import annotations

from ..engine.base import Base, resolve_base
from ..engine.errors import UsageError
from ..engine.recipe import RangesSection, stage_kwargs
from ..engine.runs import RunDir, read_json, write_json
from ..engine.splitting import compute_ranges, trained_on


def run_split(recipe, run: RunDir, force: bool = False) -> dict:
    """`deme split RECIPE`: the stage for a recipe."""
    return split_ranges(resolve_base(recipe.model), run, force=force, **stage_kwargs(split_ranges, recipe))


def split_ranges(base: Base, run: RunDir, *, ranges: RangesSection, force: bool = False) -> dict:
    """Compute the ranges and write ranges.json. A ranges.json with other ranges that range models were trained on is
    not replaced without `force` (the models would no longer match it)."""
    result = compute_ranges(base, ranges, run)
    T = base.T
    if run.ranges_json.is_file() and not force:
        try:
            old = read_json(run.ranges_json)
            same = old.get("T") == T and old.get("ranges") == result["ranges"]
        except (ValueError, AttributeError):
            same = False
        trained = trained_on(run)
        if not same and trained:
            many = len(trained) > 1
            raise UsageError(f"'{run.ranges_json}' holds other ranges, and range{'s' if many else ''} "
                             f"{', '.join(map(str, trained))} {'were' if many else 'was'} trained on them; re-run with "
                             f"--force to replace it (then 'deme train --force' retrains them), or use another --out")
    write_json(run.ranges_json, result)
    return result
