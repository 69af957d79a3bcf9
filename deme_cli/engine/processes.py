"""Fan-out: independent jobs as separate processes on disjoint devices (DESIGN.md s. 8), shared by `deme train --all
--launcher local`, `deme sample --processes P` and the weight search's pool.

The N ranges of a recipe are independent jobs; so are the shards of a sampling run. Each job is an ordinary `deme`
command (`python -m deme_cli ...`, or `accelerate launch` with its own rendezvous port when a job spans several
GPUs) in its own process, never one process group with different models per rank.

- `device_slots("4" | "0,1,2,3" | "cpu:2" | "auto", per_job)`: where jobs run. GPU numbers index the GPUs this
  process sees (CUDA_VISIBLE_DEVICES), so `--gpus 2` inside an allocation of GPUs 4-7 uses GPUs 4 and 5.
- `run_jobs(jobs, slots)`: runs the jobs on the slots, a new job starting as soon as a slot frees (waves when there
  are more jobs than slots), logs each job's output to its own file, shows one combined progress view (a rich table
  on a terminal, periodic plain lines otherwise) and returns every job's exit code and last log lines.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from . import ui
from .errors import UsageError

BASE_PORT = 29500            # accelerate's default rendezvous port; job j uses BASE_PORT + 1 + j
TAIL_LINES = 15              # log lines shown for a failed job


# --- where jobs run ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Slot:
    """A place one job runs: some GPUs (indices into the GPUs this process sees) or the CPU."""

    name: str
    gpus: tuple = ()

    def env(self) -> dict:
        if not self.gpus:
            return {"CUDA_VISIBLE_DEVICES": ""}
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [s.strip() for s in visible.split(",") if s.strip()] if visible else None
        return {"CUDA_VISIBLE_DEVICES": ",".join(ids[g] if ids else str(g) for g in self.gpus)}


def _visible_gpu_count() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([s for s in visible.split(",") if s.strip()])
    import torch

    return torch.cuda.device_count()


def device_slots(spec: str, per_job: int = 1, check: bool = False) -> list[Slot]:
    """Slots from --gpus: a count ("4"), a list ("0,1,2,3"), "cpu" / "cpu:P" (P CPU processes) or "auto".

    check: the GPUs asked for must be visible on this machine (for jobs about to start here; a plan or a script for
    another machine leaves it off)."""
    slots = _slots(spec, per_job)
    if check and slots[0].gpus:
        want, visible = max(g for s in slots for g in s.gpus), _visible_gpu_count()
        if visible == 0:
            raise UsageError(f"--gpus {spec} asks for GPUs but none is visible on this machine; "
                             f"use --gpus cpu:P to run P CPU processes")
        if want >= visible:
            raise UsageError(f"--gpus {spec} asks for GPU {want} but only {visible} GPU(s) are visible "
                             f"(numbered 0 to {visible - 1})")
    return slots


def worker_slots(base, gpus: str, processes: int) -> list[Slot]:
    """The slots of P worker processes started here for a stage on `base` (sharded sampling, the search pool): P CPU
    slots when the base computes on the CPU (train.device = "cpu", or "auto" without a GPU and --gpus auto), else the
    slots of --gpus (checked against the GPUs this machine shows)."""
    on_cpu = base.device_choice == "cpu" or (gpus == "auto" and base.on_cpu)
    return device_slots(f"cpu:{processes}" if on_cpu else gpus, check=True)


def _slots(spec: str, per_job: int) -> list[Slot]:
    spec = (spec or "auto").strip().lower()
    if per_job < 1:
        raise UsageError(f"--gpus-per-range must be at least 1, got {per_job}")
    if spec.startswith("cpu"):
        n = spec[4:] if spec.startswith("cpu:") else "1"
        if spec not in ("cpu",) and not (spec.startswith("cpu:") and n.isdigit() and int(n) >= 1):
            raise UsageError(f"--gpus '{spec}' is not valid; use cpu or cpu:P with P processes, like cpu:2")
        if per_job != 1:
            raise UsageError("--gpus-per-range applies to GPUs; CPU jobs take one process each")
        return [Slot(f"cpu {k}") for k in range(int(n))]
    if spec == "auto":
        count = _visible_gpu_count()
        if count == 0:
            return [Slot("cpu 0")]
        gpus = list(range(count))
    elif spec.isdigit():
        gpus = list(range(int(spec)))
        if not gpus:
            raise UsageError("--gpus 0 leaves no device; give a GPU count, a list like 0,1 or cpu:P")
    else:
        try:
            gpus = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise UsageError(f"--gpus '{spec}' is not valid; give a count (4), a list (0,1,2,3), cpu:P or auto") \
                from None
        if not gpus or len(set(gpus)) != len(gpus) or min(gpus) < 0:
            raise UsageError(f"--gpus '{spec}' must list distinct GPU indices, like 0,1,2,3")
    if len(gpus) < per_job:
        raise UsageError(f"--gpus-per-range {per_job} needs at least {per_job} GPUs, --gpus gives {len(gpus)}")
    groups = [tuple(gpus[k:k + per_job]) for k in range(0, len(gpus) - per_job + 1, per_job)]
    return [Slot(f"gpu {','.join(map(str, g))}", g) for g in groups]


def deme_command(args: list[str], processes: int = 1, port: Optional[int] = None, cpu: bool = False) -> list[str]:
    """argv of `python -m deme_cli ARGS`; a job of several processes runs under `accelerate launch --multi_gpu` with
    its own rendezvous port (on the CPU under torchrun: `accelerate launch --cpu` starts one process only)."""
    if processes <= 1:
        return [sys.executable, "-m", "deme_cli", *args]
    if cpu:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                str(port or BASE_PORT), "-m", "deme_cli", *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--main_process_port", str(port or BASE_PORT), "-m", "deme_cli", *args]


# --- running jobs --------------------------------------------------------------------------------------------------

@dataclass
class Job:
    name: str                                         # "range 2"
    args: list[str]                                   # deme arguments (after `python -m deme_cli`)
    log: Path                                         # its stdout and stderr, appended
    progress: Optional[Callable[[], tuple]] = None    # () -> (done, total) for the progress view
    processes: int = 1                                # processes of the job (accelerate launch when > 1)
    env: dict = field(default_factory=dict)
    # filled in by run_jobs
    slot: Optional[Slot] = None
    started: Optional[float] = None
    returncode: Optional[int] = None
    seconds: float = 0.0
    argv: list = field(default_factory=list)


def tail(path: Path, n: int = TAIL_LINES) -> list[str]:
    """The last n lines of a text file (reads at most the last 64 KiB)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 65536))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return data.splitlines()[-n:]


def _state(job: Job, running: dict) -> str:
    if job.returncode is None:
        return "running" if job in running.values() else "queued"
    return "done" if job.returncode == 0 else f"failed ({job.returncode})"


class _View:
    """One combined progress view: a live rich table on a terminal, else a plain line per change (and every 30 s)."""

    def __init__(self, title: str, jobs: list[Job]):
        self.title, self.jobs, self.live, self.last_plain, self.last_states = title, jobs, None, 0.0, None
        self.t0 = time.time()

    def __enter__(self):
        if ui.is_tty():
            from rich.live import Live

            self.live = Live(self._table({}), console=ui.console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)

    def _rows(self, running: dict) -> list[list]:
        rows = []
        for j in self.jobs:
            done, total = j.progress() if j.progress else (None, None)
            frac = f"{done}/{total}" if done is not None else "-"
            secs = j.seconds if j.returncode is not None else (time.time() - j.started if j.started else 0.0)
            rows.append([j.name, j.slot.name if j.slot else "-", _state(j, running), frac, f"{secs:.0f} s"])
        return rows

    def _table(self, running: dict):
        from rich.table import Table

        t = Table(title=f"{self.title} ({time.time() - self.t0:.0f} s)", title_justify="left")
        for c in ("job", "device", "state", "progress", "time"):
            t.add_column(c)
        for r in self._rows(running):
            t.add_row(*map(str, r))
        return t

    def update(self, running: dict, force: bool = False) -> None:
        if self.live is not None:
            self.live.update(self._table(running))
            return
        states = [_state(j, running) for j in self.jobs]
        now = time.time()
        if states != self.last_states or now - self.last_plain > 30:
            self.last_states, self.last_plain = states, now
            print(f"{self.title}: " + "; ".join(f"{r[0]} {r[2]} {r[3]}" for r in self._rows(running)),
                  file=sys.stderr, flush=True)


def _start(job: Job, slot: Slot, port: int, cpu_threads: int) -> subprocess.Popen:
    job.slot = slot
    job.argv = deme_command(job.args, job.processes, port, cpu=not slot.gpus)
    env = {**os.environ, **slot.env(), **job.env, "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    if not slot.gpus and "OMP_NUM_THREADS" not in os.environ:   # CPU jobs share the cores instead of fighting
        env["OMP_NUM_THREADS"] = str(cpu_threads)
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a") as f:
        f.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} on {slot.name}: "
                f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r} {shlex.join(job.argv)}\n")
    log = open(job.log, "a")
    try:
        # a new session per job: an interrupt ends the whole job (accelerate's workers too), and only it
        return subprocess.Popen(job.argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    finally:
        log.close()


STOP_GRACE_S = 120   # seconds a stopped job has to write its checkpoint (interrupts.py) before SIGKILL


def _stop(procs: dict) -> None:
    """SIGTERM to every job's process group (each saves at its next safe point and exits), SIGKILL after the grace."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.time() + STOP_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()


def run_jobs(jobs: list[Job], slots: list[Slot], title: str, poll_s: float = 1.0) -> list[Job]:
    """Run every job on the first free slot (more jobs than slots: the rest wait for one); returns the jobs with
    their exit codes. One failing job does not stop the others: they are independent."""
    if not slots:
        raise UsageError("no device to run on; give --gpus a count, a list like 0,1 or cpu:P")
    queue, free, running = deque(jobs), list(slots), {}
    ports = {s: BASE_PORT + 1 + k for k, s in enumerate(slots)}   # one rendezvous port per slot, never shared
    cpu_slots = sum(1 for s in slots if not s.gpus)
    cpu_threads = max(1, (os.cpu_count() or 1) // max(1, cpu_slots))
    with _View(title, jobs) as view:
        try:
            while queue or running:
                while queue and free:
                    job, slot = queue.popleft(), free.pop(0)
                    job.started = time.time()
                    running[_start(job, slot, ports[slot], cpu_threads)] = job
                for p, job in list(running.items()):
                    rc = p.poll()
                    if rc is not None:
                        job.returncode, job.seconds = rc, time.time() - job.started
                        del running[p]
                        free.append(job.slot)
                        free.sort(key=slots.index)
                view.update(running)
                if queue or running:
                    time.sleep(poll_s)
            view.update(running, force=True)
        except BaseException:     # Ctrl-C, SIGTERM (interrupts.Interrupted), any error: the jobs stop too
            _stop(running)
            raise
    return jobs


def failure_report(jobs: list[Job]) -> list[str]:
    """One paragraph per failed job: its exit code, device, log file and last log lines."""
    out = []
    for j in jobs:
        if j.returncode not in (0, None):
            out.append(f"{j.name} failed with exit code {j.returncode} on {j.slot.name if j.slot else '?'}; "
                       f"last lines of {j.log}:")
            out.extend("    " + line for line in tail(j.log))
    return out


def metrics_progress(metrics: Path, total: int) -> Callable[[], tuple]:
    """Progress of a training job: the step of the last line of its metrics.jsonl."""
    import json

    def read() -> tuple:
        for line in reversed(tail(metrics, 3)):
            try:
                return int(json.loads(line)["step"]), total
            except (ValueError, KeyError, TypeError):
                continue
        return 0, total
    return read


# --- the recipe launched jobs read ---------------------------------------------------------------------------------

def launch_recipe_file(recipe, run) -> Path:
    """Where launched jobs read the resolved recipe: <run>/launch/recipe.toml (output.dir made absolute)."""
    return Path(run.root).resolve() / "launch" / "recipe.toml"


def write_launch_recipe(recipe, run) -> Path:
    from .runs import write_atomic

    path = launch_recipe_file(recipe, run)
    fixed = recipe.model_copy(update={"output": recipe.output.model_copy(update={"dir": str(path.parent.parent)})})
    write_atomic(path, fixed.to_toml())
    return path
