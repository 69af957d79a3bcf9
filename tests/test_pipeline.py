"""`deme run`: the whole pipeline through the command line, resumable, refusing to mix recipes."""
import functools
import json
import re

import pytest
from typer.testing import CliRunner

from deme_cli.cli import app
from deme_cli.engine import ui


@pytest.fixture
def run_recipe(tmp_path, tiny_ddpm, tiny_images):
    import torch

    from nets import tiny_feature_net

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
    record = json.loads((run / "run.json").read_text())["stages"]
    assert {s["stage"]: s["work_seconds"] for s in again["stages"]} == {k: v["seconds"] for k, v in record.items()}
    assert {s["stage"]: s["seconds"] for s in out["stages"]} == {k: v["seconds"] for k, v in record.items()}

    # a person's view ends with the stage times: each stage's seconds in this run and those of its earlier work
    r = runner.invoke(app, ["run", str(run_recipe)])
    assert r.exit_code == 0, r.output
    lines = r.output[r.output.index("stage times"):].splitlines()
    for stage, rec in record.items():
        row = next(line for line in lines if re.search(rf"\b{stage}\b", line))
        assert "kept" in row and ui.fmt(rec["seconds"]) in row, (stage, row)
    assert any(re.search(r"\btotal\b", line) for line in lines)

    # a changed recipe is refused, naming the stage and the difference; nothing is touched
    r = runner.invoke(app, ["run", str(run_recipe), "--set", "deme.p=0.5"])
    assert r.exit_code == 2
    assert "'train' stage" in r.output and "deme.p" in r.output and "--force" in r.output
    assert "Traceback" not in r.output
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")} == mtimes


def test_run_interrupted_mid_stage_finishes_without_redoing_work(run_recipe, tmp_path, monkeypatch):
    """Ctrl-C while `deme run` samples its second model: the next `deme run` keeps the split, the trained ranges, the
    merge and the first model's images, and does only what is missing."""
    from deme_cli.commands import pipeline

    real = pipeline.sample_model

    @functools.wraps(real)              # the pipeline binds the recipe's sections by the stage's signature
    def interrupted(base, run, spec, **kw):
        if spec == "ensemble":
            raise KeyboardInterrupt
        return real(base, run, spec, **kw)

    runner = CliRunner()
    monkeypatch.setattr(pipeline, "sample_model", interrupted)
    r = runner.invoke(app, ["run", str(run_recipe), "--json"])
    assert r.exit_code != 0
    run = tmp_path / "run"
    assert not (run / "eval").exists() and not (run / "samples" / "ensemble").exists()
    weights = {p: p.stat().st_mtime_ns for p in run.rglob("*.safetensors")}
    base_pngs = {p: p.stat().st_mtime_ns for p in (run / "samples" / "base").glob("0*.png")}
    assert len(base_pngs) == 6 and any("merged" in str(p) for p in weights)

    monkeypatch.setattr(pipeline, "sample_model", real)
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
    assert "eval.reference is not set" in err and "checked before any stage starts" in err and "Traceback" not in err
    assert not (out / "ranges").exists() and not (out / "ranges.json").exists()
    # with a reference that exists, the same checks pass (and the run would go on)
    from deme_cli.commands.pipeline import check_needs
    from deme_cli.engine.base import resolve_base
    from deme_cli.engine.recipe import load_recipe
    from deme_cli.engine.runs import RunDir

    ok = load_recipe(recipe, [f'eval.reference="{tiny_images}"', f'model.pretrained="{tiny_ddpm}"',
                              'data.source="imagefolder"', f'data.path="{tiny_images}"', "data.resolution=16"])
    check_needs(ok, resolve_base(ok.model, ok.train.device), RunDir(out), list(ok.run.models))


def test_stage_inputs_are_read_off_the_stage_signatures(make_recipe):
    """Each stage's recorded inputs are the sections its function (and the functions before it) take: a section only
    a later stage reads is not an input of an earlier one, and speed-only keys are left out."""
    from deme_cli.commands.pipeline import STAGES, stage_inputs, stage_sections
    from deme_cli.engine.recipe import stage_keys

    by_name = {s.name: s for s in STAGES}
    assert stage_keys(by_name["train"].fn) == ["model", "data", "ranges", "train", "deme", "seed"]
    assert stage_sections(by_name["split"]) == ["model", "ranges"]
    assert set(stage_sections(by_name["train"])) == {"model", "ranges", "data", "train", "deme", "seed"}
    assert {"merge", "sample", "eval"} <= set(stage_sections(by_name["eval"]))
    recipe = make_recipe()
    inputs = stage_inputs(recipe, by_name["train"])
    d = recipe.model_dump(mode="json")
    speed = {("data", "num_workers"), ("train", "checkpoint_every"), ("train", "keep_checkpoints"),
             ("train", "log_every"), ("train", "compile"), ("train", "gradient_checkpointing"), ("train", "log_with"),
             ("train", "preview_every"), ("train", "preview_images"), ("train", "preview_steps")}
    want = {f"{s}.{k}": v for s in ("model", "data", "ranges", "train", "deme") for k, v in d[s].items()
            if (s, k) not in speed}
    assert inputs == {**want, "seed": recipe.seed}               # every key of those sections, nothing else
    assert set(stage_inputs(recipe, by_name["eval"])) == {
        f"{s}.{k}" for s in ("model", "data", "ranges", "train", "deme", "merge", "sample", "eval") for k in d[s]
        if (s, k) not in speed} | {"seed"}


def test_run_json_of_older_versions_reads_unset_keys_as_their_meaning_then(make_recipe, tmp_path):
    """run.json written before merge.weights and caption_column were explicit holds None for them: None in
    merge.weights meant a search in `deme run`, elsewhere the key's default. A key the old record lacks cannot
    differ. Any other change is refused."""
    from deme_cli.commands.pipeline import STAGES, check_provenance, stage_inputs
    from deme_cli.engine.errors import UsageError
    from deme_cli.engine.runs import RunDir

    searched = make_recipe(merge={"weights": "search"})
    merge_stage = next(s for s in STAGES if s.name == "merge")
    old = stage_inputs(searched, merge_stage)
    old.update({"merge.weights": None, "data.caption_column": None})
    del old["sample.steps"]                                    # not recorded by the old version
    record = {"stages": {"merge": {"inputs": old}}}
    run = RunDir(tmp_path)
    check_provenance(searched, run, record)                    # same meaning: continues
    with pytest.raises(UsageError, match=r"merge.weights: None -> 'uniform'"):
        check_provenance(make_recipe(), run, record)           # the new default is not what the old run did
    with pytest.raises(UsageError, match=r"'merge' stage .*merge.seed: 0 -> 7"):
        check_provenance(make_recipe(merge={"weights": "search", "seed": 7}), run, record)
