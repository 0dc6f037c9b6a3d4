"""Decoder building blocks shared by the Llama and whatever wraps it: RMSNorm, RoPE, LoRA linear, SwiGLU.

Numerics follow Hugging Face Llama: RMSNorm takes the variance in fp32 and casts the normalised
activations back before the weight multiply; RoPE is the `rotate_half` (half-split) convention with
cos/sin computed in fp32 from explicit position ids, so keys can be rotated at any position.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seed_story_jax.nn.params import dtype_of, param


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, param_dtype="float32", dtype="float32"):
        self.eps = eps
        self.dtype = dtype_of(dtype)
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return (self.scale[...].astype(self.dtype) * normed.astype(self.dtype)).astype(self.dtype)


# ----------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """HF's `1 / theta ** (arange(0, d, 2) / d)` in float32."""
    return (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _rope_table(limit: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    freqs = np.arange(limit, dtype=np.float32)[:, None] * rope_inv_freq(head_dim, theta)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float,
                 limit: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
    """positions (B, T) int → cos, sin (B, T, head_dim) float32 (halves duplicated, HF layout).

    `limit`: positions are known to lie in [0, limit) (a shifted cache's ranks): read a table built
    once on the host instead of evaluating sin/cos for every cached key at every decoded token."""
    if limit is not None:
        cos, sin = _rope_table(int(limit), head_dim, float(theta))
        idx = jnp.clip(positions, 0, limit - 1)
        return jnp.asarray(cos)[idx], jnp.asarray(sin)[idx]
    inv = jnp.asarray(rope_inv_freq(head_dim, theta))
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B, T, H, D); cos/sin (B, T, D). Rotates in fp32 and returns x's dtype."""
    x32 = x.astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return (x32 * c + rotate_half(x32) * s).astype(x.dtype)


# ----------------------------------------------------------------------------------------- LoRA


def _lora_a_init(key, shape, dtype):
    # peft: kaiming_uniform_(a=sqrt(5)) on the (r, in) torch weight ⇒ U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1.0 / np.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class LoRALinear(nnx.Module):
    """y = x W (+ dropout(x) A B · alpha/r). Kernel (in, out) is an nnx.Param; A (in, r) and B (r, out)
    are nnx.LoRAParam (a Param subclass), so `nnx.LoRAParam` selects exactly the adapters for training.

    Dropout applies to the LoRA branch input only, and only when a `dropout_key` is passed."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        names: tuple[str, str],
        *,
        rngs: nnx.Rngs,
        rank: int = 0,
        alpha: float = 0.0,
        dropout: float = 0.0,
        param_dtype="float32",
        dtype="float32",
        init_std: float = 0.02,
    ):
        self.dtype = dtype_of(dtype)
        self.kernel = param(rngs, nnx.initializers.normal(init_std), (in_features, out_features), names, param_dtype)
        self.rank = rank
        self.dropout = dropout
        if rank > 0:
            self.scaling = alpha / rank
            a = _lora_a_init(rngs.params(), (in_features, rank), dtype_of(param_dtype))
            self.lora_a = nnx.LoRAParam(a, out_sharding=(names[0], "lora_rank"))
            self.lora_b = nnx.LoRAParam(jnp.zeros((rank, out_features), dtype_of(param_dtype)),
                                        out_sharding=("lora_rank", names[1]))

    def __call__(self, x: jax.Array, dropout_key: Optional[jax.Array] = None) -> jax.Array:
        x = x.astype(self.dtype)
        y = x @ self.kernel[...].astype(self.dtype)
        if self.rank > 0:
            xa = x
            if dropout_key is not None and self.dropout > 0.0:
                keep = jax.random.bernoulli(dropout_key, 1.0 - self.dropout, x.shape)
                xa = jnp.where(keep, x / (1.0 - self.dropout), 0.0).astype(self.dtype)
            y = y + (xa @ self.lora_a[...].astype(self.dtype)) @ self.lora_b[...].astype(self.dtype) * self.scaling
        return y


def merge_lora(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scaling: float) -> jax.Array:
    """W + s·A·B, computed in fp32 and cast back to the kernel's dtype."""
    w = kernel.astype(jnp.float32) + scaling * (lora_a.astype(jnp.float32) @ lora_b.astype(jnp.float32))
    return w.astype(kernel.dtype)


# ----------------------------------------------------------------------------------------- MLP


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) · up(x)), no biases (Llama MLP)."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, lora: dict[str, dict] | None = None,
                 param_dtype="float32", dtype="float32", init_std: float = 0.02):
        lora = lora or {}
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype, init_std=init_std)
        self.gate_proj = LoRALinear(dim, hidden, ("embed", "mlp"), **lora.get("gate_proj", {}), **kw)
        self.up_proj = LoRALinear(dim, hidden, ("embed", "mlp"), **lora.get("up_proj", {}), **kw)
        self.down_proj = LoRALinear(hidden, dim, ("mlp", "embed"), **lora.get("down_proj", {}), **kw)

    def __call__(self, x: jax.Array, dropout_key: Optional[jax.Array] = None) -> jax.Array:
        keys = [None] * 3 if dropout_key is None else list(jax.random.split(dropout_key, 3))
        g = self.gate_proj(x, keys[0])
        u = self.up_proj(x, keys[1])
        return self.down_proj(jax.nn.silu(g) * u, keys[2])
