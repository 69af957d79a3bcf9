"""`deme merge --search`: find the merge weights w_i by scoring candidate merges with a cheap proxy.

The paper says only "grid search" (section 3.3); which grid, which metric and how many samples are not given
(paper-spec section 6, item 6). Here each candidate weight vector is merged in memory and scored by an objective;
lower is better. For speed, theta and every range's (sparsified) task vector are held on the objective's device in
float32 (`merge.CandidateMerger`, about N + 1 models of memory; when that does not fit, each candidate is streamed from
disk with `merge.load_merged_into`, as `merged/` is written). Every candidate and its score goes into merge.json's
"search" log; the best one is written as merged/ by the exact streaming path.

Strategies (`merge.search`):
- scaled (default): theta (all weights 0, the yardstick), then each weight shape of `merge.shapes` at each scale of
  `merge.scales` (the shape's weights times the scale: a sweep of the weights' sum). Default shapes: the uniform
  average (1/N each), the release's kind of weights (N = 4: 0.1, 0.1, 0.2, 0.5, low t first; more weight on noisier
  ranges) and its mirror; default scales 0.5, 0.75, 1, 1.25, 1.5. 1 + shapes x scales merges, all independent.
- grid: every combination of `merge.candidates` for the N weights, |candidates|^N merges (the paper's "grid search").
- coordinate: coordinate descent from the given weights (`--weights` / merge.weights, else 1/N each): sweep each
  weight over the candidates with the others fixed and keep the best, until a round brings no improvement (at most
  3 rounds). About 3 * N * |candidates| merges, and it can stop in a local optimum.
- greedy: model soups' greedy recipe (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482) for weights: score theta
  (all weights 0); give each range alone its best non-zero candidate; then, in order of those solo scores, add each
  range at its value if that improves the score of the merge so far. 1 + N * |candidates| + N merges.

Objectives (`merge.objective`), all on merge.search_reference, a folder of held-out training images (required; the
search refuses eval.reference, the images `deme eval` reports on):
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
Every candidate and its score goes into merge.json's "search" log, drawn as merged/merge-search.png.
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
DEFAULT_SEARCH_IMAGES = 1000  # per candidate (and per loss estimate): FID and KID are noisy far below this


# --- strategies --------------------------------------------------------------------------------------------------

Score = Callable[[tuple], float]
RELEASE_WEIGHTS = (0.1, 0.1, 0.2, 0.5)  # the authors' LSUN Church weights, low t first (release merge.py)


def rising_shape(n: int) -> list[float]:
    """The release's kind of weights for N ranges: more weight on noisier ranges. N = 4: exactly the release's
    (0.1, 0.1, 0.2, 0.5); other N: a geometric ramp with the same sum (0.9) and last-to-first ratio (5)."""
    if n == len(RELEASE_WEIGHTS):
        return list(RELEASE_WEIGHTS)
    if n == 1:
        return [sum(RELEASE_WEIGHTS)]
    r = 5.0 ** (1.0 / (n - 1))
    total = sum(r ** i for i in range(n))
    return [sum(RELEASE_WEIGHTS) * r ** i / total for i in range(n)]


def default_shapes(n: int) -> list[list[float]]:
    """merge.shapes when unset: the uniform average (1/N each), the release's kind (rising), and its mirror."""
    rising = rising_shape(n)
    shapes = [[1.0 / n] * n, rising, rising[::-1]]
    return [list(w) for w in dict.fromkeys(tuple(w) for w in shapes)]


@dataclass(frozen=True)
class Space:
    """What a strategy searches over: N weights; `candidates` (the values each weight may take: grid, coordinate,
    greedy); `shapes` x `scales` (scaled); at most `rounds` rounds of coordinate descent."""
    n: int
    candidates: tuple
    shapes: tuple
    scales: tuple
    rounds: int = 3

    @staticmethod
    def from_recipe(m, n: int) -> "Space":
        shapes = m.shapes if m.shapes is not None else default_shapes(n)
        bad = [w for w in shapes if len(w) != n]
        if bad:
            raise UsageError(f"merge.shapes has a weight vector of {len(bad[0])} values but there are {n} ranges; "
                             f"give one weight per range, low t first")
        return Space(n, tuple(sorted({float(c) for c in m.candidates})), tuple(tuple(map(float, w)) for w in shapes),
                     tuple(float(c) for c in m.scales))

    def scaled(self) -> list[tuple]:
        """theta (all weights 0, the yardstick), then every shape times every scale, in that order."""
        out = [(0.0,) * self.n] + [tuple(c * w for w in shape) for shape in self.shapes for c in self.scales]
        return list(dict.fromkeys(out))


def _prefetch(score: Score, weights: list) -> None:
    """Score independent candidates together (in parallel when the scorer can); later score() calls hit the cache."""
    prefetch = getattr(score, "prefetch", None)
    if prefetch is not None:
        prefetch(weights)


def scaled_search(space: Space, start: tuple, score: Score) -> None:
    """Each weight shape (merge.shapes: the uniform average, the release's rising kind and its mirror) at each scale
    of its sum (merge.scales), and theta as the yardstick: one merge per candidate, all independent."""
    weights = space.scaled()
    _prefetch(score, weights)
    for w in weights:
        score(w)


def grid_search(space: Space, start: tuple, score: Score) -> None:
    """Every combination of the candidates for the N weights."""
    grid = list(itertools.product(space.candidates, repeat=space.n))
    _prefetch(score, grid)
    for w in grid:
        score(w)


def coordinate_search(space: Space, start: tuple, score: Score) -> None:
    """Coordinate descent from `start`: each weight in turn takes its best candidate value, others fixed."""
    n, candidates = space.n, space.candidates
    current = tuple(start)
    best = score(current)
    for _ in range(space.rounds):
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


def greedy_search(space: Space, start: tuple, score: Score) -> None:
    """Model-soups greedy: ranges ranked by their best solo score are added one by one while the score improves."""
    n, candidates = space.n, space.candidates
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
    run: Callable[[Space, tuple, Score], None]
    budget: Callable[[Space], int]            # the most merges it scores
    summary: str


STRATEGIES: dict[str, SearchStrategy] = {s.name: s for s in [
    SearchStrategy("scaled", scaled_search, lambda sp: len(sp.scaled()),
                   "theta, and each weight shape (merge.shapes) at each scale of its sum (merge.scales)"),
    SearchStrategy("grid", grid_search, lambda sp: len(sp.candidates) ** sp.n,
                   "every combination of the candidates (the paper's)"),
    SearchStrategy("coordinate", coordinate_search, lambda sp: 1 + sp.rounds * sp.n * len(sp.candidates),
                   "coordinate descent from the given weights, at most 3 rounds"),
    SearchStrategy("greedy", greedy_search, lambda sp: 1 + sp.n * len(sp.candidates) + sp.n,
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
    """Held-out denoising loss of a candidate: fixed images, noise and timesteps (heldout.py; see the module
    docstring)."""

    name = "loss"

    def __init__(self, recipe, run, inputs):
        from .heldout import load_heldout, spread_timesteps

        m = recipe.merge
        self.device = _device(recipe)
        self.held = load_heldout(recipe, m.search_reference, inputs.base_unet, self.device,
                                 num_images=search_num_images(m), seed=m.seed, timesteps=spread_timesteps,
                                 timesteps_rule="t_k = floor((k + 1/2) T / n)", batch_size=recipe.train.batch_size,
                                 what="merge.search_reference")
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

    def __init__(self, recipe, run, inputs):
        super().__init__(recipe, run, inputs)
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

    def __init__(self, recipe, run, inputs, metric: str):
        from .metrics import load_extractor, load_reference
        from .models import is_text_to_image, resolve_pretrained

        m, ev = recipe.merge, recipe.eval
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

        ev = self.recipe.eval
        images = sample_images(model, self.recipe, search_num_images(self.recipe.merge), steps=search_steps(self.recipe),
                               device=self.device)
        feats = array_features(images, self.extractor, ev.mode, ev.batch_size, self.device)
        return float(score_features(feats, self.ref, [self.metric], seed=self.recipe.seed)[0][self.metric])

    def describe(self) -> dict:
        s = self.recipe.sample
        return {"reference": self.ref.describe(), "feature_extractor": self.extractor.info or self.extractor.name,
                "mode": self.recipe.eval.mode, "num_images": search_num_images(self.recipe.merge),
                "sampler": {"scheduler": s.scheduler, "steps": search_steps(self.recipe), "eta": s.eta,
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
    s = {"strategy": m.search, "objective": m.objective, "num_images": search_num_images(m), "seed": m.seed,
         "reference": m.search_reference, **_space_log(m.search, Space.from_recipe(m, recipe.ranges.n))}
    if m.search == "coordinate":
        s["start"] = list(start)
    if m.objective in ("kid", "fid"):
        s.update(steps=search_steps(recipe), sample={k: v for k, v in recipe.sample.model_dump().items()
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


def _space_log(strategy: str, space: Space) -> dict:
    if strategy == "scaled":
        return {"shapes": [list(w) for w in space.shapes], "scales": list(space.scales)}
    return {"candidate_values": list(space.candidates)}


def search_num_images(m) -> int:
    """merge.search_num_images, or its default: 1,000 images, enough for KID to rank candidates."""
    return m.search_num_images if m.search_num_images is not None else DEFAULT_SEARCH_IMAGES


def search_steps(recipe) -> int:
    """merge.search_steps, or its default: the eval's sampler (sample.steps)."""
    return recipe.merge.search_steps if recipe.merge.search_steps is not None else recipe.sample.steps


def check_search_reference(recipe) -> None:
    """The search scores candidates on held-out images: merge.search_reference must be set and must not be the
    images `deme eval` reports on (eval.reference)."""
    m = recipe.merge
    if not m.search_reference:
        raise UsageError("the weight search needs merge.search_reference, a folder of held-out training images (not "
                         "the test set eval reports on); set it, or give merge.weights")
    if _same_folder(m.search_reference, recipe.eval.reference):
        raise UsageError(f"merge.search_reference is eval.reference ('{m.search_reference}'): the search would be "
                         f"tuned on the images eval reports on; point it at held-out training images")
    if recipe.data.source == "imagefolder" and _same_folder(m.search_reference, recipe.data.path):
        ui.warn("merge.search_reference is data.path: the search scores merges on the images the ranges were "
                "finetuned on; a held-out folder ranks them more honestly")


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
    space = Space.from_recipe(m, inputs.n)
    if m.search == "scaled" and not (space.shapes and space.scales):
        raise UsageError("merge.shapes and merge.scales must not be empty for merge.search = \"scaled\"")
    if m.search != "scaled" and not space.candidates:
        raise UsageError("merge.candidates is empty; give the values each weight may take, like [0.0, 0.5, 1.0]")
    budget = strategy.budget(space)
    if m.search == "grid" and budget > MAX_GRID:
        raise UsageError(f"a grid over {len(space.candidates)} candidates for {space.n} weights is {budget} merges; "
                         f"use merge.search = \"scaled\" or \"coordinate\", or fewer merge.candidates")
    check_search_reference(recipe)

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
            strategy.run(space, tuple(start), scorer)
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
            **described, "merges": merges, **_space_log(m.search, space), "evaluations": len(scorer.log),
            "seconds": round(time.time() - t0, 3), "best": {"weights": list(best_weights), "score": best_score},
            "candidates": scorer.log, **({"processes": processes} if processes > 1 else {})}
