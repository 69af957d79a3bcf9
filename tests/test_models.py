"""Channel-wise projections: identity projections compute exactly what the base model computes."""
import json

import pytest
import torch

from deme_cli.engine import models
from deme_cli.engine.errors import UsageError

# google/ddpm-cifar10-32 and google/ddpm-ema-church-256 architectures (their hub config.json), random weights.
CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
               block_out_channels=(128, 256, 256, 256),
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
               downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6)
CHURCH = dict(sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
              block_out_channels=(128, 128, 256, 256, 512, 512),
              down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)
TINY_COND = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=8, norm_num_groups=32)


def _check_identity(unet, x, t, **kw):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():  # random, non-degenerate weights everywhere (zero-init convs included)
            p.add_(torch.randn_like(p) * 0.02)
        base = unet(x, t, **kw).sample
        model = models.wrap(unet, projection=True)
        out = model(x, t, **kw).sample
        # the projections really are on the path: perturbing one changes the output
        model.projections.mid[0].weight.mul_(1.5)
        changed = model(x, t, **kw).sample
    assert (out - base).abs().max().item() <= 1e-5
    assert (changed - base).abs().max().item() > 1e-4
    return model


@pytest.mark.parametrize("cfg,res,batch", [(CIFAR10, 32, 2), (CHURCH, 64, 1)], ids=["ddpm-cifar10-32", "ddpm-ema-church-256"])
def test_identity_projection_unconditional(cfg, res, batch):
    from diffusers import UNet2DModel

    unet = UNet2DModel(**cfg).eval()
    x = torch.randn(batch, 3, res, res)
    model = _check_identity(unet, x, torch.tensor([10] * batch))
    ch = models.projection_channels(unet.config)
    n_down, n_up = len(cfg["block_out_channels"]), len(cfg["block_out_channels"])
    assert [c.weight.shape[0] for c in model.projections.down] == list(cfg["block_out_channels"]) == ch["down"]
    assert len(model.projections.up) == n_up and len(model.projections.down) == n_down
    if cfg is CHURCH:  # the release's hard-coded list for this architecture
        assert ch == {"down": [128, 128, 256, 256, 512, 512], "mid": [512], "up": [512, 512, 256, 256, 128, 128]}


def test_identity_projection_conditional():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**TINY_COND).eval()
    x = torch.randn(2, 4, 8, 8)
    _check_identity(unet, x, torch.tensor([10, 500]), encoder_hidden_states=torch.randn(2, 5, 32))


def test_projection_params_and_skips_not_projected():
    from diffusers import UNet2DModel

    unet = UNet2DModel(**CIFAR10)
    n_base = sum(p.numel() for p in unet.parameters())
    model = models.wrap(unet, projection=True)
    n_proj = sum(p.numel() for p in model.projections.parameters())
    assert n_proj == 491_520  # [128,256,256,256 | 256 | 256,256,256,128] squared (paper-spec 1.4)
    assert 0.013 < n_proj / n_base < 0.015
    assert sum(p.numel() for p in models.wrap(UNet2DModel(**CIFAR10), projection=False).parameters()) == n_base
    # the down blocks' residual outputs (skips) leave the hook untouched
    seen = {}
    blk = unet.down_blocks[0]
    blk.register_forward_hook(lambda m, a, out: seen.update(res=out[1]))  # returns None: output unchanged
    with torch.no_grad():
        model.projections.down[0].weight.zero_()
        model(torch.randn(1, 3, 32, 32), torch.tensor([1]))
    assert all(r.abs().sum() > 0 for r in seen["res"])


def test_model_folder_roundtrip(tmp_path, tiny_ddpm):
    """A folder with projections: a pipeline folder whose unet/ is a DemeUNet (the stock class refuses it); without
    projections: a stock pipeline folder. Both load back as the model that was saved."""
    from diffusers import DiffusionPipeline, UNet2DModel

    model = models.load_base(str(tiny_ddpm), projection=True)
    with torch.no_grad():
        model.projections.up[0].weight.add_(0.1)
    models.save_model_folder(tmp_path / "m", model, {"recipe": "t", "base_hash": models.unet_hash(model.unet)},
                             base_folder=tiny_ddpm)
    assert json.loads((tmp_path / "m" / "unet" / "config.json").read_text())["_class_name"] == "DemeUNet"
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["unet"] == ["deme_unet", "DemeUNet"]
    with pytest.raises(OSError, match="diffusion_pytorch_model"):
        UNet2DModel.from_pretrained(tmp_path / "m" / "unet")
    back = models.load_model_folder(tmp_path / "m")
    assert models.state_hash(back.state_dict()) == models.state_hash(model.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 900])
    with torch.no_grad():
        assert torch.equal(back(x, t).sample, model(x, t).sample)
    # a folder without projections is a stock pipeline folder and loads as a plain model
    plain = models.load_base(str(tiny_ddpm))
    models.save_model_folder(tmp_path / "p", plain, {"recipe": "t"}, base_folder=tiny_ddpm)
    assert json.loads((tmp_path / "p" / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DModel"]
    assert models.load_model_folder(tmp_path / "p").projections is None
    stock = DiffusionPipeline.from_pretrained(tmp_path / "p").unet
    assert all(torch.equal(a, b) for a, b in zip(stock.state_dict().values(), plain.unet.state_dict().values()))


def test_state_hash_changes_with_weights(tiny_ddpm):
    a = models.load_base(str(tiny_ddpm)).unet
    h = models.unet_hash(a)
    assert h == models.unet_hash(models.load_base(str(tiny_ddpm)).unet)
    with torch.no_grad():
        next(a.parameters()).view(-1)[0] += 1e-3
    assert models.unet_hash(a) != h


def test_missing_model_folder_is_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        models.resolve_pretrained(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no diffusers UNet"):
        models.unet_folder(tmp_path / "empty")
