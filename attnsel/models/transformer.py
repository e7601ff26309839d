"""Tiny DiT: patchified latent tokens, blocks with adaLN timestep conditioning, self- and cross-attention."""

from __future__ import annotations

import torch
from torch import nn

from .. import distributed
from .common import CrossAttention, SelfAttention, component_seed, seeded_init, timestep_embedding


class DiTBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int, backend=None, **placement):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, heads, head_dim, backend=backend, **placement)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, context_dim, heads, head_dim, backend=backend, **placement)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        # shift/scale/gate for the self-attention and MLP branches, from the timestep embedding (adaLN).
        self.modulation = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(temb)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.self_attn(self.norm1(x) * (1 + scale1) + shift1)
        x = x + self.cross_attn(self.norm2(x), context)
        return x + gate2 * self.mlp(self.norm3(x) * (1 + scale2) + shift2)


class TinyDiT(nn.Module):
    """Predicts the flow velocity of a (B, C, H, W) latent at timestep t (0..1000), conditioned on text."""

    def __init__(self, latent_channels: int = 4, latent_size: int = 16, patch: int = 2, dim: int = 128,
                 heads: int = 2, head_dim: int = 64, depth: int = 4, context_dim: int = 128, seed: int = 0,
                 seed_name: str = "transformer", backend=None, device="cpu", dtype=torch.float32):
        super().__init__()
        self.latent_channels, self.latent_size, self.patch, self.dim = latent_channels, latent_size, patch, dim
        tokens = (latent_size // patch) ** 2
        self.patch_embed = nn.Linear(latent_channels * patch * patch, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(
            DiTBlock(dim, context_dim, heads, head_dim, backend=backend, device=device, dtype=dtype)
            for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, latent_channels * patch * patch)
        seeded_init(self, component_seed(seed, seed_name))
        with torch.no_grad():
            self.proj_out.weight.mul_(0.1)  # small initial velocity keeps the sampler's latent in range
        self.to(device=device, dtype=dtype)

    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.patch
        x = x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def _unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b = x.shape[0]
        p, c = self.patch, self.latent_channels
        x = x.view(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, h, w)

    def forward(self, latent: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h, w = latent.shape[-2:]
        x = self.patch_embed(self._patchify(latent)) + self.pos_embed
        temb = self.time_mlp(timestep_embedding(t.to(x.device), self.dim).to(x.dtype))
        # Inside attnsel.distributed.sequence_parallel(...): each rank runs the blocks on its shard of the tokens
        # (norms, MLP and adaLN are per token; self-attention is sequence-parallel, cross-attention local).
        sp = distributed.active()
        if sp is not None:
            x = sp.scatter(x, dim=1)
        for block in self.blocks:
            x = block(x, context, temb)
        if sp is not None:
            x = sp.gather(x, dim=1)
        return self._unpatchify(self.proj_out(self.norm_out(x)), h, w)
