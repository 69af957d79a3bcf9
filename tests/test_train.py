"""`deme train`: Eq. 5, the frozen teacher, projections, EMA warm-up, checkpoints and bit-exact resume."""
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

from conftest import trainer_for, hand_alphas_cumprod
from deme_cli.engine import models
from deme_cli.engine.errors import UsageError
from deme_cli.engine.ranges import Range
from deme_cli.engine.runs import RunDir
from deme_cli.commands.train import run_train
from deme_cli.engine.loss import deme_loss
from deme_cli.engine.trainer import EMA, RangeTrainer, ema_decay, ignore_stop_signals

R0 = Range(0, 0, 500)


def _dataset(recipe, **kw):
    """The training images of a recipe: its [data] with its seed."""
    from deme_cli.engine.data import build_dataset

    return build_dataset(recipe.data, recipe.seed, **kw)


def _trainer(recipe, tiny_ddpm) -> RangeTrainer:
    return trainer_for(recipe, R0)


def _state_hash(module) -> str:
    return models.state_hash(module.state_dict())


def _folder_weights(folder: Path) -> dict:
    return models.folder_state(folder)


def _metric_lines(run: RunDir, i: int = 0) -> list[dict]:
    return [json.loads(x) for x in run.metrics(i).read_text().splitlines() if x.strip()]


def _compile_setting(compile_: str, monkeypatch) -> dict:
    """train.compile for a test; "on" compiles with the aot_eager backend (the same graph capture as CUDA's inductor:
    UNet, projection hooks, autograd) in seconds on this CPU."""
    if compile_ == "on":
        monkeypatch.setenv("DEME_COMPILE_BACKEND", "aot_eager")
    return {"compile": compile_}


def _count_compiles(monkeypatch) -> list:
    """Calls of train.py's compile_module (student and teacher: two per trainer)."""
    import deme_cli.engine.trainer as train_mod

    calls, real = [], train_mod.compile_module
    monkeypatch.setattr(train_mod, "compile_module", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("compile_", ["off", "on"])
def test_consistency_loss_zero_at_first_step_and_teacher_stays_frozen(make_recipe, tiny_ddpm, compile_, monkeypatch):
    train = {"lr": 1e-3, "grad_accum": 2, **_compile_setting(compile_, monkeypatch)}
    tr = _trainer(make_recipe(train=train), tiny_ddpm)
    assert tr.compiled == (compile_ == "on")
    calls = []
    tr.teacher.register_forward_hook(lambda *a: calls.append(1))
    before = _state_hash(tr.teacher)
    lines = [tr.train_step() for _ in range(3)]
    assert lines[0]["consistency_loss"] < 1e-10          # identity projections: student == teacher at step 0
    assert lines[-1]["consistency_loss"] > 1e-8          # then the student moves away
    assert len(calls) == 3 * 2                           # one teacher forward per micro-batch
    assert _state_hash(tr.teacher) == before
    assert not tr.teacher.training and not any(p.requires_grad for p in tr.teacher.parameters())
    for k in ("step", "loss", "denoise_loss", "consistency_loss", "lr", "grad_norm", "t_in_range_fraction"):
        assert k in lines[0]
    assert lines[0]["loss"] == pytest.approx(lines[0]["denoise_loss"] + lines[0]["consistency_loss"], rel=1e-6)


def test_zero_consistency_weight_never_builds_or_calls_a_teacher(make_recipe, tiny_ddpm):
    tr = _trainer(make_recipe(deme={"consistency_weight": 0.0}), tiny_ddpm)
    assert tr.teacher is None
    line = tr.train_step()
    assert line["consistency_loss"] is None and line["loss"] == line["denoise_loss"]


def test_projection_false_adds_no_parameters(make_recipe, tiny_ddpm):
    base = sum(p.numel() for p in models.load_unet(Path(tiny_ddpm)).parameters())
    without = _trainer(make_recipe(deme={"projection": False}), tiny_ddpm)
    assert sum(p.numel() for p in without.unwrapped().parameters()) == base
    assert without.unwrapped().projections is None
    chans = models.projection_channels(without.unwrapped().config)
    with_p = _trainer(make_recipe(), tiny_ddpm)
    extra = sum(c * c for cs in chans.values() for c in cs)
    assert sum(p.numel() for p in with_p.unwrapped().parameters()) == base + extra
    assert len(with_p.params) == len(list(with_p.unwrapped().parameters()))   # projections are optimized too


def test_training_lowers_the_denoising_loss_on_a_fixed_batch(make_recipe, tiny_ddpm):
    tr = _trainer(make_recipe(train={"lr": 1e-3, "ema": False, "steps": 30}, deme={"p": 1.0}), tiny_ddpm)
    ds = tr.task.dataset()
    g = torch.Generator().manual_seed(123)
    x0 = torch.stack([ds[i] for i in range(8)])
    t = torch.linspace(20, 980, 8).long()
    noise = torch.randn(x0.shape, generator=g)

    def fixed_loss() -> float:
        with torch.no_grad():
            return deme_loss(tr.student, None, tr.noise_scheduler, x0, noise, t, {}, 0.0)[1].item()

    before = fixed_loss()
    for _ in range(30):
        tr.train_step()
    after = fixed_loss()
    assert after < 0.8 * before, (before, after)


def test_ema_warmup_formula_and_updates():
    assert ema_decay(0, 0.9999, 0.75) == 0.0                         # the first update copies
    assert ema_decay(1, 0.9999, 0.75) == pytest.approx(1 - 2 ** -0.75)
    assert ema_decay(10**9, 0.9999, 0.75) == 0.9999                  # capped
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([("w", p)], 0.9999, 0.75)
    expect = None
    for k, v in enumerate([1.0, 2.0, 4.0, 8.0]):
        with torch.no_grad():
            p.fill_(v)
        ema.update([p])
        d = ema_decay(k, 0.9999, 0.75)
        expect = v if expect is None else d * expect + (1 - d) * v
        assert ema.state_dict()["w"] == pytest.approx(torch.full((3,), expect), rel=1e-6)
    assert ema.updates == 4


def test_train_writes_final_models_metrics_and_skips_when_done(make_recipe, tiny_ddpm):
    recipe = make_recipe(train={"steps": 3, "checkpoint_every": 1, "keep_checkpoints": 2})
    run = RunDir(recipe.out_dir)
    [res] = run_train(recipe, run, 1)
    assert res["range"] == 1 and (res["lo"], res["hi"]) == (500, 1000) and res["steps"] == 3 and not res["skipped"]
    final, raw = run.final(1), run.final(1, ema=False)
    meta = json.loads((final / "deme.json").read_text())
    assert meta["range"] == {"index": 1, "lo": 500, "hi": 1000} and meta["steps"] == 3 and meta["recipe"] == "tiny"
    assert meta["base_hash"] == models.unet_hash(models.load_unet(Path(tiny_ddpm)))
    assert meta["weights"] == "ema" and json.loads((raw / "deme.json").read_text())["weights"] == "raw"
    ema_w, raw_w = _folder_weights(final), _folder_weights(raw)
    assert any(not torch.equal(ema_w[k], raw_w[k]) for k in raw_w)
    m = models.load_model_folder(final)
    assert m.projections is not None
    assert (run.range_dir(1) / "recipe.resolved.toml").is_file()
    assert [x["step"] for x in _metric_lines(run, 1)] == [1, 2, 3]
    ckpts = sorted(p.name for p in run.checkpoints(1).iterdir())
    assert ckpts == ["latest", "step-2", "step-3"]                    # keep_checkpoints = 2
    assert (run.checkpoints(1) / "latest").read_text().strip() == "step-3"
    # re-running skips; --force trains again
    stamp = (final / "deme.json").stat().st_mtime_ns
    assert run_train(recipe, run, 1)[0]["skipped"]
    assert (final / "deme.json").stat().st_mtime_ns == stamp
    assert not run_train(recipe, run, 1, force=True)[0]["skipped"]
    assert [x["step"] for x in _metric_lines(run, 1)] == [1, 2, 3]
    with pytest.raises(UsageError, match="range 2 does not exist"):
        run_train(recipe, run, 2)


@pytest.mark.parametrize("compile_", ["off", "on"])
def test_resume_is_bit_exact(make_recipe, tmp_path, compile_, monkeypatch):
    # random crops + flips, 2 micro-batches per step, warm-up LR, EMA: 2K steps at once == K, then K more
    common = dict(data={"center_crop": False, "random_flip": True},
                  train={"grad_accum": 2, "lr": 1e-3, "lr_warmup_steps": 2, "checkpoint_every": 2,
                         "keep_checkpoints": 1, **_compile_setting(compile_, monkeypatch)})
    compiles = _count_compiles(monkeypatch)
    K = 3
    one = make_recipe(**common, output={"dir": str(tmp_path / "one")})
    one = one.model_copy(update={"train": one.train.model_copy(update={"steps": 2 * K})})
    run_train(one, RunDir(one.out_dir), 0)

    half = make_recipe(**common, output={"dir": str(tmp_path / "two")})
    half = half.model_copy(update={"train": half.train.model_copy(update={"steps": K})})
    run_train(half, RunDir(half.out_dir), 0)
    rest = half.model_copy(update={"train": half.train.model_copy(update={"steps": 2 * K})})
    [res] = run_train(rest, RunDir(rest.out_dir), 0)
    assert res["steps"] == 2 * K and not res["skipped"]

    a, b = RunDir(one.out_dir), RunDir(rest.out_dir)
    for ema in (True, False):
        wa, wb = _folder_weights(a.final(0, ema)), _folder_weights(b.final(0, ema))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"final (ema={ema}) differs after resume"
    la, lb = _metric_lines(a), _metric_lines(b)
    assert [x["step"] for x in lb] == list(range(1, 2 * K + 1))
    assert [x["loss"] for x in la] == [x["loss"] for x in lb]
    assert len(compiles) == (6 if compile_ == "on" else 0)     # three trainers, student and teacher each


def test_sigkill_leaves_a_checkpoint_that_resumes(make_recipe, tmp_path):
    recipe = make_recipe(train={"steps": 10_000, "checkpoint_every": 1, "keep_checkpoints": 2})
    path = tmp_path / "recipe.toml"
    path.write_text(recipe.to_toml())
    run = RunDir(recipe.out_dir)
    latest = run.checkpoints(0) / "latest"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deme_cli", "train", str(path), "--range", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if latest.is_file() and int(latest.read_text().strip().split("-")[1]) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert latest.is_file(), "no checkpoint within the deadline"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    k = int(latest.read_text().strip().split("-")[1])
    assert k >= 2
    done = recipe.model_copy(update={"train": recipe.train.model_copy(update={"steps": k + 2})})
    [res] = run_train(done, run, 0)
    assert res["steps"] == k + 2
    steps = [x["step"] for x in _metric_lines(run)]
    assert steps == list(range(1, k + 3))                               # no repeated or missing steps
    assert json.loads((run.final(0) / "deme.json").read_text())["steps"] == k + 2


def test_cifar10_recipe_trains_two_steps_on_cpu(tmp_path):
    """recipes/cifar10.toml on the real ddpm-cifar10-32 architecture (random weights) and a local image folder."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from typer.testing import CliRunner

    from conftest import write_shapes
    from deme_cli.cli import app
    from test_models import CIFAR10

    recipe = Path(__file__).parent.parent / "recipes" / "cifar10.toml"
    assert recipe.is_file(), "recipes/cifar10.toml is missing"
    torch.manual_seed(0)
    DDPMPipeline(unet=UNet2DModel(**CIFAR10), scheduler=DDPMScheduler(num_train_timesteps=1000)) \
        .save_pretrained(tmp_path / "ddpm-cifar10-32")
    images = write_shapes(tmp_path / "images", 4, 32)
    out = tmp_path / "run"
    sets = [f"model.pretrained={tmp_path / 'ddpm-cifar10-32'}", 'data.source="imagefolder"', f"data.path={images}",
            "train.steps=2", "train.batch_size=2", "train.grad_accum=1", "data.num_workers=0", 'train.device="cpu"']
    args = ["train", str(recipe), "--range", "3", "--out", str(out), "--json"]
    for s in sets:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    res = json.loads(result.stdout)["ranges"][0]
    assert (res["range"], res["lo"], res["hi"], res["steps"]) == (3, 750, 1000, 2)
    meta = json.loads((out / "ranges" / "3" / "final" / "deme.json").read_text())
    assert meta["steps"] == 2 and meta["recipe"] == "cifar10" and meta["projection"]
    proj = models.split_state(models.folder_state(out / "ranges" / "3" / "final"))[1]
    assert [proj[f"down.{i}.weight"].shape[0] for i in range(4)] == [128, 256, 256, 256]


def test_data_stream_with_workers_matches_without(make_recipe):
    from deme_cli.engine.trainer import DataStream

    ds = _dataset(make_recipe(data={"random_flip": True, "center_crop": False}), channels=3)
    a = DataStream(ds, 4, seed=0, rank=0, num_processes=1, num_workers=0, pin_memory=False, epoch=0, batch=5)
    b = DataStream(ds, 4, seed=0, rank=0, num_processes=1, num_workers=2, pin_memory=False, epoch=0, batch=5)
    for _ in range(5):                                   # crosses into epoch 1 (8 batches per epoch)
        assert torch.equal(a.next(), b.next())
    assert (a.epoch, a.batch) == (b.epoch, b.batch) == (1, 2)
    a.close()
    b.close()


def test_data_workers_stop_on_close_and_outlive_a_sigterm_only_by_the_grace(make_recipe, monkeypatch):
    """Workers ignore SIGINT/SIGUSR1 and outlive SIGTERM by WORKER_GRACE_S (the main process stops at a step
    boundary first); close() ends them, and so does the grace: a leftover worker never blocks the interpreter's exit."""
    import signal

    import psutil

    from deme_cli.engine import trainer as trainer_mod
    from deme_cli.engine.trainer import DataStream

    monkeypatch.setattr(trainer_mod, "WORKER_GRACE_S", 1)
    ds = _dataset(make_recipe(), channels=3)
    before = {c.pid for c in psutil.Process().children()}

    def workers():
        return [c for c in psutil.Process().children() if c.pid not in before and c.is_running()
                and c.status() != psutil.STATUS_ZOMBIE]
    s = DataStream(ds, 4, seed=0, rank=0, num_processes=1, num_workers=2, pin_memory=False)
    s.next()                     # the workers are signalled at once: they start with the signals blocked
    ws = workers()
    assert len(ws) == 2
    for w in ws:
        w.send_signal(signal.SIGINT)
        w.send_signal(signal.SIGUSR1)
        w.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in ws)      # still serving
    with pytest.raises(RuntimeError, match="killed by signal: Alarm clock"):      # torch reports it on SIGCHLD
        time.sleep(5)
    s.close()
    s = DataStream(ds, 4, seed=0, rank=0, num_processes=1, num_workers=2, pin_memory=False)
    s.next()
    ws = workers()
    s.close()
    gone, alive = psutil.wait_procs(ws, timeout=10)
    assert len(ws) == 2 and not alive                                              # close() ends them


def test_bf16_on_cpu_warns_and_trains(make_recipe, tiny_ddpm, capsys):
    tr = _trainer(make_recipe(train={"mixed_precision": "bf16"}), tiny_ddpm)
    assert tr.acc.mixed_precision == "bf16"
    assert "slow" in capsys.readouterr().err
    line = tr.train_step()
    assert 0.0 < line["loss"] < 10.0 and line["consistency_loss"] < 1e-3
    assert _trainer(make_recipe(), tiny_ddpm).acc.mixed_precision == "no"   # the next run gets its own precision


def test_gradient_checkpointing_gives_the_same_step(make_recipe, tiny_ddpm):
    a = _trainer(make_recipe(), tiny_ddpm)
    b = _trainer(make_recipe(train={"gradient_checkpointing": True}), tiny_ddpm)
    la, lb = a.train_step(), b.train_step()
    assert la["loss"] == pytest.approx(lb["loss"], rel=1e-5)
    assert la["grad_norm"] == pytest.approx(lb["grad_norm"], rel=1e-4)


def test_cli_train_all_and_bad_range(make_recipe, tmp_path):
    from typer.testing import CliRunner

    from deme_cli.cli import app

    recipe = make_recipe(train={"steps": 1})
    path = tmp_path / "r.toml"
    path.write_text(recipe.to_toml())
    result = CliRunner().invoke(app, ["train", str(path), "--all", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)["ranges"]
    assert [(r["range"], r["lo"], r["hi"], r["steps"]) for r in got] == [(0, 0, 500, 1), (1, 500, 1000, 1)]
    bad = CliRunner().invoke(app, ["train", str(path), "--range", "2"])
    assert bad.exit_code == 2 and "range 2 does not exist" in bad.output and "Traceback" not in bad.output


# --- what the training step actually does, checked by hand ---------------------------------------------------------

NARROW = Range(1, 400, 450)      # 5% of [0, 1000): a global draw rarely lands inside it


def _record_timesteps(tr, monkeypatch) -> list:
    """The timesteps of every micro-batch as the step uses them: the t that makes x_t (the scheduler's add_noise)
    and the t the student's UNet is called with, checked to be the same tensor values."""
    made, seen = [], []
    real = tr.noise_scheduler.add_noise
    monkeypatch.setattr(tr.noise_scheduler, "add_noise", lambda x0, noise, t: made.append(t.clone()) or real(x0, noise, t))
    tr.unwrapped().unet.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
    return made, seen


@pytest.mark.parametrize("sampling,antithetic,p,batch,accum,steps", [
    ("per_sample", False, 0.3, 16, 4, 6),    # 384 independent coins: the in-range frequency
    ("per_batch", True, 0.3, 2, 8, 8),       # 64 micro-batches, one coin each, antithetic pairs
    ("per_batch", True, 0.0, 4, 5, 4),       # p = 0: every draw in the range
])
def test_trainer_draws_timesteps_by_eq6(make_recipe, tiny_ddpm, monkeypatch, sampling, antithetic, p, batch, accum,
                                        steps):
    """Eq. 6 inside the trainer: the timesteps the training step really uses (recorded at add_noise and at the UNet)
    lie in the range with frequency 1 - p + p |range| / T and come from all of [0, T) otherwise; per_batch flips one
    coin per micro-batch; antithetic pairs t with lo + hi - 1 - t (range) or T - 1 - t (global)."""
    recipe = make_recipe(train={"batch_size": batch, "grad_accum": accum, "steps": steps, "ema": False},
                         deme={"p": p, "sampling": sampling, "antithetic": antithetic, "consistency_weight": 0.0})
    tr = trainer_for(recipe, NARROW)
    made, seen = _record_timesteps(tr, monkeypatch)
    lines = [tr.train_step() for _ in range(steps)]
    assert len(made) == len(seen) == steps * accum
    assert all(torch.equal(a, b) for a, b in zip(made, seen))
    t = torch.stack(made).long()                                     # (micro-batches, batch)
    inside = (t >= NARROW.lo) & (t < NARROW.hi)
    assert int(t.min()) >= 0 and int(t.max()) < 1000
    for k, line in enumerate(lines):                                 # the logged fraction is the used one
        assert line["t_in_range_fraction"] == pytest.approx(float(inside[k * accum:(k + 1) * accum].float().mean()))
    lo, hi, width = NARROW.lo, NARROW.hi, NARROW.hi - NARROW.lo
    if p == 0.0:
        assert bool(inside.all())
        assert int(t.min()) < lo + 5 and int(t.max()) > hi - 6          # the whole range is drawn
        return
    outside = t[~inside]
    if sampling == "per_sample":
        n = t.numel()
        expect = 1 - p + p * width / 1000
        assert abs(float(inside.float().mean()) - expect) < 4 * (expect * (1 - expect) / n) ** 0.5   # 4 sd
        mixed = (inside.any(1) & ~inside.all(1)).float().mean()
        assert mixed > 0.5                                              # coins flipped per sample, not per batch
        half = batch // 2
        mirrored = ((t[:, :half] + t[:, half:]) == lo + hi - 1) | ((t[:, :half] + t[:, half:]) == 999)
        assert float(mirrored.float().mean()) < 0.2                     # antithetic = false: no mirrored pairs
    else:
        pair = t.sum(1)
        in_range_batch = inside.all(1) & (pair == lo + hi - 1)
        global_batch = pair == 999
        assert bool((in_range_batch ^ global_batch).all())             # one coin per micro-batch, antithetic pairs
        frac = float(global_batch.float().mean())
        assert abs(frac - p) < 4 * (p * (1 - p) / len(pair)) ** 0.5
    # global draws cover [0, T): below and above the range in proportion to the room there (400 : 550)
    below = float((outside < lo).float().mean())
    assert abs(below - lo / (1000 - width)) < 0.15 and int(outside.min()) < 100 and int(outside.max()) > 900


def test_optimizer_step_is_eq5_by_hand_then_clipped_then_adamw(make_recipe, tiny_ddpm, monkeypatch):
    """Three optimizer steps of 2 micro-batches each, checked against a computation done here from the micro-batches
    the step used (x0, noise, t recorded at add_noise):
    - the accumulated gradient is that of mean_micro [ ||eps - student(x_t, t)||^2 + lambda ||teacher(x_t, t) -
      student(x_t, t)||^2 ] (Eq. 5, lambda = 0.5), x_t made by hand from alphas_cumprod, the teacher a fresh copy of
      the pretrained UNet (frozen: the same at every step), then clipped to max_grad_norm; the logged losses and
      grad_norm are these;
    - the optimizer holds every student parameter (projections included) once, in one group, with the recipe's
      AdamW settings, and its update is AdamW by hand (bias-corrected moments, decoupled weight decay, eps)."""
    from diffusers import UNet2DModel

    lam, clip, lr, b1, b2, eps, wd = 0.5, 0.05, 1e-3, 0.8, 0.9, 1e-3, 0.5
    recipe = make_recipe(train={"batch_size": 2, "grad_accum": 2, "steps": 3, "lr": lr, "adam_beta1": b1,
                                "adam_beta2": b2, "adam_eps": eps, "weight_decay": wd, "max_grad_norm": clip,
                                "ema": False},
                         deme={"consistency_weight": lam})
    tr = _trainer(recipe, tiny_ddpm)
    student = tr.unwrapped()
    names = [n for n, _ in student.named_parameters()]
    params = [p for _, p in student.named_parameters()]
    assert any(n.startswith("projections.") for n in names)
    opt = tr.optimizer.optimizer                                       # the torch optimizer under accelerate's wrapper
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert [id(p) for p in group["params"]] == [id(p) for p in params]  # every parameter, once; no teacher weights
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (lr, (b1, b2), eps, wd)
    assert not group["amsgrad"] and not group["maximize"]

    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():                                              # student != teacher from the first step
        for p in params:
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    teacher = UNet2DModel.from_pretrained(tiny_ddpm / "unet").eval().requires_grad_(False)
    abar = torch.from_numpy(hand_alphas_cumprod())
    micro = []
    real = tr.noise_scheduler.add_noise
    monkeypatch.setattr(tr.noise_scheduler, "add_noise",
                        lambda x0, noise, t: micro.append((x0.clone(), noise.clone(), t.clone())) or real(x0, noise, t))
    steps = []

    def before(optimizer, args, kwargs):
        losses = []
        with torch.enable_grad():
            total = 0.0
            for x0, noise, t in micro[-2:]:
                a = abar[t].sqrt().view(-1, 1, 1, 1)
                b = (1 - abar[t]).sqrt().view(-1, 1, 1, 1)
                x_t = (a * x0.double() + b * noise.double()).float()
                pred = student(x_t, t).sample
                with torch.no_grad():
                    target = teacher(x_t, t).sample
                d, c = ((pred - noise) ** 2).mean(), ((pred - target) ** 2).mean()
                total = total + (d + lam * c) / 2
                losses.append((float(d.detach()), float(c.detach())))
            hand = torch.autograd.grad(total, params)
        norm = float(torch.cat([g.reshape(-1) for g in hand]).double().norm())
        coef = min(1.0, clip / (norm + 1e-6))
        steps.append({"before": [p.detach().clone() for p in params], "grad": [p.grad.clone() for p in params],
                      "hand": [g * coef for g in hand], "norm": norm, "losses": losses})
    opt.register_step_pre_hook(before)
    lines = [tr.train_step() for _ in range(3)]
    after = [p.detach().clone() for p in params]

    m = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    v = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for k, (rec, line) in enumerate(zip(steps, lines), start=1):
        got = torch.cat([g.reshape(-1) for g in rec["grad"]]).double()
        want = torch.cat([g.reshape(-1) for g in rec["hand"]]).double()
        assert rec["norm"] > 2 * clip                                  # clipping is active
        assert float((got - want).norm() / want.norm()) < 1e-4, k      # Eq. 5 gradient, accumulated, clipped
        assert float(got.norm()) == pytest.approx(clip, rel=1e-4)
        assert line["grad_norm"] == pytest.approx(rec["norm"], rel=1e-4)
        d = sum(x for x, _ in rec["losses"]) / 2
        c = sum(y for _, y in rec["losses"]) / 2
        assert (line["denoise_loss"], line["consistency_loss"]) == pytest.approx((d, c), rel=1e-4)
        assert line["loss"] == pytest.approx(d + lam * c, rel=1e-4) and c > 1e-3
        # AdamW by hand on the gradient the optimizer received
        nxt = steps[k]["before"] if k < len(steps) else after
        for i, (p0, g, p1) in enumerate(zip(rec["before"], rec["grad"], nxt)):
            g = g.double()
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            step = (m[i] / (1 - b1 ** k)) / ((v[i] / (1 - b2 ** k)).sqrt() + eps)
            want_p = p0.double() * (1 - lr * wd) - lr * step
            assert torch.allclose(p1.double(), want_p, rtol=3e-7, atol=1e-8), (k, names[i])  # float32 rounding


@pytest.mark.parametrize("schedule,warmup", [("constant", 0), ("constant", 3), ("linear", 0), ("linear", 3),
                                             ("cosine", 0), ("cosine", 3)])
def test_lr_schedule_and_warmup_act_on_the_optimizer(make_recipe, tiny_ddpm, schedule, warmup):
    """The learning rate AdamW uses at each optimizer step (read when it steps) and the one logged follow the
    schedule's formula, over train.steps optimizer steps (not micro-batches), with linear warm-up from 0."""
    import math

    lr, n = 2e-3, 8
    recipe = make_recipe(train={"batch_size": 2, "grad_accum": 2, "steps": n, "lr": lr, "lr_schedule": schedule,
                                "lr_warmup_steps": warmup, "ema": False}, deme={"consistency_weight": 0.0})
    tr = _trainer(recipe, tiny_ddpm)
    used = []
    tr.optimizer.optimizer.register_step_pre_hook(lambda opt, a, k: used.append(opt.param_groups[0]["lr"]))
    logged = [tr.train_step()["lr"] for _ in range(n)]

    def factor(s: int) -> float:
        if s < warmup:
            return s / warmup
        progress = (s - warmup) / (n - warmup)
        return {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[schedule]
    want = [lr * factor(s) for s in range(n)]
    assert used == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert logged == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert len(set(round(x, 12) for x in want)) > (1 if schedule != "constant" or warmup else 0)


def test_trainer_ema_is_the_hand_average_of_the_weights_after_each_step(make_recipe, tiny_ddpm):
    """EMA by hand over the raw weights after each optimizer step: update k has decay min(max, 1 - (1 + k)^-power)
    with the recipe's max and power (0.6 and 0.6: the cap binds at k = 4), the first update copies; the final EMA
    state is that average, for every parameter, projections included."""
    recipe = make_recipe(train={"batch_size": 2, "steps": 5, "lr": 1e-2, "ema_max_decay": 0.6, "ema_power": 0.6},
                         deme={"consistency_weight": 0.0})
    tr = _trainer(recipe, tiny_ddpm)
    shadow = None
    for k in range(5):
        tr.train_step()
        raw = {n: p.detach().double().clone() for n, p in tr.unwrapped().named_parameters()}
        d = min(0.6, 1 - (1 + k) ** -0.6)
        shadow = raw if shadow is None else {n: d * shadow[n] + (1 - d) * raw[n] for n in raw}
    assert tr.ema.updates == 5
    _, ema = tr.final_states()
    assert set(raw) <= set(ema) and any(n.startswith("projections.") for n in raw)
    for n in raw:
        # float32 EMA against a float64 hand average: a few float32 roundings of weights near 1 (a wrong decay is
        # off by ~1e-3)
        assert torch.allclose(ema[n].double(), shadow[n], rtol=1e-6, atol=1e-7), n
    assert any(not torch.allclose(ema[n].double(), raw[n], atol=1e-6) for n in raw)   # the EMA lags the raw weights


def _signal_self_then_init(worker_id: int) -> None:
    """A worker signalled between its fork and its init (here: by itself): blocked, the signals wait for the
    handlers; unblocked, SIGUSR1 would end the worker before it served a batch."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGINT)
    ignore_stop_signals(worker_id)


def test_data_workers_start_with_the_stop_signals_blocked(make_recipe, monkeypatch):
    from deme_cli.engine import trainer as trainer_mod
    from deme_cli.engine.trainer import DataStream

    monkeypatch.setattr(trainer_mod, "ignore_stop_signals", _signal_self_then_init)
    ds = _dataset(make_recipe(), channels=3)
    s = DataStream(ds, 4, seed=0, rank=0, num_processes=1, num_workers=2, pin_memory=False)
    for _ in range(3):
        assert s.next().shape[0] == 4          # both workers served batches after the signals
    s.close()
