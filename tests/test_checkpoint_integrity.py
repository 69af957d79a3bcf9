"""Checkpoint integrity: the manifest, verification of damaged folders, falling back to the newest intact checkpoint,
and one-sentence errors when none is left (checkpoints.py)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from deme_cli.commands.train import run_train
from deme_cli.engine import checkpoints, models
from deme_cli.engine.errors import UsageError
from deme_cli.engine.runs import RunDir


@pytest.fixture
def warnings(monkeypatch) -> list[str]:
    """ui.warn's messages from checkpoints.py, with a fresh 'already warned' set."""
    got: list[str] = []
    monkeypatch.setattr(checkpoints, "_warned", set())
    monkeypatch.setattr(checkpoints.ui, "warn", got.append)
    return got


def _weights(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"unet.w": torch.randn(64, 64, generator=g), "projections.p": torch.randn(8, generator=g)}


def _save(ckpt: Path, step: int, keep: int = 3) -> Path:
    """A small checkpoint of every kind of file save() writes (no model needed)."""
    w = _weights(step)
    optim = {"optimizer": {"state": {0: {"exp_avg": w["unet.w"] * 0.1}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
             "lr_scheduler": {"last_epoch": step}, "scaler": None}
    return checkpoints.save(ckpt, step, student=w, ema={k: v * 0.5 for k, v in w.items()}, optim=optim,
                            rng=[checkpoints.rng_state({})], state={"epoch": 0, "batch": step}, keep=keep)


def _two(tmp_path) -> tuple[Path, Path, Path]:
    ckpt = tmp_path / "checkpoints"
    return ckpt, _save(ckpt, 3), _save(ckpt, 6)


def _recorded_bytes(folder: Path, name: str) -> int:
    return json.loads((folder / "manifest.json").read_text())["files"][name]["bytes"]


def _flip_middle_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


# --- the manifest --------------------------------------------------------------------------------------------------

def test_manifest_records_the_true_size_and_sha256_of_every_file(tmp_path):
    folder = _save(tmp_path / "checkpoints", 5)
    files = {p.name: p for p in folder.iterdir() if p.name != "manifest.json"}
    assert set(files) == {"student.safetensors", "ema.safetensors", "optimizer.pt", "rng.safetensors", "state.json"}
    recorded = json.loads((folder / "manifest.json").read_text())["files"]
    assert set(recorded) == set(files)
    for name, p in files.items():
        data = p.read_bytes()
        assert recorded[name]["bytes"] == len(data) > 0, name
        assert recorded[name]["sha256"] == hashlib.sha256(data).hexdigest(), name
    assert checkpoints.verify(folder) is None
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))


# --- verification and fallback -------------------------------------------------------------------------------------

DAMAGE = {
    "student emptied": lambda f: (f / "student.safetensors").write_bytes(b""),
    "student truncated": lambda f: (f / "student.safetensors").write_bytes(
        (f / "student.safetensors").read_bytes()[:1000]),
    "ema byte flipped": lambda f: _flip_middle_byte(f / "ema.safetensors"),
    "state.json deleted": lambda f: (f / "state.json").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one_and_warns_once(tmp_path, warnings, damage):
    ckpt, step3, step6 = _two(tmp_path)
    size = {n: _recorded_bytes(step6, n) for n in ("student.safetensors", "ema.safetensors")}
    if damage == "ema byte flipped":
        assert (step6 / "ema.safetensors").stat().st_size == size["ema.safetensors"]
    DAMAGE[damage](step6)
    if damage == "ema byte flipped":
        assert (step6 / "ema.safetensors").stat().st_size == size["ema.safetensors"]     # same size, other bytes
    reason = {"student emptied": f"student.safetensors is 0 bytes, {size['student.safetensors']} when written",
              "student truncated": f"student.safetensors is 1000 bytes, {size['student.safetensors']} when written",
              "ema byte flipped": "ema.safetensors does not match its recorded sha256",
              "state.json deleted": "state.json is missing"}[damage]
    assert checkpoints.verify(step6) == reason
    assert checkpoints.verify(step3) is None
    assert (ckpt / "latest").read_text().strip() == "step-6"

    assert checkpoints.resume_point(ckpt) == step3
    assert checkpoints.resume_point(ckpt) == step3        # train.py asks twice (trained_meta, train_range)
    assert checkpoints.latest(ckpt) == step3
    assert warnings == [f"checkpoint '{step6}' is damaged ({reason}); resuming from step-3"]


def test_latest_naming_a_missing_folder_is_skipped_with_one_warning(tmp_path, warnings):
    ckpt, step3, step6 = _two(tmp_path)
    (ckpt / "latest").write_text("step-9\n")
    assert checkpoints.resume_point(ckpt) == step6
    assert checkpoints.latest(ckpt) == step6
    assert len(warnings) == 1 and f"'{ckpt / 'latest'}' names 'step-9'" in warnings[0]
    assert "resuming from step-6" in warnings[0]
    # a missing step-6 named by latest, step-6 gone: falls back to step-3
    shutil.rmtree(step6)
    (ckpt / "latest").write_text("step-6\n")
    assert checkpoints.resume_point(ckpt) == step3
    assert len(warnings) == 2 and "'step-6'" in warnings[1] and "resuming from step-3" in warnings[1]


def test_only_the_main_process_warns(tmp_path, warnings, monkeypatch):
    ckpt, step3, step6 = _two(tmp_path)
    (step6 / "student.safetensors").write_bytes(b"")
    monkeypatch.setenv("RANK", "1")
    assert checkpoints.resume_point(ckpt) == step3 and warnings == []


def test_the_newest_intact_checkpoint_wins_over_latest_and_no_folders_means_none(tmp_path, warnings):
    ckpt, step3, step6 = _two(tmp_path)
    (ckpt / "latest").write_text("step-3\n")      # killed between the rename of step-6 and the pointer's update
    assert checkpoints.resume_point(ckpt) == step6
    assert checkpoints.resume_point(ckpt) == step6
    assert warnings == [f"'{ckpt / 'latest'}' names step-3, but step-6 is newer and intact (stopped between writing "
                        f"it and updating 'latest'); resuming from step-6"]
    (step6 / "state.json").unlink()                # the newer one damaged: latest's older one, one warning for it
    assert checkpoints.resume_point(ckpt) == step3
    assert len(warnings) == 2 and warnings[1] == f"checkpoint '{step6}' is damaged (state.json is missing); " \
                                                 f"resuming from step-3"
    warnings.clear()
    assert checkpoints.resume_point(tmp_path / "nothing") is None
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "latest").write_text("step-2\n")
    assert checkpoints.resume_point(empty) is None
    assert len(warnings) == 1 and "'step-2'" in warnings[0]


def test_no_intact_checkpoint_is_a_usage_error_naming_the_folder_and_force(tmp_path, warnings):
    ckpt, step3, step6 = _two(tmp_path)
    for f in (step3, step6):
        (f / "student.safetensors").write_bytes(b"")
    with pytest.raises(UsageError) as e:
        checkpoints.resume_point(ckpt)
    msg = str(e.value)
    assert str(ckpt) in msg and "step-6" in msg and "--force" in msg and "\n" not in msg
    assert f"student.safetensors is 0 bytes, {_recorded_bytes(step6, 'student.safetensors')} when written" in msg


def _run_with_damaged_checkpoints(make_recipe):
    recipe = make_recipe(train={"steps": 6})
    run = RunDir(recipe.out_dir)
    ckpt = run.checkpoints(0)
    for step in (2, 4):
        (_save(ckpt, step) / "student.safetensors").write_bytes(b"")
    return recipe, run


def test_run_train_with_no_intact_checkpoint_says_force(make_recipe, warnings):
    recipe, run = _run_with_damaged_checkpoints(make_recipe)
    with pytest.raises(UsageError, match="--force"):
        run_train(recipe, run, 0)


def test_cli_with_no_intact_checkpoint_exits_2_with_one_line(make_recipe, tmp_path):
    from typer.testing import CliRunner

    from deme_cli.cli import app

    recipe, run = _run_with_damaged_checkpoints(make_recipe)
    path = tmp_path / "r.toml"
    path.write_text(recipe.to_toml())
    result = CliRunner().invoke(app, ["train", str(path), "--range", "0"])
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and "--force" in lines[0] and "Traceback" not in result.output, result.output


def test_load_of_an_unreadable_checkpoint_is_a_usage_error_and_keeps_weights_only(tmp_path, monkeypatch):
    ckpt, step3, step6 = _two(tmp_path)
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    ck = checkpoints.load(step6, {})
    assert calls and all(k.get("weights_only") is True for k in calls)
    assert all(torch.equal(ck["student"][k], v) for k, v in _weights(6).items())
    (step6 / "optimizer.pt").write_bytes((step6 / "optimizer.pt").read_bytes()[:100])
    with pytest.raises(UsageError) as e:
        checkpoints.load(step6, {})
    assert f"checkpoint '{step6}' cannot be read" in str(e.value) and "--force" in str(e.value)
    (step3 / "student.safetensors").write_bytes(b"")
    with pytest.raises(UsageError, match="cannot be read"):
        checkpoints.load(step3, {})


def test_training_resumes_from_the_newest_checkpoint_when_latest_is_one_behind(make_recipe, tmp_path, warnings,
                                                                               monkeypatch):
    """A stop between renaming step-6 into place and rewriting `latest` leaves `latest` at step-3: the re-run resumes
    from step-6 (says so), logs steps 1..9 once each, and ends with the weights of an uninterrupted 9-step run."""
    common = {"checkpoint_every": 3, "keep_checkpoints": 5}
    ref = make_recipe(train={**common, "steps": 9}, output={"dir": str(tmp_path / "ref")})
    run_train(ref, RunDir(ref.out_dir), 0)

    first = make_recipe(train={**common, "steps": 6}, output={"dir": str(tmp_path / "cut")})
    run = RunDir(first.out_dir)
    run_train(first, run, 0)
    ckpt = run.checkpoints(0)
    assert {p.name for p in ckpt.glob("step-*")} == {"step-3", "step-6"}
    for f in (run.final(0), run.final(0, ema=False)):           # as if it stopped before exporting
        shutil.rmtree(f)
    (ckpt / "latest").write_text("step-3\n")

    loaded, said = [], []
    real = checkpoints.load
    monkeypatch.setattr(checkpoints, "load", lambda folder, *a, **k: loaded.append(folder.name) or real(folder, *a,
                                                                                                          **k))
    monkeypatch.setattr(checkpoints.ui, "info", said.append)
    rest = first.model_copy(update={"train": first.train.model_copy(update={"steps": 9})})
    [res] = run_train(rest, run, 0)
    assert res["steps"] == 9 and loaded == ["step-6"]
    assert "range 0: resuming from step-6" in said and len(warnings) == 1 and "names step-3" in warnings[0]
    assert [json.loads(x)["step"] for x in run.metrics(0).read_text().splitlines()] == list(range(1, 10))
    assert (ckpt / "latest").read_text().strip() == "step-9"
    for ema in (False, True):
        wa, wb = _folder_weights(RunDir(ref.out_dir).final(0, ema)), _folder_weights(run.final(0, ema))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# --- pruning after a fallback --------------------------------------------------------------------------------------

def test_saving_after_a_fallback_deletes_the_damaged_newer_folder_and_keeps_the_intact_ones(tmp_path, warnings):
    ckpt, step3, step6 = _two(tmp_path)
    (step6 / "student.safetensors").write_bytes(b"")
    assert checkpoints.resume_point(ckpt) == step3
    step4 = _save(ckpt, 4, keep=2)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-3", "step-4"]
    assert checkpoints.resume_point(ckpt) == step4
    assert checkpoints.verify(step3) is None


def test_saving_the_same_step_replaces_a_damaged_folder(tmp_path, warnings):
    ckpt, step3, step6 = _two(tmp_path)
    _flip_middle_byte(step6 / "ema.safetensors")
    assert checkpoints.resume_point(ckpt) == step3
    assert _save(ckpt, 6, keep=1) == step6
    assert checkpoints.verify(step6) is None
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-6"]
    assert checkpoints.resume_point(ckpt) == step6


# --- checkpoints written before manifests --------------------------------------------------------------------------

def _old_format(*folders: Path) -> None:
    for f in folders:
        (f / "manifest.json").unlink()


def test_an_intact_old_format_checkpoint_verifies_without_unpickling(tmp_path, warnings, monkeypatch):
    ckpt, step3, step6 = _two(tmp_path)
    _old_format(step3, step6)

    def no_unpickling(*a, **k):
        raise AssertionError("verification must not unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    assert checkpoints.verify(step6) is None
    assert checkpoints.resume_point(ckpt) == step6 and warnings == []


OLD_DAMAGE = {
    "student emptied": (lambda f: (f / "student.safetensors").write_bytes(b""), "student.safetensors is 0 bytes"),
    "student short by 4 bytes": (lambda f: (f / "student.safetensors").write_bytes(
        (f / "student.safetensors").read_bytes()[:-4]), "student.safetensors"),
    "rng emptied": (lambda f: (f / "rng.safetensors").write_bytes(b""), "rng.safetensors"),
    "optimizer.pt truncated": (lambda f: (f / "optimizer.pt").write_bytes((f / "optimizer.pt").read_bytes()[:-30]),
                               "optimizer.pt"),
    "state.json garbage": (lambda f: (f / "state.json").write_text("{\"step\": 6, "), "state.json"),
}


@pytest.mark.parametrize("damage", list(OLD_DAMAGE))
def test_a_damaged_old_format_checkpoint_is_detected(tmp_path, warnings, damage):
    ckpt, step3, step6 = _two(tmp_path)
    _old_format(step3, step6)
    hurt, reason = OLD_DAMAGE[damage]
    hurt(step6)
    assert reason in (checkpoints.verify(step6) or "")
    assert checkpoints.resume_point(ckpt) == step3
    assert len(warnings) == 1 and f"checkpoint '{step6}' is damaged ({reason}" in warnings[0]


def test_run_train_resumes_from_an_intact_old_format_checkpoint(make_recipe, monkeypatch, warnings):
    loaded = []
    real = checkpoints.load
    monkeypatch.setattr(checkpoints, "load", lambda folder, *a, **k: loaded.append(folder.name) or real(folder, *a,
                                                                                                          **k))
    recipe = make_recipe(train={"steps": 2, "checkpoint_every": 2})
    run = RunDir(recipe.out_dir)
    run_train(recipe, run, 0)
    _old_format(run.checkpoints(0) / "step-2")
    more = recipe.model_copy(update={"train": recipe.train.model_copy(update={"steps": 3})})
    [res] = run_train(more, run, 0)
    assert res["steps"] == 3 and not res["skipped"] and loaded == ["step-2"] and warnings == []
    assert (run.checkpoints(0) / "step-3" / "manifest.json").is_file()


# --- end to end: training resumes from the newest intact checkpoint, bit-exactly ----------------------------------

def _folder_weights(folder: Path) -> dict:
    return models.folder_state(folder)


def test_training_falls_back_past_an_emptied_checkpoint_and_ends_bit_exact(make_recipe, tmp_path, warnings,
                                                                          monkeypatch):
    common = {"checkpoint_every": 2, "keep_checkpoints": 2}
    one = make_recipe(train={**common, "steps": 6}, output={"dir": str(tmp_path / "one")})
    run_train(one, RunDir(one.out_dir), 0)

    first = make_recipe(train={**common, "steps": 4}, output={"dir": str(tmp_path / "two")})
    run = RunDir(first.out_dir)
    run_train(first, run, 0)
    ckpt = run.checkpoints(0)
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-2", "step-4"]
    assert all(checkpoints.verify(ckpt / n) is None for n in ("step-2", "step-4"))
    (ckpt / "step-4" / "student.safetensors").write_bytes(b"")

    loaded = []
    real = checkpoints.load
    monkeypatch.setattr(checkpoints, "load", lambda folder, *a, **k: loaded.append(folder.name) or real(folder, *a,
                                                                                                          **k))
    rest = first.model_copy(update={"train": first.train.model_copy(update={"steps": 6})})
    [res] = run_train(rest, run, 0)
    assert res["steps"] == 6 and not res["skipped"] and loaded == ["step-2"]
    assert len(warnings) == 1 and f"checkpoint '{ckpt / 'step-4'}' is damaged" in warnings[0]
    assert "resuming from step-2" in warnings[0]
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step-4", "step-6"]
    assert all(checkpoints.verify(ckpt / n) is None for n in ("step-4", "step-6"))

    a = RunDir(one.out_dir)
    for ema in (False, True):
        wa, wb = _folder_weights(a.final(0, ema)), _folder_weights(run.final(0, ema))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"final (ema={ema}) differs after the fallback"
    la = [json.loads(x) for x in a.metrics(0).read_text().splitlines()]
    lb = [json.loads(x) for x in run.metrics(0).read_text().splitlines()]
    assert [x["step"] for x in lb] == list(range(1, 7))
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]
