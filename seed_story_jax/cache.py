"""The decoder's KV cache: a pytree of fixed-capacity buffers with explicit per-slot metadata.

    k, v      (layers, batch, capacity, kv_heads, head_dim)   keys are stored post-RoPE
    pos       (batch, capacity) int32   original position of the token held in each slot
    valid     (batch, capacity) bool    slot holds a token that may be attended to
    kind      (batch, capacity) int8    TEXT / BOI / IMG / EOI (what a multimodal sink pins)
    length    (batch,) int32            tokens written so far (the write counter)
    next_pos  (batch,) int32            position the next token gets unless positions are given

Attention masks come from the slot metadata (`valid & pos <= query_pos`), never from "the first n
slots", so the order of slots carries no meaning. A write is planned per token (`plan_write`: slot
index and position for every incoming token, metadata updated once per forward) and then applied to
each layer's buffers with a scatter (`write_layer`). Only the dense policy exists here: token n of a
row goes to slot n. A sink + ring policy changes `_dense_slots` (e.g. `sink + (n - sink) % ring`,
pinning by `kind`) and `attention_mask`; pre-RoPE ("shifted") keys change where the model calls
its one key-rotation function. The buffers' shapes never change, so a step compiles once per
(batch, capacity).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

TEXT, BOI, IMG, EOI = 0, 1, 2, 3


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array
    v: jax.Array
    pos: jax.Array
    valid: jax.Array
    kind: jax.Array
    length: jax.Array
    next_pos: jax.Array

    @classmethod
    def create(cls, num_layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int,
               dtype=jnp.float32) -> "KVCache":
        buf = (num_layers, batch, capacity, kv_heads, head_dim)
        return cls(
            k=jnp.zeros(buf, dtype),
            v=jnp.zeros(buf, dtype),
            pos=jnp.zeros((batch, capacity), jnp.int32),
            valid=jnp.zeros((batch, capacity), jnp.bool_),
            kind=jnp.zeros((batch, capacity), jnp.int8),
            length=jnp.zeros((batch,), jnp.int32),
            next_pos=jnp.zeros((batch,), jnp.int32),
        )

    @classmethod
    def for_model(cls, cfg, batch: int, capacity: int, dtype=None) -> "KVCache":
        """A cache shaped for a LlamaConfig; dtype defaults to the model's compute dtype."""
        from seed_story_jax.nn.params import dtype_of

        return cls.create(cfg.num_layers, batch, capacity, cfg.num_kv_heads, cfg.resolved_head_dim,
                          dtype_of(dtype or cfg.dtype))

    @property
    def capacity(self) -> int:
        return self.pos.shape[1]

    @property
    def batch(self) -> int:
        return self.pos.shape[0]

    def logical_axes(self) -> "KVCache":
        """Logical axis names of every buffer (for sharding rules)."""
        kv = ("layers", "cache_batch", "cache_len", "cache_heads", "head_dim")
        row = ("cache_batch", "cache_len")
        return KVCache(k=kv, v=kv, pos=row, valid=row, kind=row, length=("cache_batch",),
                       next_pos=("cache_batch",))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Write:
    """Where a chunk of incoming tokens goes: slot per token (== capacity: not written) and the
    position each token is rotated/masked with."""

    slots: jax.Array  # (B, T) int32
    positions: jax.Array  # (B, T) int32


def _dense_slots(cache: KVCache, token_mask: jax.Array) -> jax.Array:
    """Token n of a row (counting only real tokens) goes to slot n; padding and overflow go nowhere."""
    rank = jnp.cumsum(token_mask.astype(jnp.int32), axis=1) - 1
    slots = cache.length[:, None] + rank
    ok = token_mask & (slots < cache.capacity)
    return jnp.where(ok, slots, cache.capacity).astype(jnp.int32)


def default_positions(cache: KVCache, token_mask: jax.Array) -> jax.Array:
    """Real tokens continue the row's position counter; padding repeats the last position."""
    rank = jnp.cumsum(token_mask.astype(jnp.int32), axis=1) - 1
    return (cache.next_pos[:, None] + jnp.maximum(rank, 0)).astype(jnp.int32)


def plan_write(
    cache: KVCache,
    token_mask: jax.Array,
    positions: Optional[jax.Array] = None,
    kinds: Optional[jax.Array] = None,
) -> tuple[Write, KVCache]:
    """Slots and positions for a chunk (B, T) of tokens, and the cache with its metadata updated
    (buffers untouched: each layer writes its K/V with `write_layer`)."""
    token_mask = token_mask.astype(jnp.bool_)
    if positions is None:
        positions = default_positions(cache, token_mask)
    positions = positions.astype(jnp.int32)
    if kinds is None:
        kinds = jnp.full(token_mask.shape, TEXT, jnp.int8)
    slots = _dense_slots(cache, token_mask)
    rows = jnp.arange(cache.batch)[:, None]
    n_new = token_mask.sum(axis=1).astype(jnp.int32)
    last_pos = jnp.max(jnp.where(token_mask, positions, -1), axis=1)
    cache = dataclasses.replace(
        cache,
        pos=cache.pos.at[rows, slots].set(positions, mode="drop"),
        valid=cache.valid.at[rows, slots].set(True, mode="drop"),
        kind=cache.kind.at[rows, slots].set(kinds.astype(jnp.int8), mode="drop"),
        length=cache.length + n_new,
        next_pos=jnp.where(n_new > 0, jnp.maximum(cache.next_pos, last_pos + 1), cache.next_pos),
    )
    return Write(slots=slots, positions=positions), cache


def write_layer(buf: jax.Array, layer, write: Write, new: jax.Array) -> jax.Array:
    """Scatter `new` (B, T, K, D) into `buf` (L, B, C, K, D) at layer `layer` (int or traced)."""
    rows = jnp.arange(buf.shape[1])[:, None]
    return buf.at[layer, rows, write.slots].set(new.astype(buf.dtype), mode="drop")


def read_layer(buf: jax.Array, layer) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(buf, layer, axis=0, keepdims=False)


def attention_mask(cache: KVCache, q_positions: jax.Array) -> jax.Array:
    """(B, 1, T, C) bool: a query sees valid slots whose position is not after its own."""
    m = cache.valid[:, None, :] & (cache.pos[:, None, :] <= q_positions[:, :, None])
    return m[:, None]


def causal_mask(positions: jax.Array, token_mask: Optional[jax.Array] = None) -> jax.Array:
    """(B, 1, T, T) for an uncached chunk: causal by position, padding keys hidden."""
    m = positions[:, None, :] <= positions[:, :, None]
    if token_mask is not None:
        m = m & token_mask.astype(jnp.bool_)[:, None, :]
    return m[:, None]
