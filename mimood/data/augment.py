"""Training-time augmentation of slice batches [B, 1, H, W] in [0, 1] with background 0.

The paper trains the token models (MVTM, ATD, AR) with random flips and rotations only, and the VQ-VAE
with "broader-than-usual" intensity augmentation. Both functions work on the whole batch at once with
batched torch ops (one affine_grid/grid_sample, one grouped convolution), on the batch's own device, so
augmentation costs little next to a training step; every random number comes from `generator`, so a
seeded run is reproducible.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(generator: torch.Generator, n: int, low: float, high: float, device) -> torch.Tensor:
    """[n] uniform samples from `generator` (on the generator's device), moved to `device`."""
    u = torch.rand(n, generator=generator, device=generator.device)
    return (low + (high - low) * u).to(device)


def spatial_augment(x: torch.Tensor, generator: torch.Generator, max_rotation_deg: float = 10.0,
                    flip_p: float = 0.5) -> torch.Tensor:
    """Random left-right flip (last axis) and in-plane rotation by up to +-max_rotation_deg.

    Bilinear resampling with zero padding: the background stays 0 and values stay in [0, 1].
    """
    B = x.shape[0]
    flip = _uniform(generator, B, 0.0, 1.0, x.device) < flip_p              # [B]
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if max_rotation_deg <= 0:
        return x
    angle = _uniform(generator, B, -max_rotation_deg, max_rotation_deg, x.device) * (math.pi / 180)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)  # [B, 2, 3]
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)                   # [B, H, W, 2]
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def intensity_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Broad intensity augmentation for the VQ-VAE, inside the brain (x > 0) only.

    Per sample: gamma (0.6-1.6, log-uniform), contrast (x0.8-1.2 about the brain mean) and brightness
    (+-0.1), a smooth multiplicative bias field (+-~20%), Gaussian blur (sigma 0-1 px) and Gaussian
    noise (sigma 0-0.04). Output clipped to [0, 1], background reset to 0.
    """
    B, _, H, W = x.shape
    dev = x.device
    brain = x > 0                                                                      # [B, 1, H, W]
    n_brain = brain.sum(dim=(1, 2, 3)).clamp(min=1)

    gamma = torch.exp(_uniform(generator, B, math.log(0.6), math.log(1.6), dev))
    y = x.clamp(min=0) ** gamma[:, None, None, None]

    mean = (y * brain).sum(dim=(1, 2, 3)) / n_brain                                    # [B]
    contrast = _uniform(generator, B, 0.8, 1.2, dev)[:, None, None, None]
    brightness = _uniform(generator, B, -0.1, 0.1, dev)[:, None, None, None]
    y = (y - mean[:, None, None, None]) * contrast + mean[:, None, None, None] + brightness

    coarse = torch.randn(B, 1, 4, 4, generator=generator, device=generator.device).to(dev) * 0.1
    bias = F.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=True).exp()  # [B, 1, H, W]
    y = y * bias

    sigma = _uniform(generator, B, 1e-3, 1.0, dev)                                     # [B] pixels
    r = torch.arange(-3, 4, device=dev, dtype=x.dtype)                                 # 7-tap kernel
    k = torch.exp(-0.5 * (r[None, :] / sigma[:, None]) ** 2)
    k = k / k.sum(dim=1, keepdim=True)                                                 # [B, 7]
    y = y.reshape(1, B, H, W)                                # one grouped conv blurs each sample with its own sigma
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), k[:, None, :, None], groups=B)
    y = F.conv2d(F.pad(y, (3, 3, 0, 0), mode="replicate"), k[:, None, None, :], groups=B)
    y = y.reshape(B, 1, H, W)

    noise_sigma = _uniform(generator, B, 0.0, 0.04, dev)[:, None, None, None]
    noise = torch.randn(x.shape, generator=generator, device=generator.device).to(dev)
    y = y + noise * noise_sigma
    return torch.where(brain, y.clamp(0.0, 1.0), torch.zeros_like(y))
