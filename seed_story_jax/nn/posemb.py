"""Position tables the original builds at run time, computed once here with its exact semantics.

* `sincos_2d(dim, grid)`: MAE's 2-D sin-cos table as Qwen-VL builds it (float32 numpy throughout):
  first half of the channels from the column (w) coordinate, second half from the row (h).
* `torch_bicubic_resize(table, out_grid)`: `torch.nn.functional.interpolate(mode="bicubic",
  align_corners=False)` on a (G*G, C) table viewed as (1, C, G, G): cubic convolution with A = -0.75,
  source index `(dst + 0.5) * in / out - 0.5`, taps clamped at the borders, no antialiasing even
  when shrinking. `jax.image.resize` is a different function (Keys a = -0.5, antialiased).
"""

from __future__ import annotations

import math

import numpy as np

_A = -0.75


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional positions t (torch's order)."""
    def near(x):  # |x| <= 1
        return ((_A + 2) * x - (_A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix M with out = M @ in along one axis, torch bicubic semantics."""
    scale = in_size / out_size
    dst = np.arange(out_size, dtype=np.float64)
    src = (dst + 0.5) * scale - 0.5
    base = np.floor(src)
    t = src - base
    w = _cubic_weights(t)
    m = np.zeros((out_size, in_size), np.float64)
    for tap in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)
        np.add.at(m, (np.arange(out_size), idx), w[:, tap])
    return m


def torch_bicubic_resize(table: np.ndarray, out_grid: int) -> np.ndarray:
    """Resize a (G*G, C) row-major grid table to (out_grid*out_grid, C), returned as float32."""
    table = np.asarray(table, np.float32)
    n, c = table.shape
    g = int(round(math.sqrt(n)))
    if g * g != n:
        raise ValueError(f"position table has {n} rows, not a square grid")
    if g == out_grid:
        return table.copy()
    m = _resize_matrix(g, out_grid)
    grid = table.astype(np.float64).reshape(g, g, c)
    out = np.einsum("oh,hwc->owc", m, grid)
    out = np.einsum("pw,owc->opc", m, out)
    return out.reshape(out_grid * out_grid, c).astype(np.float32)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    # float32 throughout, the same numpy operations in the same order as Qwen-VL's
    # get_1d_sincos_pos_embed_from_grid, so a freshly built table equals the original bit for bit.
    if dim % 2:
        raise ValueError(f"sin-cos dim must be even, got {dim}")
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid: int) -> np.ndarray:
    """(grid*grid, dim) float32; row-major over (row i, column j)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos dim must be a multiple of 4, got {dim}")
    gh = np.arange(grid, dtype=np.float32)
    gw = np.arange(grid, dtype=np.float32)
    mesh = np.meshgrid(gw, gh)  # w goes first, as in MAE
    emb_a = _sincos_1d(dim // 2, mesh[0])  # column coordinate
    emb_b = _sincos_1d(dim // 2, mesh[1])  # row coordinate
    return np.concatenate([emb_a, emb_b], axis=1).astype(np.float32)
