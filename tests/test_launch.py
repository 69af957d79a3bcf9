"""Scale-out: ranges fanned out as processes, failure reports, SLURM scripts, data parallel under torchrun, sharded
sampling (bit-identical to one process). The tests that start processes use 2 CPU processes of the tiny DDPM."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deme_cli.engine import processes
from deme_cli.cli import app
from deme_cli.engine.errors import UsageError
from deme_cli.engine.runs import RunDir

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _write(recipe, tmp_path) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(recipe.to_toml())
    return path


def test_device_slots(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert [s.name for s in processes.device_slots("cpu:2")] == ["cpu 0", "cpu 1"]
    assert processes.device_slots("cpu:2")[0].env() == {"CUDA_VISIBLE_DEVICES": ""}
    two = processes.device_slots("2")
    assert [s.gpus for s in two] == [(0,), (1,)] and two[1].env() == {"CUDA_VISIBLE_DEVICES": "5"}   # visible 1
    pairs = processes.device_slots("0,1,2,3", per_job=2)
    assert [s.env()["CUDA_VISIBLE_DEVICES"] for s in pairs] == ["4,5", "6,7"]
    assert len(processes.device_slots("auto")) == 4
    for bad in ("0", "a,b", "1,1", "cpu:0", "cpu:x"):
        with pytest.raises(UsageError):
            processes.device_slots(bad)
    with pytest.raises(UsageError, match="needs at least 2"):
        processes.device_slots("1", per_job=2)
    # jobs about to start here: the GPUs asked for must be visible (a plan for another machine is not checked)
    assert len(processes.device_slots("0,3", check=True)) == 2 and processes.device_slots("cpu:2", check=True)
    with pytest.raises(UsageError, match="asks for GPU 4 but only 4 GPU"):
        processes.device_slots("5", check=True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert len(processes.device_slots("2")) == 2
    with pytest.raises(UsageError, match="none is visible on this machine; use --gpus cpu:P"):
        processes.device_slots("2", check=True)
    assert [s.name for s in processes.device_slots("auto", check=True)] == ["cpu 0"]
    cmd = processes.deme_command(["train", "r.toml", "--range", "1"], processes=2, port=29601)
    assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--multi_gpu"] and "29601" in cmd


def test_fan_out_two_ranges_as_two_processes(make_recipe, tmp_path):
    """`deme train --all --launcher local --gpus cpu:2`: each range in its own process, then a re-run keeps them."""
    recipe = make_recipe(train={"steps": 2, "checkpoint_every": 2})
    path = _write(recipe, tmp_path)
    run = RunDir(recipe.out_dir)
    result = CliRunner().invoke(app, ["train", str(path), "--all", "--launcher", "local", "--gpus", "cpu:2", "--json"],
                                env=ENV)
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["slots"] == ["cpu 0", "cpu 1"] and got["failed"] == []
    assert [(r["range"], r["status"], r["steps"]) for r in got["ranges"]] == [(0, "done", 2), (1, "done", 2)]
    assert {r["device"] for r in got["ranges"]} == {"cpu 0", "cpu 1"}             # ran side by side
    for i in (0, 1):
        assert (run.final(i) / "deme.json").is_file()
        assert "CUDA_VISIBLE_DEVICES=''" in (run.range_dir(i) / "launch.log").read_text()
        assert [json.loads(x)["step"] for x in run.metrics(i).read_text().splitlines()] == [1, 2]
    again = CliRunner().invoke(app, ["train", str(path), "--all", "--launcher", "local", "--gpus", "cpu:2", "--json"],
                               env=ENV)
    assert again.exit_code == 0, again.output
    assert [r["status"] for r in json.loads(again.stdout)["ranges"]] == ["kept", "kept"]   # nothing started


def test_failed_job_is_reported_with_exit_code_and_log_tail(tmp_path):
    jobs = [processes.Job("range 0", ["train", str(tmp_path / "missing.toml"), "--range", "0"], tmp_path / "0.log")]
    processes.run_jobs(jobs, processes.device_slots("cpu:1"), "test", poll_s=0.1)
    assert jobs[0].returncode == 2
    report = "\n".join(processes.failure_report(jobs))
    assert "range 0 failed with exit code 2 on cpu 0" in report and "does not exist" in report


def test_slurm_emit_and_dry_run(make_recipe, tmp_path):
    recipe = make_recipe(ranges={"n": 3})
    path = _write(recipe, tmp_path)
    folder = Path(recipe.out_dir).resolve() / "launch" / "slurm"
    dry = CliRunner().invoke(app, ["train", str(path), "--all", "--launcher", "slurm", "--emit", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "#SBATCH --array=0-2" in dry.stdout and "afterok" in dry.stdout and not folder.exists()
    res = CliRunner().invoke(app, ["train", str(path), "--all", "--launcher", "slurm", "--emit", "--gpus-per-range",
                                   "2", "--slurm-option", "partition=gpu", "--json"])
    assert res.exit_code == 0, res.output
    train = (folder / "train.sbatch").read_text()
    assert "#SBATCH --array=0-2" in train and "#SBATCH --partition=gpu" in train and "--gres=gpu:2" in train
    assert "accelerate.commands.launch --multi_gpu --num_processes 2" in train
    assert '--range "$SLURM_ARRAY_TASK_ID"' in train
    assert "--dependency=afterok:$train" in (folder / "submit.sh").read_text()
    assert "deme_cli merge" in (folder / "merge.sbatch").read_text()
    resolved = (folder.parent / "recipe.toml").read_text()
    assert f'dir = "{Path(recipe.out_dir).resolve()}"' in resolved
    assert json.loads(res.stdout)["submit"].endswith("submit.sh")


def test_launcher_misuse_is_a_usage_error(make_recipe, tmp_path):
    path = _write(make_recipe(), tmp_path)
    for args, msg in ((["--range", "0", "--launcher", "local"], "use it with --all"),
                      (["--all", "--emit"], "--launcher slurm"),
                      (["--all", "--launcher", "ssh"], "unknown launcher"),
                      (["--all", "--launcher", "local", "--gpus", "cpu:0"], "not valid"),
                      (["--all", "--launcher", "local", "--gpus", "2"], "none is visible")):
        r = CliRunner().invoke(app, ["train", str(path), *args], env={"CUDA_VISIBLE_DEVICES": ""})
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, (args, r.output)
    assert not RunDir(make_recipe().out_dir).range_dir(0).exists()       # nothing was started


def test_one_range_data_parallel_under_torchrun(make_recipe, tmp_path):
    """One range on 2 processes (what `accelerate launch --multi_gpu` starts on GPUs; torchrun on the CPU)."""
    recipe = make_recipe(train={"steps": 2, "checkpoint_every": 2})
    path = _write(recipe, tmp_path)
    cmd = processes.deme_command(["train", str(path), "--range", "1"], processes=2, port=29611, cpu=True)
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-10000:]    # the ranks' own errors come before torchrun's summary
    run = RunDir(recipe.out_dir)
    lines = [json.loads(x) for x in run.metrics(1).read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]                            # one line per step, from the main process
    state = json.loads((run.checkpoints(1) / "step-2" / "state.json").read_text())
    assert state["num_processes"] == 2 and len(state["rng"]) == 2         # every process's RNG state
    assert json.loads((run.final(1) / "deme.json").read_text())["steps"] == 2


def test_sampling_with_2_processes_is_bit_identical_to_one(make_recipe, tmp_path, monkeypatch):
    from deme_cli.commands.sample import run_sample
    from deme_cli.engine.images import existing_images

    common = dict(sample={"num_images": 5, "batch_size": 2, "steps": 3})
    one = make_recipe(**common, output={"dir": str(tmp_path / "one")})
    two = make_recipe(**common, output={"dir": str(tmp_path / "two")})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    a = run_sample(one, RunDir(one.out_dir), "base")
    b = run_sample(two, RunDir(two.out_dir), "base", processes=2, gpus="cpu:2")
    assert b["processes"] == 2 and b["generated"] == 5 and b["complete"] and b["grid"] == "grid.png"
    fa, fb = existing_images(Path(a["folder"])), existing_images(Path(b["folder"]))
    assert sorted(fa) == sorted(fb) == list(range(5))
    assert all(fa[k].read_bytes() == fb[k].read_bytes() for k in fa)
    meta = json.loads((Path(b["folder"]) / "samples.json").read_text())
    assert meta["settings"] == json.loads((Path(a["folder"]) / "samples.json").read_text())["settings"]
    assert not list(Path(b["folder"]).glob(".shard-*")) and not list(Path(b["folder"]).parent.glob(".*.log"))
    again = run_sample(two, RunDir(two.out_dir), "base", processes=2, gpus="cpu:2")   # resume: nothing to make
    assert again["generated"] == 0 and again["skipped"] == 5


@pytest.mark.parametrize("objective", ["loss", "range_loss"])
def test_parallel_weight_search_equals_the_serial_one(make_recipe, tiny_ddpm, tiny_images, tmp_path, monkeypatch,
                                                      objective):
    """`deme merge --search --processes 2`: the same candidates, scores (exactly) and best weights as one process.

    Coordinate search: its sweeps are scored in parallel, its decisions stay sequential. range_loss: each process
    computes theta's losses itself."""
    import shutil

    import torch

    from deme_cli.commands import merge
    from test_merge import N, write_ranges

    monkeypatch.setenv("OMP_NUM_THREADS", "1")              # the same thread count in every process
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        write_ranges(tmp_path / "serial", tiny_ddpm)
        shutil.copytree(tmp_path / "serial", tmp_path / "parallel")
        m = {"search": "coordinate", "candidates": [0.0, 0.5, 1.0], "objective": objective, "search_num_images": 6,
             "search_reference": str(tiny_images)}
        runs = {}
        for name, procs in (("serial", 1), ("parallel", 2)):
            recipe = make_recipe(ranges={"n": N}, merge=m, output={"dir": str(tmp_path / name)})
            runs[name] = merge.run_merge(recipe, RunDir(tmp_path / name), search=True, weights=[0.5, 0.5, 0.5],
                                         processes=procs, gpus="cpu")
    finally:
        torch.set_num_threads(threads)
    a, b = runs["serial"]["search"], runs["parallel"]["search"]
    assert b["processes"] == 2 and "processes" not in a
    assert a["candidates"] == b["candidates"] and len(a["candidates"]) >= 7
    assert a["best"] == b["best"] and runs["serial"]["weights"] == runs["parallel"]["weights"]
    assert len({c["score"] for c in a["candidates"]}) > 1


def test_the_slurm_merge_job_follows_merge_weights(make_recipe, tmp_path):
    """One meaning of merge.weights everywhere: the emitted merge job searches (and asks for a GPU) exactly when the
    recipe says "search"; its recipe file carries the same value to `deme merge`."""
    from deme_cli.engine.recipe import tomllib

    from deme_cli.commands import launch
    from deme_cli.engine.runs import RunDir

    for weights, searches in (("uniform", False), ("search", True), ([0.2, 0.8], False)):
        recipe = make_recipe(merge={"weights": weights}, output={"dir": str(tmp_path / str(searches) / str(weights))})
        emitted = launch.slurm_emit(recipe, RunDir(recipe.out_dir), write=True)
        merge_job = next(t for p, t in emitted["files"].items() if p.endswith("merge.sbatch"))
        assert ("--gres=gpu:1" in merge_job) == searches and ("--search" in merge_job) == searches
        assert tomllib.loads(Path(emitted["recipe"]).read_text())["merge"]["weights"] == weights


def _wait_for_steps(proc, metrics: Path, steps: int, timeout: float = 300) -> None:
    """Wait until a training process has logged `steps` steps (it must still be running then)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.stdout.read()[-3000:]


def test_a_slurm_task_checkpoints_on_sigusr1_before_the_time_limit_and_requeues_itself(make_recipe, tmp_path):
    """The emitted train.sbatch run as SLURM would run it (scontrol faked): SIGUSR1 to the batch shell reaches
    `deme train`, which writes a checkpoint at its next step and exits 138; the script then requeues its job."""
    import signal

    from deme_cli.commands import launch

    recipe = make_recipe(train={"steps": 100_000, "checkpoint_every": 100_000})
    run = RunDir(recipe.out_dir)
    emitted = launch.slurm_emit(recipe, run, write=True)
    script = next(p for p in emitted["files"] if p.endswith("train.sbatch"))
    text = Path(script).read_text()
    assert "#SBATCH --signal=B:USR1@300" in text and "#SBATCH --requeue" in text
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (fake / "scontrol").chmod(0o755)
    env = {**ENV, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_ID": "4242"}
    proc = subprocess.Popen(["bash", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_steps(proc, run.metrics(1), 2)
        proc.send_signal(signal.SIGUSR1)          # SLURM signals the batch shell (B:)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 138, out[-2000:]
    assert "stopped: range 1 stopped by SIGUSR1" in out and "Traceback" not in out
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    k = int((run.checkpoints(1) / "latest").read_text().strip().split("-")[1])
    assert k >= 2 and len(run.metrics(1).read_text().splitlines()) == k


SAVE_HOOK = """
import os, time
from pathlib import Path
from deme_cli.engine import checkpoints, interrupts

_real = checkpoints.save


def save(ckpt_dir, step, **kw):  # the last step's save waits, while it is being written, for the signal to arrive
    if step == int(os.environ["TEST_SAVE_STEP"]):
        Path(os.environ["TEST_SAVE_MARK"]).write_text("saving")
        deadline = time.time() + 120
        while not any(f.signum for f in interrupts._deferred) and time.time() < deadline:
            time.sleep(0.05)
    return _real(ckpt_dir, step, **kw)


checkpoints.save = save
"""


def test_a_slurm_task_signalled_during_its_last_save_stops_and_requeues_then_finishes(make_recipe, tmp_path):
    """SIGUSR1 reaches `deme train` while it writes the last step's checkpoint (a save that, for Stable Diffusion,
    takes minutes): the task exits 138 once that is written and requeues itself; the requeued task exports the range
    from that checkpoint without training and exits 0. A sitecustomize in the task's Python holds the save open until
    the signal has arrived, so the signal always lands inside it."""
    import signal
    import time

    from deme_cli.commands import launch

    recipe = make_recipe(train={"steps": 3, "checkpoint_every": 100_000})
    run = RunDir(recipe.out_dir)
    emitted = launch.slurm_emit(recipe, run, write=True)
    script = next(p for p in emitted["files"] if p.endswith("train.sbatch"))
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    (fake / "scontrol").chmod(0o755)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SAVE_HOOK)
    mark = tmp_path / "saving"
    env = {**ENV, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "0", "SLURM_JOB_ID": "4242"}
    hooked = {**env, "PYTHONPATH": os.pathsep.join([str(hook), env.get("PYTHONPATH", "")]),
              "TEST_SAVE_STEP": "3", "TEST_SAVE_MARK": str(mark)}
    proc = subprocess.Popen(["bash", script], env=hooked, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not mark.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert mark.exists(), proc.stdout.read()[-3000:]
        proc.send_signal(signal.SIGUSR1)          # SLURM signals the batch shell (B:)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 138, out[-2000:]
    assert "range 0 stopped by SIGUSR1 after its last step (3 of 3)" in out and "Traceback" not in out
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]
    assert (run.checkpoints(0) / "latest").read_text().strip() == "step-3" and not run.final(0).exists()

    again = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=300)   # requeued
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert json.loads((run.final(0) / "deme.json").read_text())["steps"] == 3
    assert len(run.metrics(0).read_text().splitlines()) == 3                 # exported, not trained again
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]


def test_under_torchrun_a_signal_to_one_process_stops_every_process_at_the_same_step(make_recipe, tmp_path):
    """SIGTERM to rank 1 only: both processes stop after the same step (they agree through an all-reduce), the
    checkpoint holds both processes' RNG states, and the range resumes from it on 2 processes."""
    import signal

    import psutil

    recipe = make_recipe(train={"steps": 100_000, "checkpoint_every": 100_000})
    path = _write(recipe, tmp_path)
    run = RunDir(recipe.out_dir)
    cmd = processes.deme_command(["train", str(path), "--range", "1"], processes=2, port=29613, cpu=True)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_steps(proc, run.metrics(1), 2)
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                   if c.environ().get("RANK") == "1" and "deme_cli" in " ".join(c.cmdline())]
        assert len(workers) == 1
        workers[0].send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    k = int((run.checkpoints(1) / "latest").read_text().strip().split("-")[1])
    state = json.loads((run.checkpoints(1) / f"step-{k}" / "state.json").read_text())
    assert k >= 2 and state["num_processes"] == 2 and len(state["rng"]) == 2, out[-3000:]
    assert [json.loads(x)["step"] for x in run.metrics(1).read_text().splitlines()] == list(range(1, k + 1))
    assert f"range 1 stopped by SIGTERM at step {k}" in out
    done = _write(make_recipe(train={"steps": k + 1, "checkpoint_every": 100_000}), tmp_path)
    cmd = processes.deme_command(["train", str(done), "--range", "1"], processes=2, port=29614, cpu=True)
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-10000:]    # the ranks' own errors come before torchrun's summary
    assert json.loads((run.final(1) / "deme.json").read_text())["steps"] == k + 1
