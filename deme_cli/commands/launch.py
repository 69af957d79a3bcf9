"""`deme train --all --launcher local | slurm`: the ranges of a recipe as separate jobs (DESIGN.md s. 8).

- local: each range an ordinary `deme train --range I` process on its own device slot (engine/processes.py: slots,
  the job runner, the combined progress view); finished ranges are kept.
- `slurm_scripts(...)`: a job-array script (one range per array task) and a merge job that waits for the whole array
  (`sbatch --dependency=afterok`), plus submit.sh, which submits both.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

from ..engine import ui
from ..engine.errors import UsageError
from ..engine.processes import (BASE_PORT, Job, deme_command, device_slots, failure_report, launch_recipe_file,
                                metrics_progress, run_jobs, tail, write_launch_recipe)


# --- SLURM ---------------------------------------------------------------------------------------------------------

def _sbatch_lines(options: list[str]) -> list[str]:
    lines = []
    for o in options or []:
        o = o.strip().lstrip("-")
        if not o:
            continue
        lines.append(f"#SBATCH --{o}")
    return lines


SIGNAL_LEAD_S = 300      # SLURM sends SIGUSR1 this many seconds before the time limit: time to write a checkpoint


def _signalled(command: str) -> list[str]:
    """Script lines that run `command` in its own process group and pass SIGUSR1 (SLURM's warning before the time
    limit, `--signal=B:USR1@...`) and SIGTERM on to all of it (under accelerate launch: every training process). deme
    writes a checkpoint and stops; a task that stopped after SIGUSR1 without finishing requeues itself (`scontrol
    requeue`) to continue from that checkpoint. SIGTERM (scancel, preemption) also saves a checkpoint; SLURM itself
    requeues preempted jobs (--requeue)."""
    return [
        "warned=0",
        f"setsid -w {command} &",
        "child=$!",
        "trap 'warned=1; kill -USR1 -- -\"$child\" 2>/dev/null' USR1",
        "trap 'kill -TERM -- -\"$child\" 2>/dev/null' TERM",
        "while :; do wait \"$child\"; rc=$?; kill -0 \"$child\" 2>/dev/null || break; done",
        "if [ \"$warned\" = 1 ] && [ \"$rc\" -ne 0 ]; then",
        "  echo \"stopped before the time limit (exit code $rc); requeueing job $SLURM_JOB_ID to continue from its "
        "checkpoint\"",
        "  scontrol requeue \"$SLURM_JOB_ID\"",
        "fi",
        "exit \"$rc\"",
    ]


def slurm_scripts(recipe, recipe_file: Path, folder: Path, n: int, gpus_per_range: int = 1,
                  options: Optional[list[str]] = None, search: bool = False) -> dict[str, str]:
    """{file name: text} of train.sbatch (array 0..n-1), merge.sbatch and submit.sh, to live in `folder`."""
    py, cwd, rf = shlex.quote(sys.executable), shlex.quote(str(Path.cwd())), shlex.quote(str(recipe_file))
    logs = shlex.quote(str(folder))
    extra = _sbatch_lines(options or [])
    if gpus_per_range > 1:
        launch = (f"{py} -m accelerate.commands.launch --multi_gpu --num_processes {gpus_per_range} "
                  f"--main_process_port $(( {BASE_PORT + 1} + SLURM_ARRAY_TASK_ID % 1000 )) "
                  f"-m deme_cli train {rf} --range \"$SLURM_ARRAY_TASK_ID\"")
    else:
        launch = f"{py} -m deme_cli train {rf} --range \"$SLURM_ARRAY_TASK_ID\""
    train = "\n".join([
        "#!/bin/bash",
        f"# DeMe finetuning of the {n} ranges of recipe '{recipe.name}': one range per array task.",
        "# Each task is an ordinary `deme train --range I`"
        + (f" (accelerate data parallel over {gpus_per_range} GPUs)" if gpus_per_range > 1 else "") + ".",
        "# Resumable: a requeued task, or this script submitted again, continues from ranges/I/checkpoints/latest.",
        f"# {SIGNAL_LEAD_S} s before the time limit SLURM sends SIGUSR1: the range writes a checkpoint, stops and the "
        "task requeues itself.",
        f"#SBATCH --job-name=deme-{recipe.name}",
        f"#SBATCH --array=0-{n - 1}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        f"#SBATCH --gres=gpu:{gpus_per_range}",
        f"#SBATCH --cpus-per-task={8 * gpus_per_range}",
        f"#SBATCH --output={folder}/train-%A_%a.log",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{SIGNAL_LEAD_S}",
        *extra,
        "set -uo pipefail",
        f"cd {cwd}",
        *_signalled(launch),
        ""])
    merge = "\n".join([
        "#!/bin/bash",
        f"# Merge the {n} range models of recipe '{recipe.name}' once every array task of train.sbatch succeeded.",
        f"#SBATCH --job-name=deme-{recipe.name}-merge",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        *(["#SBATCH --gres=gpu:1"] if search else []),
        "#SBATCH --cpus-per-task=8",
        f"#SBATCH --output={folder}/merge-%j.log",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{SIGNAL_LEAD_S}",
        *extra,
        "set -uo pipefail",
        f"cd {cwd}",
        *_signalled(f"{py} -m deme_cli merge {rf}{' --search' if search else ''}"),
        ""])
    submit = "\n".join([
        "#!/bin/bash",
        "# Submit the training array, then the merge job that waits for all of it (afterok).",
        "set -euo pipefail",
        f"train=$(sbatch --parsable {logs}/train.sbatch)",
        "train=${train%%;*}",
        f"merge=$(sbatch --parsable --dependency=afterok:$train {logs}/merge.sbatch)",
        f"echo \"submitted training array $train ({n} ranges) and merge job ${{merge%%;*}}; logs in {folder}\"",
        ""])
    return {"train.sbatch": train, "merge.sbatch": merge, "submit.sh": submit}


# --- `deme train --all --launcher local | slurm` -------------------------------------------------------------------

def _range_args(recipe_file: Path, index: int, force: bool) -> list[str]:
    return ["train", str(recipe_file), "--range", str(index)] + (["--force"] if force else [])


def train_local(recipe, run, gpus: str = "auto", per_range: int = 1, force: bool = False,
                poll_s: float = 1.0) -> dict:
    """Train every range as its own process on the slots of `gpus` (see run_jobs); finished ranges are skipped.

    Returns {"ranges": one summary per range (with "status", "exit_code", "log"), "failed": [indices]}.
    """
    from ..engine.base import resolve_base
    from ..engine.models import read_meta
    from ..engine.recipe import stage_kwargs
    from ..engine.splitting import load_ranges
    from .train import finished_meta, range_inputs, reexport_if_stale

    slots = device_slots(gpus, per_range, check=True)
    # ranges.json exists before any job starts: no job computes it
    base = resolve_base(recipe.model, recipe.train.device)
    ranges = load_ranges(base, recipe.ranges, run)
    recipe_file = write_launch_recipe(recipe, run)
    jobs, kept = [], {}
    inputs = range_inputs(**stage_kwargs(range_inputs, recipe))
    for r in ranges:
        meta = None if force else finished_meta(recipe.train, run, r, inputs)   # refused when made otherwise
        if meta is not None:
            reexport_if_stale(run, r, base)
            kept[r.index] = meta
            continue
        jobs.append(Job(f"range {r.index}", _range_args(recipe_file, r.index, force), run.range_dir(r.index) /
                        "launch.log", metrics_progress(run.metrics(r.index), recipe.train.steps), per_range))
    if kept:
        ui.info(f"already trained for {recipe.train.steps} steps, kept: range {', '.join(map(str, sorted(kept)))} "
                f"(--force trains them again)")
    if jobs:
        ui.info(f"training {len(jobs)} range(s) as separate processes on {len(slots)} slot(s): "
                f"{', '.join(s.name for s in slots)}; logs in {run.root}/ranges/<i>/launch.log")
        run_jobs(jobs, slots, f"deme train {recipe.name}", poll_s=poll_s)
    by_index = {int(j.args[3]): j for j in jobs}
    summaries, failed = [], []
    for r in ranges:
        s = {"range": r.index, "lo": r.lo, "hi": r.hi, "final": str(run.final(r.index))}
        job = by_index.get(r.index)
        if job is None:
            s.update(status="kept", skipped=True, steps=kept[r.index].get("steps"), loss=kept[r.index].get("loss"))
        elif job.returncode == 0:
            meta = read_meta(run.final(r.index)) if run.final(r.index).is_dir() else {}
            s.update(status="done", skipped=False, steps=meta.get("steps"), loss=meta.get("loss"),
                     device=job.slot.name, seconds=round(job.seconds, 1), log=str(job.log))
        else:
            failed.append(r.index)
            s.update(status="failed", skipped=False, exit_code=job.returncode, device=job.slot.name if job.slot
                     else None, log=str(job.log), log_tail=tail(job.log))
        summaries.append(s)
    return {"launcher": "local", "slots": [s.name for s in slots], "ranges": summaries, "failed": failed,
            "report": failure_report(jobs)}


def local_plan(recipe, run, gpus: str = "auto", per_range: int = 1, force: bool = False) -> list[str]:
    """The commands train_local would start (for --dry-run), one line per range, assuming no range is finished."""
    slots = device_slots(gpus, per_range)
    rf = launch_recipe_file(recipe, run)
    lines = []
    for i in range(recipe.ranges.n):
        slot = slots[i % len(slots)]
        wave = i // len(slots)
        argv = deme_command(_range_args(rf, i, force), per_range, BASE_PORT + 1 + i % len(slots), cpu=not slot.gpus)
        env = slot.env()["CUDA_VISIBLE_DEVICES"]
        lines.append(f"# range {i} on {slot.name}{f' (wave {wave + 1})' if wave else ''}: "
                     f"CUDA_VISIBLE_DEVICES={env!r} {shlex.join(argv)}")
    return lines


def slurm_emit(recipe, run, gpus_per_range: int = 1, options: Optional[list[str]] = None,
               write: bool = True) -> dict:
    """Write (or, with write=False, only render) the SLURM scripts under <run>/launch/slurm/. Returns
    {"folder", "files": {path: text}, "submit": command}."""
    if gpus_per_range < 1:
        raise UsageError(f"--gpus-per-range must be at least 1, got {gpus_per_range}")
    folder = Path(run.root).resolve() / "launch" / "slurm"
    recipe_file = launch_recipe_file(recipe, run)
    scripts = slurm_scripts(recipe, recipe_file, folder, recipe.ranges.n, gpus_per_range, options,
                            search=recipe.merge.weights == "search")
    files = {str(folder / name): text for name, text in scripts.items()}
    if write:
        from ..engine.runs import write_atomic

        write_launch_recipe(recipe, run)
        for path, text in files.items():
            write_atomic(Path(path), text)
            os.chmod(path, 0o755)
    return {"launcher": "slurm", "folder": str(folder), "recipe": str(recipe_file), "files": files,
            "submit": f"bash {shlex.quote(str(folder / 'submit.sh'))}"}


def slurm_submit(emitted: dict) -> str:
    """Run submit.sh (sbatch must be on PATH); returns what it printed."""
    import shutil

    if shutil.which("sbatch") is None:
        raise UsageError("sbatch is not on PATH; use --emit to write the job scripts and submit them where SLURM is")
    p = subprocess.run(["bash", str(Path(emitted["folder"]) / "submit.sh")], capture_output=True, text=True)
    if p.returncode != 0:
        raise UsageError(f"sbatch refused the jobs: {(p.stderr or p.stdout).strip().splitlines()[-1:]}; the scripts "
                         f"are in {emitted['folder']}")
    return p.stdout.strip()
