"""Run the Fashion-MNIST reproduction benchmark with one command: data, (optionally) a longer-pretrained base, every
recipe of benchmarks/fashion-mnist/recipes/ through `deme run`, for each seed of the whole finetuning, then the table.

    python benchmarks/fashion-mnist/run.py                  # the full benchmark -> runs/fmnist-bench, RESULTS.md
    python benchmarks/fashion-mnist/run.py --smoke          # the same pipeline shrunk to minutes -> runs/fmnist-bench-smoke
    python benchmarks/fashion-mnist/run.py --suite keep-the-gain --jobs 2 --threads 1 --nice 19   # issue 26's rows

Run it from the repository root. It is resumable: run the same command again after an interruption and every stage
that already finished is skipped (`deme run` keeps finished ranges, merges, samples and evals; the data folders are
kept while their settings match). What each step runs, its settings and its cost are in PLAN.md next to this file.

Steps:
1. data: make_assets.py writes <out>/data/{train,holdout,test}/ (16 px PNGs): training images 0-54,999 (finetuning),
   55,000-59,999 (held out: the merge weight search uses the first 2,000 of them, holdout-2k/), and all 10,000 test
   images (the FID/KID reference and the loss by timestep only).
2. base: assets/fmnist-ddpm, or with --pretrain-steps N a DDPM pretrained from scratch for N steps by pretrain.py.
3. every recipe, for every seed in --seeds (seed s: `seed = s`, `sample.seed = s * 1,000,000`, run dir
   <out>/<name>-seed<s>, seed 0 without the suffix), through `python -m deme_cli run RECIPE --out <run dir> --set ...`
   (the data/base paths, the scale's sizes); deme-searched runs on a copy of deme's range models (its merge searches
   the weights: row (e)). Each run dir gets command.json (the exact command, the hardware, wall time).
   --scale cpu (the default without CUDA): 1,000 samples per model with DDIM-50, and a smaller weight search (KID of
   250 samples per candidate from the eval's DDIM-50, scales 0.5, 1, 1.5); --scale gpu: the recipes as written (5,000 samples,
   DDIM-100; the search: 1,000 DDIM-100 samples per candidate, 5 scales).
4. results.py: the table, with the mean and spread over seeds and the loss-by-timestep plot of all rows
   (benchmarks/fashion-mnist/RESULTS.md; with --smoke <out>/RESULTS-smoke.md, never RESULTS.md).

--suite keep-the-gain (issue 26; --scale cpu-5k on a CPU: 5,000 samples per model, DDIM-50): n1-all-timesteps, deme,
deme-lora (its ensemble, the routed model, sampled), n1-all-timesteps-4x and deme-4x (8,000 total finetuning steps);
then objectives.py (item 1's study, resumable; skipped when its summary is complete) and rows (f), deme-chosen and
deme-4x-chosen: the range models of deme / deme-4x, merged with weights searched by the study's choice of objective
(--chosen-objective overrides it). When the study is already complete, each row (f) runs right after its range models
(deme-chosen with the 5,000-sample rows, before the 4x training), not after every other run dir. Its table is a
section of RESULTS.md; the rest of the file stays as it is.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from deme_cli.engine.recipe import tomllib  # tomli on Python 3.10

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import results  # noqa: E402

# recipe name -> run it for seeds other than 0 too (every row of the table has two seeds)
RECIPES = ["n1-all-timesteps", "deme", "deme-searched", "ablation-sampling", "ablation-consistency", "n1-projection",
           "n1-min-snr", "deme-lora"]
MAIN_RECIPES = ["n1-all-timesteps", "deme", "deme-searched"]     # rows (a)-(e); the others are Table 3's ablations
# --suite keep-the-gain (issue 26): rows (a)-(d), (f) and the LoRA ensemble at --scale cpu-5k, and 4x the budget
KEEP_THE_GAIN = ["n1-all-timesteps", "deme", "deme-lora", "deme-chosen", "n1-all-timesteps-4x", "deme-4x",
                 "deme-4x-chosen"]
SUITES = {"table": RECIPES, "keep-the-gain": KEEP_THE_GAIN}
# the suite's run.models where they differ from the recipe's (not a training key: the trained ranges are kept):
# the LoRA ranges as the routed ensemble, and no second sampling of the base (n1-all-timesteps' has the same seeds)
SUITE_MODELS = {"keep-the-gain": {"deme-lora": ["ensemble"], "n1-all-timesteps-4x": ["range:0"]}}
# a run dir that runs another recipe's file with its own --set values (no second copy of the recipe)
VARIANTS = {
    # (f): the merge whose weights item 1's objective (objectives.py: its choice, or --chosen-objective) searched on
    # holdout-2k, one round of coordinate descent over merge.candidates from the uniform average: 1 + 4 x 6 = 25
    # merges (fid at 1,000 samples: ~200 CPU-s each, ~1.5 h of a core per seed; 3 rounds would be up to 3x that)
    "deme-chosen": ("deme", ['name="deme-chosen"', 'merge.weights="search"', 'merge.search="coordinate"',
                             'merge.search_rounds=1', 'run.models=["merged"]']),
    "deme-4x-chosen": ("deme-4x", ['name="deme-4x-chosen"', 'merge.weights="search"', 'merge.search="coordinate"',
                                   'merge.search_rounds=1', 'run.models=["merged"]']),
}
CHOSEN = {"deme-chosen", "deme-4x-chosen"}     # their search needs objectives.py's choice of objective
DERIVED = {"deme-searched": "deme",     # recipe -> the recipe whose range models it merges (copied, not retrained)
           "deme-chosen": "deme", "deme-4x-chosen": "deme-4x"}
# recipe -> models scored by the loss by timestep only (no samples, so no FID/KID): after its `deme run`, one
# `deme eval --models <run.models + these> --set eval.metrics=["loss"]` adds them to eval/ and to loss-by-t.png
# (a merged model only where run.models makes one)
RANGE_MODELS = ["range:0", "range:1", "range:2", "range:3"]
LOSS_ONLY = {"deme": RANGE_MODELS, "deme-4x": RANGE_MODELS,
             "ablation-sampling": ["ensemble"], "ablation-consistency": ["ensemble"],
             "deme-lora": ["ensemble"] + RANGE_MODELS}
BASELINES = ["n1-min-snr", "deme-lora"]     # issue 17's rows: their table is RESULTS-baselines.md (run.py --only)
TOTAL_STEPS = 2000          # finetuning steps per recipe, shared by its ranges (equal for every row)
BUDGET_4X = {"n1-all-timesteps-4x", "deme-4x"}    # 4x TOTAL_STEPS (issue 26, item 4): N = 1 x 8,000, N = 4 x 2,000
SEARCH_IMAGES = 2000        # holdout-2k: the first images of holdout/, the weight search's reference

FULL = dict(train=55000, holdout=5000, test=10000)
SMOKE = dict(train=300, holdout=64, test=100)
SMOKE_TOTAL_STEPS = 16      # 4 per range at N = 4, 16 at N = 1
SMOKE_SETS = [              # everything shrunk: a few minutes on 2 CPU cores
    "train.batch_size=16", "train.checkpoint_every=2", "train.log_every=2",
    "sample.num_images=16", "sample.steps=4", "sample.batch_size=16",
    "merge.scales=[1.0]", "merge.search_num_images=16", "merge.search_steps=2",
    "eval.batch_size=50", "eval.loss_bins=4",
]
SCALES = {                  # --scale: what changes between a CPU and a GPU run (the training never does)
    "gpu": [],
    "cpu": ["sample.num_images=1000", "sample.steps=50", "sample.batch_size=100",
            "merge.search_num_images=250", "merge.scales=[0.5, 1.0, 1.5]"],
    # issue 26: 5,000 samples per model on the CPU (DDIM-50); the same samples' seeds as "cpu", 4,000 more each
    "cpu-5k": ["sample.num_images=5000", "sample.steps=50", "sample.batch_size=100",
               "merge.search_num_images=250", "merge.scales=[0.5, 1.0, 1.5]"],
}


def log(msg: str) -> None:
    print(f"[fmnist-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_cmd(cmd: list[str], env=None) -> None:
    log("$ " + shlex.join(cmd))
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        log(f"failed with exit code {rc}: {shlex.join(cmd)}; fix the cause and run the same command again to resume")
        sys.exit(rc)


def make_data(out: Path, sizes: dict, env) -> Path:
    data = out / "data"
    marker = data / "assets.json"
    if marker.is_file() and json.loads(marker.read_text()) == sizes:
        log(f"data: kept {data} ({sizes})")
        return data
    run_cmd([sys.executable, str(HERE / "make_assets.py"), "--out", str(data), "--train", str(sizes["train"]),
             "--holdout", str(sizes["holdout"]), "--test", str(sizes["test"]), "--resolution", "16"], env)
    marker.write_text(json.dumps(sizes) + "\n")
    return data


def search_subset(data: Path, k: int) -> Path:
    """holdout-2k/: copies of the first k images of holdout/ (sorted by name), the weight search's reference."""
    dest = data / "holdout-2k"
    files = sorted((data / "holdout").glob("*.png"))[:k]
    if dest.is_dir() and sorted(f.name for f in dest.glob("*.png")) == [f.name for f in files]:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    tmp = data / ".holdout-2k.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in files:
        shutil.copy2(f, tmp / f.name)
    tmp.rename(dest)
    return dest


def copy_range_models(src: Path, dest: Path) -> None:
    """The trained range models of run dir `src` (ranges.json, ranges/<i>/final, final-raw, metrics.jsonl) into
    `dest`, so that a second merge of the same models gets its own run dir (merged/, samples/, eval/)."""
    if (dest / "ranges.json").is_file():
        return
    for f in sorted((src / "ranges").glob("*/final")):
        i = f.parent.name
        for part in ("final", "final-raw"):
            shutil.copytree(src / "ranges" / i / part, dest / "ranges" / i / part, dirs_exist_ok=True)
        shutil.copy2(src / "ranges" / i / "metrics.jsonl", dest / "ranges" / i / "metrics.jsonl")
    shutil.copy2(src / "ranges.json", dest / "ranges.json")     # last: its presence marks a complete copy


def make_base(out: Path, steps: int, smoke: bool, threads: int | None, env, data: Path) -> str:
    if not steps:
        return "assets/fmnist-ddpm"
    base = out / f"base-{steps}"
    if (base / "model_index.json").is_file():
        log(f"base: kept {base}")
        return str(base)
    cmd = [sys.executable, str(HERE / "pretrain.py"), "--steps", str(steps), "--out", str(base),
           "--work", str(out / f"pretrain-{steps}"), "--threads", str(threads or os.cpu_count() or 1),
           "--image-dirs", str(data / "train"), str(data / "holdout")]    # all 60,000 training images
    if smoke:
        cmd += ["--checkpoint-every", "2", "--log-every", "1", "--grid-steps", "2", "--warmup", "1"]
    run_cmd(cmd, env)
    return str(base)


def seed_reference_cache(out: Path, run_dir: Path) -> None:
    """Copy the test set's Inception features from an earlier run dir (same paths -> same cache key), so the 10,000
    reference images go through Inception once for the whole benchmark instead of once per recipe."""
    dest = run_dir / "eval" / "cache"
    for f in sorted(out.glob("*/eval/cache/reference-*.npy")):
        if f.parent != dest and not (dest / f.name).exists():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest / f.name)


def record_call(name: str, seed: int, run_dir: Path, cmd: list[str], t1: float, args) -> None:
    """Append this call (start, wall time, stage times, hardware) to <run_dir>/command.json."""
    wall = time.time() - t1
    record_file = run_dir / "command.json"
    old = json.loads(record_file.read_text()) if record_file.is_file() else {}
    run_json = run_dir / "run.json"
    stages = {k: v.get("seconds") for k, v in json.loads(run_json.read_text())["stages"].items()} \
        if run_json.is_file() else {}
    # run.json keeps, per stage, the seconds of the call that did its work (a stage a later call kept keeps them):
    # every call is logged here with those times, its wall time and its hardware, so that the table can say how long
    # the work took and where, also when a run was interrupted and resumed elsewhere (results.stage_seconds counts a
    # stage's work once)
    calls = old.get("calls", []) + [{"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t1)),
                                     "wall_s": round(wall, 1), "stages": stages,
                                     "hardware": results.hardware(args.threads), "parallel": args.parallel,
                                     "jobs": args.jobs}]
    record = {"command": shlex.join(["deme"] + cmd[3:]), "recipe": name, "seed": seed, "smoke": args.smoke,
              "calls": calls}
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    log(f"{name} (seed {seed}): {wall:.0f} s")


def precompute_reference(out: Path, recipe: Path, sets: list[str]) -> None:
    """The reference set's Inception features into <out>/reference/eval/cache/ (eval's own cache file, same key),
    through the recipe's own eval settings, so that seed_reference_cache can hand them to every run dir."""
    from deme_cli.engine.devices import pick_device
    from deme_cli.engine.features import load_extractor
    from deme_cli.engine.fid import load_reference
    from deme_cli.engine.recipe import load_recipe

    t0 = time.time()
    r = load_recipe(recipe, sets)
    dev = pick_device(r.train.device)
    ext = load_extractor(r.eval.feature_extractor, r.eval.mode, dev)
    ref = load_reference(r.eval.reference, ext, r.eval.mode, batch_size=r.eval.batch_size, device=dev,
                         cache_dir=out / "reference" / "eval" / "cache", want_feats=True)
    log(f"reference features: {ref.num_images} images, {time.time() - t0:.0f} s")


def is_trained(run_dir: Path) -> bool:
    """Every range of the run dir has its final/ model (ranges.json written, nothing left to train)."""
    try:
        n = len(json.loads((run_dir / "ranges.json").read_text())["ranges"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((run_dir / "ranges" / str(i) / "final" / "deme.json").is_file() for i in range(n))


def run_dir_of(out: Path, name: str, seed: int) -> Path:
    return out / (name if seed == 0 else f"{name}-seed{seed}")


def recipe_file(name: str) -> Path:
    """The recipe a run dir's `deme run` reads (a variant's: the recipe it varies)."""
    return HERE / "recipes" / f"{VARIANTS.get(name, (name,))[0]}.toml"


def budget(name: str) -> int:
    """The recipe's total finetuning steps, over all its ranges."""
    base = VARIANTS.get(name, (name,))[0]
    return 4 * TOTAL_STEPS if base in BUDGET_4X else TOTAL_STEPS


def deme_sets(name: str, seed: int, *, out: Path, base: str, scale: str, smoke: bool, suite: str = "table",
              extra: list[str] = ()) -> list[str]:
    """Every `--set` of run dir (name, seed)'s `deme run`: the data and base paths, the seed, the scale's sizes,
    the suite's run.models, the variant's own values, smoke sizes, then `extra`. The training values are the
    recipe's: only paths and seeds are set for them (a run dir trained by `deme train` with the same paths resumes)."""
    data = out / "data"
    cfg = tomllib.loads(recipe_file(name).read_text())
    n = int(cfg["ranges"]["n"])
    sets = [f"model.pretrained={json.dumps(base)}", f"data.path={json.dumps(str(data / 'train'))}",
            f"merge.search_reference={json.dumps(str(data / 'holdout-2k'))}",
            f"eval.reference={json.dumps(str(data / 'test'))}"]
    if seed != 0:
        sets += [f"seed={seed}", f"sample.seed={seed * 1_000_000}"]
    sets += SCALES[scale]
    models = SUITE_MODELS.get(suite, {}).get(name)
    if models:
        sets.append(f"run.models={json.dumps(models)}")
    sets += VARIANTS.get(name, (name, []))[1]
    if smoke:
        sets += SMOKE_SETS + [f"train.steps={SMOKE_TOTAL_STEPS * budget(name) // TOTAL_STEPS // n}"]
    else:
        assert n * int(cfg["train"]["steps"]) == budget(name), f"{name}: total finetuning steps != {budget(name)}"
    return sets + list(extra)


def chosen_sets(out: Path, chosen: str | None) -> list[str] | None:
    """The --set values of the search objective item 1's study chose (<out>/objectives/objectives.json, written by
    objectives.py): its "choice", or the objective named by --chosen-objective; None while the study is not done."""
    import objectives

    summary = objectives.read_summary(out)
    if summary is None:
        return None
    name = chosen or summary.get("choice")
    if name not in summary.get("objectives", {}):
        raise SystemExit(f"--chosen-objective {name!r} is not one of the study's objectives "
                         f"({', '.join(summary.get('objectives', {}))})")
    return list(summary["objectives"][name]["sets"])


def effective_models(name: str, suite: str) -> list[str]:
    """run.models of run dir `name` in `suite`: the suite's or variant's value, else the recipe's."""
    for s in VARIANTS.get(name, (name, []))[1]:
        if s.startswith("run.models="):
            return json.loads(s.split("=", 1)[1])
    return SUITE_MODELS.get(suite, {}).get(name) or tomllib.loads(recipe_file(name).read_text())["run"]["models"]


def loss_only_models(name: str, suite: str) -> list[str]:
    """The models `deme eval` scores by the loss by timestep after the run: run.models and LOSS_ONLY's (a merged
    model only where run.models makes one), or [] when there are none to add."""
    models = effective_models(name, suite)
    extra = [m for m in LOSS_ONLY.get(name, []) if m not in models and (m != "merged" or "merged" in models)]
    return models + extra if extra else []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (300/64/100 images, 4 steps per range, 16 "
                   "samples, DDIM-4, a 4-merge search); writes <out>/RESULTS-smoke.md, never RESULTS.md")
    p.add_argument("--suite", choices=sorted(SUITES), default="table", help="table: every recipe of the main "
                   "table and Table 3 (RESULTS.md's first table); keep-the-gain (issue 26): rows (a)-(d), (f) and "
                   "the LoRA ensemble, and 4x the budget, with objectives.py's study before row (f) (a section of "
                   "RESULTS.md)")
    p.add_argument("--scale", choices=["auto", *SCALES], default="auto", help="gpu: 5,000 samples per model, "
                   "DDIM-100; cpu: 1,000 samples, DDIM-50, a smaller weight search; cpu-5k: 5,000 samples, DDIM-50; "
                   "auto: gpu when CUDA is available, else cpu (cpu-5k for --suite keep-the-gain)")
    p.add_argument("--out", type=Path, default=None, help="benchmark folder (default runs/fmnist-bench, or "
                   "runs/fmnist-bench-smoke with --smoke)")
    p.add_argument("--pretrain-steps", type=int, default=0, help="pretrain a base from scratch for this many steps "
                   "(pretrain.py; CUDA when available) instead of using assets/fmnist-ddpm; 0: use the asset")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds of the whole finetuning (seed s also "
                   "samples from sample.seed = s * 1,000,000)")
    p.add_argument("--only", default=None, help="comma-separated recipe names to run (default: the suite's)")
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of each child process")
    p.add_argument("--jobs", type=int, default=1, help="run dirs processed side by side (each a `deme run` process, "
                   "its log in <run dir>/deme-run.log); on a 2-core CPU, --jobs 2 --threads 1")
    p.add_argument("--nice", type=int, default=0, help="add this to the niceness of this script and every child "
                   "(19: run only when the CPU is otherwise idle)")
    p.add_argument("--parallel", action="store_true", help="every run dir at once (--jobs = their number): for a "
                   "GPU that one tiny model leaves idle")
    p.add_argument("--chosen-objective", default=None, help="row (f)'s search objective: one of objectives.py's "
                   "objective names (e.g. loss_by_t_guarded, kid@1000); default: the study's choice")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra `deme run --set` for every recipe")
    p.add_argument("--dest", type=Path, default=None, help="the table's Markdown file (default: RESULTS.md, or "
                   "RESULTS-baselines.md when --only names baseline recipes only; smoke runs: <out>/RESULTS-smoke.md)")
    args = p.parse_args(argv)

    if args.nice:
        os.nice(args.nice)                          # inherited by every child process
    out = args.out or Path("runs/fmnist-bench-smoke" if args.smoke else "runs/fmnist-bench")
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    suite = SUITES[args.suite]
    only = set(args.only.split(",")) if args.only else set(suite)
    unknown = only - set(suite)
    if unknown:
        p.error(f"--only: unknown recipe(s) {sorted(unknown)}; the suite {args.suite} has: {', '.join(suite)}")
    scale = args.scale
    if scale == "auto":
        import torch
        scale = "gpu" if torch.cuda.is_available() else "cpu-5k" if args.suite == "keep-the-gain" else "cpu"

    t0 = time.time()
    (out / "benchmark.json").write_text(json.dumps(
        {"command": shlex.join(["python", *sys.argv]), "smoke": args.smoke, "scale": scale, "suite": args.suite,
         "seeds": seeds, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "hardware": results.hardware(args.threads)},
        indent=2) + "\n")
    data = make_data(out, SMOKE if args.smoke else FULL, env)
    search_subset(data, 32 if args.smoke else SEARCH_IMAGES)
    base = make_base(out, args.pretrain_steps, args.smoke, args.threads, env, data)

    def chains_of(names: list[str], chosen: list[str] = ()) -> list[list]:
        """The jobs of these recipes, every seed, grouped into chains: (seed, the recipe that trains) -> in order.
        `chosen`: the --set values of the CHOSEN recipes only (their search objective)."""
        chains: dict[tuple, list] = {}
        for name, seed in [(name, seed) for seed in seeds for name in suite if name in names]:
            recipe = recipe_file(name)
            run_dir = run_dir_of(out, name, seed)
            sets = deme_sets(name, seed, out=out, base=base, scale=scale, smoke=args.smoke, suite=args.suite,
                             extra=(list(chosen) if name in CHOSEN else []) + args.sets)
            rel = recipe.relative_to(Path.cwd()) if recipe.is_relative_to(Path.cwd()) else recipe
            cmd = [sys.executable, "-m", "deme_cli", "run", str(rel), "--out", str(run_dir)]
            for s in sets:
                cmd += ["--set", s]
            src = DERIVED.get(name)
            chains.setdefault((seed, src or name), []).append(
                (name, seed, run_dir, cmd, recipe, sets, run_dir_of(out, src, seed) if src else None))
        return list(chains.values())

    # rows (f) join the first pass when item 1's study is already complete: each runs right after its range models
    # (in their chain), so deme-chosen comes with the 5,000-sample rows and does not wait for the 4x training
    chosen = chosen_sets(out, args.chosen_objective) if only & CHOSEN and objectives_done(out, seeds) else None
    if chosen is not None:
        log(f"row (f): search objective {' '.join(chosen)} (objectives.py's study is complete)")
    first = chains_of(sorted(only if chosen is not None else only - CHOSEN), chosen or [])
    jobs = [job for chain in first for job in chain]
    if jobs and not args.smoke:
        # the test set's features once, before the runs start, so that no two runs compute them side by side
        precompute_reference(out, jobs[0][4], jobs[0][5])
    failed: list[str] = []
    run_chains(first, out, env, args, failed)
    if only & CHOSEN and chosen is None:
        # row (f): item 1's study (objectives.py, resumable) chooses the objective that searches its weights
        rc = 0 if objectives_done(out, seeds) else subprocess.call(objectives_cmd(out, args, seeds), env=env)
        extra = chosen_sets(out, args.chosen_objective) if rc == 0 else None
        if extra is None:
            failed.append(f"row (f): objectives.py did not finish (exit {rc}), so no objective was chosen; see "
                          f"{out / 'objectives'}")
        else:
            log(f"row (f): search objective {' '.join(extra)}")
            run_chains(chains_of(sorted(only & CHOSEN), extra), out, env, args, failed)
    if failed:
        log(f"failed: {'; '.join(failed)}; fix the cause and run the same command again to resume")
        return 1
    dest = args.dest
    if dest is None and not args.smoke and only <= set(BASELINES):
        dest = results.BASELINES_MD
    dest = results.write(out, dest)
    log(f"done in {time.time() - t0:.0f} s; table: {dest}")
    return 0


def objectives_cmd(out: Path, args, seeds: list[int]) -> list[str]:
    """objectives.py for this benchmark folder, with run.py's own --jobs, --threads and --smoke."""
    cmd = [sys.executable, str(HERE / "objectives.py"), "--out", str(out), "--seeds", ",".join(map(str, seeds)),
           "--jobs", str(max(1, args.jobs))]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return cmd + (["--smoke"] if args.smoke else [])


def objectives_done(out: Path, seeds: list[int]) -> bool:
    import objectives

    summary = objectives.read_summary(out)
    return summary is not None and sorted(summary.get("seeds", [])) == sorted(seeds) and summary.get("complete")


def chain_order(chains: list[list]) -> list[list]:
    """The order the workers take chains in: the main rows before the others, so that on a CPU the rows that settle
    the question finish first and an interrupted run is missing ablation seeds, not main ones; within each, the chains
    that still train first, then the shorter chains (a chain's second job is a weight search, the longest job: the
    single rows finish before it), then by seed."""
    return sorted(chains, key=lambda c: (c[0][0] not in MAIN_RECIPES + KEEP_THE_GAIN[:3], is_trained(c[0][2]),
                                         len(c), c[0][1]))


def run_chains(chains: list[list], out: Path, env: dict, args, failed: list[str]) -> None:
    """Run each chain's jobs in order, --jobs chains side by side; a failed job ends its chain (listed in
    `failed`)."""
    for chain in chains:
        for name, seed, run_dir, *_ in chain:
            seed_reference_cache(out, run_dir)
    lock = threading.Lock()

    def run_chain(chain: list) -> None:
        for name, seed, run_dir, cmd, recipe, _, src in chain:
            if src is not None:
                if not (src / "ranges.json").is_file() or any(not (f / "deme.json").is_file() for f in
                                                               (src / "ranges").glob("*/final")):
                    with lock:
                        failed.append(f"{name} (seed {seed}): {src} has no trained range models")
                    return
                copy_range_models(src, run_dir)
            seed_reference_cache(out, run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            t1 = time.time()
            with open(run_dir / "deme-run.log", "a") as logf:
                log("$ " + shlex.join(cmd) + f"  > {logf.name}")
                rc = subprocess.call(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)
            models = loss_only_models(name, args.suite)
            if rc == 0 and models:
                eval_cmd = [("eval" if i == cmd.index("run") else c) for i, c in enumerate(cmd)]
                eval_cmd += ["--models", ",".join(models), "--set", 'eval.metrics=["loss"]']
                with open(run_dir / "deme-run.log", "a") as logf:
                    log("$ " + shlex.join(eval_cmd) + f"  > {logf.name}")
                    rc = subprocess.call(eval_cmd, env=env, stdout=logf, stderr=subprocess.STDOUT)
            record_call(name, seed, run_dir, cmd, t1, args)
            if rc != 0:
                with lock:
                    failed.append(f"{name} (seed {seed}, exit {rc}, log {run_dir / 'deme-run.log'})")
                return

    width = len(chains) if args.parallel else max(1, args.jobs)
    queue = chain_order(chains)
    threads = []
    for _ in range(min(width, len(queue))):
        def worker():
            while True:
                with lock:
                    if not queue:
                        return
                    chain = queue.pop(0)
                run_chain(chain)
        th = threading.Thread(target=worker)
        th.start()
        threads.append(th)
    for th in threads:
        th.join()


if __name__ == "__main__":
    sys.exit(main())
