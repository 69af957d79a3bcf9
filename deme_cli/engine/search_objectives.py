"""The objectives of the merge weight search (`merge.objective`): each scores a candidate merge loaded into a model;
lower is better.

All on merge.search_reference, a folder of held-out training images (required; the search refuses eval.reference,
the images `deme eval` reports on):
- fid (default) / kid: generate merge.search_num_images images (default 1,000) with merge.search_steps sampler steps
  (default: sample.steps, the eval's sampler; the recipe's [sample] scheduler, seeds sample.seed + k) and score them
  against the reference with eval's feature extractor. What FID measures, at a size where KID ranks merges.
- loss: held-out denoising loss. merge.search_num_images images evenly spaced through the folder, fixed noise
  (merge.seed), fixed timesteps spread over [0, T) (t_k = floor((k + 1/2) T / n)); the score is the mean squared error
  of the prediction (the loss `train` computes, without the consistency term). Dominated by the low-t ranges: an
  epsilon-prediction's error is ~150x larger at small t (in-range losses 0.13, 0.025, 0.006, 0.0013 in the
  Fashion-MNIST benchmark), so it mostly weighs how the merge does there.
- range_loss: the same held-out losses, grouped by the timestep range each t_k falls in; the score is the mean over
  ranges of (candidate's loss in range r) / (theta's loss in range r), so theta scores 1 and every range counts
  equally.
- loss_by_t: the loss by timestep of `deme eval` (loss_by_t.py) on merge.search_reference: merge.search_num_images
  images, image k with one fixed noise draw and a timestep uniform in bin k mod eval.loss_bins (both seeded by
  eval.loss_seed); each bin's mean loss as a ratio to theta's; the score is the mean of the per-bin ratios (theta
  scores 1). A plain mean is NOT a proxy for FID: in the Fashion-MNIST benchmark the merge (0, 0, 0.5, 1) had the best
  mean (0.9945: a 4% gain at t >= 900) and the worst FID (+0.31), because it lost 0.1-0.2% at t < 500; FID punishes
  a small loss at low noise far more than it rewards a large gain at high noise. Hence two variants:
- loss_by_t_guarded: the same mean, but a candidate with a bin more than merge.bin_tolerance worse than theta
  (ratio > 1 + tolerance) scores its worst bin's ratio instead, so it ranks below theta and below every candidate
  that keeps every bin within the tolerance.
- loss_by_t_weighted: the per-bin ratios averaged with merge.bin_weights (one per bin, e.g. fitted to FID on one
  seed of a benchmark: benchmarks/fashion-mnist/objectives.py).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .errors import UsageError


@dataclass(frozen=True)
class SearchSetup:
    """What the weight search reads from the recipe, by name (it is pickled to the search's worker processes)."""

    base: Any                  # base.Base: theta, its noise schedule, its kind, the device
    merge: Any                 # [merge]: objective, search_reference, search_num_images, search_steps, seed, ...
    sample: Any                # [sample]: the sampler of the kid/fid objectives
    eval: Any                  # [eval]: the feature extractor and mode of the kid/fid objectives
    data: Any                  # [data]: how a text-to-image reference folder is read (loss objectives)
    batch_size: int            # train.batch_size: images per forward pass of the loss objectives
    seed: int                  # the recipe's seed: KID's subsets

    @classmethod
    def from_sections(cls, base, *, merge, sample, eval, data, train, seed: int) -> "SearchSetup":
        """The setup of the merge stage: its base computing in sample.precision, and train.batch_size."""
        return cls(base.with_precision(sample.precision), merge, sample, eval, data, train.batch_size, seed)

    @property
    def num_images(self) -> int:
        return self.merge.search_num_images

    @property
    def steps(self) -> int:
        return self.merge.search_sampler_steps(self.sample)


def _same_folder(a: Optional[str], b: Optional[str]) -> bool:
    if not a or not b:
        return False
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return a == b


class LossObjective:
    """Held-out denoising loss of a candidate: fixed images, noise and timesteps (heldout.py; see the module
    docstring)."""

    name = "loss"

    def __init__(self, setup: SearchSetup, run, inputs):
        from .heldout import load_heldout, spread_timesteps

        m = setup.merge
        self.device = setup.base.device
        self.held = load_heldout(setup.base, setup.data, m.search_reference, inputs.base_unet, self.device,
                                 num_images=setup.num_images, seed=m.seed, timesteps=spread_timesteps,
                                 timesteps_rule="t_k = floor((k + 1/2) T / n)", batch_size=setup.batch_size,
                                 what="merge.search_reference", cache_dir=run.cache)
        self.n, self.seed, self.indices = self.held.n, m.seed, self.held.indices

    def losses(self, model):
        """The n per-image denoising losses (mean squared error of the prediction), in search order, on the CPU."""
        from .heldout import model_predict, per_image_losses

        return per_image_losses(model_predict(model), self.held)

    def __call__(self, model) -> float:
        return float(self.losses(model).mean())

    def describe(self) -> dict:
        return {**self.held.describe(), "image_indices": self.indices}


class RangeLossObjective(LossObjective):
    """range_loss: the held-out losses grouped by timestep range, each range's mean divided by theta's (from
    set_baseline, which candidate_evaluator calls with theta loaded), averaged over ranges."""

    name = "range_loss"

    def __init__(self, setup: SearchSetup, run, inputs):
        super().__init__(setup, run, inputs)
        self.baseline = None
        bounds = [((r.meta.get("range") or {}).get("lo"), (r.meta.get("range") or {}).get("hi"))
                  for r in inputs.ranges]
        if any(lo is None or hi is None for lo, hi in bounds):
            raise UsageError("merge.objective = \"range_loss\" needs each range model's timestep range in its "
                             "deme.json; retrain the ranges with this version or use merge.objective = \"loss\"")
        t_all = self.held.t
        self.groups = [((t_all >= lo) & (t_all < hi)).nonzero().flatten() for lo, hi in bounds]
        self.bounds = [[int(lo), int(hi)] for lo, hi in bounds]
        empty = [i for i, g in enumerate(self.groups) if len(g) == 0]
        if empty:
            raise UsageError(f"merge.search_num_images = {self.n} leaves range {empty[0]} without a search timestep; "
                             f"use at least {len(bounds)} images")

    def range_losses(self, model) -> list[float]:
        per_image = self.losses(model)
        return [float(per_image[g].mean()) for g in self.groups]

    def set_baseline(self, model) -> None:
        """theta's loss per range: the denominators."""
        self.baseline = self.range_losses(model)

    def __call__(self, model) -> float:
        if self.baseline is None:
            raise RuntimeError("range_loss needs theta's losses first (set_baseline)")
        return sum(c / b for c, b in zip(self.range_losses(model), self.baseline)) / len(self.baseline)

    def describe(self) -> dict:
        return {**super().describe(), "score": "mean over ranges of candidate loss / theta loss",
                "ranges": self.bounds, "timesteps_per_range": [len(g) for g in self.groups],
                "theta_range_losses": None if self.baseline is None else [round(b, 6) for b in self.baseline]}


class SampleMetricObjective:
    """KID or FID of merge.search_num_images images sampled with merge.search_steps steps against a held-out
    reference (merge.search_reference: an image folder, or a statistics .npz for FID), with eval's feature extractor
    and mode. The reference features are computed once (and cached like eval's, under <run>/eval/cache)."""

    def __init__(self, setup: SearchSetup, run, inputs, metric: str):
        from .features import load_extractor
        from .fid import load_reference

        m, ev = setup.merge, setup.eval
        if setup.base.kind.conditional:
            raise UsageError(f"merge.objective = '{metric}' samples unconditional models only; use merge.objective = "
                             f"\"loss\" for text-to-image models")
        self.setup, self.metric, self.device = setup, metric, setup.base.device
        self.extractor = load_extractor(ev.feature_extractor, ev.mode, self.device)
        size = inputs.base_unet.config.sample_size
        self.ref = load_reference(m.search_reference, self.extractor, ev.mode,
                                  res=int(size if isinstance(size, int) else size[0]), split=ev.reference_split,
                                  batch_size=ev.batch_size, device=self.device, cache_dir=run.root / "eval" / "cache",
                                  want_feats=metric == "kid")
        if metric == "kid" and self.ref.feats is None:
            raise UsageError(f"KID needs reference features but merge.search_reference '{m.search_reference}' holds "
                             f"statistics only; point it at an image folder or use merge.objective = \"fid\"")

    def samples(self, model):
        """The candidate's merge.search_num_images uint8 images: the recipe's sampler, merge.search_steps steps,
        image k from seed sample.seed + k."""
        from .model_specs import sample_images

        st = self.setup
        return sample_images(model, st.base, st.sample, st.data.resolution, st.num_images, steps=st.steps,
                             device=self.device)

    def features(self, images):
        from .features import array_features

        return array_features(images, self.extractor, self.setup.eval.mode, self.setup.eval.batch_size, self.device)

    def score_features(self, feats) -> float:
        """The metric of these features against the reference's (KID's subsets drawn with the recipe's seed)."""
        from .fid import score_features

        return float(score_features(feats, self.ref, [self.metric], seed=self.setup.seed)[0][self.metric])

    def __call__(self, model) -> float:
        return self.score_features(self.features(self.samples(model)))

    def describe(self) -> dict:
        s = self.setup.sample
        return {"reference": self.ref.describe(), "feature_extractor": self.extractor.info or self.extractor.name,
                "mode": self.setup.eval.mode, "num_images": self.setup.num_images,
                "sampler": {"scheduler": s.scheduler, "steps": self.setup.steps, "eta": s.eta,
                            "seeds": f"{s.seed} + k"}}


# --- the loss by timestep ------------------------------------------------------------------------------------------

def _mean(ratios: Sequence[float], merge) -> float:
    return sum(ratios) / len(ratios)


def _guarded(ratios: Sequence[float], merge) -> float:
    # a rejected candidate scores max(ratios) > 1 + tolerance >= the mean of any accepted one, and theta scores 1
    worst = max(ratios)
    return worst if worst > 1.0 + merge.bin_tolerance else _mean(ratios, merge)


def _weighted(ratios: Sequence[float], merge) -> float:
    w = merge.bin_weights
    return sum(a * b for a, b in zip(w, ratios)) / sum(w)


def _check_weights(merge, bins: int) -> None:
    if merge.bin_weights is None:
        raise UsageError("merge.objective = \"loss_by_t_weighted\" needs merge.bin_weights, one weight per "
                         "eval.loss_bins bin (low t first); set them, or use merge.objective = \"loss_by_t_guarded\"")
    if len(merge.bin_weights) != bins:
        raise UsageError(f"merge.bin_weights has {len(merge.bin_weights)} weights but eval.loss_bins = {bins}; give "
                         f"one weight per bin, low t first")


@dataclass(frozen=True)
class BinScore:
    """How the loss-by-timestep objectives turn a candidate's per-bin ratios to theta into one score."""
    name: str
    score: Callable[[Sequence[float], Any], float]   # (ratios, [merge]) -> score, lower is better
    rule: str                                        # for the search log
    keys: tuple = ()                                 # the [merge] keys it reads (part of the search's fingerprint)
    check: Callable[[Any, int], None] = lambda merge, bins: None   # ([merge], bins): UsageError for bad settings


BIN_SCORES: dict[str, BinScore] = {b.name: b for b in [
    BinScore("loss_by_t", _mean, "mean over bins of candidate loss / theta loss"),
    BinScore("loss_by_t_guarded", _guarded, "mean over bins of candidate loss / theta loss; if a bin's ratio exceeds "
             "1 + merge.bin_tolerance, the largest ratio instead", ("bin_tolerance",)),
    BinScore("loss_by_t_weighted", _weighted, "mean over bins of candidate loss / theta loss, weighted by "
             "merge.bin_weights", ("bin_weights",), _check_weights),
]}


class LossByTObjective:
    """The loss by timestep on merge.search_reference, each bin as a ratio to theta's (from set_baseline, which
    candidate_evaluator calls with theta loaded), reduced to one score by a BinScore (see the module docstring)."""

    def __init__(self, setup: SearchSetup, run, inputs, score: BinScore):
        from .heldout import load_binned

        m, e = setup.merge, setup.eval
        score.check(m, e.loss_bins)
        self.merge, self.bin_score, self.name = m, score, score.name
        self.device = setup.base.device
        self.held, self.edges, self.counts = load_binned(
            setup.base, setup.data, m.search_reference, inputs.base_unet, self.device, bins=e.loss_bins,
            seed=e.loss_seed, num_images=setup.num_images, batch_size=setup.batch_size,
            what="merge.search_reference", images_key="merge.search_num_images", cache_dir=run.cache)
        self.baseline = None

    def bin_losses(self, model) -> list[float]:
        from .heldout import bin_losses, model_predict

        return bin_losses(model_predict(model), self.held, self.edges)

    def set_baseline(self, model) -> None:
        """theta's loss per bin: the denominators."""
        self.baseline = self.bin_losses(model)

    def bin_ratios(self, model) -> list[float]:
        """The candidate's loss in each bin / theta's."""
        if self.baseline is None:
            raise RuntimeError(f"{self.name} needs theta's losses first (set_baseline)")
        return [c / b for c, b in zip(self.bin_losses(model), self.baseline)]

    def score_ratios(self, ratios: Sequence[float]) -> float:
        return float(self.bin_score.score(ratios, self.merge))

    def __call__(self, model) -> float:
        return self.score_ratios(self.bin_ratios(model))

    def describe(self) -> dict:
        return {**self.held.describe(), "score": self.bin_score.rule, "bins": [list(b) for b in self.edges],
                "images_per_bin": self.counts, **{k: getattr(self.merge, k) for k in self.bin_score.keys},
                "theta_bin_losses": None if self.baseline is None else [round(b, 8) for b in self.baseline]}


OBJECTIVES: dict[str, Callable[..., Any]] = {
    "loss": LossObjective,
    "range_loss": RangeLossObjective,
    "kid": lambda setup, run, inputs: SampleMetricObjective(setup, run, inputs, "kid"),
    "fid": lambda setup, run, inputs: SampleMetricObjective(setup, run, inputs, "fid"),
    **{name: functools.partial(LossByTObjective, score=b) for name, b in BIN_SCORES.items()},
}
SAMPLE_OBJECTIVES = ("kid", "fid")      # score samples of the candidate; the others score held-out losses


def check_objective(setup: SearchSetup) -> None:
    """The objective's own settings, checked before any work (merge.bin_weights against eval.loss_bins)."""
    score = BIN_SCORES.get(setup.merge.objective)
    if score is not None:
        score.check(setup.merge, setup.eval.loss_bins)


def objective_settings(setup: SearchSetup) -> dict:
    """What the objective's scores depend on besides the images, their number and merge.seed (part of the merge
    fingerprint)."""
    m = setup.merge
    if m.objective in SAMPLE_OBJECTIVES:
        return {"steps": setup.steps,
                "sample": {k: v for k, v in setup.sample.model_dump().items()
                           if k in ("scheduler", "eta", "seed", "precision")},
                "eval": {k: v for k, v in setup.eval.model_dump().items() if k in ("mode", "feature_extractor")},
                "kid_seed": setup.seed}
    out = {"data": setup.data.model_dump(), "batch_size": setup.batch_size}
    score = BIN_SCORES.get(m.objective)
    if score is not None:
        out.update(loss_bins=setup.eval.loss_bins, loss_seed=setup.eval.loss_seed,
                   **{k: getattr(m, k) for k in score.keys})
    return out
