"""The objectives of the merge weight search (`merge.objective`): each scores a candidate merge loaded into a model;
lower is better.

All on merge.search_reference, a folder of held-out training images (required; the search refuses eval.reference,
the images `deme eval` reports on):
- kid (default) / fid: generate merge.search_num_images images (default 1,000) with merge.search_steps sampler steps
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
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

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

    def __call__(self, model) -> float:
        from .features import array_features
        from .fid import score_features
        from .model_specs import sample_images

        st = self.setup
        images = sample_images(model, st.base, st.sample, st.data.resolution, st.num_images, steps=st.steps,
                               device=self.device)
        feats = array_features(images, self.extractor, st.eval.mode, st.eval.batch_size, self.device)
        return float(score_features(feats, self.ref, [self.metric], seed=st.seed)[0][self.metric])

    def describe(self) -> dict:
        s = self.setup.sample
        return {"reference": self.ref.describe(), "feature_extractor": self.extractor.info or self.extractor.name,
                "mode": self.setup.eval.mode, "num_images": self.setup.num_images,
                "sampler": {"scheduler": s.scheduler, "steps": self.setup.steps, "eta": s.eta,
                            "seeds": f"{s.seed} + k"}}


OBJECTIVES: dict[str, Callable[..., Any]] = {
    "loss": LossObjective,
    "range_loss": RangeLossObjective,
    "kid": lambda setup, run, inputs: SampleMetricObjective(setup, run, inputs, "kid"),
    "fid": lambda setup, run, inputs: SampleMetricObjective(setup, run, inputs, "fid"),
}
