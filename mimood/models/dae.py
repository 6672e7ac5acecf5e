"""The denoising-autoencoder baseline (Kascenas, Pugeault & O'Neil, "Denoising autoencoders for unsupervised
anomaly detection in brain MRI", MIDL 2022), implemented here from the paper's description:

    train:  x_noisy = x + brain * upsample(N(0, noise_std) at noise_res x noise_res)   ("coarse" noise)
            minimise |DAE(x_noisy) - x|^2  on healthy slices
    test:   map = |x - DAE(x)|, smoothed and masked exactly like MIM-OOD's restoration residual

The network is MONAI's `UNet` (a well-kept implementation; residual units, strided convolutions), not a
hand-written one. Pure `nn.Module`s and tensor functions, no I/O.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import UNet
from torch import nn

from mimood.config import DAEConfig


class DAE(nn.Module):
    """x [B, 1, H, W] in [0, 1] -> denoised [B, 1, H, W] (background forced to 0)."""

    def __init__(self, cfg: DAEConfig):
        super().__init__()
        self.cfg = cfg
        self.unet = UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(cfg.channels),
                         strides=(2,) * (len(cfg.channels) - 1), num_res_units=cfg.num_res_units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x) * (x > 0).to(x.dtype)


def coarse_noise(x: torch.Tensor, cfg: DAEConfig, generator: torch.Generator) -> torch.Tensor:
    """x [B, 1, H, W] plus Gaussian noise drawn at cfg.noise_res x cfg.noise_res and upsampled bilinearly,
    inside the brain (x > 0) only."""
    B, _, H, W = x.shape
    n = torch.randn(B, 1, cfg.noise_res, cfg.noise_res, generator=generator) * cfg.noise_std
    n = F.interpolate(n.to(x.device, x.dtype), size=(H, W), mode="bilinear", align_corners=False)
    return x + n * (x > 0).to(x.dtype)
