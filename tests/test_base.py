"""The resolved base: `[model]` and the device and precision choices, worked out once (engine/base.py)."""
from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import hand_alphas_cumprod
from deme_cli.engine.base import resolve_base
from deme_cli.engine.errors import UsageError
from deme_cli.engine.recipe import ModelSection


def test_the_base_of_a_pipeline_folder(tiny_ddpm, tiny_sd):
    cfg = json.loads((tiny_ddpm / "scheduler" / "scheduler_config.json").read_text())
    base = resolve_base(ModelSection(pretrained=str(tiny_ddpm)), "cpu", "auto")
    assert base.folder == tiny_ddpm and base.T == cfg["num_train_timesteps"] == 1000
    assert base.prediction_type == cfg.get("prediction_type", "epsilon") == "epsilon"
    assert base.kind.name == "unconditional" and base.kind.unet_class == "UNet2DModel" and not base.kind.conditional
    assert str(base.device) == "cpu" and base.precision == "fp32" and base.on_cpu
    assert base.with_precision("bf16").precision == "bf16" and base.with_precision("no").precision == "fp32"
    sched = base.noise_scheduler()
    assert sched.config.num_train_timesteps == 1000 and sched is not base.noise_scheduler()   # a fresh one each time
    # the whole schedule, every t, against the hand-computed one of the fixture's config
    assert np.allclose(sched.alphas_cumprod.double().numpy(), hand_alphas_cumprod(1000), rtol=1e-6, atol=0)
    sd = resolve_base(ModelSection(pretrained=str(tiny_sd["pipeline"])), "cpu")
    assert sd.kind.name == "text-to-image" and sd.kind.conditional


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_precision_on_a_gpu_follows_its_bf16_support(tiny_ddpm, monkeypatch, native_bf16):
    """precision "auto" on CUDA: bf16 where the GPU computes in bf16 natively, else fp16 (said once per process), and
    training then runs accelerate's fp16, which brings the gradient scaler."""
    import accelerate
    import torch

    from deme_cli.engine import devices
    from deme_cli.engine.trainer import make_accelerator

    asked, said, made = [], [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **k: asked.append(k) or native_bf16)
    monkeypatch.setattr(devices, "_said", set())
    monkeypatch.setattr(devices.ui, "info", said.append)
    monkeypatch.setattr(accelerate, "Accelerator", lambda **k: made.append(k))
    want = "bf16" if native_bf16 else "fp16"
    for _ in range(2):
        base = resolve_base(ModelSection(pretrained=str(tiny_ddpm)), "auto", "auto")
        assert base.device.type == "cuda" and base.precision == want
        assert base.with_precision("bf16").precision == "bf16"            # an explicit choice is kept
        make_accelerator(base.device, base.precision)
    assert asked and all(k == {"including_emulation": False} for k in asked)  # emulated bf16 counts as none
    assert [k["mixed_precision"] for k in made] == [want, want] and not made[0]["cpu"]
    if native_bf16:
        assert said == []
    else:
        assert len(said) == 1 and "fp16" in said[0] and "gradient scaler" in said[0]
    assert devices.resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_a_pickled_base_looks_its_device_up_again(tiny_ddpm):
    """Worker processes get the base pickled; they must pick their device under their own CUDA_VISIBLE_DEVICES."""
    base = resolve_base(ModelSection(pretrained=str(tiny_ddpm)), "auto")
    assert str(base.device) == "cpu" and "device" in base.__dict__
    again = pickle.loads(pickle.dumps(base))
    assert "device" not in again.__dict__ and again == base and str(again.device) == "cpu"


def test_bad_bases_are_one_sentence(tiny_ddpm, tmp_path):
    other = tmp_path / "pipe"
    shutil.copytree(tiny_ddpm, other)
    cfg_file = other / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "prediction_type": "flow"}))
    with pytest.raises(UsageError, match="prediction_type 'flow' is not supported"):
        resolve_base(ModelSection(pretrained=str(other)))
    with pytest.raises(UsageError, match="does not exist"):
        resolve_base(ModelSection(pretrained=str(tmp_path / "nope")))
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            _ = resolve_base(ModelSection(pretrained=str(tiny_ddpm)), "cuda").device


def test_resolving_a_base_does_not_import_torch(tiny_ddpm):
    """`deme split` and `--dry-run` stay fast: the device is looked up when a stage first needs it."""
    code = ("import sys; from deme_cli.engine.base import resolve_base; from deme_cli.engine.recipe import ModelSection;"
            f"b = resolve_base(ModelSection(pretrained={str(tiny_ddpm)!r})); assert b.T == 1000;"
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
