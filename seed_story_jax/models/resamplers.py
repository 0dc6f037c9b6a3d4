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
from seed_story_jax.nn.params import dtype_of, linear, mha_in_proj_init, param, torch_default_init
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
        # The original's init (a model trained from scratch starts as it would): _init_weights puts
        # trunc_normal(0.02) on every nn.Linear (kv_proj, out_proj); MHA's in_proj is xavier_uniform.
        inp = dict(use_bias=True, kernel_init=mha_in_proj_init(embed_dim), **lin)
        self.q_proj = linear(rngs, embed_dim, embed_dim, ("embed", "heads"), **inp)
        self.k_proj = linear(rngs, embed_dim, embed_dim, ("embed", "heads"), **inp)
        self.v_proj = linear(rngs, embed_dim, embed_dim, ("embed", "heads"), **inp)
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


# --------------------------------------------------------------------------------------------
# ResamplerXLV2 (spec §4.1–4.2)
# --------------------------------------------------------------------------------------------


def l2_normalize_tokens(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """torch `F.normalize(x)` on (B, N, C): p=2 over dim=1, the TOKEN axis (not channels)."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
    return x / jnp.maximum(norm, eps)


class PerceiverAttention(nnx.Module):
    """Latents attend to [x; latents]; q and k are each scaled by dim_head^-1/4 before QKᵀ."""

    def __init__(self, dim: int, dim_head: int, heads: int, eps: float, *, param_dtype, dtype, rngs):
        inner = dim_head * heads
        lin = dict(param_dtype=param_dtype, dtype=dtype, kernel_init=torch_default_init)  # nn.Linear default
        self.heads, self.dim_head, self.dtype = heads, dim_head, dtype_of(dtype)
        self.norm1 = layer_norm(rngs, dim, eps, param_dtype)
        self.norm2 = layer_norm(rngs, dim, eps, param_dtype)
        self.to_q = linear(rngs, dim, inner, ("embed", "heads"), **lin)
        # torch's to_kv (dim → 2·inner, chunked k | v) kept as two projections.
        self.to_k = linear(rngs, dim, inner, ("embed", "heads"), **lin)
        self.to_v = linear(rngs, dim, inner, ("embed", "heads"), **lin)
        self.to_out = linear(rngs, inner, dim, ("heads", "embed"), **lin)

    def __call__(self, x: jax.Array, latents: jax.Array) -> jax.Array:
        dt = self.dtype
        xn = self.norm1(x).astype(dt)
        ln = self.norm2(latents).astype(dt)
        b, n, _ = ln.shape
        kv_in = jnp.concatenate([xn, ln], axis=1)
        h, d = self.heads, self.dim_head
        s = 1.0 / math.sqrt(math.sqrt(d))
        q = (self.to_q(ln) * s).reshape(b, n, h, d)
        k = (self.to_k(kv_in) * s).reshape(b, -1, h, d)
        v = self.to_v(kv_in).reshape(b, -1, h, d)
        out = attention(q, k, v, scale=1.0)
        return self.to_out(out.reshape(b, n, h * d))


class FeedForward(nnx.Module):
    """LayerNorm → Linear (no bias) → exact GELU → Linear (no bias)."""

    def __init__(self, dim: int, mult: int, eps: float, *, param_dtype, dtype, rngs):
        lin = dict(param_dtype=param_dtype, dtype=dtype, kernel_init=torch_default_init)
        self.dtype = dtype_of(dtype)
        self.norm = layer_norm(rngs, dim, eps, param_dtype)
        self.fc1 = linear(rngs, dim, dim * mult, ("embed", "mlp"), **lin)
        self.fc2 = linear(rngs, dim * mult, dim, ("mlp", "embed"), **lin)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(self.norm(x).astype(self.dtype)), approximate=False))


class AttentionPool(nnx.Module):
    """CLIP-style AttentionPool2d over a token sequence: prepend the mean token, add the learned
    positional embedding, multi-head attention (separate q/k/v with bias, c_proj as out-projection,
    scale 1/sqrt(dim/heads)); only token 0's output is returned, so only its query is computed."""

    def __init__(self, seq_len: int, dim: int, heads: int, out_dim: int, *, param_dtype, dtype, rngs):
        lin = dict(param_dtype=param_dtype, dtype=dtype, use_bias=True, kernel_init=torch_default_init)
        self.heads, self.dtype = heads, dtype_of(dtype)
        self.positional_embedding = param(
            rngs, nnx.initializers.normal(dim**-0.5), (seq_len + 1, dim), ("queries", "embed"), param_dtype)
        self.q_proj = linear(rngs, dim, dim, ("embed", "heads"), **lin)
        self.k_proj = linear(rngs, dim, dim, ("embed", "heads"), **lin)
        self.v_proj = linear(rngs, dim, dim, ("embed", "heads"), **lin)
        self.c_proj = linear(rngs, dim, out_dim, ("heads", "embed"), **lin)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, c = x.shape
        x = jnp.concatenate([jnp.mean(x, axis=1, keepdims=True), x], axis=1)
        x = (x + self.positional_embedding[...].astype(x.dtype)).astype(self.dtype)
        h, d = self.heads, c // self.heads
        q = self.q_proj(x[:, :1]).reshape(b, 1, h, d)
        k = self.k_proj(x).reshape(b, n + 1, h, d)
        v = self.v_proj(x).reshape(b, n + 1, h, d)
        out = attention(q, k, v, scale=1.0 / math.sqrt(d))
        return self.c_proj(out.reshape(b, c))


class ResamplerXLV2(nnx.Module):
    """(B, N, embedding_dim) ViT-like features → (prompt_embeds (B, Q, out1+out2), pooled (B, out2))."""

    def __init__(self, cfg: ResamplerXLV2Config, *, rngs: nnx.Rngs):
        dim, pd, dt = cfg.dim, cfg.param_dtype, cfg.dtype
        kw = dict(param_dtype=pd, dtype=dt, rngs=rngs)
        self.cfg = cfg
        self.dtype = dtype_of(dt)
        self.latents = param(rngs, nnx.initializers.normal(dim**-0.5), (1, cfg.num_queries, dim),
                             (None, "queries", "embed"), pd)
        self.proj_in = linear(rngs, cfg.embedding_dim, dim, ("embed", "embed"), use_bias=True,
                              param_dtype=pd, dtype=dt, kernel_init=torch_default_init)
        self.layers = nnx.List([
            nnx.Dict(attn=PerceiverAttention(dim, cfg.dim_head, cfg.heads, cfg.eps, **kw),
                     ff=FeedForward(dim, cfg.ff_mult, cfg.eps, **kw))
            for _ in range(cfg.depth)
        ])
        self.norm_out = layer_norm(rngs, dim, cfg.eps, pd)
        self.unet_proj_1 = linear(rngs, dim, cfg.output1_dim, ("embed", "embed"), use_bias=True,
                                  param_dtype=pd, dtype=dt, kernel_init=torch_default_init)
        self.unet_proj_2 = linear(rngs, dim, cfg.output2_dim, ("embed", "embed"), use_bias=True,
                                  param_dtype=pd, dtype=dt, kernel_init=torch_default_init)
        self.unet_attnpool = AttentionPool(cfg.num_queries, dim, cfg.heads, cfg.output2_dim, **kw)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        b = x.shape[0]
        if x.ndim != 3 or x.shape[-1] != self.cfg.embedding_dim:
            raise ValueError(f"ResamplerXLV2 expects (B, N, {self.cfg.embedding_dim}), got {x.shape}")
        if self.cfg.normalize:
            x = l2_normalize_tokens(x)
        x = self.proj_in(x.astype(self.dtype))
        latents = jnp.broadcast_to(self.latents[...], (b,) + self.latents.shape[1:]).astype(jnp.float32)
        # The residual stream stays fp32; each block computes in `dtype`.
        for layer in self.layers:
            latents = latents + layer["attn"](x, latents).astype(jnp.float32)
            latents = latents + layer["ff"](latents).astype(jnp.float32)
        h = self.norm_out(latents).astype(self.dtype)
        prompt_embeds = jnp.concatenate([self.unet_proj_1(h), self.unet_proj_2(h)], axis=-1)
        return prompt_embeds, self.unet_attnpool(h)
