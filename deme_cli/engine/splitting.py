"""The N timestep ranges of a run: computed by the `[ranges]` strategy (with the evidence it needs: the noise
schedule for `snr`, the gradient matrix for `affinity`), written to ranges.json, read back by every later stage."""
from __future__ import annotations

from pathlib import Path

from .errors import UsageError
from .ranges import Range, split, validate_ranges
from .runs import RunDir, read_json, write_json


def _schedule(base, ranges, run: RunDir) -> dict:
    """snr: alphas_cumprod of the pipeline's noise schedule."""
    return {"alphas_cumprod": base.noise_scheduler().alphas_cumprod.double().tolist()}


def gradient_matrix_file(ranges, run: RunDir) -> Path:
    """ranges.matrix if set, else the run's analysis/gradients.npz."""
    from .gradients import NPZ_FILE

    return Path(ranges.matrix).expanduser() if ranges.matrix else run.analysis / NPZ_FILE


def _gradient_matrix(base, ranges, run: RunDir) -> dict:
    """affinity: the matrix, its bin edges, and where it came from (recorded in ranges.json)."""
    import hashlib

    from .gradients import load_matrix

    f = gradient_matrix_file(ranges, run)
    if not f.is_file():
        raise UsageError(f"no gradient matrix at '{f}'; run `deme analyze-gradients` first or set ranges.matrix")
    m = load_matrix(f)
    s = m["settings"]
    source = {"matrix_file": str(f.resolve()), "matrix_sha256": hashlib.sha256(f.read_bytes()).hexdigest()[:16],
              **{k: s[k] for k in ("model_hash", "params", "method", "sketch_dim", "batch_size") if k in s}}
    return {"matrix": m["matrix"], "edges": m["edges"], "source": source}


EVIDENCE = {                     # strategy -> what it needs beyond (T, n)
    "uniform": lambda base, ranges, run: {},
    "snr": _schedule,
    "affinity": _gradient_matrix,
}


def split_evidence(base, ranges, run: RunDir) -> dict:
    """Extra inputs the strategy needs (the gradient matrix for `affinity`, the noise schedule for `snr`)."""
    provide = EVIDENCE.get(ranges.strategy)
    return provide(base, ranges, run) if provide is not None else {}


def compute_ranges(base, ranges, run: RunDir) -> dict:
    """What ranges.json holds: the strategy, T, the ranges (and the strategy's evidence)."""
    rs, info = split(ranges.strategy, base.T, ranges.n, **split_evidence(base, ranges, run))
    return {"strategy": ranges.strategy, "T": base.T, "n": len(rs), "ranges": [r.as_dict() for r in rs],
            **({"evidence": info} if info else {})}


def trained_on(run: RunDir) -> list[int]:
    """Indices of the ranges with a checkpoint or a final model in the run."""
    root = run.root / "ranges"
    if not root.is_dir():
        return []
    return sorted(int(d.name) for d in root.iterdir() if d.name.isdigit()
                  and ((d / "final").is_dir() or (d / "final-raw").is_dir() or (d / "checkpoints").is_dir()))


def load_ranges(base, ranges, run: RunDir) -> list[Range]:
    """The ranges every stage uses: ranges.json when present (written by `split`), else computed now and written."""
    if not run.ranges_json.is_file():
        write_json(run.ranges_json, compute_ranges(base, ranges, run))
    try:
        d = read_json(run.ranges_json)
        rs = d["ranges"]
        validate_ranges(rs, d["T"])
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"'{run.ranges_json}' is not a valid ranges file; run 'deme split' again with --force") \
            from None
    if len(rs) != ranges.n:
        raise UsageError(f"'{run.ranges_json}' holds {len(rs)} ranges but the recipe asks for ranges.n = "
                         f"{ranges.n}; run 'deme split' again")
    return [Range(int(r["index"]), int(r["lo"]), int(r["hi"])) for r in rs]
