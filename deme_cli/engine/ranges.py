"""Timestep ranges and the timestep sampler (paper section 3.2, Eq. 6). Pure functions.

A range is half-open, [lo, hi). Ranges from a split are contiguous and cover [0, T) exactly.
Split strategies live in `SPLIT_STRATEGIES`; each takes (T, n, **evidence) and returns (ranges, info) where info
is recorded in ranges.json.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .errors import UsageError


@dataclass(frozen=True)
class Range:
    index: int
    lo: int
    hi: int

    def as_dict(self) -> dict:
        return {"index": self.index, "lo": self.lo, "hi": self.hi}


def check_n(n: int, T: int) -> None:
    if n < 1 or n > T:
        raise UsageError(f"ranges.n must be between 1 and T = {T} (the model's num_train_timesteps), got {n}")


def ranges_from_bounds(bounds: list[int]) -> list[Range]:
    """[0, b1, ..., T] -> contiguous ranges."""
    return [Range(i, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def uniform_split(T: int, n: int, **_) -> tuple[list[Range], dict]:
    """The paper's split: N equal ranges ((i-1)T/N, iT/N), rounded down to integers."""
    check_n(n, T)
    bounds = [(i * T) // n for i in range(n + 1)]
    return ranges_from_bounds(bounds), {}


def snr_split(T: int, n: int, *, alphas_cumprod=None, **_) -> tuple[list[Range], dict]:
    """N contiguous ranges that share the log-SNR span equally (our extension; cf. ANT's SNR-based intervals).

    log SNR_t = log(abar_t / (1 - abar_t)) falls from lambda_0 (t = 0) to lambda_{T-1}. With the levels
    L_i = lambda_0 - i (lambda_0 - lambda_{T-1}) / N, boundary b_i is the number of timesteps with lambda_t > L_i, i.e.
    the first t with lambda_t <= L_i; range i = [b_i, b_{i+1}) holds the timesteps whose log-SNR lies in
    (L_{i+1}, L_i]. A boundary that would leave a range empty is pushed forward (near T: back) just enough to keep
    every range non-empty. `alphas_cumprod` (length T) comes from the pipeline's scheduler (see splitting.split_evidence).
    """
    import numpy as np

    check_n(n, T)
    if alphas_cumprod is None or len(alphas_cumprod) != T:
        raise UsageError(f"the snr split needs the noise schedule's alphas_cumprod for all T = {T} timesteps")
    abar = np.clip(np.asarray(alphas_cumprod, dtype=np.float64), 1e-20, 1 - 1e-16)
    lam = np.log(abar) - np.log1p(-abar)
    if np.any(np.diff(lam) > 1e-9):
        raise UsageError("the scheduler's log-SNR does not fall monotonically with t, so 'snr' cannot split it; use "
                         "another ranges.strategy")
    levels = lam[0] - np.arange(1, n) * (lam[0] - lam[-1]) / n
    bounds = [0] + [int(np.sum(lam > level)) for level in levels] + [T]
    for i in range(1, n):                        # keep every range non-empty (steep or flat schedule ends)
        bounds[i] = min(max(bounds[i], bounds[i - 1] + 1), T - (n - i))
    ranges = ranges_from_bounds(bounds)
    span = [float(lam[r.lo] - (lam[r.hi] if r.hi < T else lam[-1])) for r in ranges]
    return ranges, {"rule": "equal log-SNR span: boundary i is the first t with log SNR_t <= "
                            "logSNR_0 - i (logSNR_0 - logSNR_{T-1}) / N",
                    "log_snr_first": float(lam[0]), "log_snr_last": float(lam[-1]),
                    "log_snr_at_bounds": [float(lam[b]) for b in bounds[:-1]] + [float(lam[-1])],
                    "log_snr_span_per_range": span}


# --- affinity: contiguous clustering of the gradient-similarity matrix --------------------------------------------

def interval_scores(matrix):
    """W[a, b] = (1 / (b - a)) * sum_{i, j in [a, b)} S[i, j] for 0 <= a < b <= B (diagonal included), else -inf.

    For a cosine matrix S = U U^T of unit gradient directions u_i, sum over ranges of W equals
    B - (within-range scatter sum_i ||u_i - mean of its range||^2): maximising it is k-means on the gradient
    directions, restricted to contiguous ranges. (The plain sum of similarities would favour one huge range, the
    plain mean would favour single-bin ranges.)
    """
    import numpy as np

    S = np.asarray(matrix, dtype=np.float64)
    B = len(S)
    P = np.zeros((B + 1, B + 1))
    P[1:, 1:] = S.cumsum(0).cumsum(1)
    a, b = np.meshgrid(np.arange(B + 1), np.arange(B + 1), indexing="ij")
    block = P[b, b] - P[a, b] - P[b, a] + P[a, a]           # sum of S[a:b, a:b]
    with np.errstate(divide="ignore", invalid="ignore"):
        W = np.where(b > a, block / np.maximum(b - a, 1), -np.inf)
    return W


def contiguous_clusters(matrix, n: int) -> tuple[list[int], float]:
    """Cut bins [0, B) into n contiguous ranges maximising sum of interval_scores (dynamic programming, exact).

    Returns the cut positions [0, c_1, ..., B] (bin indices) and the objective. O(n B^2); ties go to the earliest
    cut.
    """
    import numpy as np

    W = interval_scores(matrix)
    B = len(W) - 1
    if not 1 <= n <= B:
        raise ValueError(f"cannot cut {B} bins into {n} ranges")
    best = np.full((n + 1, B + 1), -np.inf)          # best[j, b]: j ranges covering bins [0, b)
    arg = np.zeros((n + 1, B + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for j in range(1, n + 1):
        for b in range(j, B + 1):
            cand = best[j - 1, :b] + W[:b, b]
            arg[j, b] = int(np.argmax(cand))
            best[j, b] = cand[arg[j, b]]
    cuts = [B]
    for j in range(n, 0, -1):
        cuts.append(int(arg[j, cuts[-1]]))
    return cuts[::-1], float(best[n, B])


def affinity_split(T: int, n: int, *, matrix=None, edges=None, source: Optional[dict] = None,
                   **_) -> tuple[list[Range], dict]:
    """N contiguous ranges that keep similar timesteps together (our extension; cf. ANT's interval clustering).

    `matrix` is the B x B gradient cosine-similarity matrix of `deme analyze-gradients`, bin i covering timesteps
    [edges[i], edges[i+1]). The bins are cut by contiguous_clusters (objective: see interval_scores) and each cut
    at bin c becomes the range boundary edges[c].
    """
    import numpy as np

    check_n(n, T)
    if matrix is None or edges is None:
        raise UsageError("the affinity split needs a gradient matrix; run `deme analyze-gradients` first or set "
                         "ranges.matrix")
    S, e = np.asarray(matrix, dtype=np.float64), np.asarray(edges, dtype=np.int64)
    B = len(S)
    if int(e[0]) != 0 or int(e[-1]) != T:
        raise UsageError(f"the gradient matrix covers [{int(e[0])}, {int(e[-1])}) but the model has T = {T}; run "
                         f"`deme analyze-gradients` again for this model")
    if n > B:
        raise UsageError(f"ranges.n = {n} is more than the {B} bins of the gradient matrix; run `deme "
                         f"analyze-gradients` with --bins of at least {n}")
    cuts, objective = contiguous_clusters(S, n)
    W = interval_scores(S)
    uniform_cuts = [(i * B) // n for i in range(n + 1)]

    def mean_within(a: int, b: int):
        return float((S[a:b, a:b].sum() - (b - a)) / ((b - a) * (b - a - 1))) if b - a > 1 else None

    info = {"objective": objective,
            "objective_rule": "maximise sum over ranges of (1/|r|) sum_{i,j in r} S_ij over the bins (diagonal "
                              "included): k-means on the gradient directions, contiguous ranges, exact DP",
            "objective_uniform_bins": float(sum(W[a, b] for a, b in zip(uniform_cuts, uniform_cuts[1:]))),
            "bins": B, "cuts_in_bins": cuts, "edges": [int(x) for x in e],
            "mean_similarity_within": [mean_within(a, b) for a, b in zip(cuts, cuts[1:])]}
    return ranges_from_bounds([int(e[c]) for c in cuts]), {**(source or {}), **info}


SPLIT_STRATEGIES: dict[str, Callable[..., tuple[list[Range], dict]]] = {
    "uniform": uniform_split,
    "snr": snr_split,
    "affinity": affinity_split,
}


def split(strategy: str, T: int, n: int, **evidence) -> tuple[list[Range], dict]:
    try:
        fn = SPLIT_STRATEGIES[strategy]
    except KeyError:
        raise UsageError(f"unknown split strategy '{strategy}' (known: {', '.join(SPLIT_STRATEGIES)})") from None
    ranges, info = fn(T, n, **evidence)
    validate_ranges([r.as_dict() for r in ranges], T)
    return ranges, info


def validate_ranges(ranges: list[dict], T: int) -> None:
    if not ranges or ranges[0]["lo"] != 0 or ranges[-1]["hi"] != T:
        raise UsageError(f"ranges must start at 0 and end at T = {T}")
    for a, b in zip(ranges, ranges[1:]):
        if a["hi"] != b["lo"]:
            raise UsageError("ranges must be contiguous")
    if any(r["hi"] <= r["lo"] for r in ranges):
        raise UsageError("every range must hold at least one timestep")


# --- the timestep sampler ---------------------------------------------------------------------------------------

def sample_timesteps(batch: int, lo: int, hi: int, T: int, p: float, *, per_sample: bool = False,
                     antithetic: bool = True, generator=None, device=None):
    """Draw `batch` training timesteps for range [lo, hi) (Eq. 6).

    With probability p a timestep comes from all of [0, T), otherwise from [lo, hi). `per_sample=False` flips the
    coin once for the whole micro-batch (the release); `per_sample=True` flips it per sample. With `antithetic`, the
    first ceil(batch/2) draws u are followed by their mirrors a + b - 1 - u in the same interval [a, b) (the release),
    truncated to `batch`. Returns an int64 tensor on `device`.
    """
    import torch

    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if not 0 <= lo < hi <= T:
        raise ValueError(f"bad range [{lo}, {hi}) for T = {T}")
    gen_device = generator.device if generator is not None else device
    kw = dict(generator=generator, device=gen_device)
    half = (batch + 1) // 2 if antithetic else batch
    n_coins = half if per_sample else 1
    coin = torch.rand(n_coins, **kw) < p                          # True: global draw
    a = torch.where(coin, torch.zeros_like(coin, dtype=torch.long), torch.full_like(coin, lo, dtype=torch.long))
    b = torch.where(coin, torch.full_like(coin, T, dtype=torch.long), torch.full_like(coin, hi, dtype=torch.long))
    a, b = a.expand(half), b.expand(half)
    u = torch.rand(half, **kw)
    t = a + (u * (b - a).to(u.dtype)).long().clamp_max(b - a - 1)
    if antithetic:
        t = torch.cat([t, a + b - 1 - t])[:batch]
    return t.to(device) if device is not None else t
