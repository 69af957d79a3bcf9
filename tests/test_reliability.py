"""Reliability: signals stop training, sampling and the weight search at a safe point and they resume; NaN or
infinite losses stop training naming the last good checkpoint; finished work made from other recipe values is
refused; one writer per folder."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from deme_cli.cli import app
from deme_cli.commands.train import run_train
from deme_cli.engine import interrupts, locks
from deme_cli.engine.errors import Failed, UsageError
from deme_cli.engine.interrupts import Interrupted
from deme_cli.engine.runs import RunDir
from deme_cli.engine.trainer import RangeTrainer


def _weights(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        out.update({f"{f.relative_to(folder)}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def _signal_at_step(monkeypatch, step: int, signum: int) -> list:
    """Send `signum` to this process right after the trainer queued optimizer step `step`."""
    real, sent = RangeTrainer.launch_step, []

    def launch(self):
        out = real(self)
        if self.step == step and not sent:
            sent.append(step)
            os.kill(os.getpid(), signum)
        return out
    monkeypatch.setattr(RangeTrainer, "launch_step", launch)
    return sent


def _strict_json_lines(path: Path) -> list[dict]:
    def no_constants(name):
        raise ValueError(f"{name} is not JSON")
    return [json.loads(x, parse_constant=no_constants) for x in path.read_text().splitlines() if x.strip()]


# --- preemption ----------------------------------------------------------------------------------------------------

def test_sigterm_checkpoints_at_the_step_boundary_and_the_resumed_run_is_bit_exact(make_recipe, tmp_path,
                                                                                  monkeypatch):
    common = dict(train={"steps": 6, "checkpoint_every": 100, "lr": 1e-3})
    ref = make_recipe(**common, output={"dir": str(tmp_path / "ref")})
    run_train(ref, RunDir(ref.out_dir), 0)

    cut = make_recipe(**common, output={"dir": str(tmp_path / "cut")})
    run = RunDir(cut.out_dir)
    sent = _signal_at_step(monkeypatch, 3, signal.SIGTERM)
    with interrupts.handle_signals(), pytest.raises(Interrupted) as e:
        run_train(cut, run, 0)
    assert sent == [3] and e.value.exit_code == 143
    assert "step 3 of 6" in str(e.value) and "step-3" in str(e.value)
    assert (run.checkpoints(0) / "latest").read_text().strip() == "step-3"   # written at the boundary, not at 100
    assert not run.final(0).exists()
    assert [x["step"] for x in _strict_json_lines(run.metrics(0))] == [1, 2, 3]

    monkeypatch.undo()
    [res] = run_train(cut, run, 0)
    assert res["steps"] == 6 and not res["skipped"]
    for ema in (True, False):
        a, b = _weights(RunDir(ref.out_dir).final(0, ema)), _weights(run.final(0, ema))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGUSR1, 138)])
def test_sigint_and_sigusr1_stop_the_cli_with_one_line_and_a_checkpoint(make_recipe, tmp_path, monkeypatch,
                                                                          signum, code):
    recipe = make_recipe(train={"steps": 5, "checkpoint_every": 100})
    f = tmp_path / "r.toml"
    f.write_text(recipe.to_toml())
    _signal_at_step(monkeypatch, 2, signum)
    r = CliRunner().invoke(app, ["train", str(f), "--range", "0"])
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    last = [line for line in r.output.splitlines() if line.strip()][-1]
    assert last.startswith("stopped:") and "step 2 of 5" in last, r.output
    assert (RunDir(recipe.out_dir).checkpoints(0) / "latest").read_text().strip() == "step-2"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL            # the handlers are put back


def test_outside_a_loop_a_signal_ends_the_command_at_once():
    with interrupts.handle_signals(), pytest.raises(Interrupted) as e:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert e.value.exit_code == 143
    with interrupts.handle_signals(), interrupts.deferred() as flag:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert flag.signum == signal.SIGUSR1                       # deferred: only recorded
        with pytest.raises(Interrupted):                           # a second Ctrl-C does not wait
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)


# --- non-finite losses ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("every", [1, 100])
def test_a_nan_loss_stops_training_naming_the_step_and_keeping_the_last_good_checkpoint(make_recipe, every):
    recipe = make_recipe(train={"steps": 6, "lr": 1e20, "max_grad_norm": 1e30, "checkpoint_every": every})
    run = RunDir(recipe.out_dir)
    with pytest.raises(Failed) as e:
        run_train(recipe, run, 0)
    lines = _strict_json_lines(run.metrics(0))                    # valid JSON: NaN written as null
    bad = next(x for x in lines if x["loss"] is None)
    assert bad["step"] == lines[-1]["step"] == 2                  # stopped at the first NaN step
    msg = str(e.value)
    assert "the loss is nan at step 2" in msg and "--force" in msg
    if every == 1:
        kept = (run.checkpoints(0) / "latest").read_text().strip()
        assert kept == "step-1" and f"{run.checkpoints(0) / kept}, is kept" in msg
        ck = load_file(str(run.checkpoints(0) / kept / "student.safetensors"))
        assert all(torch.isfinite(v).all() for v in ck.values())  # the kept one is good
    else:
        assert not run.checkpoints(0).exists() and "no checkpoint was written before it" in msg
    assert not run.final(0).exists() and not run.final(0, ema=False).exists()


def test_weights_that_overflow_are_never_written_to_a_checkpoint(make_recipe, monkeypatch):
    """The loss of step 3 is finite, but its update made a weight infinite: no step-3 checkpoint, step-2 kept."""
    recipe = make_recipe(train={"steps": 6, "checkpoint_every": 1})
    run = RunDir(recipe.out_dir)
    real = RangeTrainer.launch_step

    def launch(self):
        out = real(self)
        if self.step == 3:
            with torch.no_grad():
                self.params[0].view(-1)[0] = float("inf")
        return out
    monkeypatch.setattr(RangeTrainer, "launch_step", launch)
    with pytest.raises(Failed, match="weights became NaN or infinite at step 3") as e:
        run_train(recipe, run, 0)
    assert "step-2, is kept" in str(e.value)
    assert sorted(p.name for p in run.checkpoints(0).glob("step-*"))[-1] == "step-2"


def test_an_overflowing_update_stops_training_with_one_sentence(make_recipe, tmp_path):
    recipe = make_recipe(train={"steps": 3, "lr": 1e38})
    f = tmp_path / "r.toml"
    f.write_text(recipe.to_toml())
    r = CliRunner().invoke(app, ["train", str(f), "--range", "0"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert lines[-1].startswith("failed:") and "overflowed" in lines[-1] and "at step 1" in lines[-1], r.output
    assert not RunDir(recipe.out_dir).final(0).exists()


# --- changed recipes on finished work ------------------------------------------------------------------------------

def test_a_finished_range_with_other_recipe_values_is_refused_naming_the_keys(make_recipe):
    recipe = make_recipe(train={"steps": 2})
    run = RunDir(recipe.out_dir)
    run_train(recipe, run, 0)
    before = _weights(run.final(0))

    def changed(**train):
        return recipe.model_copy(update={"train": recipe.train.model_copy(update=train)})
    for other, key in [(changed(lr=1e-3), "train.lr: 0.0001 -> 0.001"),
                       (recipe.model_copy(update={"deme": recipe.deme.model_copy(update={"p": 0.5})}), "deme.p"),
                       (recipe.model_copy(update={"seed": 3}), "seed: 0 -> 3")]:
        with pytest.raises(UsageError, match="--force") as e:
            run_train(other, run, 0)
        assert key in str(e.value) and "another --out" in str(e.value)
    with pytest.raises(UsageError, match="train.lr"):           # more steps continue it: only with the same values
        run_train(changed(lr=1e-3, steps=3), run, 0)
    # values that only change the speed (or the logs and previews) are not compared; a changed range is retrained
    # with --force
    assert run_train(changed(log_every=1, checkpoint_every=1, keep_checkpoints=5, log_with="tensorboard",
                             preview_every=1, preview_images=2, preview_steps=3), run, 0)[0]["skipped"]
    after = _weights(run.final(0))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not run_train(changed(lr=1e-3), run, 0, force=True)[0]["skipped"]


def test_a_merge_with_other_recipe_values_is_refused_and_new_range_models_are_merged_again(make_recipe):
    from deme_cli.commands.merge import run_merge

    recipe = make_recipe(train={"steps": 1})
    run = RunDir(recipe.out_dir)
    run_train(recipe, run)
    first = run_merge(recipe, run)
    stamp = (run.merged / "merge.json").stat().st_mtime_ns
    ties = recipe.model_copy(update={"merge": recipe.merge.model_copy(update={"method": "ties"})})
    with pytest.raises(UsageError) as e:
        run_merge(ties, run)
    assert "merge.method: 'task_arithmetic' -> 'ties'" in str(e.value) and "--force" in str(e.value)
    assert "method_url" not in str(e.value)                      # follows from the method: not a second key
    umask = os.umask(0)
    os.umask(umask)
    assert (run.merged.stat().st_mode & 0o777) == 0o777 & ~umask     # not mkdtemp's private 0700
    with pytest.raises(UsageError, match=r"merge\.weights"):
        run_merge(recipe, run, weights=[0.7, 0.3])
    assert (run.merged / "merge.json").stat().st_mtime_ns == stamp        # nothing replaced
    assert run_merge(recipe, run)["skipped"]
    # the same recipe values on retrained range models: merged again (the old merge is stale), no refusal
    run_train(recipe.model_copy(update={"seed": 1}), run, 0, force=True)
    again = run_merge(recipe, run)
    assert not again["skipped"] and again["ranges"] != first["ranges"]
    assert run_merge(ties, run, force=True)["method"] == "ties"


def test_changed_sample_settings_name_the_recipe_keys(make_recipe):
    from deme_cli.commands.sample import run_sample

    recipe = make_recipe(sample={"num_images": 2, "batch_size": 2, "steps": 2})
    run = RunDir(recipe.out_dir)
    run_sample(recipe, run, "base")
    other = recipe.model_copy(update={"sample": recipe.sample.model_copy(update={"steps": 3, "eta": 0.5})})
    with pytest.raises(UsageError) as e:
        run_sample(other, run, "base")
    assert "sample.steps, sample.eta" in str(e.value) and "another --out" in str(e.value)


# --- one writer ----------------------------------------------------------------------------------------------------

HOLDER = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}).encode())
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(make_recipe, tmp_path,
                                                                                           capsys):
    recipe = make_recipe(train={"steps": 1})
    run = RunDir(recipe.out_dir)
    lock = run.range_dir(0) / locks.LOCK_NAME
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.time()
        with pytest.raises(UsageError) as e:
            run_train(recipe, run, 0)
        assert time.time() - t0 < 10
        assert f"process {holder.pid} on " in str(e.value) and "range 0" in str(e.value)
        assert not run.checkpoints(0).exists() and not run.metrics(0).exists()
    finally:
        holder.kill()
        holder.wait()
    capsys.readouterr()
    [res] = run_train(recipe, run, 0)                       # the holder died: its lock is taken over
    assert not res["skipped"]
    err = capsys.readouterr().err
    assert f"took over the lock left by process {holder.pid}" in err
    assert lock.read_text() == ""                           # released when done


def test_locks_in_one_process_and_without_flock(tmp_path, monkeypatch):
    import fcntl

    f = tmp_path / "x.lock"
    with locks.hold(f, "the thing"):
        with pytest.raises(UsageError, match=f"the thing is being written by process {os.getpid()}"):
            with locks.hold(f, "the thing"):
                pass
    with locks.hold(f, "the thing"):                        # released after the block
        pass

    # a filesystem without flock: the holder's PID decides
    def no_flock(fd, op):
        raise OSError(37, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket
    f.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "then"}))
    with locks.hold(f, "the thing"):                        # dead: taken over
        assert json.loads(f.read_text())["pid"] == os.getpid()
    f.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "then"}))
    with pytest.raises(UsageError, match="delete"):          # alive: refused
        with locks.hold(f, "the thing"):
            pass
    f.write_text(json.dumps({"pid": dead.pid, "host": "another-host", "started": "then"}))
    with pytest.raises(UsageError, match="another-host"):    # another host cannot be checked: refused
        with locks.hold(f, "the thing"):
            pass


# --- the weight search stops and continues -------------------------------------------------------------------------

@pytest.mark.parametrize("many", [False, True])
def test_a_stopped_search_continues_from_its_journal_with_the_same_log(tmp_path, many):
    from deme_cli.engine.weight_search import Journal, Scorer, Space, scaled_search

    space = Space(3, (0.0, 0.5, 1.0), ((1 / 3,) * 3, (0.1, 0.2, 0.7)), (0.5, 1.0, 1.5))
    calls = []

    def score(w):
        calls.append(tuple(w))
        return (sum(w) - 1.0) ** 2 + 0.01 * w[2]

    def many_scores(ws, on_result, one=score):      # a pool's map: each result reported as it arrives
        out = []
        for i, w in enumerate(ws):
            out.append(one(w))
            on_result(i, out[-1])
        return out

    ref = Scorer(score)
    scaled_search(space, (1 / 3,) * 3, ref)
    total = len(calls)

    calls.clear()
    stop = interrupts.StopFlag()
    path = tmp_path / "journal.jsonl"

    def stopping(w):
        s = score(w)
        if len(calls) == 3:
            stop.signum = signal.SIGTERM                     # a signal arrives while the third merge is scored
        return s

    def stopping_many(ws, on_result):
        return many_scores(ws, on_result, one=stopping)
    first = Scorer(stopping, evaluate_many=stopping_many if many else None, journal=Journal(path, "fp"), stop=stop)
    with pytest.raises(Interrupted, match="after 3 scored merges"):
        scaled_search(space, (1 / 3,) * 3, first)
    assert len(calls) == 3 and len(path.read_text().splitlines()) == 1 + 3

    calls.clear()
    again = Scorer(score, evaluate_many=many_scores if many else None, journal=Journal(path, "fp"))
    scaled_search(space, (1 / 3,) * 3, again)
    assert len(calls) == total - 3                          # only the merges not scored before
    assert again.log == ref.log and again.best == ref.best

    calls.clear()
    other = Scorer(score, journal=Journal(path, "another search"))   # another fingerprint: started over
    scaled_search(space, (1 / 3,) * 3, other)
    assert len(calls) == total


# --- sampling stops and continues ----------------------------------------------------------------------------------

def test_sampling_stops_after_a_batch_on_sigterm_and_a_rerun_makes_the_rest(make_recipe, monkeypatch):
    from deme_cli.commands import sample as sample_mod
    from deme_cli.commands.sample import run_sample

    recipe = make_recipe(sample={"num_images": 4, "batch_size": 2, "steps": 2})
    run = RunDir(recipe.out_dir)
    real, saved = sample_mod.save_png, []

    def save(path, img, size):
        real(path, img, size)
        saved.append(path.name)
        if len(saved) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(sample_mod, "save_png", save)
    with interrupts.handle_signals(), pytest.raises(Interrupted, match="2 of 4 images"):
        run_sample(recipe, run, "base")
    assert sorted(p.name for p in run.samples("base").glob("*.png")) == ["000000.png", "000001.png"]
    res = run_sample(recipe, run, "base")
    assert res["complete"] and res["generated"] == 2 and saved[2:] == ["000002.png", "000003.png"]


def test_merge_and_sample_folders_have_one_writer(make_recipe):
    from deme_cli.commands.merge import MERGE_LOCK, run_merge
    from deme_cli.commands.sample import run_sample

    recipe = make_recipe(train={"steps": 1}, sample={"num_images": 2, "batch_size": 2, "steps": 2})
    run = RunDir(recipe.out_dir)
    run_train(recipe, run)
    me = f"process {os.getpid()} on "
    with locks.hold(run.root / MERGE_LOCK, "held by the test"):
        with pytest.raises(UsageError, match=f"the merge in .* is being written by {me}"):
            run_merge(recipe, run)
    assert not run.merged.exists()
    with locks.hold(run.samples("base").parent / ".base.lock", "held by the test"):
        with pytest.raises(UsageError, match=f"the samples of base in .* is being written by {me}"):
            run_sample(recipe, run, "base")
    assert not run.samples("base").exists()
    assert run_sample(recipe, run, "base")["complete"]                  # released: it goes ahead


def test_a_stopped_merge_search_continues_where_it_stopped(make_recipe, heldout_images, monkeypatch):
    """SIGTERM while `deme merge --search` scores merges: it stops with the scores journalled; a re-run scores only
    the rest, logs the same candidates as an uninterrupted search and removes the journal."""
    from deme_cli.commands import merge as merge_cmd
    from deme_cli.engine import search_pool

    recipe = make_recipe(train={"steps": 1}, merge={"weights": "search", "objective": "loss", "search": "scaled",
                                                    "scales": [0.5, 1.0], "search_num_images": 4,
                                                    "search_reference": str(heldout_images)})
    run = RunDir(recipe.out_dir)
    run_train(recipe, run)
    real, calls = search_pool.candidate_evaluator, []

    def counting(*a, signal_after=None, **k):
        objective, merger, evaluate = real(*a, **k)

        def ev(w):
            calls.append(tuple(w))
            out = evaluate(w)
            if signal_after and len(calls) == signal_after:
                os.kill(os.getpid(), signal.SIGTERM)
            return out
        return objective, merger, ev
    import deme_cli.engine.weight_search as ws
    monkeypatch.setattr(ws, "candidate_evaluator", lambda *a, **k: counting(*a, signal_after=2, **k))
    with interrupts.handle_signals(), pytest.raises(Interrupted, match="after 2 scored merges"):
        merge_cmd.run_merge(recipe, run)
    journal = run.root / merge_cmd.SEARCH_JOURNAL
    assert len(journal.read_text().splitlines()) == 1 + 2 and not run.merged.exists()

    calls.clear()
    monkeypatch.setattr(ws, "candidate_evaluator", lambda *a, **k: counting(*a, **k))
    resumed = merge_cmd.run_merge(recipe, run)
    assert not journal.exists()
    n = resumed["search"]["evaluations"]
    assert len(calls) == n - 2
    calls.clear()
    fresh = merge_cmd.run_merge(recipe, run, force=True)             # the same search from scratch
    assert len(calls) == n and fresh["search"]["candidates"] == resumed["search"]["candidates"]


def test_a_signal_to_the_whole_process_group_spares_the_data_workers(make_recipe, monkeypatch):
    """SLURM signals every process of the job: the DataLoader workers leave the signal to the main process (killed,
    they would make the next batch fail with a traceback instead of a checkpoint)."""
    import psutil

    recipe = make_recipe(train={"steps": 6, "checkpoint_every": 100}, data={"num_workers": 2})
    run = RunDir(recipe.out_dir)
    real, seen = RangeTrainer.launch_step, []
    before = {c.pid for c in psutil.Process().children()}          # other tests' processes are not ours to signal

    def launch(self):
        if self.step == 2 and not seen:
            workers = [c for c in psutil.Process().children() if c.pid not in before]
            seen.append(len(workers))
            for w in workers:                                  # the workers first, as a group signal might
                w.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self)
    monkeypatch.setattr(RangeTrainer, "launch_step", launch)
    with interrupts.handle_signals(), pytest.raises(Interrupted, match="at step 3 of 6"):
        run_train(recipe, run, 0)
    assert seen == [2]
    assert (run.checkpoints(0) / "latest").read_text().strip() == "step-3"
