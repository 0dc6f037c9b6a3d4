"""Qwen-VL's visual encoder (`VisionTransformerWithAttnPool`, SEED-Story `src/models/qwen_visual.py`)
as plain PyTorch, written from spec §1.2: the same module tree, so its `state_dict()` has the 594
keys of `qwen_vit_G.pt`. Position tables are resized at run time with `F.interpolate` bicubic, as the
original does (`get_abs_pos`); the attention pool is the Qwen `Resampler` of resamplers.py."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from convert.torch_ref.resamplers import Resampler, get_abs_pos  # the one torch Qwen Resampler


class VisualAttention(nn.Module):
    """Fused in_proj laid out per head: channel h·3d + j·d + i, j ∈ {q, k, v}."""

    def __init__(self, embed_dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.norm_factor = math.sqrt(self.head_dim)
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x):  # x (L, N, C)
        sq, b, _ = x.shape
        mixed = self.in_proj(x).view(sq, b, self.num_heads, 3 * self.head_dim)
        q, k, v = mixed.split(self.head_dim, dim=-1)
        q = q.reshape(sq, b * self.num_heads, self.head_dim).transpose(0, 1)
        k = k.reshape(sq, b * self.num_heads, self.head_dim).transpose(0, 1)
        v = v.reshape(sq, b * self.num_heads, self.head_dim).transpose(0, 1)
        probs = torch.bmm(q / self.norm_factor, k.transpose(-2, -1)).softmax(dim=-1)
        ctx = torch.bmm(probs, v).view(b, self.num_heads, sq, self.head_dim)
        ctx = ctx.permute(2, 0, 1, 3).reshape(sq, b, self.num_heads * self.head_dim)
        return self.out_proj(ctx)


class VisualAttentionBlock(nn.Module):
    def __init__(self, d_model, n_head, mlp_width, norm_layer):
        super().__init__()
        self.ln_1 = norm_layer(d_model)
        self.ln_2 = norm_layer(d_model)
        self.attn = VisualAttention(d_model, n_head)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, mlp_width)),
            ("gelu", nn.GELU()),
            ("c_proj", nn.Linear(mlp_width, d_model)),
        ]))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TransformerBlock(nn.Module):
    def __init__(self, width, layers, heads, mlp_width, norm_layer):
        super().__init__()
        self.resblocks = nn.ModuleList(
            [VisualAttentionBlock(width, heads, mlp_width, norm_layer) for _ in range(layers)])

    def forward(self, x):
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    """(B, 3, H, W) normalised → (B, n_queries, output_dim)."""

    def __init__(self, image_size=448, patch_size=14, width=1664, layers=48, heads=16, mlp_width=8192,
                 output_dim=4096, n_queries=256, pos_grid=16, eps=1e-6, pool_heads=None):
        super().__init__()
        norm_layer = lambda d: nn.LayerNorm(d, eps=eps)  # noqa: E731 - Qwen-VL's partial(LayerNorm, eps=1e-6)
        self.grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(pos_grid ** 2, width))
        self.ln_pre = norm_layer(width)
        self.transformer = TransformerBlock(width, layers, heads, mlp_width, norm_layer)
        # Qwen: output_dim // 128 heads; tiny configs choose their own.
        self.attn_pool = Resampler(int(math.sqrt(n_queries)), output_dim, pool_heads or output_dim // 128,
                                   kv_dim=width, eps=eps)
        self.ln_post = norm_layer(output_dim)
        self.proj = nn.Parameter(output_dim ** -0.5 * torch.randn(output_dim, output_dim))

    def forward(self, x):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = x + get_abs_pos(self.positional_embedding, x.size(1))
        x = self.ln_pre(x).permute(1, 0, 2)
        x = self.transformer(x).permute(1, 0, 2)
        x = self.attn_pool(x)
        x = self.ln_post(x)
        return x @ self.proj


def from_config(cfg) -> VisionTransformer:
    """The reference for a `ViTConfig` (float32, random weights; load a state dict to compare)."""
    model = VisionTransformer(cfg.image_size, cfg.patch_size, cfg.width, cfg.layers, cfg.heads, cfg.mlp_width,
                              cfg.output_dim, cfg.n_queries, cfg.pos_grid, cfg.ln_eps, cfg.pool_heads)
    return model.eval()


def load_state_dict(model: VisionTransformer, state_dict) -> VisionTransformer:
    """Load numpy/ml_dtypes arrays (any float dtype) as float32, strictly."""
    tensors = {k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state_dict.items()}
    model.load_state_dict(tensors, strict=True)
    return model
