"""The GPU speed paths keep the maths: compiled training and sampling, half-precision weight copies.

torch.compile runs here with the "aot_eager" backend (DEME_COMPILE_BACKEND): the same graph capture as inductor
(dynamo traces the UNet, the projections' forward hooks and the autograd graph) in seconds instead of the minutes
inductor's C++ compile takes on this CPU. A run of the training comparison with inductor itself (on this CPU, 216 s)
gave losses equal to 2e-7 relative and a non-zero consistency loss identical to eager: the hooks are in the graph.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

from deme_cli.engine.ranges import Range


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    monkeypatch.setenv("DEME_COMPILE_BACKEND", "aot_eager")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _perturbed_model():
    """The tiny UNet with projections that are not the identity (so a lost hook would change the output)."""
    from diffusers import UNet2DModel

    from conftest import TINY_UNET
    from deme_cli.engine.models import wrap

    torch.manual_seed(0)
    m = wrap(UNet2DModel(**TINY_UNET), True).eval()
    with torch.no_grad():
        for c in m.projections.modules():
            if isinstance(c, torch.nn.Conv2d):
                c.weight.add_(0.02 * torch.randn_like(c.weight))
    return m


def test_use_compile_switch():
    from deme_cli.engine.speed import use_compile

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_compile("auto", cuda) and not use_compile("auto", cpu)
    assert use_compile("on", cpu) and not use_compile("off", cuda)
    with pytest.raises(ValueError):
        use_compile("yes", cpu)


def test_compiled_training_gives_the_same_steps(make_recipe, tiny_ddpm):
    """train.compile = on (student and teacher compiled in place): same losses and gradient norms as eager, the
    consistency loss (non-zero only through the projections) included; state_dict keys unchanged."""
    from conftest import trainer_for

    recipe = make_recipe(train={"lr": 1e-3})
    eager = trainer_for(recipe, Range(0, 0, 500))
    comp = trainer_for(recipe.model_copy(update={"train": recipe.train.model_copy(update={"compile": "on"})}),
                       Range(0, 0, 500))
    assert comp.compiled and not eager.compiled
    assert comp.unwrapped().unet._compiled_call_impl is not None and comp.teacher._compiled_call_impl is not None
    a = [eager.train_step() for _ in range(3)]
    b = [comp.train_step() for _ in range(3)]
    assert a[-1]["consistency_loss"] > 1e-6
    for x, y in zip(a, b):
        for k in ("loss", "denoise_loss", "consistency_loss", "grad_norm"):
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-9), k
    assert eager.unwrapped().state_dict().keys() == comp.unwrapped().state_dict().keys()


def test_model_copy_is_independent_and_keeps_its_projections():
    """model_copy rebuilds the hooks on the copy's own projections (a deep copy would call the original's)."""
    from deme_cli.engine.models import model_copy

    m = _perturbed_model()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor(300)
    with torch.no_grad():
        ref = m(x, t).sample
        c = model_copy(m)
        assert torch.equal(c(x, t).sample, ref)
        for conv in c.projections.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.mul_(2.0)
        assert not torch.allclose(c(x, t).sample, ref)       # the copy uses its own projections...
        assert torch.equal(m(x, t).sample, ref)              # ...and the original is untouched
        half = model_copy(m, torch.bfloat16)
        assert next(half.parameters()).dtype == torch.bfloat16 and next(m.parameters()).dtype == torch.float32
        assert torch.allclose(half(x.bfloat16(), t).sample.float(), ref, atol=0.1)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_sampling_gives_the_same_images(precision):
    """sample.compile on vs off: the same images for the same (model, seeds).

    bf16 (a bf16 copy of the weights, no autocast): bit-identical. fp32: eager sampling on the CPU computes the
    timestep embedding on one row (batch invariance, sample.shared_rows); compiled sampling does not (that trick
    would break the graph), so eps differs in the last float bits and a uint8 value can round the other way: at most
    1 level, on well under 1% of the values. A real fault (a lost projection, a wrong seed or timestep) changes nearly
    every value by many levels.
    """
    from deme_cli.engine.denoise import UNetDenoiser, generate

    m = _perturbed_model()
    cfg, seeds = {"num_train_timesteps": 1000}, list(range(5))
    eager = generate(UNetDenoiser(m), "ddim", 4, seeds, scheduler_config=cfg, batch_size=4, precision=precision)
    comp = generate(UNetDenoiser(m), "ddim", 4, seeds, scheduler_config=cfg, batch_size=4, precision=precision,
                    compile=True)
    diff = np.abs(eager.astype(int) - comp.astype(int))
    if precision == "bf16":
        assert diff.max() == 0
    else:
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    other = generate(UNetDenoiser(m), "ddim", 4, [s + 100 for s in seeds], scheduler_config=cfg, batch_size=4,
                     precision=precision, compile=True)
    assert np.abs(other.astype(int) - comp.astype(int)).mean() > 10    # the check can see a wrong seed
    assert next(m.parameters()).dtype == torch.float32                  # the caller's model was not cast


def test_quickstart_runs_bf16_on_cuda_and_fp32_on_cpu(monkeypatch):
    """Issue 6: the quickstart uses bf16 on a GPU. Its recipe leaves both precisions on "auto", which resolve to bf16
    for a CUDA device with native bf16 (this path ran on an H200: benchmarks/results/h200-*.json, "precision":
    "bf16"; an older GPU gets fp16: test_base.py)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)   # an H200

    from deme_cli.engine.devices import resolve_precision
    from deme_cli.engine.recipe import load_recipe

    from pathlib import Path

    r = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.toml")
    assert r.train.mixed_precision == "auto" and r.sample.precision == "auto"
    assert resolve_precision(r.sample.precision, torch.device("cuda")) == "bf16"
    assert resolve_precision(r.sample.precision, torch.device("cpu")) == "fp32"
