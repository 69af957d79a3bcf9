"""`deme run`: the whole pipeline through the command line, resumable, refusing to mix recipes."""
import json

import pytest
from typer.testing import CliRunner

from deme_cli.cli import app


@pytest.fixture
def run_recipe(tmp_path, tiny_ddpm, tiny_images):
    import torch

    from deme_cli.engine.metrics import tiny_feature_net

    ext = tmp_path / "tiny_extractor.pt"
    torch.jit.script(tiny_feature_net()).save(str(ext))
    f = tmp_path / "r.toml"
    f.write_text(f'''
name = "pipe"
seed = 0
[model]
pretrained = "{tiny_ddpm}"
[data]
path = "{tiny_images}"
resolution = 16
[ranges]
n = 2
[train]
steps = 2
batch_size = 4
mixed_precision = "no"
checkpoint_every = 2
[merge]
weights = [0.5, 0.5]
[sample]
steps = 3
num_images = 6
batch_size = 6
[eval]
reference = "{tiny_images}"
feature_extractor = "{ext}"
[run]
models = ["base", "ensemble", "merged"]
[output]
dir = "{tmp_path / 'run'}"
''')
    return f


def test_run_pipeline_resumes_and_refuses_to_mix(run_recipe, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["run", str(run_recipe), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [s["stage"] for s in out["stages"]] == ["split", "train", "merge", "sample", "eval"]
    assert all(s["status"] == "done" for s in out["stages"])
    for m in ("base", "ensemble", "merged"):
        assert out["models"][m]["num_images"] == 6
        assert set(out["models"][m]["metrics"]) >= {"fid", "kid"}
    run = tmp_path / "run"
    assert (run / "merged" / "merge.json").is_file() and (run / "eval" / "merged.json").is_file()
    mtimes = {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")}
    pngs = {p: p.stat().st_mtime_ns for p in (run / "samples").rglob("0*.png")}

    # re-running redoes nothing: no weights or images are rewritten
    r = runner.invoke(app, ["run", str(run_recipe), "--json"])
    assert r.exit_code == 0, r.output
    again = json.loads(r.stdout)
    assert {s["stage"]: s["status"] for s in again["stages"]} == {s["stage"]: "kept" for s in out["stages"]}
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")} == mtimes
    assert {p: p.stat().st_mtime_ns for p in (run / "samples").rglob("0*.png")} == pngs
    assert again["models"] == out["models"]

    # a changed recipe is refused, naming the stage and the difference; nothing is touched
    r = runner.invoke(app, ["run", str(run_recipe), "--set", "deme.p=0.5"])
    assert r.exit_code == 2
    assert "'train' stage" in r.output and "deme.p" in r.output and "--force" in r.output
    assert "Traceback" not in r.output
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")} == mtimes


def test_run_interrupted_mid_stage_finishes_without_redoing_work(run_recipe, tmp_path, monkeypatch):
    """Ctrl-C while `deme run` samples its second model: the next `deme run` keeps the split, the trained ranges, the
    merge and the first model's images, and does only what is missing."""
    from deme_cli.engine import sample

    real = sample.run_sample

    def interrupted(recipe, run, model, **kw):
        if model == "ensemble":
            raise KeyboardInterrupt
        return real(recipe, run, model, **kw)

    runner = CliRunner()
    monkeypatch.setattr(sample, "run_sample", interrupted)
    r = runner.invoke(app, ["run", str(run_recipe), "--json"])
    assert r.exit_code != 0
    run = tmp_path / "run"
    assert not (run / "eval").exists() and not (run / "samples" / "ensemble").exists()
    weights = {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")}
    base_pngs = {p: p.stat().st_mtime_ns for p in (run / "samples" / "base").glob("0*.png")}
    assert len(base_pngs) == 6 and any("merged" in str(p) for p in weights)

    monkeypatch.setattr(sample, "run_sample", real)
    r = runner.invoke(app, ["run", str(run_recipe), "--json"])
    assert r.exit_code == 0, r.output
    status = {s["stage"]: s["status"] for s in json.loads(r.stdout)["stages"]}
    assert status == {"split": "kept", "train": "kept", "merge": "kept", "sample": "done", "eval": "done"}
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")} == weights
    assert {p: p.stat().st_mtime_ns for p in (run / "samples" / "base").glob("0*.png")} == base_pngs
    assert len(list((run / "samples" / "ensemble").glob("0*.png"))) == 6
    assert (run / "eval" / "ensemble.json").is_file()


@pytest.mark.parametrize("recipe_name", ["lsun-church", "lsun-bedroom"])
def test_run_without_an_eval_reference_stops_before_training(recipe_name, tmp_path, tiny_ddpm, tiny_images):
    """The LSUN recipes leave eval.reference to the user: `deme run` must say so in seconds, before any training."""
    from pathlib import Path

    recipe = Path(__file__).parent.parent / "recipes" / f"{recipe_name}.toml"
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["run", str(recipe), "--out", str(out), "--set", f'model.pretrained="{tiny_ddpm}"',
                                 "--set", 'data.source="imagefolder"', "--set", f'data.path="{tiny_images}"',
                                 "--set", "data.resolution=16", "--set", "train.steps=1"])
    assert r.exit_code == 2, r.output
    err = " ".join(r.output.split())
    assert "eval.reference is not set" in err and "checked before training" in err and "Traceback" not in err
    assert not (out / "ranges").exists() and not (out / "ranges.json").exists()
    # with a reference that exists, the same check passes (and the run would go on)
    from deme_cli.commands.pipeline import preflight_eval
    from deme_cli.engine.recipe import load_recipe

    preflight_eval(load_recipe(recipe, [f'eval.reference="{tiny_images}"', f'model.pretrained="{tiny_ddpm}"']))
