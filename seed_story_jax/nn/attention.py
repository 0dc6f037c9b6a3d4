"""The project's one attention function: every model calls `attention`, so one change speeds up all.

Layout is (batch, length, heads, head_dim) as jax.nn.dot_product_attention takes it. Softmax runs in
fp32 whatever the compute dtype. `implementation=None` lets XLA pick (cuDNN flash on GPU when the
shapes allow it).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

_IMPLEMENTATION: Optional[str] = None


def set_implementation(name: Optional[str]) -> None:
    """'xla', 'cudnn' or None (auto). A process-wide knob for benchmarks."""
    global _IMPLEMENTATION
    if name not in (None, "xla", "cudnn"):
        raise ValueError(f"attention implementation must be None, 'xla' or 'cudnn', got {name!r}")
    _IMPLEMENTATION = name


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
) -> jax.Array:
    """q (B,T,H,D), k/v (B,S,K,D) with H % K == 0 (grouped-query); mask broadcastable to (B,H,T,S)
    with True = attend. Returns (B,T,H,D) in q's dtype."""
    if mask is not None:
        mask = mask.astype(jnp.bool_)
    if q.dtype == jnp.float32 or _IMPLEMENTATION != "cudnn":
        return _xla_attention(q, k, v, mask=mask, bias=bias, is_causal=is_causal, scale=scale)
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, is_causal=is_causal, scale=scale, implementation="cudnn"
    )


def _xla_attention(q, k, v, *, mask, bias, is_causal, scale):
    # Written out (not jax.nn.dot_product_attention's xla path) so the softmax is fp32 even for
    # bf16 inputs and fully-masked rows give zeros instead of NaN.
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    if h != kh:
        if h % kh:
            raise ValueError(f"heads {h} not a multiple of kv heads {kh}")
        rep = h // kh
        k = jnp.repeat(k, rep, axis=2)
        v = jnp.repeat(v, rep, axis=2)
    scale = (1.0 / (d ** 0.5)) if scale is None else scale
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if is_causal:
        causal = jnp.tril(jnp.ones((t, s), jnp.bool_), k=s - t)
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        probs = jnp.where(mask, probs, 0.0)
    out = jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)
