"""`deme sample`: generate images from the base, merged, range or ensemble model with per-image seeds.

Image k uses seed + k (engine/denoise.py: the loop, the schedulers, batch invariance; engine/model_specs.py: what each
model spec loads; engine/images.py: the folder). Writes numbered PNGs, grid.png and samples.json (model and its hash,
scheduler, steps, eta, seeds, precision) into the run dir, and the grid into the model card of merged/ or the range's
folders (engine/model_card.py); a re-run keeps the images made with the same settings and refuses other settings
unless --force. `--processes P` (or `accelerate launch`) splits the seeds across processes; the images do not change.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..engine import interrupts, locks, model_card
from ..engine.base import Base, resolve_base
from ..engine.denoise import Loaded, generate_batches, make_scheduler
from ..engine.errors import UsageError
from ..engine.images import GRID_FILE, SAMPLES_JSON, existing_images, save_png, write_grid
from ..engine.model_specs import load_model, parse_model_spec, spec_settings
from ..engine.recipe import DataSection, MergeSection, RangesSection, SampleSection, stage_kwargs
from ..engine.runs import RunDir, read_json, read_record, write_json


def _settings(s: SampleSection, spec: str, loaded: Loaded, precision: str) -> dict:
    """What determines the pixels: a resume must match these."""
    return {"model": spec, "model_hash": loaded.identity.get("hash"), "scheduler": s.scheduler, "steps": s.steps,
            "eta": s.eta if s.scheduler == "ddim" else None, "seed": s.seed, "precision": precision,
            "output_size": s.output_size}


def _recipe_key(setting: str) -> str:
    """The recipe key (or what else) a sampling setting comes from, for messages."""
    if setting == "model_hash":
        return "the model's weights"
    return f"sample.{setting}" if setting in SampleSection.model_fields else setting


@dataclass(frozen=True)
class Shard:
    """Process `rank` of `count` makes the images k with k % count == rank (each writes its own PNGs)."""

    rank: int = 0
    count: int = 1

    def owns(self, k: int) -> bool:
        return k % self.count == self.rank

    @staticmethod
    def parse(text: str) -> "Shard":
        """'I/P' -> Shard(I, P)."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
        if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
            raise UsageError(f"--shard expects I/P with 0 <= I < P, like 0/2; got '{text}'")
        return Shard(int(m.group(1)), int(m.group(2)))


def _distributed(base: Base):
    """(Shard, device, barrier) when run under `accelerate launch` / torchrun with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    state = PartialState(cpu=base.on_cpu)
    return Shard(state.process_index, state.num_processes), state.device, state.wait_for_everyone


class _Job:
    """One `deme sample` run: the model loaded, its settings, and the sample folder."""

    def __init__(self, base: Base, run: RunDir, spec: str, device, *, sample: SampleSection, models: dict,
                 target=None):
        """`device`: where the model is loaded; `target`: where the images are made (default: `device`); `models`:
        what model_specs.load_model takes besides (ranges, use_ema, resolution)."""
        from ..engine.devices import resolve_precision
        from ..engine.speed import use_compile

        s = self.s = sample
        self.spec, self.device = spec, device
        target = target if target is not None else device
        self.kind, _ = parse_model_spec(spec)
        self.precision = resolve_precision(s.precision, target)
        self.sched_cfg = base.scheduler_config
        make_scheduler(s.scheduler, self.sched_cfg, s.eta)       # fail on a bad scheduler before loading models
        self.loaded = load_model(base, run, spec, device, sample=s, **models)
        self.folder = run.samples(spec)
        self.meta_path = self.folder / SAMPLES_JSON
        self.settings = {**_settings(s, spec, self.loaded, self.precision), **self.loaded.settings}
        self.compile, self.target = use_compile(s.compile, target), target

    def check_resume(self, force: bool) -> dict[int, Path]:
        """Images already in the folder; refuses (UsageError) when they were made with other settings."""
        have = existing_images(self.folder)
        if have and not force:
            old = read_record(self.meta_path, "re-run with --force to make the images again").get("settings") \
                if self.meta_path.is_file() else None
            changed = [_recipe_key(k) for k in self.settings if old is None or old.get(k) != self.settings[k]]
            if changed:
                raise UsageError(f"'{self.folder}' holds {len(have)} images made with other settings "
                                 f"({', '.join(changed)}); re-run with --force to regenerate them, or use another "
                                 f"--out")
        return have

    def start(self, have: dict, force: bool, processes: int = 1) -> dict:
        """Remove old images on --force, write samples.json (complete: false); returns the record."""
        s = self.s
        if force:  # inputs are valid and the model loaded: now the old images go, so no mix of old and new remains
            for p in have.values():
                p.unlink()
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"model": self.spec, "kind": self.kind, "model_info": self.loaded.info, "settings": self.settings,
                  "scheduler": s.scheduler,
                  "scheduler_class": type(make_scheduler(s.scheduler, self.sched_cfg)[0]).__name__,
                  "steps": s.steps, "eta": self.settings["eta"],
                  "seeds": {"base": s.seed, "count": s.num_images, "rule": "image k uses seed + k"},
                  "precision": self.precision, "device": self.target.type, "compile": self.compile,
                  "batch_size": s.batch_size, "num_images": s.num_images, "processes": processes,
                  **({"sharding": "image k is made by process k % processes"} if processes > 1 else {}),
                  **self.loaded.record, "complete": False}
        write_json(self.meta_path, record)
        return record

    def generate(self, shard: Shard = Shard()) -> dict:
        """Make the missing images this shard owns; returns {"generated", "time_s", "calls"}."""
        from ..engine import ui

        s = self.s
        have = existing_images(self.folder)
        todo = [k for k in range(s.num_images) if k not in have and shard.owns(k)]
        t0 = time.time()
        if todo:
            seeds = [s.seed + k for k in todo]
            mine = len([k for k in range(s.num_images) if shard.owns(k)])
            desc = f"sample {self.spec}" + (f" [{shard.rank}/{shard.count}]" if shard.count > 1 else "")
            with ui.progress(desc, total=mine, start=mine - len(todo), unit="img", every=max(1, s.batch_size)) as bar, \
                    interrupts.deferred() as stop:
                for pos, images in generate_batches(self.loaded.denoiser, s.scheduler, s.steps, seeds,
                                                    scheduler_config=self.sched_cfg,
                                                    conds=self.loaded.conds_for(todo), eta=s.eta,
                                                    batch_size=s.batch_size, precision=self.precision,
                                                    device=self.device, compile=self.compile):
                    for j, img in zip(pos, images):
                        save_png(self.folder / f"{todo[j]:06d}.png", img, s.output_size)
                    bar.update(len(pos))
                    if stop.signum:     # every image made so far is on disk: a re-run makes only the rest
                        done = len([k for k in existing_images(self.folder) if k < s.num_images])
                        raise interrupts.Interrupted(stop.signum, (
                            f"sampling {self.spec} stopped by {stop.name} with {done} of {s.num_images} images in "
                            f"{self.folder}; re-run the same command to make the rest"))
        return {"generated": len(todo), "time_s": time.time() - t0,
                "calls": getattr(self.loaded.denoiser, "calls", None)}

    def finish(self, record: dict, generated: int, elapsed: float, calls: Optional[list] = None) -> dict:
        """grid.png and the complete samples.json."""
        s = self.s
        grid = write_grid(self.folder, s.num_images, self.folder / GRID_FILE) if s.grid else None
        missing = s.num_images - len([k for k in existing_images(self.folder) if k < s.num_images])
        record.update(complete=missing == 0, generated=generated, skipped=s.num_images - generated - missing,
                      time_s=round(elapsed, 3),
                      images_per_s=round(generated / elapsed, 3) if generated and elapsed > 0 else None,
                      grid=grid.name if grid else None, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        if missing:
            record["missing"] = missing
        if calls is not None:  # the ensemble (also inside a text-to-image denoiser)
            record["model_info"]["calls_per_range"] = calls
        write_json(self.meta_path, record)
        return {**record, "folder": str(self.folder)}


def _shard_file(folder: Path, shard: Shard) -> Path:
    return folder / f".shard-{shard.rank}-of-{shard.count}.json"


def _sum_calls(parts: list) -> Optional[list]:
    calls = [c for c in parts if c is not None]
    return [sum(x) for x in zip(*calls)] if calls else None


def run_sample(recipe, run: RunDir, spec: str, force: bool = False, processes: int = 1, gpus: str = "auto",
               shard: Optional[Shard] = None) -> dict:
    """`deme sample RECIPE --model SPEC` for a recipe (the fan-out's workers read the recipe from a file)."""
    from ..engine.processes import write_launch_recipe

    return sample_model(resolve_base(recipe.model, recipe.train.device), run, spec, force=force, processes=processes,
                        gpus=gpus, shard=shard, write_recipe=lambda: write_launch_recipe(recipe, run),
                        **stage_kwargs(sample_model, recipe))


def sample_model(base: Base,                       # the pretrained model (spec "base") and its noise schedule
                 run: RunDir,                      # the run directory: models in, samples/<spec>/ out
                 spec: str,                        # base | merged | range:I | ensemble
                 *,
                 sample: SampleSection,            # sampler, steps, seeds, images, precision, prompts, guidance
                 data: DataSection,                # data.resolution: the sample size of UNets whose config has none
                 ranges: RangesSection,            # N: the range models of range:I and ensemble
                 merge: MergeSection,              # merge.use_ema: those range models' EMA (final/) or raw weights
                 force: bool = False,              # regenerate images made before
                 processes: int = 1,               # worker processes (see below)
                 gpus: str = "auto",               # the device slots of those processes
                 shard: Optional[Shard] = None,    # this process is worker I/P
                 write_recipe: Optional[Callable[[], Path]] = None,  # writes the workers' recipe file
                 ) -> dict:
    """Write run.samples(spec)/000000.png ..., grid.png and samples.json; skip images already written.

    The images can be made by several processes, each making the images k with k % P == its rank (the pixels do not
    depend on which process makes an image: per-image seeds, batch-invariant arithmetic on the CPU):
    - under `accelerate launch --num_processes P` (or torchrun): every process runs this; the main one writes
      samples.json and grid.png once all are done;
    - `processes` = P > 1: this process starts P `deme sample --shard I/P` workers (processes.run_jobs, one per slot
      of `gpus`) on the recipe file `write_recipe()` writes once the settings are checked, waits for them and writes
      samples.json and grid.png;
    - `shard` = I/P: a worker of the above; writes only its PNGs (and a small .shard file the main process reads).
    """
    models = spec_settings(ranges, merge, data)
    if shard is not None:           # a worker of a fan-out: the starting process holds the folder's lock
        return _sample_worker(base, run, spec, shard, sample, models)
    lock = run.samples(spec).parent / f".{run.samples(spec).name}.lock"
    with locks.hold(lock, f"the samples of {spec} in '{run.root}'", main=int(os.environ.get("RANK", "0")) == 0):
        if processes > 1:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise UsageError("--processes starts its own processes; under accelerate launch or torchrun leave it "
                                 "out (the launched processes already share the images)")
            if write_recipe is None:
                raise ValueError("sampling with several processes needs write_recipe (the workers' recipe file)")
            out = _sample_fan_out(base, run, spec, force, processes, gpus, sample, models, write_recipe)
        else:
            out = _sample_here(base, run, spec, force, sample, models)
    if "failed" not in out and int(os.environ.get("RANK", "0")) == 0:
        model_card.update(run, base, [spec])            # the grid in the card of merged/ or the range's folders
    return out


def _sample_here(base: Base, run: RunDir, spec: str, force: bool, sample: SampleSection, models: dict) -> dict:
    """This process makes the images (under accelerate launch: its share of them)."""
    dist = _distributed(base)
    if dist is None:
        job = _Job(base, run, spec, base.device, sample=sample, models=models)
        record = job.start(job.check_resume(force), force)
        out = job.generate()
        return job.finish(record, out["generated"], out["time_s"], out["calls"])

    # Under accelerate launch: the main process removes (--force) and writes samples.json; all make their share.
    me, device, barrier = dist
    t0 = time.time()
    job = _Job(base, run, spec, device, sample=sample, models=models)
    have = job.check_resume(force)                # every process checks, so a refusal stops them all alike
    barrier()
    record = job.start(have, force, me.count) if me.rank == 0 else None
    barrier()
    out = job.generate(me)
    write_json(_shard_file(job.folder, me), {**out, "time_s": round(out["time_s"], 3)})
    barrier()
    if me.rank != 0:
        return {"model": spec, "shard": f"{me.rank}/{me.count}", **out, "folder": str(job.folder)}
    return _collect(job, record, me.count, time.time() - t0)


def _collect(job: "_Job", record: dict, count: int, elapsed: float) -> dict:
    parts = []
    for r in range(count):
        f = _shard_file(job.folder, Shard(r, count))
        if f.is_file():
            parts.append(read_json(f))
            f.unlink()
    return job.finish(record, sum(p["generated"] for p in parts), elapsed, _sum_calls([p.get("calls") for p in parts]))


def _sample_worker(base: Base, run: RunDir, spec: str, shard: Shard, sample: SampleSection, models: dict) -> dict:
    """`deme sample --shard I/P`: make this shard's missing images (the starting process checked the settings)."""
    job = _Job(base, run, spec, base.device, sample=sample, models=models)
    if not job.meta_path.is_file():
        raise UsageError(f"--shard is for workers started by 'deme sample --processes'; '{job.meta_path}' is missing")
    out = job.generate(shard)
    write_json(_shard_file(job.folder, shard), {**out, "time_s": round(out["time_s"], 3)})
    return {"model": spec, "shard": f"{shard.rank}/{shard.count}", **out, "folder": str(job.folder)}


def _sample_fan_out(base: Base, run: RunDir, spec: str, force: bool, processes: int, gpus: str,
                    sample: SampleSection, models: dict, write_recipe: Callable[[], Path]) -> dict:
    """`deme sample --processes P`: P worker processes on the slots of `gpus`, then samples.json and the grid.

    When a worker fails, returns the record with "failed" (shard names) and "report" (exit codes, log tails)."""
    import torch

    from ..engine import processes as launch

    slots = launch.worker_slots(base, gpus, processes)
    on_cpu = not slots[0].gpus
    # the model is loaded here for its identity (settings) and the checks only: on the CPU, GPUs stay free for workers
    job = _Job(base, run, spec, torch.device("cpu"), sample=sample, models=models,
               target=torch.device("cpu" if on_cpu else "cuda"))
    record = job.start(job.check_resume(force), force, processes)
    recipe_file = write_recipe()
    for r in range(processes):
        _shard_file(job.folder, Shard(r, processes)).unlink(missing_ok=True)
    folder = job.folder

    n, seen = sample.num_images, {"t": 0.0, "have": {}}

    def progress(rank: int):
        def read() -> tuple:
            if time.time() - seen["t"] > 1.0:          # one folder listing per poll, shared by the shards
                seen.update(t=time.time(), have=existing_images(folder))
            return sum(1 for k in seen["have"] if k < n and k % processes == rank), len(range(rank, n, processes))
        return read

    have = existing_images(folder)
    busy = {k % processes for k in range(sample.num_images) if k not in have}   # shards with work left
    jobs = [launch.Job(f"shard {r}/{processes}", ["sample", str(recipe_file), "--model", spec, "--shard",
                                                  f"{r}/{processes}"],
                       folder.parent / f".{folder.name}-shard-{r}.log", progress(r)) for r in sorted(busy)]
    t0 = time.time()
    if jobs:
        launch.run_jobs(jobs, slots, f"deme sample {spec}", poll_s=2.0)
    failed = [j.name for j in jobs if j.returncode]
    if failed:  # samples.json stays incomplete; the logs stay for the report
        return {**record, "folder": str(folder), "failed": failed, "report": launch.failure_report(jobs)}
    for j in jobs:
        j.log.unlink(missing_ok=True)
    return _collect(job, record, processes, time.time() - t0)
