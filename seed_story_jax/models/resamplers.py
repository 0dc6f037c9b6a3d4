"""The two resampler families: Qwen-VL's 2-D Resampler (agent input/output, ViT attention pool) and
SEED-X's ResamplerXLV2 (ViT features → SDXL conditioning).

Position tables are frozen: they live in the params tree (so checkpoints and exports carry them)
as `FrozenParam`, a subclass of `nnx.Param`. Training takes its trainable set with
`TRAINABLE = nnx.All(nnx.Param, nnx.Not(FrozenParam))`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seed_story_jax.config import QwenResamplerConfig, ResamplerXLV2Config
from seed_story_jax.nn.attention import attention
from seed_story_jax.nn.params import dtype_of, linear, param
from seed_story_jax.nn.posemb import sincos_2d, torch_bicubic_resize


class FrozenParam(nnx.Param):
    """A parameter that checkpoints carry but training never updates (sin-cos position tables)."""


TRAINABLE = nnx.All(nnx.Param, nnx.Not(FrozenParam))


def layer_norm(rngs: nnx.Rngs, dim: int, eps: float, param_dtype) -> nnx.LayerNorm:
    """LayerNorm computed in fp32 (exact two-pass variance, as torch), scale/bias named `norm`."""
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        dtype=jnp.float32,
        param_dtype=dtype_of(param_dtype),
        use_fast_variance=False,
        rngs=rngs,
        scale_metadata={"out_sharding": ("norm",)},
        bias_metadata={"out_sharding": ("norm",)},
    )


def _grid_of(tokens: int, what: str) -> int:
    g = int(round(math.sqrt(tokens)))
    if g * g != tokens:
        raise ValueError(f"{what} = {tokens} is not a square grid")
    return g


def key_pos_table(pos_embed, input_tokens: int) -> np.ndarray:
    """The key-side table: the module's own grid table bicubic-resized (torch semantics, float32)
    to the input token grid — what Qwen's `get_abs_pos` computes on every call."""
    return torch_bicubic_resize(np.asarray(pos_embed, np.float32), _grid_of(input_tokens, "input_tokens"))


def _const(table: np.ndarray):
    return lambda key, shape, dtype: jnp.asarray(table, dtype).reshape(shape)


# --------------------------------------------------------------------------------------------
# Qwen-VL 2-D Resampler (spec §1.2 step 5, §2.3)
# --------------------------------------------------------------------------------------------


class QwenResampler(nnx.Module):
    """grid² learned queries cross-attend to `input_tokens` tokens (nn.MultiheadAttention semantics).

    kv = ln_kv(kv_proj(x)); q = ln_q(query) + pos_embed; k = kv + resized(pos_embed); v = kv.
    `kv_proj` exists only when kv_dim != embed_dim (as in the original, Identity otherwise).
    """

    def __init__(
        self,
        grid_size: int,
        embed_dim: int,
        num_heads: int,
        kv_dim: int,
        input_tokens: int,
        eps: float,
        *,
        param_dtype="float32",
        dtype="float32",
        rngs: nnx.Rngs,
    ):
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}")
        self.grid_size = grid_size
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.input_tokens = input_tokens
        self.dtype = dtype_of(dtype)
        n = grid_size * grid_size
        lin = dict(param_dtype=param_dtype, dtype=dtype)

        self.query = param(rngs, nnx.initializers.truncated_normal(0.02), (n, embed_dim), ("queries", "embed"), param_dtype)
        table = sincos_2d(embed_dim, grid_size)
        self.pos_embed = FrozenParam(jnp.asarray(table, dtype_of(param_dtype)), out_sharding=("queries", "embed"))
        keys = key_pos_table(table, input_tokens)
        self.key_pos_embed = FrozenParam(jnp.asarray(keys, dtype_of(param_dtype)), out_sharding=("length", "embed"))
        self.kv_proj = linear(rngs, kv_dim, embed_dim, ("embed", "embed"), **lin) if kv_dim != embed_dim else None
        self.ln_q = layer_norm(rngs, embed_dim, eps, param_dtype)
        self.ln_kv = layer_norm(rngs, embed_dim, eps, param_dtype)
        # nn.MultiheadAttention's in_proj [q; k; v] split into three projections, plus out_proj.
        self.q_proj = linear(rngs, embed_dim, embed_dim, ("embed", "heads"), use_bias=True, **lin)
        self.k_proj = linear(rngs, embed_dim, embed_dim, ("embed", "heads"), use_bias=True, **lin)
        self.v_proj = linear(rngs, embed_dim, embed_dim, ("embed", "heads"), use_bias=True, **lin)
        self.out_proj = linear(rngs, embed_dim, embed_dim, ("heads", "embed"), use_bias=True, **lin)

    @classmethod
    def from_config(cls, cfg: QwenResamplerConfig, rngs: nnx.Rngs) -> "QwenResampler":
        return cls(cfg.grid_size, cfg.embed_dim, cfg.num_heads, cfg.kv_dim, cfg.input_tokens, cfg.eps,
                   param_dtype=cfg.param_dtype, dtype=cfg.dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, input_tokens, kv_dim) → (B, grid², embed_dim)."""
        b, n, _ = x.shape
        if n != self.input_tokens:
            raise ValueError(f"QwenResampler built for {self.input_tokens} input tokens, got {n} "
                             f"(its key position table is resized to that grid)")
        dt = self.dtype
        kv = x.astype(dt)
        if self.kv_proj is not None:
            kv = self.kv_proj(kv)
        kv = self.ln_kv(kv)  # fp32
        q_in = self.ln_q(self.query[...]) + self.pos_embed[...].astype(jnp.float32)
        k_in = kv + self.key_pos_embed[...].astype(jnp.float32)
        h, d = self.num_heads, self.embed_dim // self.num_heads
        q = self.q_proj(q_in.astype(dt)).reshape(1, -1, h, d)
        q = jnp.broadcast_to(q, (b,) + q.shape[1:])
        k = self.k_proj(k_in.astype(dt)).reshape(b, n, h, d)
        v = self.v_proj(kv.astype(dt)).reshape(b, n, h, d)
        out = attention(q, k, v, scale=1.0 / math.sqrt(d))
        return self.out_proj(out.reshape(b, -1, self.embed_dim))
