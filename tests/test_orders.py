"""Right after any order of commands, every number deme shows is of the models and samples on disk now (issue 27).

One scored run (2 ranges, merged, base / merged / ensemble sampled and scored: KID, and the held-out loss by
timestep in 4 bins) is built once; each case copies it and runs an order of commands on the copy, asserting what the
next command does (redo, refuse with one sentence naming the command, or mark stale) and that no file still holding
valid work changed. "Shown" means what the report, the step summary, the model cards and `deme run`'s table show:
all of them read eval numbers through engine/freshness.py.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import read_pngs, tiny_recipe_dict
from deme_cli.cli import app
from deme_cli.engine.pipeline_folders import folder_files
from deme_cli.engine.recipe import load_recipe, recipe_from_dict
from deme_cli.engine.runs import RunDir

MODELS = ("base", "merged", "ensemble")


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_ddpm, tiny_images):
    """(recipe file, run root) of a finished, scored tiny run; cases copy it, nobody writes here."""
    import torch

    from deme_cli.commands.eval import run_eval
    from deme_cli.commands.merge import run_merge
    from deme_cli.commands.sample import run_sample
    from deme_cli.commands.train import run_train
    from nets import tiny_feature_net

    root = tmp_path_factory.mktemp("orders")
    torch.jit.script(tiny_feature_net(dim=8)).save(str(root / "features.pt"))
    d = tiny_recipe_dict(tiny_ddpm, tiny_images, root / "run")
    d["train"].update(steps=2, checkpoint_every=2)
    d["merge"] = {"weights": [0.5, 0.5]}
    d["sample"] = {"scheduler": "ddim", "steps": 2, "num_images": 8, "batch_size": 8}
    d["eval"] = {"reference": str(tiny_images), "metrics": ["kid", "loss"], "batch_size": 8, "loss_bins": 4,
                 "feature_extractor": str(root / "features.pt"), "loss_num_images": 8}
    d["run"] = {"models": list(MODELS)}
    (root / "recipe.toml").write_text(recipe_from_dict(d).to_toml())
    recipe = load_recipe(root / "recipe.toml")
    run = RunDir(recipe.out_dir)
    run_train(recipe, run)
    run_merge(recipe, run)
    for m in MODELS:
        run_sample(recipe, run, m)
    run_eval(recipe, run, list(MODELS))
    run.resolved_recipe.write_text(recipe.to_toml())
    return root / "recipe.toml", run.root


def _sha(f: Path) -> str:
    return hashlib.sha256(f.read_bytes()).hexdigest()


class Order:
    """A copy of the scored run and the commands of one case on it (CLI with --out, or in process)."""

    def __init__(self, scored, tmp: Path, copy=shutil.copy2):
        recipe_file, root = scored
        self.root = tmp / "run"
        shutil.copytree(root, self.root, copy_function=copy)
        self.recipe_file = str(recipe_file)
        self.recipe = load_recipe(recipe_file, out=str(self.root))
        self.run = RunDir(self.root)
        self.arg = f"{recipe_file} --out {self.root}"            # how suggested commands name the recipe

    # --- commands ---
    def cli(self, cmd: str, *args: str):
        return CliRunner().invoke(app, [cmd, self.recipe_file, "--out", str(self.root), *args])

    def ok(self, cmd: str, *args: str) -> str:
        r = self.cli(cmd, *args)
        assert r.exit_code == 0, r.output
        return r.output

    def refuses(self, naming: str, cmd: str, *args: str, after_stages: bool = False) -> str:
        """The command is refused in one sentence naming `naming`, exit 2, and changes no file (`deme run` prints
        the stages it went through first, and records them in run.json: `after_stages`)."""
        before = self.files()
        r = self.cli(cmd, *args)
        lines = [x.strip() for x in r.output.splitlines() if x.strip()]
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert (after_stages or len(lines) == 1) and lines[-1].startswith("error:") and lines[-1].endswith("."), \
            r.output
        assert naming in lines[-1], (naming, r.output)
        assert self.changed(before, ignore=("*.lock",) + (("run.json",) if after_stages else ())) == set(), r.output
        return lines[-1]

    def report(self) -> dict:
        """`deme report` (in process): the collected data, with the Markdown it wrote as "md"."""
        from deme_cli.engine.report import write_report
        from deme_cli.engine.report_data import collect

        out = write_report(self.run, self.arg, self.recipe.to_toml())
        return {**collect(self.run, self.arg), "md": Path(out["markdown"]).read_text()}

    # --- what is shown ---
    def shown(self) -> dict:
        """{model: {metric: value}} the report shows as results."""
        return {e["model"]: {k: v for k, v in e["metrics"].items() if v is not None} for e in self.report()["eval"]}

    def stale(self) -> dict:
        """{(model, part): (why, command)} the report lists as stale."""
        return {(x["model"], x["part"]): (x["why"], x["command"]) for x in self.report()["stale"]}

    def recorded(self, model: str) -> dict:
        return json.loads(self.run.eval_json(model).read_text())

    # --- files ---
    def files(self) -> dict:
        return {str(f.relative_to(self.root)): _sha(f) for f in sorted(self.root.rglob("*")) if f.is_file()}

    def changed(self, before: dict, ignore=()) -> set:
        after = self.files()
        diff = {f for f in set(before) | set(after) if before.get(f) != after.get(f)}
        return {f for f in diff if not any(fnmatch.fnmatch(f, p) for p in ignore)}

    def untouched(self, before: dict, *valid: str) -> None:
        """No file under the globs `valid` (work still valid) changed, appeared or went."""
        moved = {f for f in self.changed(before) if any(fnmatch.fnmatch(f, p) for p in valid)}
        assert not moved, moved


BASE_WORK = ("samples/base/*", "eval/base.json")
RANGES = ("ranges/*/final/*", "ranges/*/final-raw/*", "ranges/*/checkpoints/*")


def kid_text(v: float) -> str:
    return f"{v:.4g}"


# --- the cases -------------------------------------------------------------------------------------------------------

def test_retrain_a_range_then_merge_sample_eval(scored, tmp_path):
    """Range 0 retrained (--force): the ensemble's numbers go stale (its member changed), merged/ (not rewritten)
    keeps its own; merge then redoes merged/, whose old samples are refused until sampled again with --force."""
    o = Order(scored, tmp_path)
    before = o.files()
    o.ok("train", "--range", "0", "--force", "--set", "train.lr=0.002")
    st = o.stale()
    assert set(st) == {("ensemble", "samples"), ("ensemble", "loss")}
    assert "ranges/0/final/ was written again" in st[("ensemble", "samples")][0]
    assert st[("ensemble", "samples")][1].startswith(f"`deme sample {o.arg} --model ensemble --force`")
    assert set(o.shown()) == {"base", "merged"}
    o.untouched(before, *BASE_WORK, "samples/merged/*", "eval/merged.json", "merged/unet/*", "ranges/1/*")

    o.ok("merge")                                                        # the range changed: merged again
    weights = {str(f.relative_to(o.root)) for f in folder_files(o.run.merged).unet}
    assert weights and o.changed(before, ignore=("report/*",)) >= weights
    assert ("merged", "samples") in o.stale() and ("merged", "loss") in o.stale()
    o.refuses("--force", "sample", "--model", "merged")                  # images of another model: refused
    mid = o.files()
    for m in ("merged", "ensemble"):
        o.ok("sample", "--model", m, "--force")
    o.ok("eval", "--models", "merged,ensemble")
    assert o.stale() == {} and set(o.shown()) == set(MODELS)
    o.untouched(mid, *BASE_WORK, *RANGES)


def test_merge_again_with_other_weights_then_report_eval_and_load_pipeline(scored, tmp_path, monkeypatch):
    """merge --force with other weights: merged's old KID is shown nowhere as current (report, step summary, card,
    take-away table); eval refuses the old samples naming `deme sample --force`; load_pipeline samples the new
    model; sampled and scored again, it is current."""
    import torch
    from huggingface_hub import ModelCard

    from deme_cli import load_pipeline
    from deme_cli.engine.report import write_report

    o = Order(scored, tmp_path)
    old_kid = o.recorded("merged")["metrics"]["kid"]
    before = o.files()
    o.ok("merge", "--weights", "0.9,0.1", "--force")
    d = o.report()
    assert "kid" not in o.shown().get("merged", {}) and "loss_ratio" not in o.shown().get("merged", {})
    why, cmd = o.stale()[("merged", "samples")]
    assert why == "merged/ was written again since the samples were scored"
    assert cmd == f"`deme sample {o.arg} --model merged --force`, then `deme eval {o.arg} --models merged`"
    assert all(r[0] != "merged" for r in d["take_away"]["rows"])
    results, stale_part = d["md"].split("## Stale results")[0], d["md"].split("## Stale results")[1]
    assert kid_text(old_kid) not in results and kid_text(old_kid) in stale_part.split("\n## ")[0]
    summary = tmp_path / "summary.md"
    with monkeypatch.context() as m:
        m.setenv("GITHUB_STEP_SUMMARY", str(summary))
        write_report(o.run, o.arg, o.recipe.to_toml())
    assert kid_text(old_kid) not in summary.read_text() and "stale" in summary.read_text()
    assert ModelCard.load(o.run.merged / "README.md").data.eval_results is None
    o.untouched(before, *BASE_WORK, "samples/ensemble/*", "eval/ensemble.json", *RANGES)

    o.refuses("run 'deme sample RECIPE --model merged --force'", "eval", "--models", "merged")
    pipe = load_pipeline(o.root, model="merged")
    o.ok("sample", "--model", "merged", "--force")
    got = np.round(np.asarray(pipe(batch_size=1, num_inference_steps=2, output_type="np",
                                   generator=torch.Generator().manual_seed(0)).images) * 255)
    assert np.abs(got[0] - read_pngs(o.run.samples("merged"))[0]).max() <= 1     # the new model, as deme samples it
    o.ok("eval", "--models", "merged")
    assert o.stale() == {} and o.shown()["merged"]["kid"] == o.recorded("merged")["metrics"]["kid"]
    ev = o.recorded("merged")
    card = ModelCard.load(o.run.merged / "README.md").data.eval_results
    assert {r.metric_type: r.metric_value for r in card} == ev["metrics"]


def test_sample_again_with_other_steps_then_eval(scored, tmp_path):
    """sample --force with other steps: the KID of the old images is stale, the loss by timestep (no samples) stays
    current; eval redoes only the sample part."""
    o = Order(scored, tmp_path)
    loss_before = o.recorded("merged")["loss_by_t"]
    o.ok("sample", "--model", "merged", "--force", "--set", "sample.steps=3")
    assert o.stale() == {("merged", "samples"): ("samples/merged/ was made again since it was scored",
                                                 f"`deme eval {o.arg} --models merged`")}
    assert o.shown()["merged"] == {"loss_ratio": loss_before["ratio_mean"]}
    before = o.files()
    o.ok("eval", "--models", "merged", "--set", "sample.steps=3")
    assert o.recorded("merged")["loss_by_t"] == loss_before and o.stale() == {}
    assert o.recorded("merged")["sampler"]["steps"] == 3
    o.untouched(before, *BASE_WORK, "samples/*", "eval/ensemble.json", *RANGES)


def _ratio_cells(md: str) -> dict:
    """{(model, (lo, hi)): ratio} of every loss-by-timestep table in report.md."""
    out, header = {}, None
    for line in md.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "t":
            header = cells
        elif header and cells[0].startswith("["):
            lo, hi = (int(x) for x in cells[0].strip("[)").split(","))
            for name, c in zip(header[2:], cells[2:]):
                out[(name, (lo, hi))] = float(c)
    return out


@pytest.mark.parametrize("other", ["ensemble", "merged"])
def test_other_loss_bins_for_one_model_are_shown_apart_by_their_edges(scored, tmp_path, other, capsys):
    """One model re-scored with 2 bins, the others with 4 (both orders: the 2-bin model is the ensemble, or merged):
    every ratio the report shows sits under the edges it was measured for, the two sets of bins in two tables, and
    the report names the model to re-score; the plot draws each model over its own edges."""
    o = Order(scored, tmp_path)
    before = o.files()
    o.ok("eval", "--models", other, "--set", "eval.loss_bins=2")
    assert o.changed(before, ignore=("report/*",)) <= {f"eval/{other}.json", "eval/loss-by-t.png",
                                                        "merged/README.md", "recipe.resolved.toml"}
    d = o.report()
    cells = _ratio_cells(d["md"])
    want = {}
    for m in ("merged", "ensemble"):
        rec = o.recorded(m)["loss_by_t"]
        want.update({(m, tuple(b)): r for b, r in zip(rec["bins"], rec["ratio"])})
    assert len(o.recorded(other)["loss_by_t"]["bins"]) == 2
    assert set(cells) == set(want)
    assert all(abs(cells[k] - want[k]) <= 6e-4 * max(1, abs(want[k])) for k in want)
    assert "shown apart" in d["md"]
    assert f"re-score them with the recipe's eval.loss_bins: `deme eval {o.arg} --models {other}`" in d["md"]
    assert o.stale() == {}
    plot = o.root / "report" / "loss-by-t.png"
    assert plot.is_file() and "loss-by-t.png" in d["md"]

    # the table deme prints (`deme eval`, `deme run`) matches by edges too: one table per set of bins
    from deme_cli import tables
    from deme_cli.engine.ui import fmt

    capsys.readouterr()
    tables.loss_by_t({m: {"loss_by_t": o.recorded(m)["loss_by_t"]} for m in ("merged", "ensemble")}, None)
    err = capsys.readouterr().err
    assert err.count("held-out loss by timestep") == 2 and "shown apart" in err
    two = o.recorded(other)["loss_by_t"]
    row = next(line for line in err.splitlines() if "[0, 500)" in line)
    assert fmt(two["ratio"][0]) in row


def test_a_stopped_sample_then_eval(scored, tmp_path, monkeypatch):
    """sample --force stopped after 3 images: the KID of the images it removed is stale and eval refuses the
    incomplete samples naming `deme sample`; finishing the sample makes the same images, and eval scores them."""
    from deme_cli.commands import sample as sample_cmd
    from deme_cli.commands.sample import run_sample

    o = Order(scored, tmp_path)
    kid = o.recorded("merged")["metrics"]["kid"]
    saved, real = [], sample_cmd.save_png

    def stop_after_3(path, *a, **k):
        if len(saved) == 3:
            raise KeyboardInterrupt
        saved.append(path)
        return real(path, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(sample_cmd, "save_png", stop_after_3)
        with pytest.raises(KeyboardInterrupt):
            run_sample(o.recipe, o.run, "merged", force=True)
    why, cmd = o.stale()[("merged", "samples")]
    assert "incomplete" in why and cmd.startswith(f"`deme sample {o.arg} --model merged`, then")
    o.refuses("run 'deme sample RECIPE --model merged' to finish them", "eval", "--models", "merged")
    before = o.files()
    o.ok("sample", "--model", "merged")                         # resumes: the 5 missing images
    o.untouched(before, *(f"samples/merged/{k:06d}.png" for k in range(3)), *BASE_WORK)
    o.ok("eval", "--models", "merged")
    assert o.stale() == {} and o.shown()["merged"]["kid"] == kid       # the same images: the same KID


def test_nothing_changed_eval_is_a_no_op(scored, tmp_path):
    o = Order(scored, tmp_path)
    before = o.files()
    out = o.ok("eval", "--models", ",".join(MODELS))
    assert out.count("up to date") >= 3
    o.untouched(before, "eval/*.json", "samples/*", "merged/*.safetensors", "merged/unet/*", *RANGES)
    assert o.stale() == {} and set(o.shown()) == set(MODELS)


def test_a_run_copied_without_its_times_stays_current(scored, tmp_path):
    """cp -r (new mtimes, in any order): the numbers are still those of the models and samples there (content), and
    eval (which re-scores images whose times changed, to be safe) finds the same numbers."""
    o = Order(scored, tmp_path, copy=shutil.copyfile)
    assert o.stale() == {} and set(o.shown()) == set(MODELS)
    metrics = {m: o.recorded(m)["metrics"] for m in MODELS}
    o.ok("eval", "--models", ",".join(MODELS))
    assert {m: o.recorded(m)["metrics"] for m in MODELS} == metrics and o.stale() == {}


def test_deleted_samples(scored, tmp_path):
    """samples/merged removed: its KID is stale (the command makes the samples, then scores them); the loss by
    timestep, which needs no samples, stays."""
    o = Order(scored, tmp_path)
    shutil.rmtree(o.run.samples("merged"))
    assert o.stale() == {("merged", "samples"): (
        "samples/merged/ is gone", f"`deme sample {o.arg} --model merged`, then `deme eval {o.arg} --models merged`")}
    assert set(o.shown()["merged"]) == {"loss_ratio"}
    o.refuses("run 'deme sample RECIPE --model merged' first", "eval", "--models", "merged")


def test_merge_again_with_the_same_weights_keeps_the_numbers(scored, tmp_path):
    """merge --force with the same weights writes merged/ again with the same content: its numbers still hold."""
    o = Order(scored, tmp_path)
    o.ok("merge", "--force")
    assert o.stale() == {} and set(o.shown()) == set(MODELS)
    assert "up to date" in o.ok("eval", "--models", "merged")


def test_loss_only_eval_after_a_merge_refreshes_only_the_loss(scored, tmp_path):
    """merge --force with other weights, then eval with metrics = ["loss"]: the loss ratio is current again, the
    KID of the old samples stays stale."""
    o = Order(scored, tmp_path)
    o.ok("merge", "--weights", "0.2,0.8", "--force")
    o.ok("eval", "--models", "merged", "--set", 'eval.metrics=["loss"]')
    assert set(o.stale()) == {("merged", "samples")}
    assert set(o.shown()["merged"]) == {"loss_ratio"}
    assert o.shown()["merged"]["loss_ratio"] == o.recorded("merged")["loss_by_t"]["ratio_mean"]


def test_deme_run_after_a_retrained_range_shows_only_current_numbers(scored, tmp_path):
    """Range 1 retrained (its final/ holds other weights), then `deme run` for the base only: the run ends with the
    take-away table and the results of current evals (merged/ untouched: current; the ensemble's member changed:
    left out, said stale)."""
    from safetensors.torch import load_file, save_file

    from deme_cli.commands.pipeline import run_pipeline

    o = Order(scored, tmp_path)
    unet, = folder_files(o.run.final(1)).unet                                   # range 1 retrained: other weights
    save_file({k: v + 0.01 for k, v in load_file(unet).items()}, unet)
    recipe = o.recipe.model_copy(update={"run": o.recipe.run.model_copy(update={"models": ["base"]})})
    before = o.files()
    r = run_pipeline(recipe, o.run, recipe_arg=o.arg)
    assert {s["stage"]: s["status"] for s in r["stages"]}["eval"] == "kept"
    assert [row[0] for row in r["take_away"]["rows"]] == ["base", "merged"]
    assert r["models"]["base"]["metrics"] == o.recorded("base")["metrics"]
    assert ("ensemble", "samples") in o.stale()
    # the images and scores stay (samples.json is rewritten by every `deme sample`: its per-call bookkeeping)
    o.untouched(before, "samples/*/*.png", "eval/*.json", "merged/*.safetensors", "merged/unet/*")


def test_deme_run_after_a_merge_with_other_weights_refuses(scored, tmp_path):
    """merge --force with other weights, then `deme run` (recipe weights): the merge stage refuses to replace a merge
    made with other settings, naming --force; nothing changes."""
    o = Order(scored, tmp_path)
    o.ok("merge", "--weights", "0.9,0.1", "--force")
    o.refuses("re-run with --force", "run", after_stages=True)


def test_eval_of_a_range_retrained_after_its_samples_refuses(scored, tmp_path):
    """Range 0 retrained after the ensemble was sampled: eval of the ensemble refuses its samples (made by the old
    range model), naming `deme sample --force`; a loss-only eval then refreshes only the loss."""
    o = Order(scored, tmp_path)
    o.ok("train", "--range", "0", "--force", "--set", "train.lr=0.002")
    o.refuses("run 'deme sample RECIPE --model ensemble --force'", "eval", "--models", "ensemble")
    o.ok("eval", "--models", "ensemble", "--set", 'eval.metrics=["loss"]')
    assert set(o.stale()) == {("ensemble", "samples")}


def test_the_catalogue_has_at_least_12_orders():
    orders = [n for n, f in globals().items() if n.startswith("test_") and callable(f)
              and n != "test_the_catalogue_has_at_least_12_orders"]
    assert len(orders) + 1 >= 12, orders         # + 1: the loss-bins case runs in both orders
