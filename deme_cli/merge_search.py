"""`deme merge --search`: find the merge weights w_i by scoring candidate merges with a cheap proxy.

The paper says only "grid search" (section 3.3); which grid, which metric and how many samples are not given
(paper-spec section 6, item 6). Here each candidate weight vector is merged in memory and scored by an objective;
lower is better. For speed, theta and every range's (sparsified) task vector are held on the objective's device in
float32 (`merge.CandidateMerger`, about N + 1 models of memory; when that does not fit, each candidate is streamed from
disk with `merge.load_merged_into`, as `merged/` is written). Every candidate and its score goes into merge.json's
"search" log; the best one is written as merged/ by the exact streaming path.

Strategies (`merge.search`), over the values in `merge.candidates` for each of the N weights:
- grid: every combination, |candidates|^N merges (the paper's).
- coordinate: coordinate descent from the given weights (`--weights` / merge.weights, else 1/N each): sweep each
  weight over the candidates with the others fixed and keep the best, until a round brings no improvement (at most
  3 rounds). About 3 * N * |candidates| merges, and it can stop in a local optimum.
- greedy: model soups' greedy recipe (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482) for weights: score theta
  (all weights 0); give each range alone its best non-zero candidate; then, in order of those solo scores, add each
  range at its value if that improves the score of the merge so far. 1 + N * |candidates| + N merges.

Objectives (`merge.objective`):
- loss: held-out denoising loss. merge.search_num_images fixed images (from merge.search_reference when set, else the
  training data, evenly spaced through it), fixed noise (merge.seed), fixed timesteps spread over [0, T)
  (t_k = floor((k + 1/2) T / n)); the score is the mean squared error of the prediction (the same loss `train`
  computes, without the consistency term).
- range_loss: the same held-out losses, grouped by the timestep range each t_k falls in; the score is the mean over
  ranges of (candidate's loss in range r) / (theta's loss in range r), so theta scores 1 and every range counts
  equally. The plain loss is dominated by the low-t ranges (an epsilon-prediction's error is largest there: in-range
  losses 0.13, 0.025, 0.006, 0.0013 in the Fashion-MNIST benchmark), so it mostly weighs how the merge does there.
- kid / fid: generate merge.search_num_images images with merge.search_steps sampler steps (the recipe's [sample]
  scheduler, seeds sample.seed + k) and score them against merge.search_reference, a held-out image folder.
A warning is printed when merge.search_reference is eval.reference: the search would be tuned on the images that
`deme eval` reports on (mergekit-evolve refuses the same thing without a loud flag).
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from . import ui
from .errors import UsageError

MAX_GRID = 100_000  # candidates; beyond this a grid search is not a cheap proxy any more


# --- strategies --------------------------------------------------------------------------------------------------

Score = Callable[[tuple], float]


def _prefetch(score: Score, weights: list) -> None:
    """Score independent candidates together (in parallel when the scorer can); later score() calls hit the cache."""
    prefetch = getattr(score, "prefetch", None)
    if prefetch is not None:
        prefetch(weights)


def grid_search(n: int, candidates: list[float], start: tuple, score: Score, rounds: int = 3) -> None:
    """Every combination of the candidates for the N weights."""
    grid = list(itertools.product(candidates, repeat=n))
    _prefetch(score, grid)
    for w in grid:
        score(w)


def coordinate_search(n: int, candidates: list[float], start: tuple, score: Score, rounds: int = 3) -> None:
    """Coordinate descent from `start`: each weight in turn takes its best candidate value, others fixed."""
    current = tuple(start)
    best = score(current)
    for _ in range(rounds):
        improved = False
        for i in range(n):
            # the trials of weight i do not depend on each other: an improvement changes only weight i of `current`
            _prefetch(score, [current[:i] + (c,) + current[i + 1:] for c in candidates])
            for c in candidates:
                trial = current[:i] + (c,) + current[i + 1:]
                s = score(trial)
                if s < best:
                    best, current, improved = s, trial, True
        if not improved:
            break


def greedy_search(n: int, candidates: list[float], start: tuple, score: Score, rounds: int = 3) -> None:
    """Model-soups greedy: ranges ranked by their best solo score are added one by one while the score improves."""
    current = (0.0,) * n
    current_score = score(current)
    _prefetch(score, [current[:i] + (c,) + current[i + 1:] for i in range(n) for c in candidates if c != 0])
    solo = []
    for i in range(n):
        tried = [(score(current[:i] + (c,) + current[i + 1:]), c) for c in candidates if c != 0]
        if tried:
            s, c = min(tried)
            solo.append((s, i, c))
    for _, i, c in sorted(solo):
        trial = current[:i] + (c,) + current[i + 1:]
        s = score(trial)
        if s < current_score:
            current, current_score = trial, s


@dataclass(frozen=True)
class SearchStrategy:
    name: str
    run: Callable[..., None]
    budget: Callable[[int, int, int], int]   # (N, |candidates|, rounds) -> most merges it scores
    summary: str


STRATEGIES: dict[str, SearchStrategy] = {s.name: s for s in [
    SearchStrategy("grid", grid_search, lambda n, c, r: c ** n, "every combination of the candidates (the paper's)"),
    SearchStrategy("coordinate", coordinate_search, lambda n, c, r: 1 + r * n * c,
                   "coordinate descent from the given weights, at most 3 rounds"),
    SearchStrategy("greedy", greedy_search, lambda n, c, r: 1 + n * c + n,
                   "model-soups greedy: add ranges in order of solo score while the score improves"),
]}


class Scorer:
    """Scores each distinct weight vector once, logs every one, tracks the best (lowest score)."""

    def __init__(self, evaluate: Callable[[list[float]], float], bar=None,
                 evaluate_many: Optional[Callable[[list[list[float]]], list[float]]] = None):
        self.evaluate, self.evaluate_many, self.bar = evaluate, evaluate_many, bar
        self.scores: dict[tuple, float] = {}
        self.log: list[dict] = []
        self.best: Optional[tuple[float, tuple]] = None

    def _record(self, key: tuple, s: float) -> float:
        s = float(s)
        if s != s:  # NaN never wins
            s = math.inf
        self.scores[key] = s
        self.log.append({"weights": list(key), "score": s})
        if self.best is None or s < self.best[0]:
            self.best = (s, key)
        if self.bar is not None:
            self.bar.update(score=s, best=self.best[0])
        return s

    def __call__(self, weights) -> float:
        key = tuple(float(w) for w in weights)
        if key in self.scores:
            return self.scores[key]
        return self._record(key, self.evaluate(list(key)))

    def prefetch(self, weights: list) -> None:
        """Score the new ones among `weights` at once (evaluate_many), logged in the given order as if one by one."""
        keys = list(dict.fromkeys(tuple(float(w) for w in ws) for ws in weights))
        keys = [k for k in keys if k not in self.scores]
        if not keys:
            return
        scores = self.evaluate_many([list(k) for k in keys]) if self.evaluate_many else \
            [self.evaluate(list(k)) for k in keys]
        for k, s in zip(keys, scores):
            self._record(k, s)


# --- objectives --------------------------------------------------------------------------------------------------

def _device(recipe):
    import torch

    if recipe.train.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("train.device is 'cuda' but no CUDA device is available; set train.device = \"auto\" or "
                         "\"cpu\"")
    return torch.device("cuda" if recipe.train.device != "cpu" and torch.cuda.is_available() else "cpu")


def _same_folder(a: Optional[str], b: Optional[str]) -> bool:
    if not a or not b:
        return False
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return a == b


class LossObjective:
    """Held-out denoising loss of a candidate: fixed images, noise and timesteps (see the module docstring)."""

    name = "loss"

    def __init__(self, recipe, run, inputs):
        import numpy as np
        import torch
        from diffusers import DDPMScheduler

        from .models import resolve_pretrained, scheduler_config
        from .train import TARGETS, make_task

        m = recipe.merge
        self.device = _device(recipe)
        pipeline_dir = resolve_pretrained(recipe.model.pretrained, recipe.model.revision)
        if m.search_reference:
            ref = Path(m.search_reference).expanduser()
            if not ref.is_dir():
                raise UsageError(f"merge.search_reference '{m.search_reference}' is not a folder; point it at a "
                                 f"held-out image folder")
            data = recipe.data.model_copy(update={"source": "imagefolder", "path": str(ref), "max_samples": None,
                                                  "center_crop": True, "random_flip": False})
            recipe = recipe.model_copy(update={"data": data})
            self.images = f"merge.search_reference ({ref})"
        else:
            ui.warn("merge.search_reference is not set: the loss objective uses training images (recipe.data); set "
                    "it to a held-out image folder")
            self.images = "training data (recipe.data)"
        task = make_task(recipe, pipeline_dir, inputs.base_unet, self.device)
        dataset = task.dataset()
        n = min(m.search_num_images, len(dataset))
        if n < m.search_num_images:
            ui.warn(f"the search images hold {len(dataset)} images, fewer than merge.search_num_images = "
                    f"{m.search_num_images}; using {n}")
        self.indices = sorted({int(i) for i in np.linspace(0, len(dataset) - 1, n).round()})
        n = len(self.indices)
        self.scheduler = DDPMScheduler.from_config(scheduler_config(pipeline_dir))
        if self.scheduler.config.prediction_type not in TARGETS:
            raise UsageError(f"the scheduler's prediction_type '{self.scheduler.config.prediction_type}' is not "
                             f"supported (known: {', '.join(TARGETS)})")
        T = int(self.scheduler.config.num_train_timesteps)
        gen = torch.Generator().manual_seed(m.seed)
        self.batches = []  # (x0, unet kwargs, t, noise) on the device
        bs = recipe.train.batch_size
        items = [dataset[(i, 0)] for i in self.indices]
        k0 = 0
        for b in range(0, n, bs):
            x0, kwargs = task.prepare(torch.utils.data.default_collate(items[b:b + bs]))
            k = torch.arange(k0, k0 + x0.shape[0])
            t = ((k.double() + 0.5) * T / n).floor().long().clamp(0, T - 1).to(self.device)
            noise = torch.randn(x0.shape, generator=gen).to(self.device, x0.dtype)
            self.batches.append((x0, kwargs, t, noise))
            k0 += x0.shape[0]
        self.n, self.seed = n, m.seed

    def losses(self, model):
        """The n per-image denoising losses (mean squared error of the prediction), in search order, on the CPU."""
        import torch

        from .train import noisy_and_target

        out = []
        with torch.no_grad():
            for x0, kwargs, t, noise in self.batches:
                x_t, target = noisy_and_target(self.scheduler, x0, noise, t)
                err = (model(x_t, t, **kwargs).sample.float() - target.float()).pow(2)
                out.append(err.flatten(1).mean(1))
        return torch.cat(out).double().cpu()      # one device-to-host copy per candidate

    def __call__(self, model) -> float:
        return float(self.losses(model).mean())

    def describe(self) -> dict:
        return {"images": self.images, "num_images": self.n, "image_indices": self.indices,
                "timesteps": "t_k = floor((k + 1/2) T / n)", "noise_seed": self.seed}


class RangeLossObjective(LossObjective):
    """range_loss: the held-out losses grouped by timestep range, each range's mean divided by theta's (from
    set_baseline, which candidate_evaluator calls with theta loaded), averaged over ranges."""

    name = "range_loss"

    def __init__(self, recipe, run, inputs):
        import torch

        super().__init__(recipe, run, inputs)
        self.baseline = None
        bounds = [((r.meta.get("range") or {}).get("lo"), (r.meta.get("range") or {}).get("hi"))
                  for r in inputs.ranges]
        if any(lo is None or hi is None for lo, hi in bounds):
            raise UsageError("merge.objective = \"range_loss\" needs each range model's timestep range in its "
                             "deme.json; retrain the ranges with this version or use merge.objective = \"loss\"")
        t_all = torch.cat([t.cpu() for _, _, t, _ in self.batches])
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

    def __init__(self, recipe, run, inputs, metric: str):
        from .metrics import load_extractor, load_reference
        from .models import is_text_to_image, resolve_pretrained

        m, ev = recipe.merge, recipe.eval
        if not m.search_reference:
            raise UsageError(f"merge.objective = '{metric}' needs merge.search_reference, a held-out image folder; "
                             f"set it, or use merge.objective = \"loss\"")
        if is_text_to_image(resolve_pretrained(recipe.model.pretrained, recipe.model.revision)):
            raise UsageError(f"merge.objective = '{metric}' samples unconditional models only; use merge.objective = "
                             f"\"loss\" for text-to-image models")
        self.recipe, self.metric, self.device = recipe, metric, _device(recipe)
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
        from .metrics import array_features, score_features
        from .model_specs import sample_images

        m, ev = self.recipe.merge, self.recipe.eval
        images = sample_images(model, self.recipe, m.search_num_images, steps=m.search_steps, device=self.device)
        feats = array_features(images, self.extractor, ev.mode, ev.batch_size, self.device)
        return float(score_features(feats, self.ref, [self.metric], seed=self.recipe.seed)[0][self.metric])

    def describe(self) -> dict:
        s = self.recipe.sample
        return {"reference": self.ref.describe(), "feature_extractor": self.extractor.info or self.extractor.name,
                "mode": self.recipe.eval.mode, "num_images": self.recipe.merge.search_num_images,
                "sampler": {"scheduler": s.scheduler, "steps": self.recipe.merge.search_steps, "eta": s.eta,
                            "seeds": f"{s.seed} + k"}}


OBJECTIVES: dict[str, Callable[..., Any]] = {
    "loss": LossObjective,
    "range_loss": RangeLossObjective,
    "kid": lambda recipe, run, inputs: SampleMetricObjective(recipe, run, inputs, "kid"),
    "fid": lambda recipe, run, inputs: SampleMetricObjective(recipe, run, inputs, "fid"),
}


def free_bytes(device) -> Optional[int]:
    """Memory free for new tensors on `device` (CUDA: free device memory; CPU: MemAvailable), None if unknown."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def make_merger(inputs, spec, device):
    """Task vectors held on the device when they fit in 70% of its free memory, else merges streamed from disk."""
    from .merge import CandidateMerger, StreamingMerger

    need, free = CandidateMerger.nbytes(inputs), free_bytes(device)
    if free is not None and need > 0.7 * free:
        ui.warn(f"the task vectors ({need / 2 ** 30:.1f} GiB) do not fit next to the search on {device.type}; "
                f"each candidate is merged from disk instead (slower)")
        return StreamingMerger(inputs, spec)
    return CandidateMerger(inputs, spec, device)


# --- the search --------------------------------------------------------------------------------------------------

def search_settings(recipe, start: list[float]) -> dict:
    """What determines a search's outcome (part of the merge fingerprint)."""
    m = recipe.merge
    s = {"strategy": m.search, "objective": m.objective, "candidates": list(m.candidates),
         "num_images": m.search_num_images, "seed": m.seed, "reference": m.search_reference}
    if m.search == "coordinate":
        s["start"] = list(start)
    if m.objective in ("kid", "fid"):
        s.update(steps=m.search_steps, sample={k: v for k, v in recipe.sample.model_dump().items()
                                                if k in ("scheduler", "eta", "seed", "precision")},
                 eval={k: v for k, v in recipe.eval.model_dump().items() if k in ("mode", "feature_extractor")},
                 kid_seed=recipe.seed)
    else:
        s.update(data=recipe.data.model_dump(), batch_size=recipe.train.batch_size)
    return s


def candidate_evaluator(recipe, run, inputs, spec):
    """(objective, merger, evaluate(weights) -> score): one candidate model on the objective's device."""
    from .merge import new_candidate_model

    objective = OBJECTIVES[recipe.merge.objective](recipe, run, inputs)
    model = new_candidate_model(inputs).to(objective.device).eval().requires_grad_(False)
    merger = make_merger(inputs, spec, objective.device)

    if hasattr(objective, "set_baseline"):          # an objective relative to theta (range_loss)
        merger.load_into(model, [0.0] * inputs.n)   # all weights 0: theta itself
        objective.set_baseline(model)

    def evaluate(weights: list[float]) -> float:
        merger.load_into(model, weights)
        return float(objective(model))
    return objective, merger, evaluate


def _pool_worker(recipe, run, env: dict, tasks, results) -> None:
    """A search process: builds its own objective and candidate model, then scores the weight vectors it is sent."""
    import os
    import traceback

    os.environ.update(env)                    # before torch initialises CUDA: this worker's GPU (or none)
    try:
        ui.console.quiet = True               # the main process reports; warnings would repeat once per worker
        from .merge import load_inputs
        from .merge_methods import MergeSpec

        inputs = load_inputs(recipe, run)
        objective, merger, evaluate = candidate_evaluator(recipe, run, inputs, MergeSpec.from_recipe(recipe))
        results.put(("ready", {"describe": objective.describe(), "merges": type(merger).kind}))
        for job in iter(tasks.get, None):
            i, weights = job
            results.put(("score", i, evaluate(weights)))
    except BaseException as e:  # the main process raises it
        results.put(("error", isinstance(e, UsageError), str(e), traceback.format_exc()))


class SearchPool:
    """P worker processes (spawned), each scoring candidates on its own device slot; `map` keeps the input order.

    A candidate's score is a deterministic function of its weights, so the search takes the same decisions and logs
    the same scores as the serial one (on the CPU: with the same number of threads per process; on GPUs: the same
    kind of card).
    """

    def __init__(self, recipe, run, processes: int, gpus: str = "auto"):
        import multiprocessing as mp
        import os

        import torch

        from .launch import device_slots

        on_cpu = recipe.train.device == "cpu" or (gpus == "auto" and not torch.cuda.is_available())
        slots = device_slots(f"cpu:{processes}" if on_cpu else gpus, check=True)
        ctx = mp.get_context("spawn")         # fork after torch initialised is unsafe; spawn starts clean
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        threads = str(max(1, (os.cpu_count() or 1) // processes))
        self.procs = []
        for k in range(processes):
            slot = slots[k % len(slots)]
            env = slot.env() if slot.gpus else {"CUDA_VISIBLE_DEVICES": "",
                                                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
            p = ctx.Process(target=_pool_worker, args=(recipe, run, env, self.tasks, self.results), daemon=True)
            p.start()
            self.procs.append(p)
        self.slots = [slots[k % len(slots)].name for k in range(processes)]
        self.info = None
        for _ in range(processes):
            msg = self._get()
            self.info = self.info or msg[1]

    def _get(self):
        import queue

        while True:
            try:
                msg = self.results.get(timeout=5)
            except queue.Empty:
                dead = [p for p in self.procs if not p.is_alive()]
                if dead:
                    self.close()
                    raise RuntimeError(f"a search process ended unexpectedly (exit code {dead[0].exitcode})")
                continue
            if msg[0] == "error":
                self.close()
                if msg[1]:
                    raise UsageError(msg[2])
                raise RuntimeError(f"a search process failed: {msg[2]}\n{msg[3]}")
            return msg

    def map(self, weights: list) -> list[float]:
        for i, w in enumerate(weights):
            self.tasks.put((i, list(w)))
        out = [None] * len(weights)
        for _ in weights:
            _, i, s = self._get()
            out[i] = s
        return out

    def close(self) -> None:
        for _ in self.procs:
            self.tasks.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()


def search_weights(recipe, run, inputs, spec, start: list[float], processes: int = 1, gpus: str = "auto") -> dict:
    """Score candidate merges of `inputs` with the recipe's strategy and objective; the log for merge.json.

    processes > 1: candidates that do not depend on each other (all of a grid, one coordinate's sweep, greedy's
    solo runs) are scored by a SearchPool of that many processes on the slots of `gpus`.
    """
    import torch

    m = recipe.merge
    try:
        strategy = STRATEGIES[m.search]
        OBJECTIVES[m.objective]
    except KeyError as e:
        raise UsageError(f"unknown search setting {e}") from None
    candidates = sorted({float(c) for c in m.candidates})
    if not candidates:
        raise UsageError("merge.candidates is empty; give the values each weight may take, like [0.0, 0.5, 1.0]")
    n, rounds = inputs.n, 3
    budget = strategy.budget(n, len(candidates), rounds)
    if m.search == "grid" and budget > MAX_GRID:
        raise UsageError(f"a grid over {len(candidates)} candidates for {n} weights is {budget} merges; use "
                         f"merge.search = \"coordinate\" or fewer merge.candidates")
    if _same_folder(m.search_reference, recipe.eval.reference):
        ui.warn("merge.search_reference is eval.reference: the search is tuned on the images eval reports on; "
                "use a held-out folder for the search")

    t0 = time.time()
    pool = None
    if processes > 1:
        pool = SearchPool(recipe, run, processes, gpus)
        described, merges = pool.info["describe"], pool.info["merges"]
        evaluate, evaluate_many = (lambda w: pool.map([w])[0]), pool.map
        ui.info(f"search: {processes} processes on {', '.join(dict.fromkeys(pool.slots))}")
    else:
        objective, merger, evaluate = candidate_evaluator(recipe, run, inputs, spec)
        described, merges, evaluate_many = objective.describe(), type(merger).kind, None
    try:
        with ui.progress(f"search ({m.search}, {m.objective})", total=budget, unit="merges",
                         every=max(1, budget // 20)) as bar:   # plain logs: ~20 lines, not one per merge
            scorer = Scorer(evaluate, bar, evaluate_many)
            strategy.run(n, candidates, tuple(start), scorer, rounds=rounds)
    finally:
        if pool is not None:
            pool.close()
    if pool is None:
        device = objective.device
        del objective, merger, evaluate
        if device.type == "cuda":
            torch.cuda.empty_cache()
    best_score, best_weights = scorer.best
    return {"strategy": m.search, "strategy_summary": strategy.summary, "objective": m.objective,
            **described, "merges": merges, "candidate_values": candidates, "evaluations": len(scorer.log),
            "seconds": round(time.time() - t0, 3), "best": {"weights": list(best_weights), "score": best_score},
            "candidates": scorer.log, **({"processes": processes} if processes > 1 else {})}
