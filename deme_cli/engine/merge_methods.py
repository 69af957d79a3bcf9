"""Merge methods of `deme merge`: how the N task vectors tau_i = theta_i - theta combine into one (Eq. 8).

Methods are data in `MERGE_METHODS` (mergekit's design: a sparsification of each tau, then a consensus across
ranges), each with its paper's link:
- task_arithmetic: no sparsification, weighted sum. The paper's merge.
- ties: per tensor and per range, keep the `density` fraction of tau's entries with the largest magnitude (at least
  one entry; ties in magnitude broken by torch.topk), scale the trimmed tau by w_i, elect each entry's sign as the
  sign of the sum of the scaled trimmed taus, and take the mean of the scaled entries whose sign agrees with the
  elected one (entries where no range agrees, or the sum is exactly 0, get 0). With one range and density 1 this is
  task arithmetic; with N ranges it averages the agreeing ranges instead of summing them (TIES' "disjoint mean").
- dare: per tensor and per range, drop each entry of tau with probability 1 - density and divide the kept ones by
  density (so E[dropped tau] = tau), then the weighted sum. The random drop of range i, tensor k is seeded by
  (merge.seed, i, k) alone, so the result does not depend on tensor order, on which other ranges take part, or on
  streaming.
- routed: no task vectors at all; merged/ keeps the N range models and routes each call to the one owning t (Eq. 7,
  routed.py). Weights do not apply.
`combine(spec, name, taus)` applies one method to one tensor's (range index, weight, tau) triples; merge.py streams
the tensors through it. `taus` is a function that gives the triples afresh each time it is called: the sum-based
methods read them once, holding one task vector at a time; TIES reads them twice (the sign election, then the mean of
the agreeing entries) rather than hold all N of them, so that merging takes the same memory for any N.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

Pairs = Callable[[], Iterable[tuple[Any, float]]]   # gives the (tau_i, w_i) pairs afresh at each call

from .errors import UsageError


# --- methods -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MergeMethod:
    name: str
    url: str                  # the paper
    summary: str
    sparsify: Optional[str]   # key of SPARSIFIERS, or None: every entry of tau is kept
    consensus: Optional[str]  # key of CONSENSUS; None: no task vectors are combined (routed)
    routed: bool = False      # keeps the N range models and routes each call by t (routed.py), weights do not apply

    @property
    def uses_density(self) -> bool:
        return self.sparsify is not None

    @property
    def uses_seed(self) -> bool:
        return self.sparsify == "random"


# A sparsifier says which entries of tau to keep (a bool mask, or None: all) and what the kept ones are divided by.

def trim_by_magnitude(tau, density: float, generator=None):
    """TIES trim: keep the round(density * numel) entries (at least one) of largest |tau|, zero the others."""
    import torch

    n = tau.numel()
    k = max(1, int(density * n + 0.5)) if n else 0
    if k >= n:
        return None, 1.0
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.topk(tau.abs().reshape(-1), k, sorted=False).indices] = True
    return keep.reshape(tau.shape), 1.0


def drop_and_rescale(tau, density: float, generator=None):
    """DARE: drop each entry with probability 1 - density, divide the kept ones by density."""
    import torch

    if density >= 1.0:
        return None, 1.0
    return torch.rand(tau.shape, generator=generator) < density, density


# Consensus functions overwrite the taus of their pairs only when `inplace` (a streamed merge's own tensors); the
# search's cache passes the same tensors for every candidate.

def weighted_sum(pairs: Pairs, inplace: bool = False) -> Optional[Any]:
    """sum_i w_i tau_i over (tau_i, w_i) pairs (None when no range takes part)."""
    total = None
    for tau, w in pairs():
        if total is None:
            total = tau.mul_(w) if inplace else tau * w
        else:
            total.add_(tau, alpha=w)
        del tau  # one task vector in flight at a time
    return total


def disjoint_mean(pairs: Pairs, inplace: bool = False) -> Optional[Any]:
    """TIES: elect sign(sum_i w_i tau_i) per entry, average the w_i tau_i entries that agree with it. Two passes over
    the pairs, one scaled tau in flight at a time, the elected signs and agreement counts held as small integers;
    sums run over the ranges in order, as a sum over a stack of them would (tests/test_merge.py checks the result
    against that formula)."""
    import torch

    total = None
    for tau, w in pairs():
        scaled = tau.mul_(w) if inplace else tau * w
        total = scaled if total is None else total.add_(scaled)
        del tau, scaled
    if total is None:
        return None
    up, down = total > 0, total < 0           # the elected sign: +1, -1, or none (a sum of exactly 0)
    del total
    mean = count = None
    for tau, w in pairs():
        scaled = tau.mul_(w) if inplace else tau * w
        del tau
        agree = (scaled > 0).logical_and_(up).logical_or_((scaled < 0).logical_and_(down))
        kept = scaled.mul_(agree)
        mean = kept if mean is None else mean.add_(kept)
        count = agree.to(torch.int16) if count is None else count.add_(agree)
        del scaled, kept, agree
    return mean.div_(count.clamp_(min=1))


SPARSIFIERS: dict[str, Callable] = {"magnitude": trim_by_magnitude, "random": drop_and_rescale}
CONSENSUS: dict[str, Callable] = {"sum": weighted_sum, "sign_mean": disjoint_mean}

MERGE_METHODS: dict[str, MergeMethod] = {m.name: m for m in [
    MergeMethod("task_arithmetic", "https://arxiv.org/abs/2212.04089",
                "theta + sum_i w_i tau_i (task arithmetic; DeMe Eq. 8)", None, "sum"),
    MergeMethod("ties", "https://arxiv.org/abs/2306.01708",
                "trim each tau to the top density by magnitude, elect signs, disjoint mean (TIES-merging)",
                "magnitude", "sign_mean"),
    MergeMethod("dare", "https://arxiv.org/abs/2311.03099",
                "drop tau entries with probability 1 - density, rescale by 1/density, weighted sum (DARE)",
                "random", "sum"),
    MergeMethod("routed", "https://arxiv.org/abs/2410.06664",
                "no weights: the N range models kept as one model that routes each call to the range model owning t "
                "(the timestep-wise ensemble, DeMe Eq. 7)", None, None, routed=True),
]}


def get_method(name: str) -> MergeMethod:
    try:
        return MERGE_METHODS[name]
    except KeyError:
        raise UsageError(f"unknown merge method '{name}' (known: {', '.join(MERGE_METHODS)})") from None


@dataclass(frozen=True)
class MergeSpec:
    """How to combine the task vectors (weights excluded): merge.method, merge.density, merge.seed."""
    method: str
    density: float         # ties: fraction kept by magnitude; dare: keep probability
    seed: int              # dare

    @classmethod
    def from_section(cls, merge) -> "MergeSpec":
        """The spec of a recipe's [merge] section."""
        return cls(merge.method, merge.density, merge.seed)

    def describe(self) -> dict:
        m = get_method(self.method)
        d: dict = {"method": m.name, "method_url": m.url}
        if m.uses_density:
            d["density"] = self.density
        if m.uses_seed:
            d["seed"] = self.seed
        return d


def tensor_seed(seed: int, range_index: int, name: str) -> int:
    """The seed of range `range_index`'s random drop on tensor `name` (independent of order and of other ranges)."""
    digest = hashlib.sha256(f"{seed}/{range_index}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def sparsify(spec: MergeSpec, name: str, index: int, tau, masks: Optional[dict] = None):
    """tau of range `index`, tensor `name`, after the method's sparsification (TIES trim, DARE drop; else as is),
    computed in place: tau is overwritten. `masks`: the sparsifications found so far for this tensor, by range (a
    second pass over the ranges reuses them rather than trim again)."""
    import torch

    method = get_method(spec.method)
    if method.sparsify is None:
        return tau
    if masks is not None and index in masks:
        keep, divisor = masks[index]
    else:
        gen = torch.Generator().manual_seed(tensor_seed(spec.seed, index, name)) if method.uses_seed else None
        keep, divisor = SPARSIFIERS[method.sparsify](tau, spec.density, gen)
        if masks is not None:
            masks[index] = keep, divisor
    if keep is not None:
        tau.mul_(keep)
    return tau if divisor == 1.0 else tau.div_(divisor)


def consensus(spec: MergeSpec, pairs: Pairs, inplace: bool = False):
    """The merged delta from (sparsified tau_i, w_i) pairs (`pairs()` gives them; `inplace`: tensors it may
    overwrite); None when none takes part."""
    return CONSENSUS[get_method(spec.method).consensus](pairs, inplace)


def combine(spec: MergeSpec, name: str, taus: Callable[[], Iterable[tuple[int, float, Any]]]):
    """The merged delta of one tensor from (range index, weight, tau) triples (`taus()` gives them afresh, each tau a
    tensor of the caller's that sparsifying may overwrite); None when none takes part."""
    masks: dict = {}            # each range's trim or drop (a bool per entry), found once even if read twice

    def sparsified():
        for index, w, tau in taus():
            tau = sparsify(spec, name, index, tau, masks)
            yield tau, w
            del tau
    return consensus(spec, sparsified, inplace=True)
