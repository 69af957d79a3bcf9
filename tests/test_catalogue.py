"""A catalogue of bad input across every subcommand, each checked against the same contract (README: exit codes).

Every case ends with exactly one line of output: one sentence starting with `error:` (exit 2, bad input) or `failed:`
(exit 1, a failure while running such as a diverged loss), ending with a full stop; no traceback; the CliRunner saw a
clean exit (no exception but SystemExit); and nothing already on disk changed: every file under the case's tmp_path
is byte-identical afterwards and still there, and the only new files a refusal may leave are lock files (`*.lock`).

Cases that need trained models work on a copy of one finished run (split, both ranges trained, merged, base sampled,
`deme run` recorded) built once per module, damaged as each case says.
"""
from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest
import tomli_w
from typer.testing import CliRunner

from conftest import tiny_recipe_dict
from deme_cli.cli import app

SUBCOMMANDS = ("split", "train", "merge", "sample", "eval", "analyze-gradients", "report", "run")
UNET = "unet/model-0/unet.safetensors"      # the UNet weights of a model folder with projections (a DemeUNet)


def recipe_dict(tiny_ddpm: Path, tiny_images: Path, heldout_images: Path, out: Path) -> dict:
    """The recipe of every case: conftest's tiny recipe, 2 steps with a checkpoint each, plus cheap sampling and a
    held-out loss as the eval."""
    return _merged(tiny_recipe_dict(tiny_ddpm, tiny_images, out), {
        "train": {"steps": 2, "checkpoint_every": 1},
        "sample": {"num_images": 2, "batch_size": 2, "steps": 2},
        "eval": {"metrics": ["loss"], "reference": str(heldout_images), "loss_bins": 2},
        "run": {"models": ["base"]},
    })


def _merged(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_ddpm, tiny_images, heldout_images) -> Path:
    """A finished run: `deme run` (split, train both ranges for 2 steps, sample base, held-out loss of base; run.json),
    then `deme merge`. Cases copy it; nobody writes here."""
    from deme_cli.commands.merge import run_merge
    from deme_cli.commands.pipeline import run_pipeline
    from deme_cli.engine.recipe import recipe_from_dict
    from deme_cli.engine.runs import RunDir

    root = tmp_path_factory.mktemp("finished") / "run"
    recipe = recipe_from_dict(recipe_dict(tiny_ddpm, tiny_images, heldout_images, root))
    run = RunDir(recipe.out_dir)
    run_pipeline(recipe, run)
    run_merge(recipe, run)
    for f in ("ranges.json", "run.json", "ranges/0/final/deme.json", f"ranges/1/final/{UNET}", f"merged/{UNET}",
              "samples/base/000000.png", "samples/base/samples.json", "ranges/0/checkpoints/step-2"):
        assert (root / f).exists(), f
    return root


class Env:
    """What a case's setup gets: its tmp_path, recipe files, the finished run's copy and the text-to-image fixture."""

    def __init__(self, tmp: Path, request):
        self.tmp, self.request = tmp, request
        self.run = tmp / "run"
        self.base = recipe_dict(request.getfixturevalue("tiny_ddpm"), request.getfixturevalue("tiny_images"),
                                request.getfixturevalue("heldout_images"), self.run)
        self.cleanups: list[Callable[[], None]] = []
        self.pid: Optional[int] = None          # the live process holding a lock (lock cases)

    def recipe(self, name: str = "r.toml", **sections) -> str:
        """A recipe file (TOML) of the base recipe with `sections` merged in; the run dir is tmp_path / "run"."""
        f = self.tmp / name
        f.write_text(tomli_w.dumps(_merged(self.base, sections)))
        return str(f)

    def raw(self, text: str, name: str = "raw.toml") -> str:
        f = self.tmp / name
        f.write_text(text)
        return str(f)

    def finished(self, **sections) -> str:
        """Copy the finished run to tmp_path / "run"; returns the recipe file it was made with (plus `sections`)."""
        shutil.copytree(self.request.getfixturevalue("finished_run"), self.run, symlinks=True)
        return self.recipe(**sections)

    def sd(self, **sample) -> str:
        """A recipe of the tiny text-to-image pipeline with `[sample]` settings."""
        sd = self.request.getfixturevalue("tiny_sd")
        return self.recipe("sd.toml", model={"pretrained": str(sd["pipeline"])},
                           data={"path": str(sd["images"]), "resolution": 16}, sample=sample)


def garbage(f: Path) -> None:
    f.write_bytes(b"\x00this is not what it should be {[")


def empty(f: Path) -> None:
    f.write_bytes(b"")


def truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def unfinish(run: Path, i: int = 0) -> None:
    """Range i as if stopped before its end: its checkpoints stay, final/ and final-raw/ go."""
    shutil.rmtree(run / "ranges" / str(i) / "final")
    shutil.rmtree(run / "ranges" / str(i) / "final-raw")


HOLDER = """
import fcntl, json, os, socket, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}).encode())
print("held", flush=True)
time.sleep(120)
"""


def hold_lock(e: Env, lock: Path) -> int:
    """A live process holding the flock on `lock`, as a training process would; killed when the case ends."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)

    def stop():
        p.kill()
        p.wait()
    e.cleanups.append(stop)
    assert p.stdout.readline().strip() == "held"
    return p.pid


@dataclass
class Case:
    id: str
    cmd: str                                   # the subcommand
    setup: Callable[[Env], list]               # -> the arguments after the subcommand (may damage files first)
    expect: Callable[[Env], str] | str         # a substring of the one line
    code: int = 2
    xfail: Optional[str] = None                # a product bug: the contract is kept, the case is expected to fail


def C(id, cmd, setup, expect, code=2, xfail=None):
    return Case(id, cmd, setup, expect, code, xfail)


def _holder_case(e: Env) -> list:
    r = e.finished()
    e.pid = hold_lock(e, e.run / "ranges" / "0" / ".lock")
    return [r, "--range", "0", "--set", "train.steps=3"]


def _empty_checkpoints(e: Env) -> list:
    r = e.finished()
    unfinish(e.run)
    files = [f for f in (e.run / "ranges/0/checkpoints").rglob("*") if f.is_file() and f.parent.name != "checkpoints"]
    assert files
    for f in files:
        empty(f)
    return [r, "--range", "0", "--set", "train.steps=3"]


def _past_steps(e: Env) -> list:
    """Range 0 unfinished with its latest checkpoint at step 2, resumed with train.steps = 1."""
    r = e.finished()
    unfinish(e.run)
    return [r, "--range", "0", "--set", "train.steps=1"]


def _damage(path: str, how: Callable[[Path], None], *args, **sections) -> Callable[[Env], list]:
    """Copy the finished run, damage `path` in it, and call the subcommand with the recipe and `args`."""
    def setup(e: Env) -> list:
        r = e.finished(**sections)
        f = e.run / path
        assert how is garbage or f.is_file(), f          # garbage may also be a file the run does not have yet
        f.parent.mkdir(parents=True, exist_ok=True)
        how(f)
        return [r, *args]
    return setup


def _no_unet(e: Env) -> str:
    """A copy of the tiny pipeline folder without its unet/."""
    folder = e.tmp / "no-unet"
    shutil.copytree(e.request.getfixturevalue("tiny_ddpm"), folder, ignore=shutil.ignore_patterns("unet"))
    return str(folder)


def _sd_samples(e: Env) -> str:
    """The tiny text-to-image run with its base sampled (2 images, 2 steps, prompts recorded); returns its recipe."""
    r = e.sd(prompts=str(e.request.getfixturevalue("tiny_sd")["prompts"]))
    res = CliRunner().invoke(app, ["sample", r, "--model", "base"])
    assert res.exit_code == 0, res.output
    return r


def _locked(lock: str, *args, **sections) -> Callable[[Env], list]:
    """Copy the finished run, have a live process hold the lock file `lock` in it, and call the subcommand."""
    def setup(e: Env) -> list:
        r = e.finished(**sections)
        e.pid = hold_lock(e, e.run / lock)
        return [r, *args]
    return setup


def _stopped_range(cmd_args: tuple) -> Callable[[Env], list]:
    """Range 1 stopped before its end (checkpoints, no final/), then the command with `cmd_args`."""
    def setup(e: Env) -> list:
        r = e.finished()
        unfinish(e.run, 1)
        return [r, *cmd_args]
    return setup


def _stopped_sampling(e: Env) -> list:
    """samples/base as a stopped `deme sample` leaves it: image 1 not made yet."""
    r = e.finished()
    (e.run / "samples/base/000001.png").unlink()
    return [r, "--models", "base", "--set", 'eval.metrics=["fid"]']


def _delete(path: str, *args) -> Callable[[Env], list]:
    """Copy the finished run, delete the folder `path` in it, and call the subcommand with the recipe and `args`."""
    def setup(e: Env) -> list:
        r = e.finished()
        shutil.rmtree(e.run / path)
        return [r, *args]
    return setup


RECIPES = [
    C("toml-broken", "split", lambda e: [e.raw("name = 'x'\n[model\npretrained = 1\n")], "not valid TOML"),
    C("toml-unknown-section", "merge",
      lambda e: [e.recipe(trian={"steps": 2})], "did you mean 'train'"),
    C("toml-unknown-key", "sample",
      lambda e: [e.recipe(), "--model", "base", "--set", "train.stepz=3"], "did you mean 'train.steps'"),
    C("set-wrong-type", "eval", lambda e: [e.recipe(), "--models", "base", "--set", "train.steps=many"],
      "train.steps"),
    C("deme-p-above-1", "train", lambda e: [e.recipe(), "--range", "0", "--set", "deme.p=1.5"], "deme.p"),
    C("train-lr-zero", "train", lambda e: [e.recipe(), "--range", "0", "--set", "train.lr=0"], "train.lr"),
    C("train-lr-negative", "run", lambda e: [e.recipe(), "--set", "train.lr=-1"], "train.lr"),
    C("train-batch-size-zero", "analyze-gradients", lambda e: [e.recipe(), "--set", "train.batch_size=0"],
      "train.batch_size"),
    C("ranges-strategy-unknown", "split", lambda e: [e.recipe(), "--set", "ranges.strategy=bogus"],
      "ranges.strategy"),
    C("merge-method-unknown", "merge", lambda e: [e.recipe(), "--set", "merge.method=bogus"], "merge.method"),
    C("sample-scheduler-unknown", "sample",
      lambda e: [e.recipe(), "--model", "base", "--set", "sample.scheduler=bogus"], "sample.scheduler"),
    C("eval-mode-unknown", "eval", lambda e: [e.recipe(), "--models", "base", "--set", "eval.mode=bogus"],
      "eval.mode"),
    C("train-device-unknown", "train", lambda e: [e.recipe(), "--range", "0", "--set", "train.device=bogus"],
      "train.device"),
    C("recipe-missing", "eval", lambda e: [str(e.tmp / "missing.toml")], "does not exist"),
    C("recipe-is-a-directory", "sample", lambda e: [str(e.tmp), "--model", "base"],
      lambda e: f"recipe '{e.tmp}' is a folder"),
    C("set-without-equals", "train", lambda e: [e.recipe(), "--range", "0", "--set", "train.steps"],
      "--set expects section.key=value"),
    C("set-empty-key", "split", lambda e: [e.recipe(), "--set", "=3"], "--set expects section.key=value"),
    C("report-unknown-key", "report", lambda e: [e.finished(), "--set", "eval.modee=clean"],
      "did you mean 'eval.mode'"),
    C("set-unknown-section", "merge", lambda e: [e.recipe(), "--set", "bogus.key=1"], "unknown recipe key 'bogus"),
    C("set-into-a-value", "merge", lambda e: [e.recipe(), "--set", "name.key=1"], "'name' is not a section"),
    C("pretrained-missing", "analyze-gradients",
      lambda e: [e.recipe(model={"pretrained": str(e.tmp / "nope")})], "does not exist"),
    C("pretrained-without-unet", "sample", lambda e: [e.recipe(model={"pretrained": _no_unet(e)}), "--model", "base"],
      "unet"),
    C("data-path-missing", "train",
      lambda e: [e.recipe(data={"path": str(e.tmp / "no-images")}), "--range", "0"], "no-images"),
    C("data-path-without-images", "analyze-gradients",
      lambda e: [e.recipe(data={"path": str((e.tmp / "blank").mkdir() or e.tmp / "blank")})], "blank"),
    C("merge-weights-wrong-length", "merge", lambda e: [e.recipe(), "--set", "merge.weights=[0.2, 0.3, 0.5]"],
      "merge.weights has 3 values but ranges.n is 2"),
    C("merge-weights-bogus", "run", lambda e: [e.recipe(), "--set", 'merge.weights="bogus"'], "merge.weights"),
    C("eval-reference-missing", "eval",
      lambda e: [e.finished(), "--models", "base", "--set", f'eval.reference="{e.tmp / "no-ref"}"'], "no-ref"),
    C("eval-reference-missing-fid", "eval",
      lambda e: [e.finished(), "--models", "base", "--set", 'eval.metrics=["fid", "kid"]',
                 "--set", f'eval.reference="{e.tmp / "no-ref"}"'], "no-ref"),
    C("run-reference-missing", "run",
      lambda e: [e.recipe(), "--set", f'eval.reference="{e.tmp / "no-ref"}"'], "before any stage starts"),
    C("eval-clip-without-model", "eval",
      lambda e: [e.finished(), "--models", "base", "--set", 'eval.metrics=["clip"]'], "clip"),
    C("run-clip-without-model", "run", lambda e: [e.recipe(), "--set", 'eval.metrics=["clip"]'], "eval.clip_model"),
    C("sd-eval-clip-without-model", "eval",
      lambda e: [_sd_samples(e), "--models", "base", "--set", 'eval.metrics=["clip"]'], "eval.clip_model"),
    C("run-models-unknown", "run", lambda e: [e.recipe(), "--set", 'run.models=["bogus"]'], "bogus"),
    C("ranges-n-zero", "split", lambda e: [e.recipe(), "--set", "ranges.n=0"], "ranges.n"),
    C("ranges-n-past-T", "split", lambda e: [e.recipe(), "--set", "ranges.n=2000"], "ranges.n"),
    C("sd-prompts-missing", "sample",
      lambda e: [e.sd(prompts=str(e.tmp / "no-prompts.txt")), "--model", "base"], "no-prompts.txt"),
    C("sd-prompts-jsonl-bad-line", "sample",
      lambda e: [e.sd(prompts=e.raw('{"prompt": "a cat"}\n{"prompt": \n', "p.jsonl")), "--model", "base"],
      "line 2"),
    C("sd-run-prompts-missing", "run",
      lambda e: [e.sd(prompts=str(e.tmp / "no-prompts.txt"))], "no-prompts.txt"),
]

FLAGS = [
    C("train-range-7", "train", lambda e: [e.recipe(), "--range", "7"], "range 7 does not exist"),
    C("train-range-negative", "train", lambda e: [e.recipe(), "--range", "-1"], "range -1 does not exist"),
    C("train-range-and-all", "train", lambda e: [e.recipe(), "--range", "0", "--all"], "exactly one of"),
    C("train-neither-range-nor-all", "train", lambda e: [e.recipe()], "exactly one of"),
    C("train-launcher-bogus", "train", lambda e: [e.recipe(), "--all", "--launcher", "bogus"], "bogus"),
    C("train-launcher-without-all", "train", lambda e: [e.recipe(), "--range", "0", "--launcher", "local"],
      "--all"),
    C("train-emit-without-slurm", "train", lambda e: [e.recipe(), "--all", "--emit"], "--launcher slurm"),
    C("train-gpus-nonsense", "train", lambda e: [e.recipe(), "--all", "--launcher", "local", "--gpus", "abc"],
      "abc"),
    C("sample-model-nonsense", "sample", lambda e: [e.recipe(), "--model", "nonsense"], "unknown model 'nonsense'"),
    C("sample-model-range-9", "sample", lambda e: [e.finished(), "--model", "range:9"], "range 9 does not exist"),
    C("sample-shard-3-of-2", "sample", lambda e: [e.recipe(), "--model", "base", "--shard", "3/2"], "--shard"),
    C("sample-processes-0", "sample", lambda e: [e.recipe(), "--model", "base", "--processes", "0"],
      "--processes"),
    C("merge-weights-not-numbers", "merge", lambda e: [e.recipe(), "--weights", "0.1,abc"], "abc"),
    C("merge-processes-without-search", "merge", lambda e: [e.recipe(), "--processes", "2"], "--search"),
    C("merge-processes-0", "merge", lambda e: [e.recipe(), "--processes", "0"], "--processes"),
    C("merge-method-flag-unknown", "merge", lambda e: [e.recipe(), "--method", "bogus"], "unknown merge method"),
    C("gradients-bins-and-timesteps", "analyze-gradients",
      lambda e: [e.recipe(), "--bins", "4", "--timesteps", "1,2"], "--timesteps"),
    C("gradients-method-unknown", "analyze-gradients", lambda e: [e.recipe(), "--method", "bogus"],
      "unknown --method 'bogus'"),
    C("gradients-sketch-dim-0", "analyze-gradients", lambda e: [e.recipe(), "--sketch-dim", "0"], "--sketch-dim"),
    C("gradients-bins-1", "analyze-gradients", lambda e: [e.recipe(), "--bins", "1"], "--bins"),
    C("gradients-timesteps-not-numbers", "analyze-gradients", lambda e: [e.recipe(), "--timesteps", "1,x"],
      "timesteps"),
    C("gradients-timesteps-past-T", "analyze-gradients", lambda e: [e.recipe(), "--timesteps", "10,5000"], "5000"),
    C("split-strategy-unknown", "split", lambda e: [e.recipe(), "--strategy", "bogus"], "ranges.strategy"),
    C("eval-models-empty", "eval", lambda e: [e.recipe(), "--models", ","], "--models"),
    C("eval-models-range-9", "eval", lambda e: [e.finished(), "--models", "base,range:9"], "range 9 does not exist"),
    C("eval-models-nonsense", "eval", lambda e: [e.finished(), "--models", "nonsense"], "nonsense"),
    C("out-under-a-file", "eval",
      lambda e: [e.recipe(), "--models", "base", "--out", str(Path(e.raw("x", "a-file")) / "run")],
      "cannot be created"),
]

DAMAGED = [
    C("ranges-json-garbage-train", "train", _damage("ranges.json", garbage, "--range", "0"), "ranges.json"),
    C("ranges-json-garbage-ensemble", "sample", _damage("ranges.json", garbage, "--model", "ensemble"),
      "ranges.json"),
    C("range-final-missing-merge", "merge", _delete("ranges/1/final"), "range 1"),
    C("ranges-json-garbage-split", "split", _damage("ranges.json", garbage), "ranges.json"),
    C("deme-json-garbage-merge", "merge", _damage("ranges/0/final/deme.json", garbage), "deme.json"),
    C("range-unet-emptied-merge", "merge", _damage(f"ranges/1/final/{UNET}", empty), "ranges/1/final"),
    C("range-unet-truncated-merge", "merge", _damage(f"ranges/0/final/{UNET}", truncate), "ranges/0/final"),
    C("range-unet-truncated-sample", "sample", _damage(f"ranges/0/final/{UNET}", truncate, "--model", "range:0"),
      "ranges/0/final"),
    C("range-unet-emptied-sample", "sample", _damage(f"ranges/0/final/{UNET}", empty, "--model", "range:0"),
      "ranges/0/final"),
    C("merged-unet-emptied-sample", "sample", _damage(f"merged/{UNET}", empty, "--model", "merged"), "merged"),
    C("checkpoints-emptied-train", "train", _empty_checkpoints, "--force"),
    C("samples-json-garbage-sample", "sample", _damage("samples/base/samples.json", garbage, "--model", "base"),
      "samples.json"),
    C("png-truncated-eval", "eval",
      _damage("samples/base/000001.png", truncate, "--models", "base", "--set", 'eval.metrics=["fid"]'),
      "000001.png"),
    C("gradients-npz-garbage-split", "split", _damage("analysis/gradients.npz", garbage, "--strategy", "affinity"),
      "gradients.npz"),
    C("samples-json-garbage-eval", "eval",
      _damage("samples/base/samples.json", garbage, "--models", "base", "--set", 'eval.metrics=["fid"]'),
      "samples.json"),
    C("gradients-npz-garbage-analyze", "analyze-gradients", _damage("analysis/gradients.npz", garbage, "--bins", "2"),
      "gradients.npz"),
    C("run-json-garbage-run", "run", _damage("run.json", garbage), "run.json"),
]

INTERRUPTED = [
    C("finished-range-other-lr", "train",
      lambda e: [e.finished(), "--range", "0", "--set", "train.lr=0.001"], "train.lr"),
    C("finished-merge-other-method", "merge", lambda e: [e.finished(), "--method", "ties"], "merge.method"),
    C("finished-samples-other-steps", "sample",
      lambda e: [e.finished(), "--model", "base", "--set", "sample.steps=3"], "sample.steps"),
    C("checkpoint-past-train-steps", "train", _past_steps, "checkpoint at step 2"),
    C("range-locked-by-live-process", "train", _holder_case, lambda e: f"process {e.pid} "),
    C("merge-locked-by-live-process", "merge", _locked(".merge.lock", "--force"), lambda e: f"process {e.pid} "),
    C("samples-locked-by-live-process", "sample", _locked("samples/.base.lock", "--model", "base", "--force"),
      lambda e: f"process {e.pid} "),
    C("merge-before-train", "merge", lambda e: [e.recipe()], "deme train"),
    C("report-before-any-run", "report", lambda e: [e.recipe()], "does not exist"),
    C("sample-merged-before-merge", "sample", lambda e: [e.recipe(), "--model", "merged"], "deme merge"),
    C("eval-before-sample", "eval", lambda e: [e.recipe(), "--models", "base", "--set", 'eval.metrics=["fid"]'],
      "deme sample"),
    C("run-other-recipe", "run", lambda e: [e.finished(), "--set", "deme.p=0.5"], "deme.p"),
    C("merge-after-stopped-training", "merge", _stopped_range(("--force",)), "deme train RECIPE --range 1"),
    C("ensemble-after-stopped-training", "sample", _stopped_range(("--model", "ensemble")), "range"),
    C("eval-after-stopped-sampling", "eval", _stopped_sampling, "holds 1 of the 2 images"),
    C("train-loss-diverges", "train",
      lambda e: [e.recipe(), "--range", "0", "--set", "train.lr=1e20", "--set", "train.max_grad_norm=1e30"],
      "at step ", code=1),
]

CATEGORIES = {"recipes": RECIPES, "flags": FLAGS, "damaged files": DAMAGED, "interrupted runs": INTERRUPTED}
CASES = [c for cases in CATEGORIES.values() for c in cases]
PARAMS = [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [])
          for c in CASES]


# a plain progress line (ui._Plain, stderr not a terminal): "range 0 [0, 500): 1/2 loss=1.1 ... 16.61/s"
PROGRESS = re.compile(r"^[^:]+: \d+/\d+ .*\d/s$")


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("case", PARAMS)
def test_bad_input_is_one_sentence_with_its_exit_code_and_changes_nothing(case: Case, tmp_path, request):
    e = Env(tmp_path, request)
    try:
        args = [case.cmd, *case.setup(e)]
        before = snapshot(tmp_path)
        r = CliRunner().invoke(app, args)
    finally:
        for stop in e.cleanups:
            stop()
    out = r.output
    shown = f"deme {' '.join(args)}\nexit {r.exit_code}\n{out}"
    print(shown)
    assert "Traceback" not in out, shown
    assert r.exception is None or isinstance(r.exception, SystemExit), (repr(r.exception), shown)
    assert r.exit_code == case.code, shown
    lines = [line for line in out.splitlines() if line.strip()]
    if case.code == 1:  # a failure while running: the progress lines of the work done come first, the sentence last
        assert lines and all(PROGRESS.match(x) for x in lines[:-1]), shown
        lines = lines[-1:]
    assert len(lines) == 1, shown
    line = lines[0].strip()
    assert line.startswith("error:" if case.code == 2 else "failed:"), shown
    assert line.endswith((".", "?")), shown      # a question ("did you mean ...?") ends a sentence too
    expect = case.expect(e) if callable(case.expect) else case.expect
    assert expect in line, (expect, shown)
    after = snapshot(tmp_path)
    changed = [f for f in before if f in after and after[f] != before[f]]
    lost = [f for f in before if f not in after]
    new = [f for f in after if f not in before and not f.endswith(".lock")]
    assert not changed and not lost, (changed, lost, shown)
    if case.code == 2:          # refused input leaves nothing new but lock files; a failure while running may
        assert not new, (new, shown)


def test_the_catalogue_covers_every_subcommand_with_at_least_45_cases():
    cases = [p.values[0] for p in PARAMS]
    ids = [p.id for p in PARAMS]
    assert len(cases) >= 45, len(cases)
    assert len(set(ids)) == len(ids), "case ids must be unique"
    assert set(SUBCOMMANDS) <= {c.cmd for c in cases}, set(SUBCOMMANDS) - {c.cmd for c in cases}
    assert {c.cmd for c in cases} <= set(SUBCOMMANDS)
    assert set(SUBCOMMANDS) == {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
