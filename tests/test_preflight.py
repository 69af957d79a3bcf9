"""Preflight: what each command will need is checked before it starts work (engine/preflight.py)."""
from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deme_cli.cli import app
from deme_cli.commands.train import run_train
from deme_cli.engine import preflight
from deme_cli.engine.base import Base, resolve_base
from conftest import trainer_for
from deme_cli.engine.errors import UsageError
from deme_cli.engine.ranges import Range
from deme_cli.engine.runs import RunDir


def _run(recipe, tmp_path, *extra):
    f = tmp_path / "r.toml"
    f.write_text(recipe.to_toml())
    return CliRunner().invoke(app, ["run", str(f), *extra])


def _one_error_line(r, *needles):
    assert r.exit_code == 2, r.output
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _never_load(monkeypatch):
    """Loading a model is work: the checks below must fail before any."""
    def refuse(self, *a, **k):
        raise AssertionError("a model was loaded before the preflight failed")
    monkeypatch.setattr(Base, "load_unet", refuse)
    monkeypatch.setattr(Base, "load", refuse)


@pytest.mark.parametrize("change, needle", [
    ({"data": {"path": "/nonexistent/images"}}, "data.path '/nonexistent/images' is not a folder"),
    ({"merge": {"weights": "search"}}, "merge.search_reference"),
    ({"eval": {"reference": "/nonexistent/ref"}}, "/nonexistent/ref"),
    ({"eval": {"metrics": ["clip"]}}, "eval.clip_model is not set"),
])
def test_deme_run_checks_every_stage_before_the_first_one(make_recipe, tmp_path, tiny_images, monkeypatch, change,
                                                         needle):
    sections = {"train": {"steps": 1}, "sample": {"num_images": 2, "batch_size": 2, "steps": 2},
                "eval": {"reference": str(tiny_images)}}
    for k, v in change.items():
        sections[k] = {**sections.get(k, {}), **v}
    recipe = make_recipe(**sections)
    _never_load(monkeypatch)
    r = _run(recipe, tmp_path)
    _one_error_line(r, needle, "checked before any stage starts")
    run = Path(recipe.out_dir)
    assert not (run / "ranges.json").exists() and not (run / "ranges").exists() and not (run / "run.json").exists()


def test_a_text_to_image_run_without_prompts_fails_before_training(tiny_sd, tmp_path, monkeypatch):
    from deme_cli.engine.recipe import recipe_from_dict

    recipe = recipe_from_dict({
        "name": "sd", "model": {"pretrained": str(tiny_sd["pipeline"])},
        "data": {"source": "imagefolder", "path": str(tiny_sd["images"]), "resolution": 32},
        "ranges": {"n": 2}, "train": {"steps": 1, "batch_size": 2, "mixed_precision": "no"},
        "sample": {"num_images": 2, "batch_size": 2, "steps": 2, "prompts": str(tmp_path / "missing.txt")},
        "eval": {"metrics": ["clip"], "clip_model": str(tiny_sd.get("clip", tmp_path))},
        "output": {"dir": str(tmp_path / "run")}})
    _never_load(monkeypatch)
    _one_error_line(_run(recipe, tmp_path), "missing.txt", "does not exist")
    assert not (tmp_path / "run" / "ranges").exists()


def test_training_checks_its_data_before_loading_a_model(make_recipe, tmp_path, monkeypatch):
    recipe = make_recipe(data={"path": str(tmp_path / "empty")})
    (tmp_path / "empty").mkdir()
    _never_load(monkeypatch)
    with pytest.raises(UsageError, match="holds no images"):
        run_train(recipe, RunDir(recipe.out_dir), 0)
    with pytest.raises(UsageError, match="holds no images"):
        from deme_cli.commands.analyze_gradients import run_analyze_gradients
        run_analyze_gradients(recipe, RunDir(recipe.out_dir))


def test_the_disk_estimate_matches_what_training_writes(make_recipe, tiny_ddpm):
    """16 P bytes per checkpoint (student, EMA, AdamW's moments) and 8 P for final/ + final-raw/."""
    from deme_cli.engine.models import load_unet

    base = resolve_base(make_recipe().model, "cpu")
    unet = load_unet(Path(tiny_ddpm))
    P = sum(p.numel() for p in unet.parameters())
    assert preflight.unet_parameters(base) == P
    recipe = make_recipe(train={"steps": 2, "checkpoint_every": 1, "keep_checkpoints": 2})
    run = RunDir(recipe.out_dir)
    run_train(recipe, run, 0)
    written = sum(f.stat().st_size for f in run.range_dir(0).rglob("*") if f.is_file())
    peak = preflight.range_bytes(P, 2) - 16 * P          # keep + 1 exist only while a new one is written
    assert 0.9 * written < peak < 1.25 * written, (written, peak)


def test_the_lora_disk_estimate_counts_the_adapters_a_range_trains(make_recipe):
    """With deme.adapter = "lora" the estimate counts rank * (in * k * k + out) per adapted weight: the trained
    tensors less the projections, as built by peft."""
    recipe = make_recipe(deme={"adapter": "lora", "lora_rank": 4},
                         train={"steps": 2, "checkpoint_every": 1, "keep_checkpoints": 2})
    base = resolve_base(recipe.model, "cpu")
    trainer = trainer_for(recipe, Range(0, 0, 500))
    lora = sum(p.numel() for n, p in trainer.unwrapped().named_parameters() if p.requires_grad and "lora_" in n)
    trainer.close()
    assert preflight.trained_parameters(base, recipe.deme) == lora
    assert lora < preflight.unet_parameters(base) / 3
    run = RunDir(recipe.out_dir)
    run_train(recipe, run, 0)
    # the disk used: final/unet/base/ and final-raw/unet/base/ are hard links to the base UNet's files (no disk)
    written = sum(f.stat().st_size for f in run.range_dir(0).rglob("*") if f.is_file() and f.stat().st_nlink == 1)
    peak = preflight.range_bytes(lora, 2) - 16 * lora
    assert 0.5 * written < peak < 1.5 * written, (written, peak)   # + projections, optimizer and RNG files


def test_too_little_disk_is_refused_before_training(make_recipe, monkeypatch):
    recipe = make_recipe()
    run = RunDir(recipe.out_dir)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**12, 10**12 - 1000, 1000))
    _never_load(monkeypatch)
    with pytest.raises(UsageError) as e:
        run_train(recipe, run, None)
    assert "0.0 GB free" in str(e.value) and "2 range(s)" in str(e.value) and "keep_checkpoints" in str(e.value)
    assert not run.range_dir(0).exists()


def test_deme_run_refuses_a_cuda_device_on_a_machine_without_one(make_recipe, tmp_path, tiny_images, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = make_recipe(train={"steps": 1, "device": "cuda"}, eval={"reference": str(tiny_images)})
    _never_load(monkeypatch)
    _one_error_line(_run(recipe, tmp_path), "train.device is 'cuda'", "checked before any stage starts")
    assert not (Path(recipe.out_dir) / "ranges.json").exists()
