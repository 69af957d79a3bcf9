"""Where the weight search scores its candidates: one candidate model on the objective's device
(`candidate_evaluator`), its merges held in memory when they fit (`make_merger`), and `SearchPool`, P processes on
disjoint device slots that score independent candidates in parallel (`deme merge --search --processes P`).
"""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable, Optional

from . import ui
from .errors import UsageError
from .interrupts import SIGNALS
from .search_objectives import OBJECTIVES


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


def cache_bytes(inputs) -> int:
    """The bytes a task_vectors.CandidateMerger of `inputs` holds: theta (float tensors in float32) and a float32 task
    vector per range for each tensor the range changes (`_changed`: a LoRA range only its adapted weights, B @ A
    dense). Read off the files' headers; nothing is loaded."""
    import math

    changed = [_changed(r) for r in inputs.ranges]
    return sum(4 * math.prod(shape) * (1 + sum((g, k) in c or (g, None) in c for c in changed))
               if inputs.base_tensor(g, k).is_floating_point() else inputs.base_tensor(g, k).nbytes
               for g, k, _, shape in inputs.entries)


def _changed(r) -> set:
    """(group, key) of the tensors whose task vector RangeModel `r` gives (task_vector is not None); (group, None):
    every tensor of that group."""
    from .safetensors_stream import read_header

    unet = {("unet", k) for k in r.lora_pairs} if r.is_lora else {("unet", None)}
    return unet | ({("projection", k) for k in read_header(r.projection_file)[0]} if r.projection_file else set())


def make_merger(inputs, spec, device):
    """Task vectors held on the device when they fit in 70% of its free memory, else merges streamed from disk."""
    from .task_vectors import CandidateMerger, StreamingMerger

    need, free = cache_bytes(inputs), free_bytes(device)
    if free is not None and need > 0.7 * free:
        ui.warn(f"the task vectors ({need / 2 ** 30:.1f} GiB) do not fit next to the search on {device.type}; "
                f"each candidate is merged from disk instead (slower)")
        return StreamingMerger(inputs, spec)
    return CandidateMerger(inputs, spec, device)


def set_theta_baseline(objective, merger, model, n: int) -> None:
    """An objective relative to theta (range_loss, loss_by_t*) scores theta first: all n weights 0 loaded."""
    if hasattr(objective, "set_baseline"):
        merger.load_into(model, [0.0] * n)          # all weights 0: theta itself, for every merge method
        objective.set_baseline(model)


def candidate_evaluator(setup, run, inputs, spec):
    """(objective, merger, evaluate(weights) -> score): one candidate model on the objective's device."""
    from .task_vectors import new_candidate_model

    objective = OBJECTIVES[setup.merge.objective](setup, run, inputs)
    model = new_candidate_model(inputs).to(objective.device).eval().requires_grad_(False)
    merger = make_merger(inputs, spec, objective.device)

    set_theta_baseline(objective, merger, model, inputs.n)

    def evaluate(weights: list[float]) -> float:
        merger.load_into(model, weights)
        return float(objective(model))
    return objective, merger, evaluate


def _tasks(tasks):
    """The tasks sent to a worker until the None that ends them, or until the main process is gone."""
    import multiprocessing as mp
    import queue

    parent = mp.parent_process()
    while True:
        try:
            job = tasks.get(timeout=5)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return
            continue
        if job is None:
            return
        yield job


def _pool_worker(setup, ranges, run, env: dict, tasks, results) -> None:
    """A search process: builds its own objective and candidate model, then scores the weight vectors it is sent."""
    import os
    import traceback

    os.environ.update(env)                    # before torch initialises CUDA: this worker's GPU (or none)
    for s in SIGNALS:                         # Ctrl-C and SIGTERM reach the whole process group: the main process
        signal.signal(s, signal.SIG_IGN)      # stops the search (and these workers) at a safe point
    try:
        ui.console.quiet = True               # the main process reports; warnings would repeat once per worker
        from .task_vectors import load_inputs
        from .merge_methods import MergeSpec

        inputs = load_inputs(setup.base, run, n=ranges.n, use_ema=setup.merge.use_ema)
        objective, merger, evaluate = candidate_evaluator(setup, run, inputs, MergeSpec.from_section(setup.merge))
        results.put(("ready", {"describe": objective.describe(), "merges": type(merger).kind}))
        for job in _tasks(tasks):
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

    def __init__(self, setup, ranges, run, processes: int, gpus: str = "auto"):
        """`setup`: search_objectives.SearchSetup; `ranges`: [ranges] (each worker loads the N range models)."""
        import multiprocessing as mp
        import os

        from .processes import worker_slots

        slots = worker_slots(setup.base, gpus, processes)
        ctx = mp.get_context("spawn")         # fork after torch initialised is unsafe; spawn starts clean
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        threads = str(max(1, (os.cpu_count() or 1) // processes))
        self.procs = []
        for k in range(processes):
            slot = slots[k % len(slots)]
            env = slot.env() if slot.gpus else {"CUDA_VISIBLE_DEVICES": "",
                                                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
            p = ctx.Process(target=_pool_worker, args=(setup, ranges, run, env, self.tasks, self.results), daemon=True)
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

    def map(self, weights: list, on_result: Optional[Callable[[int, float], None]] = None) -> list[float]:
        """The scores of `weights`, in order; `on_result(i, score)` as each arrives (it may raise to stop: the
        workers are then stopped by `close`)."""
        for i, w in enumerate(weights):
            self.tasks.put((i, list(w)))
        out = [None] * len(weights)
        for _ in weights:
            _, i, s = self._get()
            out[i] = s
            if on_result is not None:
                on_result(i, s)
        return out

    def close(self) -> None:
        """Ask every worker to stop after its current merge; kill those still busy after 30 s (they ignore SIGTERM:
        the main process decides when the search stops)."""
        for _ in self.procs:
            self.tasks.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
