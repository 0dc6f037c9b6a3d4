"""Plain PyTorch references for the resamplers, written from the spec (§1.2 step 5, §1.4, §2.3,
§4.1–4.2) with the original module trees, so their state dicts carry the original key names."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------
# Qwen-VL Resampler
# --------------------------------------------------------------------------------------------


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """MAE's recipe as Qwen-VL has it: meshgrid(w, h), first half from grid[0] (the column)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = _sincos_1d(embed_dim // 2, grid[0])
    emb_w = _sincos_1d(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float32) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_abs_pos(abs_pos: torch.Tensor, tgt_size: int) -> torch.Tensor:
    src = int(math.sqrt(abs_pos.size(0)))
    tgt = int(math.sqrt(tgt_size))
    if src == tgt:
        return abs_pos
    dtype = abs_pos.dtype
    return (
        F.interpolate(
            abs_pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2),
            size=(tgt, tgt),
            mode="bicubic",
            align_corners=False,
        )
        .permute(0, 2, 3, 1)
        .flatten(0, 2)
        .to(dtype=dtype)
    )


class Resampler(nn.Module):
    def __init__(self, grid_size, embed_dim, num_heads, kv_dim=None, eps=1e-5):
        super().__init__()
        self.num_queries = grid_size**2
        self.pos_embed = nn.Parameter(
            torch.from_numpy(get_2d_sincos_pos_embed(embed_dim, grid_size)).float()
        ).requires_grad_(False)
        self.query = nn.Parameter(torch.zeros(self.num_queries, embed_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        if kv_dim is not None and kv_dim != embed_dim:
            self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        else:
            self.kv_proj = nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=eps)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=eps)

    def forward(self, x):
        pos_embed = get_abs_pos(self.pos_embed, x.size(1))
        x = self.kv_proj(x)
        x = self.ln_kv(x).permute(1, 0, 2)
        n = x.shape[1]
        q = self.ln_q(self.query)
        out = self.attn(
            q.unsqueeze(1).repeat(1, n, 1) + self.pos_embed.unsqueeze(1),
            x + pos_embed.unsqueeze(1),
            x,
        )[0]
        return out.permute(1, 0, 2)
