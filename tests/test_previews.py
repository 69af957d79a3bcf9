"""Training previews (train.preview_every) and experiment trackers (train.log_with): TensorBoard's event files read
back with TensorBoard's own reader and compared with metrics.jsonl, preview grids compared with samples of the range
model written to final/, resumes that repeat neither a step nor a preview, and training that previews ending exactly
where training without previews ends."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from conftest import tiny_recipe_dict, trainer_for
from deme_cli.cli import app
from deme_cli.commands.train import run_train
from deme_cli.engine.errors import UsageError
from deme_cli.engine.ranges import Range
from deme_cli.engine.runs import RunDir

SCALARS = ("loss", "denoise_loss", "consistency_loss", "grad_norm", "lr", "t_in_range_fraction")


def deme(*args):
    r = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def _metric_lines(run: RunDir, i: int = 0) -> list[dict]:
    return [json.loads(x) for x in run.metrics(i).read_text().splitlines() if x.strip()]


def _events(logdir: Path):
    """TensorBoard's own reader of one run folder (every scalar and image kept)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _write_recipe(path: Path, d: dict) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps(d))
    return path


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        out.update({f"{f.relative_to(folder)}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def test_cli_tensorboard_scalars_equal_metrics_previews_logged_and_resume_repeats_nothing(tmp_path, tiny_ddpm,
                                                                                          tiny_images):
    """The issue's command: `deme train RECIPE --all --set 'train.log_with="tensorboard"' --set
    train.preview_every=3` on the tiny DDPM with train.steps = 6; then a resume from step 4 after the run lost its last
    checkpoint (a crash after step 6 was logged)."""
    run_dir = tmp_path / "run"
    d = tiny_recipe_dict(tiny_ddpm, tiny_images, run_dir)
    d["ranges"]["n"] = 1
    d["train"].update(steps=6, checkpoint_every=2)
    recipe = _write_recipe(tmp_path / "tiny.toml", d)
    args = ("train", recipe, "--all", "--set", 'train.log_with="tensorboard"', "--set", "train.preview_every=3")
    code, _, err = deme(*args)
    assert code == 0, err

    run = RunDir(run_dir)
    rdir = run.range_dir(0)
    assert sorted(p.name for p in (rdir / "previews").iterdir()) == ["step-3.png", "step-6.png"]
    logdir = rdir / "logs" / "tiny"
    assert list(logdir.glob("events.out.tfevents*"))

    def check(ev, lines):
        for k in SCALARS:
            got = [(e.step, e.value) for e in ev.Scalars(k)]
            want = [(x["step"], float(np.float32(x[k]))) for x in lines if x.get(k) is not None]
            assert got == want, k                          # every step once, its value as metrics.jsonl says
        images = ev.Images("preview")
        assert [e.step for e in images] == [3, 6]
        for e in images:
            assert np.array_equal(_pixels(e.encoded_image_string),
                                  np.asarray(Image.open(rdir / "previews" / f"step-{e.step}.png").convert("RGB")))

    lines = _metric_lines(run)
    assert [x["step"] for x in lines] == list(range(1, 7))
    check(_events(logdir), lines)
    preview6 = (rdir / "previews" / "step-6.png").read_bytes()

    # lose step 6's checkpoint and the final models: the re-run resumes from step 4 and logs steps 5 and 6 again
    for p in (run.final(0), run.final(0, ema=False), run.checkpoints(0) / "step-6"):
        shutil.rmtree(p)
    (run.checkpoints(0) / "latest").write_text("step-4\n")
    (rdir / "previews" / "step-6.png").unlink()
    code, _, err = deme(*args)
    assert code == 0, err
    assert (rdir / "previews" / "step-6.png").read_bytes() == preview6      # the same seeds, the same weights
    lines = _metric_lines(run)
    assert [x["step"] for x in lines] == list(range(1, 7))
    check(_events(logdir), lines)
    # the resumed writer tells TensorBoard to drop what the first one logged past step 4 (SummaryWriter.purge_step)
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    newest = max(logdir.glob("events.out.tfevents*"), key=lambda f: (int(f.name.split(".")[3]),
                                                                      int(f.name.split(".")[-1])))
    starts = [e.step for e in EventFileLoader(str(newest)).Load() if e.HasField("session_log")]
    assert starts == [5]


@pytest.mark.parametrize("adapter", ["full", "lora"])
def test_a_preview_samples_the_ema_student_and_restores_it(make_recipe, adapter):
    """The grid is the EMA weights' DDIM samples (image k from seed + k); afterwards the student's weights, the EMA,
    the training mode and the global RNG are as before."""
    from deme_cli.engine.base import resolve_base
    from deme_cli.engine.images import tile
    from deme_cli.engine.model_specs import sample_images
    from deme_cli.engine.previews import Previews

    deme_ = {"adapter": "lora", "lora_rank": 4} if adapter == "lora" else {}
    recipe = make_recipe(train={"lr": 1e-2, "preview_every": 2, "preview_images": 3, "preview_steps": 4},
                         deme=deme_, seed=5)
    tr = trainer_for(recipe, Range(0, 0, 500))
    for _ in range(2):
        tr.train_step()
    model = tr.unwrapped()
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {k: v.clone() for k, v in tr.ema.state_dict().items()}
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    rng = torch.get_rng_state()
    base = resolve_base(recipe.model, recipe.train.device, recipe.train.mixed_precision)
    folder = Path(recipe.out_dir) / "previews"
    grid = Previews(base, tr, train=recipe.train, sample=recipe.sample, seed=recipe.seed, resolution=16,
                    folder=folder).write(2)

    after = model.state_dict()
    assert all(torch.equal(after[k], raw[k]) for k in raw) and model.training
    assert all(torch.equal(tr.ema.state_dict()[k], ema[k]) for k in ema)
    assert torch.equal(torch.get_rng_state(), rng)
    # by hand: the student loaded with the EMA weights by name, DDIM-4 with eta 0, seeds 5, 6, 7 (not a deep copy:
    # the projection hooks would still call the original projections)
    model.load_state_dict({**raw, **ema})
    s = recipe.sample.model_copy(update={"scheduler": "ddim", "eta": 0.0, "precision": "fp32"})
    images = sample_images(model.eval(), base, s, 16, 3, steps=4, seed=5, batch_size=3, device=torch.device("cpu"))
    assert np.array_equal(grid, np.asarray(tile([Image.fromarray(im) for im in images])))
    assert np.array_equal(np.asarray(Image.open(folder / "step-2.png")), grid)
    assert len({im.tobytes() for im in images}) == 3


def test_previews_survive_a_resume_bit_for_bit_and_do_not_change_training(make_recipe, tmp_path):
    """Previews at 2, 4, 6: a run of 6 steps, a run of 3 steps continued to 6 (both preview), and a run of 6 steps
    without previews end with the same weights and losses, and the previews are the same bytes."""
    common = dict(data={"center_crop": False, "random_flip": True},
                  train={"grad_accum": 2, "lr": 1e-3, "lr_warmup_steps": 2, "checkpoint_every": 2,
                         "keep_checkpoints": 1})

    def recipe(name: str, steps: int, previews: bool):
        r = make_recipe(**common, output={"dir": str(tmp_path / name)})
        return r.model_copy(update={"train": r.train.model_copy(update={
            "steps": steps, "preview_every": 2 if previews else 0, "preview_images": 2, "preview_steps": 3})})

    one = recipe("one", 6, True)
    run_train(one, RunDir(one.out_dir), 0)
    half = recipe("two", 3, True)
    run_train(half, RunDir(half.out_dir), 0)
    assert sorted(p.name for p in (RunDir(half.out_dir).range_dir(0) / "previews").iterdir()) == ["step-2.png"]
    run_train(recipe("two", 6, True), RunDir(half.out_dir), 0)
    none = recipe("none", 6, False)
    run_train(none, RunDir(none.out_dir), 0)

    a, b, c = (RunDir(tmp_path / n) for n in ("one", "two", "none"))
    pa, pb = a.range_dir(0) / "previews", b.range_dir(0) / "previews"
    assert sorted(p.name for p in pa.iterdir()) == ["step-2.png", "step-4.png", "step-6.png"]
    for k in (2, 4, 6):
        assert (pa / f"step-{k}.png").read_bytes() == (pb / f"step-{k}.png").read_bytes()
    assert (pa / "step-2.png").read_bytes() != (pa / "step-6.png").read_bytes()
    assert not (c.range_dir(0) / "previews").exists()
    for ema in (True, False):
        wa, wb, wc = (_weights(r.final(0, ema)) for r in (a, b, c))
        assert wa.keys() == wb.keys() == wc.keys()
        assert all(torch.equal(wa[k], wb[k]) and torch.equal(wa[k], wc[k]) for k in wa), f"ema={ema}"
    losses = [[x["loss"] for x in _metric_lines(r)] for r in (a, b, c)]
    assert losses[0] == losses[1] == losses[2] and len(losses[0]) == 6


def test_text_to_image_previews_use_the_captions_when_sample_prompts_is_unset(tmp_path, tiny_sd):
    from deme_cli.engine.recipe import recipe_from_dict

    d = {"name": "tiny-sd", "seed": 0, "model": {"pretrained": str(tiny_sd["pipeline"])},
         "data": {"path": str(tiny_sd["images"]), "resolution": 16, "center_crop": True},
         "ranges": {"n": 2},
         "train": {"steps": 2, "batch_size": 4, "mixed_precision": "no", "preview_every": 2, "preview_images": 3,
                   "preview_steps": 2},
         "sample": {"guidance_scale": 3.0},
         "output": {"dir": str(tmp_path / "run")}}
    recipe = recipe_from_dict(d)
    run = RunDir(recipe.out_dir)
    run_train(recipe, run, 0)
    previews = run.range_dir(0) / "previews"
    assert (previews / "prompts.txt").read_text() == "the cat\nthe dog\na cat\n"    # metadata.jsonl's first captions
    grid = Image.open(previews / "step-2.png")
    assert grid.size == (32, 32)             # 3 decoded 16-px images in a 2 x 2 grid (latents are 8 px)

    with_prompts = recipe.model_copy(update={"sample": recipe.sample.model_copy(
        update={"prompts": str(tiny_sd["prompts"])})})
    run_train(with_prompts, run, 1)
    assert sorted(p.name for p in (run.range_dir(1) / "previews").iterdir()) == ["step-2.png"]


def test_an_unknown_tracker_or_a_missing_package_is_one_sentence_before_training(tmp_path, tiny_ddpm, tiny_images,
                                                                                 monkeypatch):
    import accelerate.tracking

    d = tiny_recipe_dict(tiny_ddpm, tiny_images, tmp_path / "run")
    recipe = _write_recipe(tmp_path / "tiny.toml", d)
    code, out, err = deme("train", recipe, "--range", "0", "--set", 'train.log_with="tensorbord"')
    assert code == 2 and "train.log_with" in err and "Traceback" not in err + out

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [])
    code, out, err = deme("train", recipe, "--range", "0", "--set", 'train.log_with="wandb"')
    assert code == 2, err
    msg = " ".join(err.split())
    assert msg.startswith("error:") and "train.log_with" in msg and "pip install wandb" in msg
    assert "Traceback" not in err + out
    assert not (tmp_path / "run" / "ranges").exists()        # refused before training

    from deme_cli.engine.recipe import recipe_from_dict

    with pytest.raises(UsageError, match="pip install tensorboard"):
        run_train(recipe_from_dict({**d, "train": {**d["train"], "log_with": "tensorboard"}}),
                  RunDir(tmp_path / "run"), 0)


def test_data_parallel_previews_and_logs_come_from_the_main_process(make_recipe, tmp_path):
    """One range on 2 processes (torchrun on the CPU): one preview per preview step and one TensorBoard log, the
    others waiting for the main process, and every step logged once."""
    import os
    import subprocess

    from deme_cli.engine import processes

    recipe = make_recipe(train={"steps": 2, "checkpoint_every": 2, "preview_every": 1, "preview_images": 2,
                                "preview_steps": 2, "log_with": "tensorboard"})
    path = tmp_path / "recipe.toml"
    path.write_text(recipe.to_toml())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = processes.deme_command(["train", str(path), "--range", "0"], processes=2, port=29623, cpu=True)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    run = RunDir(recipe.out_dir)
    rdir = run.range_dir(0)
    assert sorted(f.name for f in (rdir / "previews").iterdir()) == ["step-1.png", "step-2.png"]
    logdir = rdir / "logs" / "tiny"
    assert len(list(logdir.glob("events.out.tfevents*"))) == 1                  # one writer: the main process
    ev = _events(logdir)
    assert [e.step for e in ev.Scalars("loss")] == [1, 2] and [e.step for e in ev.Images("preview")] == [1, 2]
    assert [e.value for e in ev.Scalars("loss")] == [float(np.float32(x["loss"])) for x in _metric_lines(run)]
