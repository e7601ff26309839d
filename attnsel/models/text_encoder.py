"""Tiny text encoder: UTF-8 bytes of the prompt -> token embeddings -> pre-norm transformer blocks."""

from __future__ import annotations

import torch
from torch import nn

from .common import SelfAttention, component_seed, seeded_init

BOS = 256  # token ids 0..255 are the prompt's bytes; 256 starts every sequence so an empty prompt still has a token


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, backend=None, **placement):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, head_dim, backend=backend, **placement)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyTextEncoder(nn.Module):
    """Encodes a prompt to (1, S, dim) embeddings; self-attention with head_dim 64."""

    def __init__(self, dim: int = 128, heads: int = 2, head_dim: int = 64, depth: int = 2, max_tokens: int = 64,
                 seed: int = 0, seed_name: str = "text_encoder", backend=None, device="cpu", dtype=torch.float32):
        super().__init__()
        self.dim, self.max_tokens = dim, max_tokens
        self.token_embedding = nn.Embedding(257, dim)
        self.position_embedding = nn.Embedding(max_tokens, dim)
        self.blocks = nn.ModuleList(
            EncoderBlock(dim, heads, head_dim, backend=backend, device=device, dtype=dtype) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        seeded_init(self, component_seed(seed, seed_name))  # on the CPU: the same weights on every device
        self.to(device=device, dtype=dtype)

    def tokenize(self, prompt: str) -> torch.Tensor:
        ids = [BOS] + list(prompt.encode("utf-8"))[: self.max_tokens - 1]
        return torch.tensor([ids], dtype=torch.long)

    def forward(self, prompt: str | torch.Tensor) -> torch.Tensor:
        ids = (self.tokenize(prompt) if isinstance(prompt, str) else prompt).to(self.token_embedding.weight.device)
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.token_embedding(ids) + self.position_embedding(positions)[None]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
