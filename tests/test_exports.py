"""final/ holds exactly the EMA state of the last step and final-raw/ the raw one; finals exported before that fix are
re-exported by `deme train` and refused by `deme merge` and `deme sample`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deme_cli.engine import models, pipeline_folders
from deme_cli.engine.errors import UsageError
from deme_cli.engine.runs import RunDir
from deme_cli.commands.train import run_train


def _unet_and_projection(folder: Path) -> tuple[dict, dict]:
    """The UNet and projection tensors a model folder holds (either layout), read from its files."""
    return models.split_state(models.read_state(pipeline_folders.folder_files(folder)))


def _assert_folder_holds(folder: Path, state: dict) -> None:
    """Every tensor of `state` (keys unet.* / projections.*) is in the folder, bit-equal, and nothing else is."""
    unet, proj = _unet_and_projection(folder)
    got = {**{f"unet.{k}": v for k, v in unet.items()}, **{f"projections.{k}": v for k, v in proj.items()}}
    assert set(got) == set(state)
    bad = [k for k in state if not torch.equal(got[k], state[k])]
    assert not bad, f"{len(bad)} of {len(state)} tensors differ, e.g. {bad[0]}"


def _last_checkpoint(run: RunDir, i: int) -> Path:
    return run.checkpoints(i) / (run.checkpoints(i) / "latest").read_text().strip()


@pytest.fixture
def trained(make_recipe):
    """Range 0 trained 4 steps at a large lr (so EMA and raw differ in every tensor that trains)."""
    recipe = make_recipe(train={"steps": 4, "checkpoint_every": 2, "lr": 1e-3})
    run = RunDir(recipe.out_dir)
    run_train(recipe, run, 0)
    return recipe, run


def test_final_is_the_ema_state_and_final_raw_the_raw_state_in_every_tensor(trained):
    recipe, run = trained
    ck = _last_checkpoint(run, 0)
    assert json.loads((ck / "state.json").read_text())["step"] == 4
    ema, raw = load_file(str(ck / "ema.safetensors")), load_file(str(ck / "student.safetensors"))
    _assert_folder_holds(run.final(0), ema)
    _assert_folder_holds(run.final(0, ema=False), raw)
    # the property is only tested if the two states differ: in most tensors, the UNet's and the projections'
    differ = [k for k in ema if not torch.equal(ema[k], raw[k])]
    assert sum(k.startswith("unet.") for k in differ) > 0.9 * sum(k.startswith("unet.") for k in ema)
    assert any(k.startswith("projections.") for k in differ)
    # and the folder loads back, through diffusers, as exactly that state
    back = models.load_model_folder(run.final(0)).state_dict()
    assert set(back) == set(ema) and all(torch.equal(back[k], ema[k]) for k in ema)
    assert json.loads((run.final(0) / "deme.json").read_text())["export_format"] == models.EXPORT_FORMAT


def _legacy_export(run: RunDir, i: int) -> None:
    """Rewrite final/ as deme 0.1.0 did: `save_pretrained(..., state_dict=ema)`, which diffusers ignores (the live
    UNet, here holding the raw weights, is what it saves), EMA projections beside it, deme.json without the marker."""
    import shutil

    final, raw = run.final(i), run.final(i, ema=False)
    from safetensors.torch import save_file

    live = models.load_model_folder(raw)                     # the trainer's module at the end: raw weights
    ema_unet, ema_proj = _unet_and_projection(final)
    shutil.rmtree(final / "unet")                            # deme 0.1.0's layout: no pipeline parts
    shutil.rmtree(final / "scheduler")
    (final / "model_index.json").unlink()
    live.unet.save_pretrained(final / "unet", safe_serialization=True, state_dict=ema_unet)
    save_file(ema_proj, str(final / "projection.safetensors"))
    meta = json.loads((final / "deme.json").read_text())
    del meta["export_format"]
    (final / "deme.json").write_text(json.dumps(meta))


def test_a_legacy_final_is_refused_by_merge_and_sample_and_reexported_by_train(trained, capsys):
    from deme_cli.commands.merge import run_merge
    from deme_cli.commands.sample import run_sample

    recipe, run = trained
    run_train(recipe, run, 1)
    _legacy_export(run, 0)
    # the simulated legacy folder really holds the raw UNet (the bug), and the library call did ignore state_dict
    raw_unet, _ = _unet_and_projection(run.final(0, ema=False))
    legacy_unet, _ = _unet_and_projection(run.final(0))
    assert all(torch.equal(legacy_unet[k], raw_unet[k]) for k in raw_unet)

    for call in (lambda: run_merge(recipe, run), lambda: run_sample(recipe, run, "range:0"),
                 lambda: run_sample(recipe, run, "ensemble")):
        with pytest.raises(UsageError, match=r"range 0's final/ .* raw UNet weights.*'deme train RECIPE --range 0' "
                                             r"to re-export"):
            call()
    assert not run.merged.exists() and not run.samples("range:0").exists()

    capsys.readouterr()
    [res] = run_train(recipe, run, 0)
    assert res["skipped"]
    err = " ".join(capsys.readouterr().err.split())
    assert "already trained" not in err
    assert "re-exported the EMA weights from checkpoints/step-4 without training" in err
    ck = _last_checkpoint(run, 0)
    _assert_folder_holds(run.final(0), load_file(str(ck / "ema.safetensors")))
    _assert_folder_holds(run.final(0, ema=False), load_file(str(ck / "student.safetensors")))
    assert [json.loads(x)["step"] for x in run.metrics(0).read_text().splitlines()] == [1, 2, 3, 4]   # no training
    run_merge(recipe, run)                                   # now accepted


def test_a_legacy_final_without_its_checkpoint_asks_for_a_retrain(trained):
    import shutil

    from deme_cli.commands.merge import run_merge

    recipe, run = trained
    _legacy_export(run, 0)
    shutil.rmtree(run.checkpoints(0))
    with pytest.raises(UsageError, match=r"retrain it with 'deme train RECIPE --range 0 --force'"):
        run_train(recipe, run, 0)
    with pytest.raises(UsageError, match=r"checkpoint is gone.*--force"):
        run_merge(recipe.model_copy(update={"ranges": recipe.ranges.model_copy(update={"n": 1})}), run)
