"""Which merge weight search objective ranks merges the way FID does, and at what CPU cost (issue 26, item 1).

    python benchmarks/fashion-mnist/objectives.py --out runs/fmnist-bench --jobs 2 --threads 1 --nice 19
    python benchmarks/fashion-mnist/objectives.py --out runs/fmnist-bench-smoke --smoke     # tiny, after run.py --smoke

For each seed's DeMe run dir (<out>/deme, <out>/deme-seed1: trained by run.py or `deme train` with deme.toml), each
of CANDIDATES (theta, the uniform average, the release's kind of weights, each range alone, per-range strengths with
range 3 at full strength, TIES and DARE at two settings each) is merged in memory exactly as `deme merge --search`
merges a candidate (task_vectors.CandidateMerger into search_pool's candidate model) and then:
1. scored with every search objective on holdout-2k/ as the search scores it: loss, range_loss and loss_by_t (the
   objectives themselves, on all 2,000 images), loss_by_t_guarded and loss_by_t_weighted (loss_by_t's per-bin ratios
   scored by their rules: the same function the objectives call), kid and fid at 250, 1,000 and 2,000 samples;
2. sampled: 2,000 images, DDIM-50, image k from seed sample.seed + k (the objective's own `samples`, so exactly the
   images a search with merge.search_num_images = 2,000 draws; the kid/fid objectives at k images score the first k
   of them, which is what a search with search_num_images = k draws: the seeds are per image), and scored with FID
   and KID against all 10,000 test images (`deme eval`'s path: the features of the images written as PNGs).
The CPU seconds of each objective per candidate (time.process_time of the scoring process: every thread) are
recorded: the merge, plus the objective's own work; the kid/fid objectives' sampling and Inception at k images are
the measured 2,000-image costs times k / 2,000.

Seed 0 is where anything is fitted: loss_by_t_guarded's merge.bin_tolerance (the value of TOLERANCES with the highest
Spearman rank correlation with FID) and loss_by_t_weighted's merge.bin_weights (non-negative least squares of
FID - FID(theta) on the per-bin ratios minus 1). Seed 1 is the test: each objective's Spearman rank correlation with
FID over the same candidates, and its cost. Writes <out>/objectives/objectives.json and objectives.md (results.py puts
the table into RESULTS.md). Resumable per candidate (<out>/objectives/seed<s>/<candidate>.json; the samples are kept
as .npy until the candidate is scored), low priority friendly (--nice, --jobs processes, --threads each).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

STUDY = "objectives"                # <out>/objectives/
SUMMARY = "objectives.json"
TABLE = "objectives.md"
RECIPE = "deme"                     # the run dirs whose range models are merged
FIT_SEED, TEST_SEED = 0, 1
TOLERANCES = (0.0, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01)    # loss_by_t_guarded, fitted on FIT_SEED
GOOD = 0.8                          # the rank correlation an objective must reach to become the recipe default


@dataclass(frozen=True)
class Candidate:
    name: str
    weights: tuple                  # one per range, low t first
    method: str = "task_arithmetic"
    density: Optional[float] = None  # ties / dare


CANDIDATES = [
    Candidate("theta", (0.0, 0.0, 0.0, 0.0)),
    Candidate("uniform", (0.25, 0.25, 0.25, 0.25)),
    Candidate("release", (0.1, 0.1, 0.2, 0.5)),
    *[Candidate(f"range{i}", tuple(1.0 if j == i else 0.0 for j in range(4))) for i in range(4)],
    Candidate("0-0-0.5-1", (0.0, 0.0, 0.5, 1.0)),
    Candidate("0.25-0.25-0.5-1", (0.25, 0.25, 0.5, 1.0)),
    Candidate("0.25-0.25-0.25-1", (0.25, 0.25, 0.25, 1.0)),
    Candidate("0.5-0.5-0.5-0.5", (0.5, 0.5, 0.5, 0.5)),
    Candidate("ties-0.2-1-1-1-1", (1.0, 1.0, 1.0, 1.0), "ties", 0.2),
    Candidate("ties-0.5-0.25-0.25-0.5-1", (0.25, 0.25, 0.5, 1.0), "ties", 0.5),
    Candidate("dare-0.2-uniform", (0.25, 0.25, 0.25, 0.25), "dare", 0.2),
    Candidate("dare-0.5-0.25-0.25-0.5-1", (0.25, 0.25, 0.5, 1.0), "dare", 0.5),
]
BY_NAME = {c.name: c for c in CANDIDATES}
# --smoke: one candidate of each kind (the code paths, in minutes; its rank correlations mean nothing)
SMOKE_CANDIDATES = ["theta", "uniform", "range3", "0-0-0.5-1", "ties-0.2-1-1-1-1", "dare-0.2-uniform"]


def candidates(smoke: bool) -> list[Candidate]:
    return [BY_NAME[n] for n in SMOKE_CANDIDATES] if smoke else CANDIDATES


@dataclass(frozen=True)
class Sizes:
    samples: int                    # per candidate: test FID/KID, and the largest kid/fid objective
    ks: tuple                       # kid/fid objectives at these numbers of samples (the first k)
    loss_images: int                # held-out images of the loss objectives


FULL = Sizes(2000, (250, 1000, 2000), 2000)
SMOKE = Sizes(16, (8, 16), 32)
LOSS_OBJECTIVES = ("loss", "range_loss", "loss_by_t")      # scored by the objectives themselves
BIN_VARIANTS = ("loss_by_t_guarded", "loss_by_t_weighted")  # loss_by_t's ratios, scored by their rules
SAMPLE_METRICS = ("kid", "fid")


def log(msg: str) -> None:
    print(f"[objectives {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu() -> float:
    return time.process_time()


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def study_dir(out: Path) -> Path:
    return Path(out) / STUDY


def read_summary(out: Path) -> Optional[dict]:
    f = study_dir(out) / SUMMARY
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return None


# --- one seed: the recipe, the run dir, the objectives ------------------------------------------------------------

class SeedStudy:
    """Everything a seed's candidates are scored with. Light at first (the recipe, theta, the range models'
    identities: enough for the fingerprints); `prepare()` loads the objectives, references and the candidate model."""

    def __init__(self, out: Path, seed: int, smoke: bool, base: str):
        import run as bench
        from deme_cli.engine.base import resolve_base
        from deme_cli.engine.recipe import load_recipe
        from deme_cli.engine.runs import RunDir
        from deme_cli.engine.task_vectors import load_inputs

        self.out, self.seed, self.sizes = Path(out), seed, SMOKE if smoke else FULL
        self.run_dir = bench.run_dir_of(self.out, RECIPE, seed)
        if not bench.is_trained(self.run_dir):
            raise SystemExit(f"{self.run_dir} has no trained range models; train them first (run.py --suite "
                             f"keep-the-gain, or `deme train benchmarks/fashion-mnist/recipes/deme.toml --all` with "
                             f"run.py's --set values)")
        # the CPU scale's sampler (DDIM-50, batch 100) and the run dir's own paths and seeds, as run.py sets them
        self.sets = bench.deme_sets(RECIPE, seed, out=self.out, base=base, scale="cpu-5k", smoke=smoke)
        self.recipe = load_recipe(bench.recipe_file(RECIPE), self.sets)
        self.base = resolve_base(self.recipe.model, self.recipe.train.device)
        self.run = RunDir(self.run_dir)
        self.inputs = load_inputs(self.base, self.run, n=self.recipe.ranges.n, use_ema=self.recipe.merge.use_ema)
        if self.inputs.n != 4:
            raise SystemExit(f"{self.run_dir} has {self.inputs.n} ranges; the candidates are written for 4")
        self.folder = study_dir(self.out) / f"seed{seed}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prepared = False

    def fingerprint(self, cand: Candidate) -> str:
        blob = {"candidate": asdict(cand), "sizes": asdict(self.sizes), "sets": self.sets,
                "merge_seed": self.recipe.merge.seed, "ranges": [r.identity() for r in self.inputs.ranges],
                "base_hash": self.inputs.base_hash}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def record_file(self, cand: Candidate) -> Path:
        return self.folder / f"{cand.name}.json"

    def done(self, cand: Candidate) -> bool:
        try:
            return json.loads(self.record_file(cand).read_text()).get("fingerprint") == self.fingerprint(cand)
        except (OSError, ValueError):
            return False

    def setup(self, objective: str, num_images: int):
        """The SearchSetup of a `deme merge --search` with this objective and merge.search_num_images (kid/fid: with
        the eval's sampler, merge.search_steps unset)."""
        from deme_cli.engine.search_objectives import SearchSetup

        r = self.recipe
        merge = r.merge.model_copy(update={"objective": objective, "search_num_images": num_images,
                                           "search_steps": None})
        return SearchSetup.from_sections(self.base, merge=merge, sample=r.sample, eval=r.eval, data=r.data,
                                         train=r.train, seed=r.seed)

    def prepare(self) -> dict:
        """Build the objectives (references cached under <out>/objectives/search/eval/cache, the test set's under
        <out>/reference/eval/cache, where run.py keeps it) and the candidate model; returns their setup CPU seconds."""
        from deme_cli.engine.fid import load_reference
        from deme_cli.engine.merge_methods import MergeSpec
        from deme_cli.engine.runs import RunDir
        from deme_cli.engine.search_objectives import OBJECTIVES
        from deme_cli.engine.search_pool import set_theta_baseline
        from deme_cli.engine.task_vectors import new_candidate_model

        if self.prepared:
            return self.setup_cpu
        r, sz = self.recipe, self.sizes
        search_run = RunDir(study_dir(self.out) / "search")      # the objectives' caches (not a benchmark run dir)
        self.device = self.base.device
        self.model = new_candidate_model(self.inputs).to(self.device).eval().requires_grad_(False)
        self.mergers: dict = {}
        theta_merger = self.merger(MergeSpec.from_section(r.merge))
        self.setup_cpu, self.objectives = {}, {}
        for name in LOSS_OBJECTIVES:
            t = cpu()
            obj = OBJECTIVES[name](self.setup(name, sz.loss_images), search_run, self.inputs)
            set_theta_baseline(obj, theta_merger, self.model, self.inputs.n)
            self.objectives[name], self.setup_cpu[name] = obj, cpu() - t
        for metric in SAMPLE_METRICS:                  # sized for the largest k: its samples are every k's prefix
            t = cpu()
            self.objectives[metric] = OBJECTIVES[metric](self.setup(metric, sz.samples), search_run, self.inputs)
            self.setup_cpu[metric] = cpu() - t
        sampler = self.objectives["kid"].setup
        assert sampler.steps == r.sample.steps and sampler.num_images == sz.samples, "the search samples otherwise"
        t = cpu()
        e = r.eval
        self.test_ref = load_reference(e.reference, self.objectives["kid"].extractor, e.mode,
                                       res=r.data.resolution, split=e.reference_split, batch_size=e.batch_size,
                                       device=self.device, cache_dir=self.out / "reference" / "eval" / "cache",
                                       want_feats=True)
        self.setup_cpu["test_reference"] = cpu() - t
        self.prepared = True
        return self.setup_cpu

    def merger(self, spec):
        from deme_cli.engine.search_pool import make_merger

        if spec not in self.mergers:
            self.mergers[spec] = make_merger(self.inputs, spec, self.device)
        return self.mergers[spec]

    def spec(self, cand: Candidate):
        from deme_cli.engine.merge_methods import MergeSpec

        m = self.recipe.merge
        return MergeSpec(cand.method, cand.density if cand.density is not None else m.density, m.seed)

    # --- one candidate ---

    def score(self, cand: Candidate, check: bool = False) -> dict:
        """Score one candidate (see the module docstring) and write its record; `check`: also run the kid and fid
        objectives directly at the smallest k and compare with the prefix scores (smoke runs)."""
        import numpy as np
        import torch

        from deme_cli.engine.fid import score_features

        self.prepare()
        sz, fp = self.sizes, self.fingerprint(cand)
        t = cpu()
        self.merger(self.spec(cand)).load_into(self.model, list(cand.weights))
        merge_s = cpu() - t
        scores: dict = {}
        for name in LOSS_OBJECTIVES:
            obj = self.objectives[name]
            t = cpu()
            if name == "loss_by_t":         # its __call__ is score_ratios(bin_ratios(model)); keep the ratios
                ratios = obj.bin_ratios(self.model)
                scores[name] = {"score": obj.score_ratios(ratios), "ratios": ratios,
                                "bin_losses": [b * r for b, r in zip(obj.baseline, ratios)]}
            else:
                scores[name] = {"score": float(obj(self.model))}
            scores[name]["cpu_s"] = merge_s + cpu() - t

        # the samples: kept on disk until the candidate is scored (sampling is most of the cost)
        npy, side = self.folder / f"{cand.name}.samples.npy", self.folder / f"{cand.name}.samples.json"
        images = None
        try:
            if json.loads(side.read_text()).get("fingerprint") == fp:
                images = np.load(npy)
                sample_s = json.loads(side.read_text())["cpu_s"]
        except (OSError, ValueError, KeyError):
            images = None
        if images is None or len(images) != sz.samples:
            t = cpu()
            images = self.objectives["kid"].samples(self.model)
            sample_s = cpu() - t
            tmp = npy.with_name(f".{npy.name}.tmp.npy")
            np.save(tmp, images)
            os.replace(tmp, npy)
            write_json(side, {"fingerprint": fp, "cpu_s": sample_s})
        self._grid(images, self.folder / f"{cand.name}.grid.png")
        t = cpu()
        feats = self.objectives["kid"].features(images)
        features_s = cpu() - t
        t = cpu()
        test, _ = score_features(feats, self.test_ref, ["fid", "kid"], seed=self.recipe.seed)
        test_s = cpu() - t
        per_image = (sample_s + features_s) / sz.samples
        for metric in SAMPLE_METRICS:
            for k in sz.ks:
                t = cpu()
                s = self.objectives[metric].score_features(feats[:k])
                scores[f"{metric}@{k}"] = {"score": s, "cpu_s": merge_s + k * per_image + cpu() - t}
        record = {"candidate": asdict(cand), "seed": self.seed, "fingerprint": fp,
                  "test": {**test, "num_images": sz.samples, "reference": self.test_ref.describe(),
                           "scheduler": self.recipe.sample.scheduler, "steps": self.recipe.sample.steps},
                  "objectives": scores,
                  "cpu_s": {"merge": merge_s, "sample": sample_s, "features": features_s, "test_scores": test_s},
                  "threads": torch.get_num_threads(), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if check:
            record["check"] = self._check(feats)
        write_json(self.record_file(cand), record)
        npy.unlink(missing_ok=True)
        side.unlink(missing_ok=True)
        return record

    def _check(self, feats) -> dict:
        """The kid and fid objectives called as the search calls them, at the smallest k, against the prefix scores
        this study uses (they must agree: the same images, the same features up to the Inception's batching)."""
        from deme_cli.engine.runs import RunDir
        from deme_cli.engine.search_objectives import OBJECTIVES

        k, out = self.sizes.ks[0], {}
        for metric in SAMPLE_METRICS:
            direct = OBJECTIVES[metric](self.setup(metric, k), RunDir(study_dir(self.out) / "search"), self.inputs)
            a, b = float(direct(self.model)), self.objectives[metric].score_features(feats[:k])
            out[f"{metric}@{k}"] = {"direct": a, "prefix": b}
            if abs(a - b) > 1e-4 * max(abs(a), abs(b), 1e-12):
                raise SystemExit(f"{metric}@{k}: the search's own score {a} differs from the prefix score {b}")
        return out

    @staticmethod
    def _grid(images, path: Path) -> None:
        from PIL import Image

        from deme_cli.engine.images import tile

        tile([Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in images[:64]]).save(path)


# --- the summary: fits on seed 0, rank correlations on seed 1 ----------------------------------------------------

def load_records(out: Path, seeds: list[int], cands: list[Candidate]) -> dict:
    """{seed: {candidate name: record}} of the records on disk (whatever their fingerprint)."""
    found = {}
    for s in seeds:
        folder = study_dir(out) / f"seed{s}"
        found[s] = {}
        for c in cands:
            try:
                found[s][c.name] = json.loads((folder / f"{c.name}.json").read_text())
            except (OSError, ValueError):
                continue
    return found


def spearman(x: list, y: list) -> Optional[float]:
    from scipy.stats import spearmanr

    if len(x) < 3:
        return None
    rho = float(spearmanr(x, y).statistic)
    return None if rho != rho else rho


def bin_variant_scores(records: dict, name: str, tolerance: float, weights: Optional[list]) -> dict:
    """{candidate: score} of a loss_by_t variant from each record's per-bin ratios, by the objective's own rule."""
    from deme_cli.engine.recipe import MergeSection
    from deme_cli.engine.search_objectives import BIN_SCORES

    m = MergeSection(bin_tolerance=tolerance, bin_weights=weights)
    return {c: BIN_SCORES[name].score(r["objectives"]["loss_by_t"]["ratios"], m) for c, r in records.items()}


def fit(records: dict) -> tuple[float, list]:
    """(bin_tolerance, bin_weights) fitted on one seed's records (see the module docstring)."""
    import numpy as np
    from scipy.optimize import nnls

    names = sorted(records)
    fid = [records[c]["test"]["fid"] for c in names]
    rhos = [(spearman([bin_variant_scores(records, "loss_by_t_guarded", tol, None)[c] for c in names], fid) or -2,
             -i, tol) for i, tol in enumerate(TOLERANCES)]
    tolerance = max(rhos)[2]                        # the best; among equals, the smallest tolerance
    theta = records.get("theta", {}).get("test", {}).get("fid", min(fid))
    a = np.array([[x - 1.0 for x in records[c]["objectives"]["loss_by_t"]["ratios"]] for c in names])
    w, _ = nnls(a, np.array(fid) - theta)
    weights = [round(float(x) / float(w.sum()), 6) for x in w] if w.sum() > 0 else [1.0] * a.shape[1]
    return tolerance, weights


def objective_sets(name: str, sizes: Sizes, tolerance: float, weights: list, steps: int) -> list[str]:
    """The `--set` values that make `deme merge --search` score with this objective as the study did (`steps`: the
    sampler steps of the study's samples)."""
    if "@" in name:
        metric, k = name.split("@")
        return [f'merge.objective="{metric}"', f"merge.search_num_images={k}", f"merge.search_steps={steps}"]
    sets = [f'merge.objective="{name}"', f"merge.search_num_images={sizes.loss_images}"]
    if name == "loss_by_t_guarded":
        sets.append(f"merge.bin_tolerance={tolerance}")
    if name == "loss_by_t_weighted":
        sets.append(f"merge.bin_weights={json.dumps(weights)}")
    return sets


def summarize(out: Path, seeds: list[int], smoke: bool) -> dict:
    sizes, cands = SMOKE if smoke else FULL, candidates(smoke)
    found = load_records(out, seeds, cands)
    complete = all(len(found[s]) == len(cands) for s in seeds)
    fit_seed = FIT_SEED if found.get(FIT_SEED) else seeds[0]
    test_seed = TEST_SEED if found.get(TEST_SEED) else seeds[-1]
    tolerance, weights = fit(found[fit_seed]) if len(found[fit_seed]) >= 3 else (0.0005, None)
    steps = next((r["test"]["steps"] for recs in found.values() for r in recs.values()), None)
    ref_images = next((r["test"]["reference"].get("num_images") for recs in found.values() for r in recs.values()
                       if isinstance(r["test"].get("reference"), dict)), None)
    names = list(LOSS_OBJECTIVES) + list(BIN_VARIANTS) + [f"{m}@{k}" for m in SAMPLE_METRICS for k in sizes.ks]
    per_seed_scores: dict = {}
    for s, recs in found.items():
        scores = {n: {c: r["objectives"][n]["score"] for c, r in recs.items() if n in r["objectives"]}
                  for n in names if n not in BIN_VARIANTS}
        scores["loss_by_t_guarded"] = bin_variant_scores(recs, "loss_by_t_guarded", tolerance, None)
        if weights is not None:
            scores["loss_by_t_weighted"] = bin_variant_scores(recs, "loss_by_t_weighted", 0.0, weights)
        per_seed_scores[s] = scores
    objectives = {}
    for n in names:
        row = {"sets": objective_sets(n, sizes, tolerance, weights, steps), "spearman_fid": {}, "spearman_kid": {},
               "cpu_s_per_candidate": {}}
        for s, recs in found.items():
            sc = per_seed_scores[s].get(n, {})
            scored = [c for c in recs if c in sc]
            row["spearman_fid"][str(s)] = spearman([sc[c] for c in scored], [recs[c]["test"]["fid"] for c in scored])
            row["spearman_kid"][str(s)] = spearman([sc[c] for c in scored], [recs[c]["test"]["kid"] for c in scored])
            base = "loss_by_t" if n in BIN_VARIANTS else n
            costs = [recs[c]["objectives"][base]["cpu_s"] for c in scored if base in recs[c]["objectives"]]
            row["cpu_s_per_candidate"][str(s)] = sum(costs) / len(costs) if costs else None
        objectives[n] = row
    # the choice: among the objectives within 0.05 of the best seed-1 rank correlation, the cheapest per candidate
    ranked = [(n, o["spearman_fid"].get(str(test_seed)), o["cpu_s_per_candidate"].get(str(test_seed)))
              for n, o in objectives.items()]
    ranked = [x for x in ranked if x[1] is not None and x[2] is not None]
    choice = None
    if ranked:
        best = max(r for _, r, _ in ranked)
        choice = min((x for x in ranked if x[1] >= best - 0.05), key=lambda x: x[2])[0]
    summary = {"seeds": seeds, "complete": complete, "fit_seed": fit_seed, "test_seed": test_seed,
               "sizes": asdict(sizes), "steps": steps, "reference_images": ref_images,
               "candidates": [asdict(c) for c in cands],
               "fitted": {"bin_tolerance": tolerance, "tolerances_tried": list(TOLERANCES), "bin_weights": weights},
               "objectives": objectives, "choice": choice,
               "choice_reaches": GOOD, "choice_ok": bool(choice and objectives[choice]["spearman_fid"][str(test_seed)]
                                                        >= GOOD),
               "rule": f"the cheapest objective (CPU s per candidate, seed {test_seed}) among those whose Spearman "
                       f"rank correlation with FID on seed {test_seed} is within 0.05 of the best",
               "per_candidate": {str(s): {c: {"fid": r["test"]["fid"], "kid": r["test"]["kid"],
                                         "kid_std": r["test"].get("kid_std"),
                                         **{n: per_seed_scores[s].get(n, {}).get(c) for n in names}}
                                     for c, r in recs.items()} for s, recs in found.items()},
               "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return summary


def render(summary: dict) -> str:
    """objectives.md: the rank correlations and costs, the fitted settings, every candidate's numbers."""
    fs, ts = str(summary["fit_seed"]), str(summary["test_seed"])
    sz = summary["sizes"]
    fitted = summary["fitted"]

    def f(x, d=3):
        return "-" if x is None else f"{x:.{d}f}"
    n_ref = f"{summary['reference_images']:,}" if summary.get("reference_images") else "?"
    lines = [f"{len(summary['candidates'])} candidate merges of each seed's DeMe range models (`deme.toml`, N = 4), "
             f"each scored with every search objective on `holdout-2k/` exactly as `deme merge --search` scores it, "
             f"and with FID and KID against all {n_ref} test images at "
             f"{sz['samples']:,} samples (DDIM-{summary['steps']}, image k from seed sample.seed + k). Fitted on seed {fs} only: `merge.bin_tolerance = "
             f"{fitted['bin_tolerance']}` (of {', '.join(map(str, fitted['tolerances_tried']))}: the highest "
             f"Spearman on seed {fs}) and `merge.bin_weights = {fitted['bin_weights']}` (non-negative least squares "
             f"of FID - FID(theta) on the per-bin loss ratios - 1). Spearman rank correlation with FID (1: the same "
             f"order as FID) on seed {ts}, the test; seed {fs}'s is in-sample for the fitted objectives. CPU seconds "
             f"per candidate (one core; kid/fid: sampling and Inception of k images, prorated from the "
             f"{sz['samples']:,} measured). `python benchmarks/fashion-mnist/objectives.py`"
             + ("" if summary["complete"] else " (INCOMPLETE: some candidates are missing)") + ".", "",
             f"| objective | Spearman with FID, seed {ts} | Spearman with KID, seed {ts} | Spearman with FID, seed {fs} "
             f"| CPU s per candidate | `deme merge --search` settings |", "|---|---|---|---|---|---|"]
    for n, o in summary["objectives"].items():
        mark = " **(choice)**" if n == summary["choice"] else ""
        lines.append(f"| {n}{mark} | {f(o['spearman_fid'].get(ts))} | {f(o['spearman_kid'].get(ts))} | "
                     f"{f(o['spearman_fid'].get(fs))} | {f(o['cpu_s_per_candidate'].get(ts), 1)} | "
                     + " ".join(f"`{s}`" for s in o["sets"]) + " |")
    c = summary["choice"]
    lines += ["", f"Choice ({summary['rule']}): **{c}**"
              + (f", which reaches {summary['choice_reaches']}" if summary["choice_ok"] else
                 f"; no objective reaches {summary['choice_reaches']} on seed {ts}: the recipe default stays "
                 f"uniform weights") + "."]
    names = list(summary["objectives"])
    for s, rows in summary["per_candidate"].items():
        lines += ["", f"Seed {s}: every candidate (FID and KID x 1000 against the test images; the objectives' "
                  f"scores, lower is better):", "",
                  "| candidate | FID | KID x1000 | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
        for name, row in sorted(rows.items(), key=lambda kv: kv[1]["fid"]):
            lines.append(f"| {name} | {f(row['fid'], 2)} | {f(1000 * row['kid'], 3)} | "
                         + " | ".join("-" if row.get(n) is None else f"{row[n]:.6g}" for n in names)
                         + " |")
    return "\n".join(lines) + "\n"


# --- the command ------------------------------------------------------------------------------------------------

def worker(out: Path, tasks: list[tuple[int, str]], smoke: bool, base: str) -> None:
    """Score the tasks (seed, candidate name) not yet done, one seed's setup at a time."""
    for seed in dict.fromkeys(s for s, _ in tasks):
        study = SeedStudy(out, seed, smoke, base)
        first = True
        for _, name in [t for t in tasks if t[0] == seed]:
            cand = BY_NAME[name]
            if study.done(cand):
                continue
            t0, c0 = time.time(), cpu()
            rec = study.score(cand, check=smoke and first)
            first = False
            log(f"seed {seed} {name}: FID {rec['test']['fid']:.3f}, loss_by_t "
                f"{rec['objectives']['loss_by_t']['score']:.5f} ({time.time() - t0:.0f} s, {cpu() - c0:.0f} CPU s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="benchmark folder (run.py --out; default runs/fmnist-bench, "
                   "or runs/fmnist-bench-smoke with --smoke)")
    p.add_argument("--seeds", default="0,1", help="seeds of the DeMe run dirs (<out>/deme, <out>/deme-seed<s>)")
    p.add_argument("--only", default=None, help="comma-separated candidate names (default: all of them)")
    p.add_argument("--jobs", type=int, default=1, help="scoring processes side by side (candidates split between "
                   "them); on a 2-core CPU, --jobs 2 --threads 1")
    p.add_argument("--threads", type=int, default=None, help="torch/OMP threads of each scoring process")
    p.add_argument("--nice", type=int, default=0, help="add this to the niceness of this process and its workers")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (16 samples, 32 held-out images), for run.py "
                   "--smoke's folder")
    p.add_argument("--base", default="assets/fmnist-ddpm", help="theta: the model the range models were finetuned "
                   "from (run.py's model.pretrained)")
    p.add_argument("--summary-only", action="store_true", help="score nothing; rebuild the summary from the records")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tasks", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.nice:
        os.nice(args.nice)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    out = args.out or Path("runs/fmnist-bench-smoke" if args.smoke else "runs/fmnist-bench")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.worker:
        worker(out, [(int(t.split(":", 1)[0]), t.split(":", 1)[1]) for t in args.tasks.split(",") if t],
               args.smoke, args.base)
        return 0
    names = args.only.split(",") if args.only else [c.name for c in candidates(args.smoke)]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        p.error(f"--only: unknown candidate(s) {unknown}; known: {', '.join(BY_NAME)}")

    rc = 0
    if not args.summary_only:
        studies = {s: SeedStudy(out, s, args.smoke, args.base) for s in seeds}
        tasks = [(s, n) for s in seeds for n in names if not studies[s].done(BY_NAME[n])]
        log(f"{len(tasks)} of {len(seeds) * len(names)} candidate scorings to do in {study_dir(out)}")
        if tasks:
            # the references' features once, here, before the workers start (they read them from the caches)
            t = cpu()
            studies[seeds[0]].prepare()
            log(f"references ready ({cpu() - t:.0f} CPU s)")
            env = dict(os.environ)
            if args.threads:
                env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
            jobs = max(1, min(args.jobs, len(tasks)))
            procs = []
            for j in range(jobs):
                mine = tasks[j::jobs]
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--out", str(out), "--base",
                       args.base, "--tasks", ",".join(f"{s}:{n}" for s, n in mine)]
                cmd += (["--threads", str(args.threads)] if args.threads else []) + (["--smoke"] if args.smoke else [])
                logf = open(study_dir(out) / f"worker-{j}.log", "a")
                log(f"worker {j}: {len(mine)} candidates, log {logf.name}")
                procs.append((subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT), logf))
            # a stop of this process (Ctrl-C, SIGTERM) stops the workers too: a candidate in progress is redone
            # on resume (its samples are kept once drawn)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
            try:
                for proc, logf in procs:
                    rc = proc.wait() or rc
                    logf.close()
            finally:
                for proc, _ in procs:
                    if proc.poll() is None:
                        proc.terminate()
            if rc:
                log(f"a worker failed (exit {rc}; logs {study_dir(out)}/worker-*.log); run the same command again "
                    f"to resume")
    summary = summarize(out, seeds, args.smoke)
    study_dir(out).mkdir(parents=True, exist_ok=True)
    write_json(study_dir(out) / SUMMARY, summary)
    text = render(summary)
    (study_dir(out) / TABLE).write_text(text)
    print(text)
    return rc or (0 if summary["complete"] else 1)


if __name__ == "__main__":
    sys.exit(main())
