"""Test-only networks: a tiny random conv net standing in for the FID Inception, and its FeatureExtractor."""
from __future__ import annotations

from deme_cli.engine.features import FeatureExtractor


def tiny_feature_net(dim: int = 16, seed: int = 0):
    """A small random conv net (TorchScript-able) for tests: (x - 128) / 128 images -> dim features."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, dim, 3, 2, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net.eval()


def tiny_extractor(dim: int = 16, seed: int = 0) -> FeatureExtractor:
    """A FeatureExtractor around `tiny_feature_net` (tests: pass it to `run_eval(extractor=...)`)."""
    import torch

    net = tiny_feature_net(dim, seed)

    def fn(x):
        with torch.no_grad():
            return net((x.cpu() - 128.0) / 128.0)

    return FeatureExtractor(fn, f"tiny-random-{dim}", {"name": f"tiny random conv net ({dim} features, seed {seed})"})
