"""Run the Fashion-MNIST reproduction benchmark with one command: data, (optionally) a longer-pretrained base, every
recipe of benchmarks/fashion-mnist/recipes/ through `deme run`, for each seed of the whole finetuning, then the table.

    python benchmarks/fashion-mnist/run.py                  # the full benchmark -> runs/fmnist-bench, RESULTS.md
    python benchmarks/fashion-mnist/run.py --smoke          # the same pipeline shrunk to minutes -> runs/fmnist-bench-smoke

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
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import results  # noqa: E402

# recipe name -> run it for seeds other than 0 too (every row of the table has two seeds)
RECIPES = ["n1-all-timesteps", "deme", "deme-searched", "ablation-sampling", "ablation-consistency", "n1-projection",
           "n1-min-snr", "deme-lora"]
MAIN_RECIPES = ["n1-all-timesteps", "deme", "deme-searched"]     # rows (a)-(e); the others are Table 3's ablations
DERIVED = {"deme-searched": "deme"}     # recipe -> the recipe whose range models it merges (copied, not retrained)
# recipe -> models scored by the loss by timestep only (no samples, so no FID/KID): after its `deme run`, one
# `deme eval --models <run.models + these> --set eval.metrics=["loss"]` adds them to eval/ and to loss-by-t.png
LOSS_ONLY = {"deme": ["range:0", "range:1", "range:2", "range:3"],
             "ablation-sampling": ["ensemble"], "ablation-consistency": ["ensemble"],
             "deme-lora": ["ensemble", "range:0", "range:1", "range:2", "range:3"]}
BASELINES = ["n1-min-snr", "deme-lora"]     # issue 17's rows: their table is RESULTS-baselines.md (run.py --only)
TOTAL_STEPS = 2000          # finetuning steps per recipe, shared by its ranges (equal for every row)
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
    # run.json keeps only the last call's stage times: every call is logged here, so that the table can say
    # how long the work took and on which hardware, also when a run was interrupted and resumed elsewhere
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (300/64/100 images, 4 steps per range, 16 "
                   "samples, DDIM-4, a 4-merge search); writes <out>/RESULTS-smoke.md, never RESULTS.md")
    p.add_argument("--scale", choices=["auto", "cpu", "gpu"], default="auto", help="gpu: 5,000 samples per model, "
                   "DDIM-100; cpu: 1,000 samples, DDIM-50, a smaller weight search; auto: gpu when CUDA is available")
    p.add_argument("--out", type=Path, default=None, help="benchmark folder (default runs/fmnist-bench, or "
                   "runs/fmnist-bench-smoke with --smoke)")
    p.add_argument("--pretrain-steps", type=int, default=0, help="pretrain a base from scratch for this many steps "
                   "(pretrain.py; CUDA when available) instead of using assets/fmnist-ddpm; 0: use the asset")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds of the whole finetuning (seed s also "
                   "samples from sample.seed = s * 1,000,000)")
    p.add_argument("--only", default=None, help="comma-separated recipe names to run (default: all)")
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of each child process")
    p.add_argument("--jobs", type=int, default=1, help="run dirs processed side by side (each a `deme run` process, "
                   "its log in <run dir>/deme-run.log); on a 2-core CPU, --jobs 2 --threads 1")
    p.add_argument("--parallel", action="store_true", help="every run dir at once (--jobs = their number): for a "
                   "GPU that one tiny model leaves idle")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra `deme run --set` for every recipe")
    p.add_argument("--dest", type=Path, default=None, help="the table's Markdown file (default: RESULTS.md, or "
                   "RESULTS-baselines.md when --only names baseline recipes only; smoke runs: <out>/RESULTS-smoke.md)")
    args = p.parse_args(argv)

    out = args.out or Path("runs/fmnist-bench-smoke" if args.smoke else "runs/fmnist-bench")
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    only = set(args.only.split(",")) if args.only else set(RECIPES)
    unknown = only - set(RECIPES)
    if unknown:
        p.error(f"--only: unknown recipe(s) {sorted(unknown)}; known: {', '.join(RECIPES)}")
    scale = args.scale
    if scale == "auto":
        import torch
        scale = "gpu" if torch.cuda.is_available() else "cpu"

    t0 = time.time()
    (out / "benchmark.json").write_text(json.dumps(
        {"command": shlex.join(["python", *sys.argv]), "smoke": args.smoke, "scale": scale, "seeds": seeds,
         "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "hardware": results.hardware(args.threads)}, indent=2) + "\n")
    data = make_data(out, SMOKE if args.smoke else FULL, env)
    search_ref = search_subset(data, 32 if args.smoke else SEARCH_IMAGES)
    base = make_base(out, args.pretrain_steps, args.smoke, args.threads, env, data)

    chains: dict[tuple, list] = {}       # (seed, the recipe that trains) -> its jobs, in order
    for name, seed in [(name, seed) for seed in seeds for name in RECIPES if name in only]:
        recipe = HERE / "recipes" / f"{name}.toml"
        cfg = tomllib.loads(recipe.read_text())
        n = int(cfg["ranges"]["n"])
        run_dir = run_dir_of(out, name, seed)
        sets = [f"model.pretrained={json.dumps(base)}", f"data.path={json.dumps(str(data / 'train'))}",
                f"merge.search_reference={json.dumps(str(search_ref))}",
                f"eval.reference={json.dumps(str(data / 'test'))}"]
        if seed != 0:
            sets += [f"seed={seed}", f"sample.seed={seed * 1_000_000}"]
        sets += SCALES[scale]
        if args.smoke:
            sets += SMOKE_SETS + [f"train.steps={SMOKE_TOTAL_STEPS // n}"]
        else:
            assert n * int(cfg["train"]["steps"]) == TOTAL_STEPS, f"{recipe}: total finetuning steps != {TOTAL_STEPS}"
        sets += args.sets
        rel = recipe.relative_to(Path.cwd()) if recipe.is_relative_to(Path.cwd()) else recipe
        cmd = [sys.executable, "-m", "deme_cli", "run", str(rel), "--out", str(run_dir)]
        for s in sets:
            cmd += ["--set", s]
        src = DERIVED.get(name)
        key = (seed, src or name)
        chains.setdefault(key, []).append((name, seed, run_dir, cmd, recipe, sets,
                                           run_dir_of(out, src, seed) if src else None))

    jobs = [job for chain in chains.values() for job in chain]
    if jobs and not args.smoke:
        # the test set's features once, before the runs start, so that no two runs compute them side by side
        precompute_reference(out, jobs[0][4], jobs[0][5])
    for name, seed, run_dir, *_ in jobs:
        seed_reference_cache(out, run_dir)
    failed: list[str] = []
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
            if rc == 0 and name in LOSS_ONLY:
                models = tomllib.loads(recipe.read_text())["run"]["models"] + LOSS_ONLY[name]
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
    # the main rows (a)-(e) before the ablation rows, so that on a CPU the rows that settle the question finish first
    # and an interrupted run is missing ablation seeds, not main ones; within each, the chains that still train and
    # the longer chains first (they set the wall time when run side by side), then by seed
    queue = sorted(chains.values(), key=lambda c: (c[0][0] not in MAIN_RECIPES, is_trained(c[0][2]), -len(c), c[0][1]))
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
    if failed:
        log(f"failed: {'; '.join(failed)}; fix the cause and run the same command again to resume")
        return 1
    dest = args.dest
    if dest is None and not args.smoke and only <= set(BASELINES):
        dest = results.BASELINES_MD
    dest = results.write(out, dest)
    log(f"done in {time.time() - t0:.0f} s; table: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
