"""`deme merge --search`: find the merge weights w_i by scoring candidate merges with a cheap proxy.

The paper says only "grid search" (section 3.3); which grid, which metric and how many samples are not given
(paper-spec section 6, item 6). Here each candidate weight vector is merged in memory and scored by an objective
(search_objectives.py); lower is better. For speed, theta and every range's (sparsified) task vector are held on the
objective's device in float32 (`task_vectors.CandidateMerger`, about N + 1 models of memory; when that does not fit,
each candidate is streamed from disk with `task_vectors.load_merged_into`, as `merged/` is written; search_pool.py).
Every candidate and its score goes into merge.json's "search" log; the best one is written as merged/ by the exact
streaming path.

Strategies (`merge.search`):
- scaled (default): theta (all weights 0, the yardstick), then each weight shape of `merge.shapes` at each scale of
  `merge.scales` (the shape's weights times the scale: a sweep of the weights' sum). Default shapes: the uniform
  average (1/N each), the release's kind of weights (N = 4: 0.1, 0.1, 0.2, 0.5, low t first; more weight on noisier
  ranges) and its mirror; default scales 0.5, 0.75, 1, 1.25, 1.5. 1 + shapes x scales merges, all independent.
- grid: every combination of `merge.candidates` for the N weights, |candidates|^N merges (the paper's "grid search").
- coordinate: coordinate descent from the given weights (`--weights` / merge.weights, else 1/N each): sweep each
  weight over the candidates with the others fixed and keep the best, until a round brings no improvement (at most
  `merge.search_rounds` rounds, default 3). About rounds * N * |candidates| merges, and it can stop in a local
  optimum.
- greedy: model soups' greedy recipe (Wortsman et al. 2022, https://arxiv.org/abs/2203.05482) for weights: score theta
  (all weights 0); give each range alone its best non-zero candidate; then, in order of those solo scores, add each
  range at its value if that improves the score of the merge so far. 1 + N * |candidates| + N merges.

Objectives (`merge.objective`: kid, fid, loss, range_loss, loss_by_t, loss_by_t_guarded, loss_by_t_weighted) are
described in search_objectives.py. The search works the same for every merge.method (task arithmetic, TIES, DARE):
a candidate is a weight vector, merged with the recipe's method. merge.candidates (default 0 to 1.5 in steps of
0.25) lets grid, coordinate and greedy give any range any of those weights, a range at full strength (1) and the
others at 0 included. Every candidate and its score goes into merge.json's "search" log, drawn as
merged/merge-search.png.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from . import interrupts, ui
from .errors import UsageError
from .interrupts import Interrupted
from .runs import write_atomic
from .search_objectives import OBJECTIVES, SearchSetup, _same_folder, check_objective, objective_settings
from .search_pool import SearchPool, candidate_evaluator

MAX_GRID = 100_000  # candidates; beyond this a grid search is not a cheap proxy any more
DEFAULT_ROUNDS = 3  # merge.search_rounds' default (left out of a merge's fingerprint)


# --- strategies --------------------------------------------------------------------------------------------------

Score = Callable[[tuple], float]



@dataclass(frozen=True)
class Space:
    """What a strategy searches over: N weights; `candidates` (the values each weight may take: grid, coordinate,
    greedy); `shapes` x `scales` (scaled); at most `rounds` rounds of coordinate descent."""
    n: int
    candidates: tuple
    shapes: tuple
    scales: tuple
    rounds: int = DEFAULT_ROUNDS

    @staticmethod
    def from_recipe(m, n: int) -> "Space":
        shapes = m.weight_shapes(n)
        bad = [w for w in shapes if len(w) != n]
        if bad:
            raise UsageError(f"merge.shapes has a weight vector of {len(bad[0])} values but there are {n} ranges; "
                             f"give one weight per range, low t first")
        return Space(n, tuple(sorted({float(c) for c in m.candidates})), tuple(tuple(map(float, w)) for w in shapes),
                     tuple(float(c) for c in m.scales), int(m.search_rounds))

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
                   "coordinate descent from the given weights, at most merge.search_rounds rounds"),
    SearchStrategy("greedy", greedy_search, lambda sp: 1 + sp.n * len(sp.candidates) + sp.n,
                   "model-soups greedy: add ranges in order of solo score while the score improves"),
]}


class Journal:
    """The scores of a search so far, on disk (one JSON line per scored merge after a header line holding the search's
    fingerprint), so that a stopped search continues where it stopped: a score is a deterministic function of the
    weights, so a journalled score is the score. A journal of another search (other fingerprint) is started over."""

    def __init__(self, path: Path, fingerprint: str):
        self.path, self.scores = Path(path), {}
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        try:
            same = bool(lines) and json.loads(lines[0]).get("fingerprint") == fingerprint
        except (ValueError, AttributeError):
            same = False
        if same:
            for line in lines[1:]:
                try:
                    rec = json.loads(line)
                    self.scores[tuple(float(w) for w in rec["weights"])] = float(rec["score"])
                except (ValueError, KeyError, TypeError):
                    continue        # a line cut short by a kill
            if self.scores:
                ui.info(f"search: continuing; {len(self.scores)} merge(s) already scored ({self.path})")
        else:
            write_atomic(self.path, json.dumps({"fingerprint": fingerprint}) + "\n")

    def add(self, key: tuple, score: float) -> None:
        if key not in self.scores:
            self.scores[key] = score
            with open(self.path, "a") as f:
                f.write(json.dumps({"weights": list(key), "score": score}) + "\n")

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class Scorer:
    """Scores each distinct weight vector once, logs every one, tracks the best (lowest score).

    `journal`: scores kept on disk (a stopped search resumes); `stop`: an interrupts.StopFlag, checked before each
    merge is scored: when a signal set it, the search stops with interrupts.Interrupted (the journal keeps what was
    scored)."""

    def __init__(self, evaluate: Callable[[list[float]], float], bar=None,
                 evaluate_many: Optional[Callable[..., list[float]]] = None, journal: Optional[Journal] = None,
                 stop=None):
        self.evaluate, self.evaluate_many, self.bar = evaluate, evaluate_many, bar
        self.journal, self.stop = journal, stop
        self.resumed = set(journal.scores) if journal is not None else set()   # scored by an earlier run
        self.scores: dict[tuple, float] = {}
        self.log: list[dict] = []
        self.best: Optional[tuple[float, tuple]] = None

    def check_stop(self) -> None:
        if self.stop is not None and self.stop.signum:
            kept = f" (kept in {self.journal.path})" if self.journal is not None else ""
            raise Interrupted(self.stop.signum, f"the weight search stopped by {self.stop.name} after "
                                                f"{len(self.journal.scores) if self.journal else len(self.scores)} "
                                                f"scored merges{kept}; re-run the same command to continue it")

    def _journalled(self, key: tuple) -> Optional[float]:
        return self.journal.scores.get(key) if self.journal is not None else None

    def _score(self, key: tuple) -> float:
        s = self._journalled(key)
        if s is None:
            self.check_stop()
            s = float(self.evaluate(list(key)))
            if self.journal is not None:
                self.journal.add(key, s)
        return s

    def _record(self, key: tuple, s: float) -> float:
        s = float(s)
        if s != s:  # NaN never wins
            s = math.inf
        self.scores[key] = s
        self.log.append({"weights": list(key), "score": s})
        if self.best is None or s < self.best[0]:
            self.best = (s, key)
        if self.bar is not None:
            self.bar.update(resumed=key in self.resumed, score=s, best=self.best[0])
        return s

    def __call__(self, weights) -> float:
        key = tuple(float(w) for w in weights)
        if key in self.scores:
            return self.scores[key]
        return self._record(key, self._score(key))

    def prefetch(self, weights: list) -> None:
        """Score the new ones among `weights` at once (evaluate_many), logged in the given order as if one by one."""
        keys = list(dict.fromkeys(tuple(float(w) for w in ws) for ws in weights))
        keys = [k for k in keys if k not in self.scores]
        todo = [k for k in keys if self._journalled(k) is None]
        if todo and self.evaluate_many is not None:
            self.check_stop()

            def done(i: int, s: float) -> None:       # each score as it arrives: journalled, then maybe stop
                if self.journal is not None:
                    self.journal.add(todo[i], float(s))
                self.check_stop()
            self.evaluate_many([list(k) for k in todo], done)
        for k in keys:
            self._record(k, self._score(k))


# --- the search --------------------------------------------------------------------------------------------------

def search_settings(setup: SearchSetup, n: int, start: list[float]) -> dict:
    """What determines a search's outcome over n ranges (part of the merge fingerprint)."""
    m = setup.merge
    s = {"strategy": m.search, "objective": m.objective, "num_images": setup.num_images, "seed": m.seed,
         "reference": m.search_reference, **_space_log(m.search, Space.from_recipe(m, n))}
    if m.search == "coordinate":
        s["start"] = list(start)
        if m.search_rounds != DEFAULT_ROUNDS:   # left out at its default: merges recorded before the key stay current
            s["rounds"] = int(m.search_rounds)
    s.update(objective_settings(setup))
    return s


def _space_log(strategy: str, space: Space) -> dict:
    if strategy == "scaled":
        return {"shapes": [list(w) for w in space.shapes], "scales": list(space.scales)}
    return {"candidate_values": list(space.candidates)}


def check_search_reference(m, eval_reference: Optional[str], data) -> None:
    """The search scores candidates on held-out images: merge.search_reference (`m` is [merge]) must be set and must
    not be the images `deme eval` reports on (eval.reference); a warning when it is the training data ([data])."""
    if not m.search_reference:
        raise UsageError("the weight search needs merge.search_reference, a folder of held-out training images (not "
                         "the test set eval reports on); set it, or set merge.weights to \"uniform\" or a list")
    if _same_folder(m.search_reference, eval_reference):
        raise UsageError(f"merge.search_reference is eval.reference ('{m.search_reference}'): the search would be "
                         f"tuned on the images eval reports on; point it at held-out training images")
    if data.source == "imagefolder" and _same_folder(m.search_reference, data.path):
        ui.warn("merge.search_reference is data.path: the search scores merges on the images the ranges were "
                "finetuned on; a held-out folder ranks them more honestly")


def _plan(m, n: int) -> tuple:
    """(strategy, space, budget) of [merge]'s search over n weights; UsageError for a search that cannot run."""
    try:
        strategy = STRATEGIES[m.search]
        OBJECTIVES[m.objective]
    except KeyError as e:
        raise UsageError(f"unknown search setting {e}") from None
    space = Space.from_recipe(m, n)
    if m.search == "scaled" and not (space.shapes and space.scales):
        raise UsageError("merge.shapes and merge.scales must not be empty for merge.search = \"scaled\"")
    if m.search != "scaled" and not space.candidates:
        raise UsageError("merge.candidates is empty; give the values each weight may take, like [0.0, 0.5, 1.0]")
    budget = strategy.budget(space)
    if m.search == "grid" and budget > MAX_GRID:
        raise UsageError(f"a grid over {len(space.candidates)} candidates for {space.n} weights is {budget} merges; "
                         f"use merge.search = \"scaled\" or \"coordinate\", or fewer merge.candidates")
    return strategy, space, budget


def check_search(setup: SearchSetup, n: int) -> None:
    """Everything a search over n weights needs from the recipe, checked before any work (`deme merge`, `deme run`):
    strategy, objective, candidates, and the held-out reference (check_search_reference)."""
    _plan(setup.merge, n)
    check_objective(setup)
    check_search_reference(setup.merge, setup.eval.reference, setup.data)


def search_weights(setup: SearchSetup, ranges, run, inputs, spec, start: list[float], processes: int = 1,
                   gpus: str = "auto", journal: Optional[Journal] = None) -> dict:
    """Score candidate merges of `inputs` with [merge]'s strategy and objective; the log for merge.json.

    The settings were checked by `check_search`. processes > 1: candidates that do not depend on each other (all
    of a grid, one coordinate's sweep, greedy's solo runs) are scored by a SearchPool of that many processes on the
    slots of `gpus`.
    `journal`: scores of an earlier, stopped run of this search (and where new ones are kept). SIGTERM, SIGINT or
    SIGUSR1 stop the search before the next merge is scored (interrupts.Interrupted).
    """
    import torch

    m = setup.merge
    strategy, space, budget = _plan(m, inputs.n)

    t0 = time.time()
    pool = None
    if processes > 1:
        pool = SearchPool(setup, ranges, run, processes, gpus)
        described, merges = pool.info["describe"], pool.info["merges"]
        evaluate, evaluate_many = (lambda w: pool.map([w])[0]), pool.map
        ui.info(f"search: {processes} processes on {', '.join(dict.fromkeys(pool.slots))}")
    else:
        objective, merger, evaluate = candidate_evaluator(setup, run, inputs, spec)
        described, merges, evaluate_many = objective.describe(), type(merger).kind, None
    try:
        with ui.progress(f"search ({m.search}, {m.objective})", total=budget, unit="merges",
                         every=max(1, budget // 20)) as bar:   # plain logs: ~20 lines, not one per merge
            with interrupts.deferred() as stop:
                scorer = Scorer(evaluate, bar, evaluate_many, journal=journal, stop=stop)
                strategy.run(space, tuple(start), scorer)
                scorer.check_stop()     # a signal while the last merge was scored: the merged model waits too
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
            "method": spec.method,
            **described, "merges": merges, **_space_log(m.search, space), "evaluations": len(scorer.log),
            "seconds": round(time.time() - t0, 3), "best": {"weights": list(best_weights), "score": best_score},
            "candidates": scorer.log, **({"processes": processes} if processes > 1 else {})}
