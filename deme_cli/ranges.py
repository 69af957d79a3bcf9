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


SPLIT_STRATEGIES: dict[str, Callable[..., tuple[list[Range], dict]]] = {
    "uniform": uniform_split,
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


def range_owning(t: int, ranges: list[Range]) -> Range:
    """The range whose [lo, hi) holds t (the ensemble's routing, Eq. 7)."""
    for r in ranges:
        if r.lo <= t < r.hi:
            return r
    raise ValueError(f"timestep {t} is outside all ranges")


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
