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
    with interrupts.handle_signals(), pytest.raises(Interrupted), interrupts.deferred() as flag:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert flag.signum == signal.SIGUSR1                       # deferred: only recorded
        with pytest.raises(Interrupted) as twice:                  # a second Ctrl-C does not wait
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        assert "interrupted twice" in str(twice.value)


def test_a_deferred_region_that_ends_with_its_flag_set_stops_the_command():
    """The loop ended before it looked at the flag again (the signal came during its last step): the end of the
    region raises, so nothing after it starts; and no `except Exception` on the way can swallow the stop."""
    after = []
    with interrupts.handle_signals(), pytest.raises(Interrupted) as e:
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)                                # the last step goes on to its end
        after.append("next stage")
    assert e.value.exit_code == 138 and after == [] and "SIGUSR1" in str(e.value)
    assert not isinstance(e.value, Exception)
    with interrupts.handle_signals(), interrupts.deferred() as flag:   # no signal: nothing raised
        pass
    assert flag.signum is None


def _signal_in_save(monkeypatch, at_step: int, signum: int = signal.SIGTERM) -> list:
    """Send `signum` to this process inside the checkpoint save of step `at_step` (once), before its files are
    written: the signal arrives while the checkpoint is being written."""
    from deme_cli.engine import checkpoints

    real, sent = checkpoints.save, []

    def save(ckpt_dir, step, **kw):
        if step == at_step and not sent:
            sent.append((ckpt_dir.parent.name, step))
            os.kill(os.getpid(), signum)
        return real(ckpt_dir, step, **kw)
    monkeypatch.setattr(checkpoints, "save", save)
    return sent


def _lora_recipe(make_recipe, out: Path):
    return make_recipe(train={"steps": 3, "checkpoint_every": 100, "lr": 1e-2}, output={"dir": str(out)},
                       deme={"adapter": "lora", "lora_rank": 4, "lora_alpha": 8.0})


def test_a_signal_during_a_ranges_final_checkpoint_stops_before_the_export_and_the_next_range(make_recipe, tmp_path,
                                                                                               monkeypatch):
    """The issue's reproduction: 2 LoRA ranges x 3 steps, SIGTERM inside range 0's final save. Training stops once
    that checkpoint is written (exit 143); range 0 is not exported and range 1 does not start. The re-run exports
    range 0 from the checkpoint without training it again (the same weights as an uninterrupted run) and trains
    range 1."""
    from deme_cli.engine import checkpoints

    ref = _lora_recipe(make_recipe, tmp_path / "ref")
    run_train(ref, RunDir(ref.out_dir), 0)

    recipe = _lora_recipe(make_recipe, tmp_path / "cut")
    run = RunDir(recipe.out_dir)
    sent = _signal_in_save(monkeypatch, 3)
    with interrupts.handle_signals(), pytest.raises(Interrupted) as e:
        run_train(recipe, run)                                       # --all
    assert sent == [("0", 3)] and e.value.exit_code == 143
    assert "range 0 stopped by SIGTERM after its last step (3 of 3)" in str(e.value)
    assert "step-3" in str(e.value)
    ckpt = run.checkpoints(0)
    assert (ckpt / "latest").read_text().strip() == "step-3" and checkpoints.verify(ckpt / "step-3") is None
    assert not run.final(0).exists() and not run.final(0, ema=False).exists()
    assert not run.metrics(1).exists() and not run.checkpoints(1).exists()          # range 1 never started

    monkeypatch.undo()
    loaded, real_load = [], checkpoints.load
    monkeypatch.setattr(checkpoints, "load", lambda f, *a, **k: loaded.append(f.name) or real_load(f, *a, **k))
    res = run_train(recipe, run)
    assert [r["steps"] for r in res] == [3, 3] and loaded == ["step-3"]
    assert [x["step"] for x in _strict_json_lines(run.metrics(0))] == [1, 2, 3]      # range 0 was not trained again
    for ema in (True, False):
        a, b = _weights(RunDir(ref.out_dir).final(0, ema)), _weights(run.final(0, ema))
        assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)
    assert run.final(1).is_dir()


def test_a_signal_during_a_ranges_export_lets_it_finish_and_starts_no_next_range(make_recipe, monkeypatch):
    recipe = make_recipe(train={"steps": 2, "checkpoint_every": 100})
    run = RunDir(recipe.out_dir)
    real, calls = RangeTrainer.export, []

    def export(self, folder, *a, **k):
        calls.append(folder.name)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)            # while final-raw/ is written
        return real(self, folder, *a, **k)
    monkeypatch.setattr(RangeTrainer, "export", export)
    with interrupts.handle_signals(), pytest.raises(Interrupted) as e:
        run_train(recipe, run)
    assert e.value.exit_code == 130 and calls == ["final-raw", "final"]
    assert "range 0 finished" in str(e.value) and "stopped by SIGINT" in str(e.value)
    for ema in (True, False):                                 # both written completely
        meta = json.loads((run.final(0, ema) / "deme.json").read_text())
        assert meta["steps"] == 2 and _weights(run.final(0, ema))
    assert not run.metrics(1).exists() and not run.checkpoints(1).exists()

    monkeypatch.undo()
    res = run_train(recipe, run)
    assert [r["skipped"] for r in res] == [True, False] and run.final(1).is_dir()


def test_deme_run_stopped_during_the_last_ranges_final_checkpoint_does_not_merge(make_recipe, tiny_images, tmp_path,
                                                                                monkeypatch):
    """SIGUSR1 (SLURM's warning) while the last range writes its final checkpoint: `deme run` exits 138 and the merge
    stage does not start; the next `deme run` finishes the run."""
    recipe = make_recipe(train={"steps": 2, "checkpoint_every": 100}, merge={"weights": [0.5, 0.5]},
                         sample={"num_images": 2, "batch_size": 2, "steps": 2},
                         eval={"reference": str(tiny_images), "metrics": ["loss"]}, run={"models": ["merged"]})
    f = tmp_path / "r.toml"
    f.write_text(recipe.to_toml())
    run = RunDir(recipe.out_dir)
    from deme_cli.engine import checkpoints

    real, sent = checkpoints.save, []

    def save(ckpt_dir, step, **kw):
        if ckpt_dir == run.checkpoints(1) and step == 2:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(ckpt_dir, step, **kw)
    monkeypatch.setattr(checkpoints, "save", save)
    r = CliRunner().invoke(app, ["run", str(f)])
    assert r.exit_code == 138 and sent == [2], r.output
    assert "Traceback" not in r.output and "range 1 stopped by SIGUSR1 after its last step" in r.output
    assert not run.merged.exists() and not run.samples("merged").exists()
    assert run.final(0).is_dir() and not run.final(1).exists()

    monkeypatch.undo()
    r = CliRunner().invoke(app, ["run", str(f)])
    assert r.exit_code == 0, r.output
    assert run.final(1).is_dir() and run.merged.is_dir() and run.eval_json("merged").is_file()


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


def test_a_resumed_search_shows_the_rate_of_this_runs_merges_only(tmp_path, capsys, monkeypatch):
    """Merges replayed from the journal count as done but not in the rate (plain log lines) and leave rich's speed
    unset: a resumed search does not report thousands of merges per second."""
    import io
    import types

    from rich.console import Console

    from deme_cli.engine import ui
    from deme_cli.engine.weight_search import Journal, Scorer, Space, scaled_search

    space = Space(2, (0.0, 1.0), ((0.5, 0.5),), (0.5, 1.0, 1.5))       # theta + 3 merges
    clock = [0.0]
    monkeypatch.setattr(ui, "time", types.SimpleNamespace(time=lambda: clock[0]))

    def score(w):
        clock[0] += 10.0                                    # each merge this run scores takes 10 s
        return sum(w)
    path = tmp_path / "journal.jsonl"
    j = Journal(path, "fp")
    for w in [(0.0, 0.0), (0.25, 0.25)]:                   # two merges scored by an earlier run
        j.add(w, sum(w))
    with ui.progress("search", total=4, every=1) as bar:
        scaled_search(space, (0.5, 0.5), Scorer(score, bar, journal=Journal(path, "fp")))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("search: ")]
    assert lines[-1].startswith("search: 4/4") and lines[-1].endswith(" 0.10/s")     # 2 merges in 20 s

    monkeypatch.setattr(ui, "console", Console(file=io.StringIO(), force_terminal=True))
    with ui.progress("search", total=4) as bar:
        bar.update(resumed=True)
        bar.update(resumed=True)
        task = bar.progress.tasks[0]
        assert task.completed == 2 and task.speed is None   # replayed: no speed yet
        bar.update()
        assert bar.progress.tasks[0].completed == 3
    with ui.progress("search", total=2) as bar:             # all of it replayed: shown finished
        bar.update(resumed=True)
        bar.update(resumed=True)
        assert bar.progress.tasks[0].finished


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


def test_sampling_stopped_during_its_last_batch_exits_with_every_image_saved(make_recipe, monkeypatch):
    from deme_cli.commands import sample as sample_mod
    from deme_cli.commands.sample import run_sample

    recipe = make_recipe(sample={"num_images": 4, "batch_size": 2, "steps": 2})
    run = RunDir(recipe.out_dir)
    real, saved = sample_mod.save_png, []

    def save(path, img, size):
        if len(saved) == 2:
            os.kill(os.getpid(), signal.SIGTERM)           # while the last batch is written
        real(path, img, size)
        saved.append(path.name)
    monkeypatch.setattr(sample_mod, "save_png", save)
    with interrupts.handle_signals(), pytest.raises(Interrupted, match="4 of 4 images") as e:
        run_sample(recipe, run, "base")
    assert e.value.exit_code == 143 and len(saved) == 4
    assert not json.loads(run.samples("base").joinpath("samples.json").read_text())["complete"]
    res = run_sample(recipe, run, "base")
    assert res["complete"] and res["generated"] == 0 and len(saved) == 4


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


def _counting(real, calls, signal_after=None, score=None):
    """search_pool.candidate_evaluator wrapped: each scored merge's weights go to `calls`; SIGTERM to this process
    after the `signal_after`-th; `score(w)`: the score to report instead of the objective's (which still runs)."""
    def make(*a, **k):
        objective, merger, evaluate = real(*a, **k)

        def ev(w):
            calls.append(tuple(w))
            out = evaluate(w)
            out = score(w) if score is not None else out
            if signal_after and len(calls) == signal_after:
                os.kill(os.getpid(), signal.SIGTERM)
            return out
        return objective, merger, ev
    return make


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
    import deme_cli.engine.weight_search as ws
    monkeypatch.setattr(ws, "candidate_evaluator", _counting(real, calls, signal_after=2))
    with interrupts.handle_signals(), pytest.raises(Interrupted, match="after 2 scored merges"):
        merge_cmd.run_merge(recipe, run)
    journal = run.root / merge_cmd.SEARCH_JOURNAL
    assert len(journal.read_text().splitlines()) == 1 + 2 and not run.merged.exists()

    calls.clear()
    monkeypatch.setattr(ws, "candidate_evaluator", _counting(real, calls))
    resumed = merge_cmd.run_merge(recipe, run)
    assert not journal.exists()
    n = resumed["search"]["evaluations"]
    assert len(calls) == n - 2
    calls.clear()
    fresh = merge_cmd.run_merge(recipe, run, force=True)             # the same search from scratch
    assert len(calls) == n and fresh["search"]["candidates"] == resumed["search"]["candidates"]


def test_search_rounds_caps_a_coordinate_search_and_a_changed_cap_continues_from_the_journal(make_recipe,
                                                                                            heldout_images,
                                                                                            monkeypatch):
    """merge.search_rounds = 1: one sweep of every weight over the candidates (1 + N * (|candidates| - 1) merges);
    a 3-round search stopped early and re-run with 1 round scores only round 1's rest, and merge.json records the
    cap; 0 rounds is refused by the recipe."""
    from deme_cli.commands import merge as merge_cmd
    from deme_cli.engine import search_pool
    import deme_cli.engine.weight_search as ws

    values = [0.0, 0.5, 1.0, 1.5]

    def recipe_with(rounds):
        return make_recipe(train={"steps": 1},
                           merge={"weights": "search", "objective": "loss", "search": "coordinate",
                                  "candidates": values, "search_rounds": rounds, "search_num_images": 4,
                                  "search_reference": str(heldout_images)})
    three = recipe_with(3)
    run = RunDir(three.out_dir)
    run_train(three, run)
    n = three.ranges.n
    assert n == 2
    one_round = 1 + n * (len(values) - 1)
    real, calls = search_pool.candidate_evaluator, []

    def coupled(w):         # N = 2: round 1 moves w1 to 1.0, round 2 then moves w0 to 1.0
        return (w[0] - w[1]) ** 2 + (w[1] - 1.5) ** 2
    monkeypatch.setattr(ws, "candidate_evaluator", _counting(real, calls, signal_after=3, score=coupled))
    with interrupts.handle_signals(), pytest.raises(Interrupted, match="after 3 scored merges"):
        merge_cmd.run_merge(three, run)

    calls.clear()
    monkeypatch.setattr(ws, "candidate_evaluator", _counting(real, calls, score=coupled))
    capped = merge_cmd.run_merge(recipe_with(1), run)
    assert len(calls) == one_round - 3                       # the journal's 3 scores were kept
    assert capped["search"]["evaluations"] == one_round
    assert capped["settings"]["search"]["rounds"] == 1
    assert capped["weights"] == [0.5, 1.0]                  # round 1 moves only w1 ...

    with pytest.raises(UsageError, match=r"merge.search.rounds: 1 -> 3"):   # another cap: refused, merged/ kept
        merge_cmd.run_merge(three, run)
    calls.clear()
    full = merge_cmd.run_merge(three, run, force=True)      # ... round 2 would move it to 1.0
    assert full["search"]["evaluations"] > one_round and full["weights"] == [1.0, 1.0]   # ... round 2 then w0
    assert "rounds" not in full["settings"]["search"]       # the default is not recorded: older merges stay current
    with pytest.raises(UsageError, match="search_rounds"):
        recipe_with(0)


def test_a_merge_search_stopped_during_its_last_candidate_writes_no_merged_model(make_recipe, heldout_images,
                                                                                  tmp_path, monkeypatch):
    """SIGTERM while the search scores its last candidate: the score is journalled and the command stops (exit 143)
    before the merged model is written; the re-run scores nothing and writes the same merge as an uninterrupted one."""
    import shutil

    from deme_cli.commands import merge as merge_cmd
    from deme_cli.engine import search_pool
    import deme_cli.engine.weight_search as ws

    def recipe_in(out):
        return make_recipe(train={"steps": 1}, output={"dir": str(out)},
                           merge={"weights": "search", "objective": "loss", "search": "scaled", "scales": [0.5, 1.0],
                                  "search_num_images": 4, "search_reference": str(heldout_images)})
    ref = recipe_in(tmp_path / "ref")
    run_train(ref, RunDir(ref.out_dir))
    shutil.copytree(ref.out_dir, tmp_path / "cut")                    # the same range models, not merged yet
    whole = merge_cmd.run_merge(ref, RunDir(ref.out_dir))
    n = whole["search"]["evaluations"]

    recipe = recipe_in(tmp_path / "cut")
    run = RunDir(recipe.out_dir)
    real, calls = search_pool.candidate_evaluator, []

    def counting(*a, signal_at=None, **k):
        objective, merger, evaluate = real(*a, **k)

        def ev(w):
            calls.append(tuple(w))
            if len(calls) == signal_at:
                os.kill(os.getpid(), signal.SIGTERM)       # while the last candidate is scored
            return evaluate(w)
        return objective, merger, ev
    monkeypatch.setattr(ws, "candidate_evaluator", lambda *a, **k: counting(*a, signal_at=n, **k))
    with interrupts.handle_signals(), pytest.raises(Interrupted, match=f"after {n} scored merges") as e:
        merge_cmd.run_merge(recipe, run)
    assert e.value.exit_code == 143 and len(calls) == n
    assert len((run.root / merge_cmd.SEARCH_JOURNAL).read_text().splitlines()) == 1 + n
    assert not run.merged.exists()

    calls.clear()
    monkeypatch.setattr(ws, "candidate_evaluator", lambda *a, **k: counting(*a, **k))
    again = merge_cmd.run_merge(recipe, run)
    assert calls == [] and again["search"]["candidates"] == whole["search"]["candidates"]
    assert again["weights"] == whole["weights"] and run.merged.is_dir()


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
