"""The `deme` command line: thin Typer commands that parse, call the engine and render.

Importing this module must not import torch or diffusers (they take ~11 s): engine modules are imported inside the
commands. Exit codes: 0 success, 2 bad input (one sentence on stderr), 1 failure while running.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from .engine import ui
from .engine.errors import UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Decouple-then-Merge (DeMe) finetuning of diffusion models. Every command takes a recipe "
                       "(TOML) as its first argument; see README.md.")

# --- options shared by every command ------------------------------------------------------------------------------
RecipeArg = typer.Argument(..., help="Recipe file (TOML).", show_default=False)
SetOpt = typer.Option(None, "--set", "-s", help="Override a recipe key: section.key=value (repeatable).",
                      metavar="KEY=VALUE")
OutOpt = typer.Option(None, "--out", "-o", help="Run directory (overrides output.dir).")
DryOpt = typer.Option(False, "--dry-run", help="Print the resolved recipe and exit without doing anything.")
JsonOpt = typer.Option(False, "--json", help="Print one machine-readable result object on stdout.")
ForceOpt = typer.Option(False, "--force", help="Redo finished work instead of skipping it.")


class Ctx:
    """What every command gets: the validated recipe, its run directory, and the output flags."""

    def __init__(self, recipe, as_json: bool, force: bool):
        from .engine.runs import RunDir

        self.recipe = recipe
        self.run = RunDir(recipe.out_dir)
        self.json = as_json
        self.force = force


def _prepare(recipe_path: Path, sets: Optional[List[str]], out: Optional[Path], dry_run: bool, as_json: bool,
             force: bool = False) -> Optional[Ctx]:
    """Load and validate the recipe; on --dry-run print it and return None; else create the run dir."""
    from .engine.recipe import load_recipe
    from .engine.runs import ensure_writable, write_atomic

    recipe = load_recipe(recipe_path, sets, str(out) if out is not None else None)
    if dry_run:
        sys.stdout.write(recipe.to_toml())
        return None
    ensure_writable(recipe.out_dir)
    write_atomic(recipe.out_dir / "recipe.resolved.toml", recipe.to_toml())
    return Ctx(recipe, as_json, force)


def _guard(fn: Callable[[], None]) -> None:
    """Run a command body: UsageError -> one sentence, exit 2; Ctrl-C -> exit 130."""
    try:
        fn()
    except UsageError as e:
        msg = str(e).strip()
        msg = msg if msg.endswith((".", "?", "!")) else msg + "."
        ui.console.print(f"[red]error:[/red] {msg}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        ui.console.print("interrupted; re-run the same command to continue where it stopped.")
        raise typer.Exit(130)


def _main_process() -> bool:
    """False in the other processes of an `accelerate launch` / torchrun job: only the main one reports."""
    import os

    return int(os.environ.get("RANK", "0")) == 0


# --- split ---------------------------------------------------------------------------------------------------------
@app.command()
def split(recipe: Path = RecipeArg,
          strategy: Optional[str] = typer.Option(None, help="uniform | snr | affinity (overrides ranges.strategy)."),
          set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt, dry_run: bool = DryOpt,
          as_json: bool = JsonOpt,
          force: bool = typer.Option(False, "--force", help="Replace a ranges.json that trained range models were "
                                     "trained on.")):
    """Cut [0, T) into N contiguous timestep ranges; writes <run>/ranges.json."""
    def body():
        sets = list(set_ or []) + ([f'ranges.strategy="{strategy}"'] if strategy else [])
        ctx = _prepare(recipe, sets, out, dry_run, as_json)
        if ctx is None:
            return
        from .engine.splitting import run_split

        result = run_split(ctx.recipe, ctx.run, force=force)
        if as_json:
            ui.emit_json(result)
        else:
            ui.table(f"{len(result['ranges'])} ranges ({result['strategy']}) -> {ctx.run.ranges_json}",
                     ["range", "lo", "hi", "timesteps"],
                     [[r["index"], r["lo"], r["hi"], r["hi"] - r["lo"]] for r in result["ranges"]])
    _guard(body)


# --- train ---------------------------------------------------------------------------------------------------------
GpusOpt = typer.Option("auto", "--gpus", help="Devices for the launched processes: a count (4), a list (0,1,2,3), "
                      "cpu:P (P CPU processes) or auto (every visible GPU, else the CPU).")
LAUNCHERS = ("none", "local", "slurm")


@app.command()
def train(recipe: Path = RecipeArg,
          range_: Optional[int] = typer.Option(None, "--range", "-r", help="Index of the range to finetune."),
          all_: bool = typer.Option(False, "--all", help="Finetune every range (see --launcher)."),
          launcher: str = typer.Option("none", "--launcher", help="How --all runs the ranges: none (one after "
                                       "another in this process), local (one process per range on --gpus, waves when "
                                       "there are more ranges than slots), slurm (a job array; see --emit)."),
          gpus: str = GpusOpt,
          gpus_per_range: int = typer.Option(1, "--gpus-per-range", help="GPUs per range (data parallel through "
                                             "accelerate launch, each range with its own port)."),
          emit: bool = typer.Option(False, "--emit", help="slurm: write the job scripts and print how to submit "
                                    "them, without submitting."),
          slurm_option: Optional[List[str]] = typer.Option(None, "--slurm-option", metavar="KEY=VALUE",
                                                           help="slurm: an extra #SBATCH option, like "
                                                           "partition=gpu or time=24:00:00 (repeatable)."),
          set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt, dry_run: bool = DryOpt,
          as_json: bool = JsonOpt, force: bool = ForceOpt):
    """DeMe-finetune range I (or --all ranges); resumes from the latest checkpoint when re-run."""
    def body():
        if launcher not in LAUNCHERS:
            raise UsageError(f"unknown launcher '{launcher}' (known: {', '.join(LAUNCHERS)})")
        if not dry_run and (range_ is None) == (not all_):
            raise UsageError("give exactly one of --range I or --all")
        if launcher != "none" and not all_:
            raise UsageError(f"--launcher {launcher} fans out the ranges of --all; use it with --all")
        if emit and launcher != "slurm":
            raise UsageError("--emit writes SLURM scripts; use it with --launcher slurm")
        if launcher != "none":
            return _train_launched(recipe, set_, out, dry_run, as_json, force, launcher, gpus, gpus_per_range, emit,
                                   list(slurm_option or []))
        ctx = _prepare(recipe, set_, out, dry_run, as_json, force)
        if ctx is None:
            return
        from .engine.train import train_ranges

        results = train_ranges(ctx.recipe, ctx.run, None if all_ else range_, force=force)
        if not _main_process():
            return
        if as_json:
            ui.emit_json({"ranges": results})
        else:
            ui.table("trained", ["range", "lo", "hi", "steps", "loss", "final"],
                     [[r["range"], r["lo"], r["hi"], r["steps"], r.get("loss"), r["final"]] for r in results])
    _guard(body)


def _train_launched(recipe: Path, set_, out, dry_run: bool, as_json: bool, force: bool, launcher: str, gpus: str,
                    gpus_per_range: int, emit: bool, slurm_options: list[str]) -> None:
    """`deme train --all --launcher local | slurm`: the ranges as separate jobs (launch.py)."""
    from .engine import launch
    from .engine.recipe import load_recipe
    from .engine.runs import RunDir

    if dry_run:  # the resolved recipe, then what would be started or written
        resolved = load_recipe(recipe, set_, str(out) if out is not None else None)
        run_dir = RunDir(resolved.out_dir)
        sys.stdout.write(resolved.to_toml())
        if launcher == "local":
            sys.stdout.write("\n".join(launch.local_plan(resolved, run_dir, gpus, gpus_per_range, force)) + "\n")
        else:
            emitted = launch.slurm_emit(resolved, run_dir, gpus_per_range, slurm_options, write=False)
            for path, text in emitted["files"].items():
                sys.stdout.write(f"\n# ===== {path} (not written: --dry-run) =====\n{text}")
        return
    ctx = _prepare(recipe, set_, out, False, as_json, force)
    if launcher == "slurm":
        emitted = launch.slurm_emit(ctx.recipe, ctx.run, gpus_per_range, slurm_options)
        submitted = None if emit else launch.slurm_submit(emitted)
        if as_json:
            ui.emit_json({**emitted, "files": list(emitted["files"]), "submitted": submitted})
            return
        ui.info(f"wrote {', '.join(Path(f).name for f in emitted['files'])} in {emitted['folder']} "
                f"(one array task per range, {ctx.recipe.ranges.n} ranges; the merge job waits for all of them)")
        ui.info(submitted if submitted else f"submit with: {emitted['submit']}")
        return
    result = launch.train_local(ctx.recipe, ctx.run, gpus, gpus_per_range, force)
    if as_json:
        ui.emit_json(result)
    else:
        ui.table(f"trained ({result['launcher']}: {', '.join(result['slots'])})",
                 ["range", "lo", "hi", "status", "steps", "loss", "final"],
                 [[r["range"], r["lo"], r["hi"], r["status"], r.get("steps"), r.get("loss"), r["final"]]
                  for r in result["ranges"]])
    if result["failed"]:
        ui.console.print("\n".join(result["report"]), markup=False, highlight=False)
        ui.console.print(f"[red]error:[/red] {len(result['failed'])} range(s) failed; re-run the same command to "
                         f"resume them (finished ranges are kept).", highlight=False)
        raise typer.Exit(1)


# --- merge ---------------------------------------------------------------------------------------------------------
@app.command()
def merge(recipe: Path = RecipeArg,
          weights: Optional[str] = typer.Option(None, help="Comma-separated weights, one per range, low t first."),
          method: Optional[str] = typer.Option(None, help="task_arithmetic | ties | dare (overrides merge.method)."),
          search: bool = typer.Option(False, "--search", help="Search the weights (merge.search strategy)."),
          processes: int = typer.Option(1, "--processes", "-p", help="--search: score candidates in P processes, "
                                        "one per slot of --gpus (same results as one process)."),
          gpus: str = GpusOpt,
          set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt, dry_run: bool = DryOpt,
          as_json: bool = JsonOpt, force: bool = ForceOpt):
    """Merge the range models into one by task-vector arithmetic; writes <run>/merged/ (+ merge.json).

    Re-running with the same settings and unchanged range models does nothing; --force merges again. A new merge
    replaces merged/ only once it is complete."""
    def body():
        if processes < 1 or (processes > 1 and not search):
            raise UsageError("--processes scores the candidates of --search and must be at least 1")
        from .engine.merge import parse_weights, resolve_weights
        from .engine.merge_methods import MERGE_METHODS
        from .engine.recipe import load_recipe

        if method is not None and method not in MERGE_METHODS:
            raise UsageError(f"unknown merge method '{method}' (known: {', '.join(MERGE_METHODS)})")
        sets = list(set_ or []) + ([f'merge.method="{method}"'] if method else [])
        if weights is not None:  # checked against N before anything is written
            w = resolve_weights(parse_weights(weights), load_recipe(recipe, sets).ranges.n)
            sets.append(f"merge.weights=[{', '.join(repr(x) for x in w)}]")
        ctx = _prepare(recipe, sets, out, dry_run, as_json, force)
        if ctx is None:
            return
        from .engine.merge import run_merge

        result = run_merge(ctx.recipe, ctx.run, search=search, force=force, processes=processes, gpus=gpus)
        if as_json:
            ui.emit_json(result)
            return
        extra = "".join(f", {k} {result[k]}" for k in ("density", "seed") if k in result)
        ui.table(f"{result['method']}{extra}{' (unchanged)' if result['skipped'] else ''} -> {result['merged']}",
                 ["range", "timesteps", "weight", "model"],
                 [[r["index"], f"[{r['lo']}, {r['hi']})" if r.get("lo") is not None else None, w, r["path"]]
                  for r, w in zip(result["ranges"], result["weights"])])
        log = result.get("search")
        if log:
            top = sorted(log["candidates"], key=lambda c: c["score"])[:10]
            ui.info(f"search: {log['strategy']}, {log['evaluations']} merges scored by {log['objective']} (lower is "
                    f"better) in {log['seconds']:.0f} s; the best is written")
            ui.table(f"best {len(top)} candidates", ["rank", "weights", log["objective"]],
                     [[k + 1, ", ".join(f"{x:g}" for x in c["weights"]), c["score"]] for k, c in enumerate(top)])
    _guard(body)


# --- sample --------------------------------------------------------------------------------------------------------
@app.command()
def sample(recipe: Path = RecipeArg,
           model: str = typer.Option("merged", "--model", "-m", help="base | merged | range:I | ensemble"),
           processes: int = typer.Option(1, "--processes", "-p", help="Worker processes, one per slot of --gpus "
                                         "(image k is made by process k % P; seeds stay per image)."),
           gpus: str = GpusOpt,
           shard: Optional[str] = typer.Option(None, "--shard", hidden=True, help="I/P: worker of --processes."),
           set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt, dry_run: bool = DryOpt,
           as_json: bool = JsonOpt, force: bool = ForceOpt):
    """Generate images with per-image seeds (image k uses sample.seed + k); writes <run>/samples/<model>/.

    Re-running skips images already written with the same settings; --force regenerates them. Under
    `accelerate launch --num_processes P` the P processes share the images as --processes P does."""
    def body():
        from .engine.model_specs import parse_model_spec
        from .engine.sample import Shard

        parse_model_spec(model)
        if processes < 1:
            raise UsageError(f"--processes must be at least 1, got {processes}")
        part = Shard.parse(shard) if shard is not None else None
        ctx = _prepare(recipe, set_, out, dry_run, as_json, force)
        if ctx is None:
            return
        from .engine.sample import run_sample

        r = run_sample(ctx.recipe, ctx.run, model, force=force, processes=processes, gpus=gpus, shard=part)
        if not _main_process():
            return
        if r.get("failed"):
            ui.console.print("\n".join(r["report"]), markup=False, highlight=False)
            ui.console.print(f"[red]error:[/red] {len(r['failed'])} of {processes} sampling processes failed; re-run "
                             f"the same command to make the missing images.", highlight=False)
            raise typer.Exit(1)
        if as_json:
            ui.emit_json(r)
            return
        if "shard" in r:
            ui.info(f"{r['model']} shard {r['shard']}: {r['generated']} new images in {r['folder']}")
            return
        rate = f", {r['images_per_s']:.2f} images/s" if r.get("images_per_s") else ""
        ui.info(f"{r['model']}: {r['num_images']} images in {r['folder']}")
        ui.info(f"  {r['generated']} new, {r['skipped']} kept; {r['scheduler']} {r['steps']} steps, "
                f"{r['precision']}{rate}")
    _guard(body)


# --- eval ----------------------------------------------------------------------------------------------------------
@app.command(name="eval")
def eval_(recipe: Path = RecipeArg,
          models: str = typer.Option("merged", help="Comma-separated models whose samples to score."),
          allow_fewer: bool = typer.Option(False, "--allow-fewer", help="Score fewer images than requested."),
          set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt, dry_run: bool = DryOpt,
          as_json: bool = JsonOpt, force: bool = ForceOpt):
    """FID / KID / CLIP score of sample folders against eval.reference; writes <run>/eval/<model>.json.

    Results whose inputs have not changed are reused; --force recomputes them."""
    def body():
        names = [m.strip() for m in models.split(",") if m.strip()]
        if not names:
            raise UsageError("--models is empty; give models like base,merged,ensemble")
        ctx = _prepare(recipe, set_, out, dry_run, as_json, force)
        if ctx is None:
            return
        from .engine.metrics import run_eval

        r = run_eval(ctx.recipe, ctx.run, names, allow_fewer=allow_fewer, force=force)
        if as_json:
            ui.emit_json(r)
            return
        res = r["results"]
        keys = list(dict.fromkeys(k for v in res.values() for k in v["metrics"]))
        rows = [[k] + [res[m]["metrics"].get(k) for m in res] for k in keys]
        rows.append(["images"] + [res[m].get("num_images") for m in res])
        if r.get("reference"):
            ui.info(f"reference: {r['reference']} (clean-fid, {r['mode']} mode)")
        ui.table("eval", ["metric"] + list(res), rows)
        _loss_table(res, r.get("loss_plot"))
    _guard(body)


METRIC_NAMES = {"clip_score": "CLIP score", "loss_ratio": "loss / base", "kid_std": "KID std"}


def _loss_table(results: dict, plot: Optional[str]) -> None:
    """The held-out loss by timestep bin: the base's loss, then each model's ratio to it."""
    curves = {m: v["loss_by_t"] for m, v in results.items() if v.get("loss_by_t")}
    if not curves:
        return
    first = next(iter(curves.values()))
    rows = [[f"[{lo}, {hi})", first["base_loss"][b]] + [c["ratio"][b] for c in curves.values()]
            for b, (lo, hi) in enumerate(first["bins"])]
    rows.append(["mean of ratios", None] + [c["ratio_mean"] for c in curves.values()])
    ui.table(f"held-out loss by timestep ({first['num_images']} images): base loss, and each model / base",
             ["t", "base loss"] + list(curves), rows)
    if plot:
        ui.info(f"plot: {plot}")


# --- analyze-gradients ---------------------------------------------------------------------------------------------
@app.command(name="analyze-gradients")
def analyze_gradients(recipe: Path = RecipeArg,
                      bins: Optional[int] = typer.Option(None, help="Number of equal timestep bins B over [0, T), "
                                                         "one timestep at each bin centre. \\[default: 20]"),
                      timesteps: Optional[str] = typer.Option(None, help="Explicit timesteps instead of bins, "
                                                              "comma-separated (10,100,500)."),
                      params: Optional[str] = typer.Option(None, help="Only parameters whose names match: globs "
                                                           "('up_blocks.*'), comma-separated; 're:' for a regex. "
                                                           "\\[default: all]"),
                      method: str = typer.Option("countsketch", help="countsketch | gaussian (random projections "
                                                 "to --sketch-dim) | exact (keeps every gradient: small models)."),
                      sketch_dim: int = typer.Option(4096, help="Dimension k of the gradient sketch."),
                      batch_size: int = typer.Option(16, help="Images (and noise draws) in the fixed batch."),
                      set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt, dry_run: bool = DryOpt,
                      as_json: bool = JsonOpt, force: bool = ForceOpt):
    """Cosine similarity of denoising-loss gradients across timesteps; writes <run>/analysis/."""
    def body():
        if bins is not None and bins < 2:
            raise UsageError(f"--bins must be at least 2 to compare timesteps, got {bins}")
        ctx = _prepare(recipe, set_, out, dry_run, as_json, force)
        if ctx is None:
            return
        from .engine.gradients import analyze_gradients as analyze

        result = analyze(ctx.recipe, ctx.run, bins=bins, timesteps=timesteps, params=params, method=method,
                         sketch_dim=sketch_dim, batch_size=batch_size, force=force)
        if as_json:
            ui.emit_json(result)
            return
        s = result["summary"]
        ui.table(f"gradient similarity over {s['bins']} timesteps -> {result['analysis']}", ["pairs", "count", "mean"],
                 [["adjacent bins", s["bins"] - 1, s["adjacent_mean"]],
                  ["more than T/2 apart", s["distant_pairs"], s["distant_mean"]],
                  ["inside [0, T/4)", s["first_quarter_pairs"], s["first_quarter_mean"]],
                  ["all", s["bins"] * (s["bins"] - 1) // 2, s["all_pairs_mean"]]])
        for name, f in result["files"].items():
            ui.info(f"{name}: {f}")
    _guard(body)


# --- run -----------------------------------------------------------------------------------------------------------
@app.command()
def run(recipe: Path = RecipeArg, set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt,
        dry_run: bool = DryOpt, as_json: bool = JsonOpt, force: bool = ForceOpt):
    """The whole pipeline: split, train (all ranges), merge, sample, eval; finished work is skipped.

    Interrupt it at any point and run the same command again to finish the job. Outputs produced from a different
    recipe are never mixed with new ones: the command refuses and names the difference (--force redoes everything)."""
    def body():
        ctx = _prepare(recipe, set_, out, dry_run, as_json, force)
        if ctx is None:
            return
        from .commands.pipeline import run_pipeline

        r = run_pipeline(ctx.recipe, ctx.run, force=force,
                         on_stage=None if as_json else lambda s: ui.console.rule(f"[bold]{s}"))
        if as_json:
            ui.emit_json(r)
            return
        keys = list(dict.fromkeys(k for m in r["models"].values() for k in m["metrics"]))
        ui.table(f"DeMe results ({ctx.recipe.name}){' vs ' + r['reference'] if r.get('reference') else ''}",
                 ["model"] + [METRIC_NAMES.get(k, k.upper()) for k in keys] + ["images"],
                 [[m] + [v["metrics"].get(k) for k in keys] + [v["num_images"]] for m, v in r["models"].items()])
        _loss_table(r["models"], r.get("loss_plot"))
        ui.table("stages", ["stage", "status", "seconds"],
                 [[s["stage"], s["status"], s["seconds"]] for s in r["stages"]])
    _guard(body)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
