"""Uniform split and the timestep sampler (Eq. 6): statistical checks over many draws."""

import pytest
import torch

from deme_cli.engine.errors import UsageError
from deme_cli.engine.ranges import sample_timesteps, split, uniform_split


def test_uniform_split_covers_T():
    for T, n in [(1000, 4), (1000, 3), (1000, 8), (7, 7), (1000, 1)]:
        rs, _ = uniform_split(T, n)
        assert rs[0].lo == 0 and rs[-1].hi == T and len(rs) == n
        assert all(a.hi == b.lo for a, b in zip(rs, rs[1:])) and all(r.hi > r.lo for r in rs)
    assert [(r.lo, r.hi) for r in uniform_split(1000, 4)[0]] == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    for bad in (0, 1001):
        with pytest.raises(UsageError):
            split("uniform", 1000, bad)


def test_the_routed_model_routes_t_to_the_range_owning_it(tiny_ddpm):
    """Eq. 7's rule ([lo, hi), low t first) as the routed model (deme_unet.DemeUNet, the ensemble) applies it."""
    from deme_cli.engine.deme_unet import DemeUNet
    from deme_cli.engine.models import load_unet

    rs, _ = uniform_split(1000, 4)
    routed = DemeUNet.from_models([load_unet(tiny_ddpm) for _ in rs], None, [(r.lo, r.hi) for r in rs])
    assert [routed.owners(t, 1)[0][0] for t in (0, 249, 250, 999)] == [0, 0, 1, 3]
    with pytest.raises(ValueError, match="outside every range"):
        routed.owners(1000, 1)


def _in_range_fraction(per_sample, p, lo=250, hi=500, T=1000, draws=4000, batch=16):
    g = torch.Generator().manual_seed(0)
    t = torch.cat([sample_timesteps(batch, lo, hi, T, p, per_sample=per_sample, generator=g) for _ in range(draws)])
    assert t.min() >= 0 and t.max() < T
    return ((t >= lo) & (t < hi)).float().mean().item(), t


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("p", [0.3, 0.7])
def test_in_range_fraction_matches(per_sample, p):
    """Expected (1 - p) + p (hi - lo) / T. Tolerance: per-batch coins make the draws clustered, so the standard error
    is that of `draws` Bernoulli(p) batch coins scaled by (1 - (hi-lo)/T): sqrt(p(1-p)/4000) * 0.75 ~= 0.0054 at
    p = 0.3; per-sample it is smaller. 5 standard errors: 0.03."""
    frac, _ = _in_range_fraction(per_sample, p)
    expected = (1 - p) + p * 250 / 1000
    assert abs(frac - expected) < 0.03


def test_p_zero_never_leaves_range_and_p_one_is_global():
    frac, t = _in_range_fraction(False, 0.0, draws=500)
    assert frac == 1.0
    frac, t = _in_range_fraction(True, 1.0, draws=2000)
    assert abs(frac - 0.25) < 0.02 and t.min() < 50 and t.max() > 950


def test_antithetic_pairs():
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        t = sample_timesteps(16, 250, 500, 1000, 0.3, generator=g)
        first, mirror = t[:8], t[8:16]
        s = (first + mirror).unique()
        assert len(s) == 1 and s.item() in (250 + 500 - 1, 1000 - 1)
    odd = sample_timesteps(5, 0, 10, 1000, 0.0, generator=g)
    assert odd.shape == (5,) and (odd[:2] + odd[3:5] == 9).all()


def test_per_sample_mixes_within_batch():
    g = torch.Generator().manual_seed(2)
    mixed = 0
    for _ in range(200):
        t = sample_timesteps(16, 0, 100, 1000, 0.5, per_sample=True, antithetic=False, generator=g)
        inside = ((t < 100)).sum().item()
        mixed += 0 < inside < 16
    assert mixed > 150  # per-batch coins would never mix... except by chance of global draws landing inside


def test_uniform_within_range():
    g = torch.Generator().manual_seed(3)
    t = torch.cat([sample_timesteps(16, 0, 4, 1000, 0.0, generator=g) for _ in range(2000)])
    counts = torch.bincount(t, minlength=4).float()
    assert counts.shape[0] == 4 and (counts / counts.sum() - 0.25).abs().max() < 0.02
