"""Tiny VAE decoder: latent -> 512-channel mid block with single-head spatial attention (head_dim 512) -> RGB."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..nn import Attention
from .common import component_seed, seeded_init


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(32, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(32, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class SpatialAttention(nn.Module):
    """Like the SD VAE mid-block: one head over all spatial positions, head_dim = channels (512)."""

    def __init__(self, channels: int, backend=None, **placement):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.attn = Attention(1, channels, backend=backend, role="self", **placement)
        self.out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        q, k, v = (t[:, None] for t in self.qkv(tokens).chunk(3, dim=-1))  # (B, 1, H*W, C) each
        out = self.out(self.attn(q, k, v)[:, 0])
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Upsample(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, cin)
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(F.silu(self.norm(x)), scale_factor=2.0, mode="nearest"))


class TinyVAEDecoder(nn.Module):
    """(B, 4, 16, 16) latent -> (B, 3, 64, 64) image in [-1, 1]."""

    def __init__(self, latent_channels: int = 4, mid_channels: int = 512, seed: int = 0, seed_name: str = "vae",
                 backend=None, device="cpu", dtype=torch.float32):
        super().__init__()
        self.conv_in = nn.Conv2d(latent_channels, mid_channels, 3, padding=1)
        self.mid_res = ResBlock(mid_channels)
        self.mid_attn = SpatialAttention(mid_channels, backend=backend, device=device, dtype=dtype)
        self.up1 = Upsample(mid_channels, 128)
        self.up2 = Upsample(128, 64)
        self.norm_out = nn.GroupNorm(32, 64)
        self.conv_out = nn.Conv2d(64, 3, 3, padding=1)
        seeded_init(self, component_seed(seed, seed_name))  # on the CPU: the same weights on every device
        self.to(device=device, dtype=dtype)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        x = self.mid_attn(self.mid_res(self.conv_in(latent)))
        x = self.up2(self.up1(x))
        return torch.tanh(self.conv_out(F.silu(self.norm_out(x))))
