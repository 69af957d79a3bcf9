"""train.loss_weighting: min-SNR-gamma and P2 weights on the denoising term of Eq. 5, in the trained target's space.

The expected weights are written out here from the betas (numpy, float64), independently of loss.py: SNR = abar /
(1 - abar), w_eps of each paper, and the factor from epsilon-space to the trained target's MSE (v: SNR / (SNR + 1),
x0: SNR). The scheduler's alphas_cumprod are float32, so SNR near t = 0 (about 1e4) agrees to a few 1e-4 only.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import hand_alphas_cumprod
from deme_cli.engine.errors import UsageError
from deme_cli.engine.loss import LOSS_WEIGHTINGS, LossWeighting, deme_loss, loss_weights, snr

T_CHECKED = [0, 10, 100, 250, 500, 750, 999]
SETTINGS = dict(snr_gamma=2.0, p2_gamma=0.5, p2_k=2.0)   # not the defaults: a swapped or ignored setting shows


def _scheduler(prediction_type: str = "epsilon", **kw):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type, **kw)   # linear 1e-4 .. 0.02


def _hand_weights(t, weighting: str, prediction_type: str, snr_gamma: float, p2_gamma: float, p2_k: float):
    abar = hand_alphas_cumprod()[np.asarray(t)]
    s = abar / (1 - abar)
    w_eps = {"min_snr": np.minimum(s, snr_gamma) / s, "p2": 1.0 / (p2_k + s) ** p2_gamma}[weighting]
    return w_eps * {"epsilon": 1.0, "v_prediction": s / (s + 1), "sample": s}[prediction_type]


def test_snr_is_abar_over_one_minus_abar():
    abar = hand_alphas_cumprod()[T_CHECKED]
    got = snr(_scheduler(), torch.tensor(T_CHECKED)).numpy()
    np.testing.assert_allclose(got, abar / (1 - abar), rtol=1e-3)
    assert got[0] > 9000 and got[-1] < 1e-4                             # clean at t = 0, pure noise at t = T - 1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("weighting", ["min_snr", "p2"])
def test_weights_are_the_papers_times_the_target_factor(weighting, prediction_type):
    got = loss_weights(_scheduler(prediction_type), torch.tensor(T_CHECKED), weighting, **SETTINGS)
    assert got.shape == (len(T_CHECKED),)
    np.testing.assert_allclose(got.numpy(), _hand_weights(T_CHECKED, weighting, prediction_type, **SETTINGS),
                               rtol=1e-3)


def test_min_snr_with_v_prediction_is_diffusers_formula():
    """diffusers' train_text_to_image: min(snr, gamma) / (snr + 1) for v-prediction, min(snr, gamma) / snr for eps."""
    abar = hand_alphas_cumprod()[T_CHECKED]
    s = abar / (1 - abar)
    t = torch.tensor(T_CHECKED)
    for pt, expect in [("v_prediction", np.minimum(s, 5.0) / (s + 1)), ("epsilon", np.minimum(s, 5.0) / s)]:
        got = loss_weights(_scheduler(pt), t, "min_snr", snr_gamma=5.0, p2_gamma=1.0, p2_k=1.0)
        np.testing.assert_allclose(got.numpy(), expect, rtol=1e-3)
    assert loss_weights(_scheduler(), t, "none", 5.0, 1.0, 1.0) is None
    assert set(LOSS_WEIGHTINGS) == {"none", "min_snr", "p2"}


def test_zero_terminal_snr_gives_finite_weights():
    sched = _scheduler(rescale_betas_zero_snr=True)
    t = torch.tensor([998, 999])
    assert float(sched.alphas_cumprod[999]) == 0.0
    assert loss_weights(sched, t, "min_snr", 5.0, 1.0, 1.0).tolist() == [1.0, 1.0]   # min(1, gamma / 0) = 1
    p2 = loss_weights(sched, t, "p2", snr_gamma=5.0, p2_gamma=0.5, p2_k=2.0)
    assert p2[1].item() == pytest.approx(2.0 ** -0.5) and bool(torch.isfinite(p2).all())


# --- the weighted loss of deme_loss ------------------------------------------------------------------------------

def _fake_unet(scale: float, shift: float):
    """A 'UNet' whose prediction is scale * x_t + shift + t / 1000 (t enters, so the samples differ)."""
    return lambda x_t, t, **kw: SimpleNamespace(sample=scale * x_t + shift + t.view(-1, 1, 1, 1).float() / 1000)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 3, 5, 5, generator=g)
    noise = torch.randn(4, 3, 5, 5, generator=g)
    return x0, noise, torch.tensor([3, 120, 480, 950])


def _hand_loss(x0, noise, t, prediction_type: str, weighting: str, lam: float, student, teacher):
    """Eq. 5 by hand in float64: mean_b w_b mse_b + lam * mean (student - teacher)^2, and the unweighted mse."""
    abar = torch.from_numpy(hand_alphas_cumprod()[t.numpy()]).view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()
    target = {"epsilon": noise.double(), "v_prediction": abar.sqrt() * noise - (1 - abar).sqrt() * x0,
              "sample": x0.double()}[prediction_type]
    pred = student(x_t, t).sample
    mse_b = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    w = torch.from_numpy(_hand_weights(t.numpy(), weighting, prediction_type, **SETTINGS))
    consistency = ((pred - teacher(x_t, t).sample) ** 2).mean()
    return float((w * mse_b).mean() + lam * consistency), float(mse_b.mean()), float(consistency)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("weighting", ["min_snr", "p2"])
def test_weighted_loss_is_the_per_sample_weighted_mean(weighting, prediction_type):
    x0, noise, t = _batch()
    student, teacher, lam = _fake_unet(0.7, 0.1), _fake_unet(0.2, -0.3), 0.5
    lw = LossWeighting(weighting, **SETTINGS)
    loss, denoise, consistency = deme_loss(student, teacher, _scheduler(prediction_type), x0, noise, t, {}, lam,
                                           weighting=lw)
    hand, hand_mse, hand_consistency = _hand_loss(x0, noise, t, prediction_type, weighting, lam, student, teacher)
    assert float(loss) == pytest.approx(hand, rel=1e-4)
    assert float(denoise) == pytest.approx(hand_mse, rel=1e-4)          # logged unweighted
    assert float(consistency) == pytest.approx(hand_consistency, rel=1e-4)
    assert abs(float(loss) - (hand_mse + lam * hand_consistency)) > 1e-3 * hand   # the weighting changed the loss


@pytest.mark.parametrize("weighting", ["min_snr", "p2"])
def test_consistency_term_is_not_weighted(weighting):
    x0, noise, t = _batch(1)
    student, teacher = _fake_unet(0.7, 0.1), _fake_unet(-0.5, 0.4)
    sched, lw = _scheduler("v_prediction"), LossWeighting(weighting, **SETTINGS)
    without = deme_loss(student, teacher, sched, x0, noise, t, {}, 0.0, weighting=lw)[0]
    with_two = deme_loss(student, teacher, sched, x0, noise, t, {}, 2.0, weighting=lw)[0]
    _, _, plain = _hand_loss(x0, noise, t, "v_prediction", weighting, 0.0, student, teacher)
    assert float(with_two - without) == pytest.approx(2.0 * plain, rel=1e-4)


def test_the_mean_weights_per_range_the_readme_quotes():
    """The README says how a weighting shifts the consistency term's relative weight: the mean denoising weight over
    what each of four uniform ranges trains on (p = 0.3 from all of [0, T), the rest from the range; Eq. 6), from
    loss.py's own weights on DDPM's linear schedule, and the effective lambda of range 0."""
    from pathlib import Path

    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    t, p = torch.arange(1000), 0.3
    quoted = {("min_snr", 5.0): ("0.73/0.97/0.97/0.97", "1.4"), ("p2", 1.0): ("0.35/0.74/0.90/0.92", "2.9")}
    for (name, gamma), (means, lam0) in quoted.items():
        w = loss_weights(_scheduler(), t, name, snr_gamma=gamma, p2_gamma=gamma, p2_k=1.0).double()
        per_range = [(1 - p) * w[lo:lo + 250].mean() + p * w.mean() for lo in range(0, 1000, 250)]
        assert "/".join(f"{float(m):.2f}" for m in per_range) == means
        assert f"{1 / float(per_range[0]):.1f}" == lam0
        assert means in readme and f"{lam0} λ with {'Min-SNR-5' if name == 'min_snr' else 'P2'}" in readme


def test_none_is_exactly_the_plain_mse():
    x0, noise, t = _batch(2)
    student, sched = _fake_unet(0.7, 0.1), _scheduler("v_prediction")
    x_t = sched.add_noise(x0, noise, t)
    plain = F.mse_loss(student(x_t, t).sample.float(), sched.get_velocity(x0, noise, t).float())
    for lw in (None, LossWeighting("none", **SETTINGS)):
        loss, denoise, consistency = deme_loss(student, None, sched, x0, noise, t, {}, 0.0, weighting=lw)
        assert torch.equal(loss, plain) and torch.equal(denoise, plain) and consistency is None


# --- the recipe and a real training run --------------------------------------------------------------------------

def test_recipe_keys_validate(make_recipe):
    r = make_recipe()
    assert (r.train.loss_weighting, r.train.snr_gamma, r.train.p2_gamma, r.train.p2_k) == ("none", 5.0, 1.0, 1.0)
    r = make_recipe(train={"loss_weighting": "p2", "p2_gamma": 0.0, "p2_k": 3.0})
    assert LossWeighting.from_section(r.train) == LossWeighting("p2", snr_gamma=5.0, p2_gamma=0.0, p2_k=3.0)
    assert 'loss_weighting = "p2"' in r.to_toml()
    with pytest.raises(UsageError, match=r"recipe key 'train\.loss_weighting'.*'min_snr'"):
        make_recipe(train={"loss_weighting": "minsnr"})
    for key, bad in [("snr_gamma", 0.0), ("p2_gamma", -1.0), ("p2_k", 0.0)]:
        with pytest.raises(UsageError, match=rf"recipe key 'train\.{key}'"):
            make_recipe(train={key: bad})


def _first_lines(recipe) -> list[dict]:
    from deme_cli.commands.train import run_train
    from deme_cli.engine.runs import RunDir

    run = RunDir(recipe.out_dir)
    run_train(recipe, run, 0)
    return [json.loads(x) for x in run.metrics(0).read_text().splitlines() if x.strip()]


def test_training_runs_with_each_weighting_and_logs_the_unweighted_denoise_loss(make_recipe, tmp_path, monkeypatch):
    """Range 0 of [0, 500) with p = 0: every sample's SNR is above 0.5 at least in one of each antithetic pair, so
    min_snr with gamma = 0.5 weighs some samples below 1, and p2 weighs every sample below 1 (1 / (1 + SNR)): the
    first step's objective (consistency 0: identity projections) is below the unweighted denoising loss, which is the
    same as the unweighted run's (same data, noise, timesteps and initial weights)."""
    import deme_cli.engine.loss as loss_mod

    seen, real = [], loss_mod.deme_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weighting", args[9] if len(args) > 9 else None))
        return real(*args, **kwargs)
    monkeypatch.setattr(loss_mod, "deme_loss", spy)
    lines = {}
    for weighting in ("none", "min_snr", "p2"):
        recipe = make_recipe(train={"steps": 2, "checkpoint_every": 10, "ema": False, "loss_weighting": weighting,
                                    "snr_gamma": 0.5}, deme={"p": 0.0}, output={"dir": str(tmp_path / weighting)})
        lines[weighting] = _first_lines(recipe)
        assert seen[-1] == LossWeighting(weighting, snr_gamma=0.5, p2_gamma=1.0, p2_k=1.0)
    none = lines["none"]
    assert none[0]["loss"] == pytest.approx(none[0]["denoise_loss"], rel=1e-6)
    for weighting in ("min_snr", "p2"):
        first = lines[weighting][0]
        assert first["denoise_loss"] == pytest.approx(none[0]["denoise_loss"], rel=1e-6)
        assert first["loss"] < 0.99 * first["denoise_loss"]
        assert lines[weighting][1]["loss"] != none[1]["loss"]


def test_a_single_range_run_is_weighted_too(make_recipe):
    """N = 1 (plain finetuning on [0, T)) takes the same path: p2 weighs every sample below 1."""
    first = _first_lines(make_recipe(ranges={"n": 1}, train={"steps": 1, "ema": False, "loss_weighting": "p2"}))[0]
    assert first["loss"] < 0.99 * first["denoise_loss"]
