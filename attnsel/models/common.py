"""Building blocks shared by the tiny models: attention wrappers around `attnsel.nn.Attention` and seeded init."""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from ..nn import Attention


def _split_heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    # (B, S, H*D) -> (B, H, S, D), the layout attnsel.nn.Attention takes.
    b, s, _ = x.shape
    return x.view(b, s, heads, head_dim).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


class SelfAttention(nn.Module):
    """Multi-head self-attention; the kernel (and so the backend) is an `attnsel.nn.Attention` picked at build time.

    `placement` (device=, dtype=) is where the layer will run: the backend is selected for it.
    """

    def __init__(self, dim: int, heads: int, head_dim: int = 64, backend=None, **placement):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.attn = Attention(heads, head_dim, backend=backend, role="self", **placement)
        self.out = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (_split_heads(t, self.heads, self.head_dim) for t in (q, k, v))
        return self.out(_merge_heads(self.attn(q, k, v)))


class CrossAttention(nn.Module):
    """Queries from the latent tokens, keys/values from the text embeddings (role "cross": under sequence
    parallelism the text stays whole on every rank while the latent tokens are split)."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int = 64, backend=None, **placement):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q = nn.Linear(dim, heads * head_dim)
        self.kv = nn.Linear(context_dim, 2 * heads * head_dim)
        self.attn = Attention(heads, head_dim, backend=backend, role="cross", **placement)
        self.out = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = _split_heads(self.q(x), self.heads, self.head_dim)
        k, v = (_split_heads(t, self.heads, self.head_dim) for t in self.kv(context).chunk(2, dim=-1))
        return self.out(_merge_heads(self.attn(q, k, v)))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps in [0, 1000]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def component_seed(seed: int, name: str) -> int:
    """A stable per-component seed, so each model's weights do not depend on what was built before it."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@torch.no_grad()
def seeded_init(module: nn.Module, seed: int) -> nn.Module:
    """Deterministic init from a private generator: the global RNG is neither used nor disturbed.

    Parameters are visited in `named_parameters` order (fixed by the module's structure), so the same seed gives
    the same weights on every run and machine.
    """
    gen = torch.Generator().manual_seed(seed)
    owners = {name: mod for name, mod in module.named_modules()}
    for name, p in module.named_parameters():
        owner = owners[name.rpartition(".")[0]]
        leaf = name.rpartition(".")[2]
        if isinstance(owner, (nn.LayerNorm, nn.GroupNorm)):
            p.fill_(1.0 if leaf == "weight" else 0.0)
        elif leaf == "bias":
            p.zero_()
        elif isinstance(owner, nn.Embedding):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        else:
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
    return module
