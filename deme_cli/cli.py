"""The `deme` command line: thin Typer commands that parse the options, call the commands (deme_cli/commands) and
print their results (tables.py).

Importing this module must not import torch or diffusers (they take ~11 s): every module imports them inside the
functions that need them. Exit codes: 0 success, 2 bad input (one sentence on stderr), 1 failure while running
(command_context.py keeps that contract and prepares every command's recipe and run directory).
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import tables
from .command_context import guard, main_process, prepare
from .commands.analyze_gradients import analyze_gradients as gradients_stage
from .engine import ui
from .engine.errors import UsageError
from .engine.gradients import DEFAULT_BINS, REDUCERS
from .engine.merge_methods import MERGE_METHODS
from .engine.model_specs import MODEL_SPECS
from .engine.ranges import SPLIT_STRATEGIES

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Decouple-then-Merge (DeMe) finetuning of diffusion models. Every command takes a recipe "
                       "(TOML) as its first argument; see README.md.")


def _print_version(value: bool) -> None:
    if value:
        from .engine.environment import deme_version

        typer.echo(f"deme {deme_version()}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="Print deme's version and exit.")) -> None:
    pass                        # the app's own options; its help text is the Typer's


def _default(fn, name: str):
    """The default of a stage function's parameter: help texts and options show it, they do not repeat it."""
    return inspect.signature(fn).parameters[name].default


def _names(registry) -> str:
    return " | ".join(registry)


MODEL_CHOICES = f"{_names(MODEL_SPECS)} | range:I"

# --- options shared by every command ------------------------------------------------------------------------------
RecipeArg = typer.Argument(..., help="Recipe file (TOML).", show_default=False)
SetOpt = typer.Option(None, "--set", "-s", help="Override a recipe key: section.key=value (repeatable).",
                      metavar="KEY=VALUE")
OutOpt = typer.Option(None, "--out", "-o", help="Run directory (overrides output.dir).")
DryOpt = typer.Option(False, "--dry-run", help="Print the resolved recipe and exit without doing anything.")
JsonOpt = typer.Option(False, "--json", help="Print one machine-readable result object on stdout.")
ForceOpt = typer.Option(False, "--force", help="Redo finished work instead of skipping it.")


# --- split ---------------------------------------------------------------------------------------------------------
@app.command()
def split(recipe: Path = RecipeArg,
          strategy: Optional[str] = typer.Option(None, help=f"{_names(SPLIT_STRATEGIES)} (overrides ranges.strategy)."),
          set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt, dry_run: bool = DryOpt,
          as_json: bool = JsonOpt,
          force: bool = typer.Option(False, "--force", help="Replace a ranges.json that trained range models were "
                                     "trained on.")):
    """Cut [0, T) into N contiguous timestep ranges; writes <run>/ranges.json."""
    def body():
        sets = list(set_ or []) + ([f'ranges.strategy="{strategy}"'] if strategy else [])
        ctx = prepare(recipe, sets, out, dry_run, as_json)
        if ctx is None:
            return
        from .commands.split import run_split

        result = run_split(ctx.recipe, ctx.run, force=force)
        if as_json:
            ui.emit_json(result)
        else:
            ui.table(f"{len(result['ranges'])} ranges ({result['strategy']}) -> {ctx.run.ranges_json}",
                     ["range", "lo", "hi", "timesteps"],
                     [[r["index"], r["lo"], r["hi"], r["hi"] - r["lo"]] for r in result["ranges"]])
    guard(body)


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
        ctx = prepare(recipe, set_, out, dry_run, as_json, force)
        if ctx is None:
            return
        from .commands.train import run_train

        results = run_train(ctx.recipe, ctx.run, None if all_ else range_, force=force)
        if not main_process():
            return
        if as_json:
            ui.emit_json({"ranges": results})
        else:
            ui.table("trained", ["range", "lo", "hi", "steps", "loss", "final"],
                     [[r["range"], r["lo"], r["hi"], r["steps"], r.get("loss"), r["final"]] for r in results])
    guard(body)


def _train_launched(recipe: Path, set_, out, dry_run: bool, as_json: bool, force: bool, launcher: str, gpus: str,
                    gpus_per_range: int, emit: bool, slurm_options: list[str]) -> None:
    """`deme train --all --launcher local | slurm`: the ranges as separate jobs (launch.py)."""
    from .commands import launch
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
    ctx = prepare(recipe, set_, out, False, as_json, force)
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
          weights: Optional[str] = typer.Option(None, help="Comma-separated weights, one per range, low t first "
                                                "(sets merge.weights; with --search, where a coordinate search "
                                                "starts)."),
          method: Optional[str] = typer.Option(None, help=f"{_names(MERGE_METHODS)} (overrides merge.method)."),
          search: bool = typer.Option(False, "--search", help="Search the weights: merge.weights = \"search\" "
                                      "(merge.search strategy, merge.objective)."),
          processes: int = typer.Option(1, "--processes", "-p", help="The weight search: score candidates in P "
                                        "processes, one per slot of --gpus (same results as one process)."),
          gpus: str = GpusOpt,
          set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt, dry_run: bool = DryOpt,
          as_json: bool = JsonOpt, force: bool = ForceOpt):
    """Merge the range models into one by task-vector arithmetic; writes <run>/merged/ (+ merge.json).

    Re-running with the same settings and unchanged range models does nothing; --force merges again. A new merge
    replaces merged/ only once it is complete."""
    def body():
        if processes < 1:
            raise UsageError("--processes scores the candidates of the weight search and must be at least 1")
        from .engine.merge_methods import MERGE_METHODS
        from .engine.recipe import load_recipe
        from .engine.task_vectors import parse_weights, resolve_weights

        if method is not None and method not in MERGE_METHODS:
            raise UsageError(f"unknown merge method '{method}' (known: {', '.join(MERGE_METHODS)})")
        sets = list(set_ or []) + ([f'merge.method="{method}"'] if method else [])
        start = None
        if weights is not None:  # checked against N before anything is written
            w = resolve_weights(parse_weights(weights), load_recipe(recipe, sets).ranges.n)
            if search:
                start = w        # where a coordinate search starts
            else:
                sets.append(f"merge.weights=[{', '.join(repr(x) for x in w)}]")
        if search:
            sets.append('merge.weights="search"')
        if processes > 1 and load_recipe(recipe, sets).merge.weights != "search":
            raise UsageError("--processes scores the candidates of the weight search; use it with --search or "
                             "merge.weights = \"search\"")
        ctx = prepare(recipe, sets, out, dry_run, as_json, force)
        if ctx is None:
            return
        from .commands.merge import run_merge

        result = run_merge(ctx.recipe, ctx.run, weights=start, search=start is not None, force=force,
                           processes=processes, gpus=gpus)
        if as_json:
            ui.emit_json(result)
            return
        tables.merge(result)
    guard(body)


# --- sample --------------------------------------------------------------------------------------------------------
@app.command()
def sample(recipe: Path = RecipeArg,
           model: str = typer.Option("merged", "--model", "-m", help=MODEL_CHOICES),
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
        from .commands.sample import Shard

        parse_model_spec(model)
        if processes < 1:
            raise UsageError(f"--processes must be at least 1, got {processes}")
        part = Shard.parse(shard) if shard is not None else None
        ctx = prepare(recipe, set_, out, dry_run, as_json, force)
        if ctx is None:
            return
        from .commands.sample import run_sample

        r = run_sample(ctx.recipe, ctx.run, model, force=force, processes=processes, gpus=gpus, shard=part)
        if not main_process():
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
    guard(body)


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
        ctx = prepare(recipe, set_, out, dry_run, as_json, force)
        if ctx is None:
            return
        from .commands.eval import run_eval

        r = run_eval(ctx.recipe, ctx.run, names, allow_fewer=allow_fewer, force=force)
        if as_json:
            ui.emit_json(r)
            return
        tables.evaluation(r)
    guard(body)


# --- analyze-gradients ---------------------------------------------------------------------------------------------
@app.command(name="analyze-gradients")
def analyze_gradients(recipe: Path = RecipeArg,
                      bins: Optional[int] = typer.Option(None, help="Number of equal timestep bins B over [0, T), "
                                                         "one timestep at each bin centre. "
                                                         f"\\[default: {DEFAULT_BINS}]"),
                      timesteps: Optional[str] = typer.Option(None, help="Explicit timesteps instead of bins, "
                                                              "comma-separated (10,100,500)."),
                      params: Optional[str] = typer.Option(None, help="Only parameters whose names match: globs "
                                                           "('up_blocks.*'), comma-separated; 're:' for a regex. "
                                                           "\\[default: all]"),
                      method: str = typer.Option(_default(gradients_stage, "method"),
                                                 help=f"{_names(REDUCERS)}: random projections to --sketch-dim, or "
                                                 "exact (keeps every gradient: small models)."),
                      sketch_dim: int = typer.Option(_default(gradients_stage, "sketch_dim"),
                                                     help="Dimension k of the gradient sketch."),
                      batch_size: int = typer.Option(_default(gradients_stage, "batch_size"),
                                                     help="Images (and noise draws) in the fixed batch."),
                      set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt, dry_run: bool = DryOpt,
                      as_json: bool = JsonOpt, force: bool = ForceOpt):
    """Cosine similarity of denoising-loss gradients across timesteps; writes <run>/analysis/."""
    def body():
        if bins is not None and bins < 2:
            raise UsageError(f"--bins must be at least 2 to compare timesteps, got {bins}")
        ctx = prepare(recipe, set_, out, dry_run, as_json, force)
        if ctx is None:
            return
        from .commands.analyze_gradients import run_analyze_gradients as analyze

        result = analyze(ctx.recipe, ctx.run, bins=bins, timesteps=timesteps, params=params, method=method,
                         sketch_dim=sketch_dim, batch_size=batch_size, force=force)
        if as_json:
            ui.emit_json(result)
            return
        tables.gradients(result)
    guard(body)


# --- report --------------------------------------------------------------------------------------------------------
def _recipe_arg(recipe: Path, out: Optional[Path]) -> str:
    """How the commands a report suggests name the recipe (and --out, when given)."""
    import shlex

    return shlex.quote(str(recipe)) + (f" --out {shlex.quote(str(out))}" if out is not None else "")


@app.command()
def report(recipe: Path = RecipeArg, set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt,
           dry_run: bool = DryOpt, as_json: bool = JsonOpt):
    """Write the run up: <run>/report/index.html (one self-contained file: opens offline) and report.md.

    Shows the recipe, versions, hardware and times, the ranges, training curves, merge weights, sample grids and the
    eval table, and names what is still missing with the command that makes it. With GITHUB_STEP_SUMMARY set (GitHub
    Actions), a short summary is appended to that file."""
    def body():
        from .engine.recipe import load_recipe
        from .engine.runs import RunDir

        resolved = load_recipe(recipe, set_, str(out) if out is not None else None)
        if dry_run:
            sys.stdout.write(resolved.to_toml())
            return
        from .commands.report import run_report

        r = run_report(resolved, RunDir(resolved.out_dir), recipe_arg=_recipe_arg(recipe, out))
        if as_json:
            ui.emit_json(r)
            return
        tables.report(r)
    guard(body)


# --- run -----------------------------------------------------------------------------------------------------------
@app.command()
def run(recipe: Path = RecipeArg, set_: Optional[List[str]] = SetOpt, out: Optional[Path] = OutOpt,
        dry_run: bool = DryOpt, as_json: bool = JsonOpt, force: bool = ForceOpt):
    """The whole pipeline: split, train (all ranges), merge, sample, eval, then the report; finished work is skipped.

    Interrupt it at any point and run the same command again to finish the job. Outputs produced from a different
    recipe are never mixed with new ones: the command refuses and names the difference (--force redoes everything)."""
    def body():
        ctx = prepare(recipe, set_, out, dry_run, as_json, force)
        if ctx is None:
            return
        from .commands.pipeline import run_pipeline

        r = run_pipeline(ctx.recipe, ctx.run, force=force,
                         on_stage=None if as_json else lambda s: ui.console.rule(f"[bold]{s}"),
                         recipe_arg=_recipe_arg(recipe, out))
        if as_json:
            ui.emit_json(r)
            return
        tables.pipeline(ctx.recipe.name, r)
    guard(body)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
