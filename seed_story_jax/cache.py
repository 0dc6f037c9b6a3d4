"""The decoder's KV cache: fixed-size buffers with per-slot metadata, and the eviction policies of
long stories (spec §3), all inside the compiled step — no shape ever changes.

    k, v      (layers, batch, capacity, kv_heads, head_dim), or a tuple of per-layer
              (batch, capacity, kv_heads, head_dim) buffers (`layered`: models with unrolled layers,
              so each layer updates its own buffer in place)
    pos       (batch, capacity) int32   original position of the token held in each slot
    key_pos   (batch, capacity) int32   position the slot's key is rotated with and masked by
    valid     (batch, capacity) bool    slot holds a token that may be attended to
    kind      (batch, capacity) int8    TEXT / BOI / IMG / EOI
    pin       (batch, capacity) bool    the token lies in an image's head/tail span (multimodal sink)
    length    (batch,) int32            tokens written so far (the write counter; evicted ones count)
    next_pos  (batch,) int32            position the next token gets unless positions are given
    pinned    (batch,) int32            tokens copied into the pin region so far
    last_boi, last_eoi (batch,) int32   original positions of the latest `<img>` / `</img>` written
    policy    CachePolicy (static)

Slot layout of the sink policies: [0, F) the first F tokens of the stream (kept forever), [F, F+P)
the pin region (multimodal sink, first in first out), [F+P, C) a ring of W = C − F − P slots that
token n ≥ F enters at `F + P + (n − F) % W`. A token leaving the ring is checked against the pin
rule with its slot metadata and, if pinned, copied (keys, values, metadata) into the pin region in
the same step, before the incoming token overwrites it. `dense` writes token n to slot n.

Pin rule (multimodal sink): a token is pinned when its original position lies in
[BOI − boi_before, BOI + boi_after) or [EOI − eoi_before, EOI + eoi_after) of some image. Tokens
after a BOI/EOI are marked as they are written (offset from `last_boi` / `last_eoi`); tokens before
one are marked when the BOI/EOI arrives (they are still in the ring: a chunk may not be longer than
W − max(boi_before, eoi_before), checked at trace time).

Positions. `original`: keys are cached after RoPE at their absolute positions (key_pos = pos).
`shifted` (StreamingLLM): keys are cached before RoPE and rotated at attention time by their place
in the cache — the rank of their original position among the valid slots — and a new token's query
takes the rank of its own slot (= the number of cached tokens before it). Masks compare key_pos
with the query's position either way; rank order equals original order, so causality is the same.

A chunk of T tokens is planned at once (`plan_write`: slots, positions, pin moves, metadata) and
applied to each layer's buffers with `write_layer`; the chunk evicts room for all its tokens before
it attends (as StreamingLLM's `evict_for_space`), so with eviction a chunk sees slightly less than
token-by-token decoding would — the held set after the write is the same.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

TEXT, BOI, IMG, EOI = 0, 1, 2, 3
NO_POS = -(2 ** 30)  # "no BOI/EOI yet": far enough that no span reaches it
POLICIES = ("dense", "sink", "multimodal-sink")


@dataclasses.dataclass(frozen=True)
class CachePolicy:
    """What a cache keeps and how it positions keys (hashable: part of the compiled program)."""

    kind: str = "dense"  # dense | sink | multimodal-sink  (the story's `window` policy re-prefills a dense cache)
    positions: str = "original"  # original (post-RoPE keys) | shifted (pre-RoPE keys, rotated by place in cache)
    sink_tokens: int = 4  # first tokens kept forever (sink policies)
    pin_slots: int = 0  # multimodal-sink: the FIFO region for image head/tail spans
    boi_before: int = 4
    boi_after: int = 8
    eoi_before: int = 8
    eoi_after: int = 4

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise ValueError(f"cache policy must be one of {POLICIES}, got {self.kind!r}")
        if self.positions not in ("original", "shifted"):
            raise ValueError(f"cache positions must be original or shifted, got {self.positions!r}")
        if self.kind == "multimodal-sink" and self.pin_slots < 1:
            raise ValueError("multimodal-sink needs pin_slots >= 1")

    @property
    def shifted(self) -> bool:
        return self.positions == "shifted"

    @property
    def pins(self) -> bool:
        return self.kind == "multimodal-sink"

    def layout(self, capacity: int) -> tuple[int, int, int, int]:
        """(F first-token slots, P pin slots, S ring start, W ring slots)."""
        if self.kind == "dense":
            return 0, 0, 0, capacity
        f, p = self.sink_tokens, (self.pin_slots if self.pins else 0)
        w = capacity - f - p
        if w < 1:
            raise ValueError(f"cache capacity {capacity} leaves no ring after {f} sink + {p} pin slots")
        return f, p, f + p, w

    def max_chunk(self, capacity: int) -> int:
        """The longest chunk one forward may write (longer ones could evict the tokens they pin)."""
        if self.kind == "dense":
            return capacity
        w = self.layout(capacity)[3]
        return w - (max(self.boi_before, self.eoi_before) if self.pins else 0)

    @classmethod
    def from_config(cls, cc, policy: Optional[str] = None) -> "CachePolicy":
        """From a `CacheConfig` (`window` maps to dense: that policy re-prefills a fresh cache)."""
        kind = policy or cc.policy
        kind = "dense" if kind == "window" else kind
        return cls(kind=kind, positions=cc.positions, sink_tokens=cc.sink_tokens,
                   pin_slots=max(cc.sink_capacity - cc.sink_tokens, 0) if kind == "multimodal-sink" else 0,
                   boi_before=cc.boi_before, boi_after=cc.boi_after, eoi_before=cc.eoi_before,
                   eoi_after=cc.eoi_after)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array | tuple
    v: jax.Array | tuple
    pos: jax.Array
    valid: jax.Array
    kind: jax.Array
    length: jax.Array
    next_pos: jax.Array
    key_pos: jax.Array
    pin: jax.Array
    pinned: jax.Array
    last_boi: jax.Array
    last_eoi: jax.Array
    policy: CachePolicy = dataclasses.field(default=CachePolicy(), metadata=dict(static=True))

    @classmethod
    def create(cls, num_layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int,
               dtype=jnp.float32, policy: CachePolicy = CachePolicy(), layered: bool = False) -> "KVCache":
        policy.layout(capacity)  # refuses a capacity with no ring
        buf = (num_layers, batch, capacity, kv_heads, head_dim)
        row = (batch, capacity)

        def zeros():
            return tuple(jnp.zeros(buf[1:], dtype) for _ in range(num_layers)) if layered else jnp.zeros(buf, dtype)

        return cls(
            k=zeros(),
            v=zeros(),
            pos=jnp.zeros(row, jnp.int32),
            valid=jnp.zeros(row, jnp.bool_),
            kind=jnp.zeros(row, jnp.int8),
            length=jnp.zeros((batch,), jnp.int32),
            next_pos=jnp.zeros((batch,), jnp.int32),
            key_pos=jnp.zeros(row, jnp.int32),
            pin=jnp.zeros(row, jnp.bool_),
            pinned=jnp.zeros((batch,), jnp.int32),
            last_boi=jnp.full((batch,), NO_POS, jnp.int32),
            last_eoi=jnp.full((batch,), NO_POS, jnp.int32),
            policy=policy,
        )

    @classmethod
    def for_model(cls, cfg, batch: int, capacity: int, dtype=None, policy: CachePolicy = CachePolicy()) -> "KVCache":
        """A cache shaped for a LlamaConfig (stacked for scanned layers, per layer otherwise); dtype
        defaults to the model's compute dtype."""
        from seed_story_jax.nn.params import dtype_of

        return cls.create(cfg.num_layers, batch, capacity, cfg.num_kv_heads, cfg.resolved_head_dim,
                          dtype_of(dtype or cfg.dtype), policy, layered=not cfg.scan_layers)

    @property
    def capacity(self) -> int:
        return self.pos.shape[1]

    @property
    def batch(self) -> int:
        return self.pos.shape[0]

    def logical_axes(self) -> "KVCache":
        """Logical axis names of every buffer (for sharding rules)."""
        kv = ("layers", "cache_batch", "cache_len", "cache_heads", "head_dim")
        row, one = ("cache_batch", "cache_len"), ("cache_batch",)
        return KVCache(k=kv, v=kv, pos=row, valid=row, kind=row, length=one, next_pos=one, key_pos=row, pin=row,
                       pinned=one, last_boi=one, last_eoi=one, policy=self.policy)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Write:
    """Where a chunk of incoming tokens goes and what moves before it lands.

    slots (B, T): slot per token (== capacity: not written); positions (B, T): the position each
    token's query is rotated and masked with; pin_src/pin_dst (B, T): ring slots whose tokens are
    copied into the pin region (dst == capacity: no copy), or None; key_cos/key_sin (B, C, D): the
    rotation of every cached key (shifted positions; set by the model), or None."""

    slots: jax.Array
    positions: jax.Array
    pin_src: Optional[jax.Array] = None
    pin_dst: Optional[jax.Array] = None
    key_cos: Optional[jax.Array] = None
    key_sin: Optional[jax.Array] = None


def with_key_rope(write: Write, cos: jax.Array, sin: jax.Array) -> Write:
    return dataclasses.replace(write, key_cos=cos, key_sin=sin)


# ------------------------------------------------------------------------------------------ planning


def _ranks(token_mask: jax.Array) -> jax.Array:
    return jnp.cumsum(token_mask.astype(jnp.int32), axis=1) - 1


def default_positions(cache: KVCache, token_mask: jax.Array) -> jax.Array:
    """Real tokens continue the row's position counter; padding repeats the last position."""
    return (cache.next_pos[:, None] + jnp.maximum(_ranks(token_mask), 0)).astype(jnp.int32)


def slot_of(policy: CachePolicy, capacity: int, n: jax.Array) -> jax.Array:
    """Slot of the n-th token of a row's stream (dense overflow: capacity, i.e. dropped)."""
    f, _, s, w = policy.layout(capacity)
    if policy.kind == "dense":
        return jnp.where(n < capacity, n, capacity).astype(jnp.int32)
    return jnp.where(n < f, n, s + (n - f) % w).astype(jnp.int32)


def _gather(a: jax.Array, idx: jax.Array) -> jax.Array:
    """a (B, C) at idx (B, T), indices clipped (callers mask what they read out of range)."""
    return jnp.take_along_axis(a, jnp.clip(idx, 0, a.shape[1] - 1), axis=1)


def _span_before(anchor_pos, anchor_ok, pos, n_before):
    """(B, X) bool: pos lies in [anchor − n_before, anchor) for some anchor (B, T) of the chunk."""
    d = anchor_pos[:, None, :] - pos[:, :, None]  # (B, X, T)
    return jnp.any(anchor_ok[:, None, :] & (d > 0) & (d <= n_before), axis=-1)


def _latest(prev, positions, is_anchor):
    """Per chunk token, the latest anchor position at or before it (including earlier chunks)."""
    seen = jax.lax.cummax(jnp.where(is_anchor, positions, NO_POS), axis=1)
    return jnp.maximum(prev[:, None], seen)


def _key_positions(cache: KVCache) -> jax.Array:
    """shifted: each valid slot's rank in stream order among the row's valid slots.

    The layout fixes that order without sorting (a sort per decoded token is most of a tiny model's
    step on CPU): first tokens by slot, then the pin region from its oldest entry (FIFO, starting at
    `pinned % P`), then the ring from its oldest slot (token `length − W`, at `(length − F) % W`).
    Pins were evicted from the ring, so they are older than every ring token; rewound slots are
    invalid and count for nothing. With positions that grow along the stream (always, unless a
    caller passes its own), stream order is original-position order."""
    if not cache.policy.shifted:
        return cache.pos
    c = cache.capacity
    f, p, s, w = cache.policy.layout(c)
    i = jnp.arange(c, dtype=jnp.int32)[None, :]
    if cache.policy.kind == "dense":
        place = order = jnp.broadcast_to(i, cache.pos.shape)
    else:
        pin0 = (cache.pinned % p)[:, None] if p else 0
        ring0 = ((cache.length - f) % w)[:, None]
        p1 = max(p, 1)

        def rotate(sign):  # place of slot i (sign −1) / slot at place i (sign +1)
            return jnp.where(i < f, i, jnp.where(i < s, f + (i - f + sign * pin0) % p1, s + (i - s + sign * ring0) % w))

        place, order = rotate(-1), rotate(1)
    before = jnp.cumsum(jnp.take_along_axis(cache.valid, order, axis=1).astype(jnp.int32), axis=1) - 1
    return jnp.where(cache.valid, jnp.take_along_axis(before, place, axis=1), 0)


def plan_write(
    cache: KVCache,
    token_mask: jax.Array,
    positions: Optional[jax.Array] = None,
    kinds: Optional[jax.Array] = None,
) -> tuple[Write, KVCache]:
    """Slots, positions and pin moves for a chunk (B, T) of tokens, and the cache with its metadata
    updated (buffers untouched: each layer writes its K/V with `write_layer`)."""
    pol, c = cache.policy, cache.capacity
    b, t = token_mask.shape
    if t > pol.max_chunk(c):
        raise ValueError(f"a chunk of {t} tokens is longer than this cache takes at once "
                         f"({pol.max_chunk(c)} for {pol.kind} with capacity {c}); split it or enlarge the ring")
    token_mask = token_mask.astype(jnp.bool_)
    if positions is None:
        positions = default_positions(cache, token_mask)
    positions = positions.astype(jnp.int32)
    kinds = jnp.full((b, t), TEXT, jnp.int8) if kinds is None else kinds.astype(jnp.int8)
    rows = jnp.arange(b)[:, None]
    n = cache.length[:, None] + _ranks(token_mask)
    slots = jnp.where(token_mask, slot_of(pol, c, n), c)

    pos, valid, kind, pin, pinned = cache.pos, cache.valid, cache.kind, cache.pin, cache.pinned
    new_pin = jnp.zeros((b, t), jnp.bool_)
    last_boi, last_eoi = cache.last_boi, cache.last_eoi
    pin_src = pin_dst = None
    if pol.pins:
        is_boi = token_mask & (kinds == BOI)
        is_eoi = token_mask & (kinds == EOI)
        # Tokens just before an arriving BOI/EOI: those in the cache, and those of this chunk.
        pin = pin | (valid & (_span_before(positions, is_boi, pos, pol.boi_before)
                              | _span_before(positions, is_eoi, pos, pol.eoi_before)))
        new_pin = (_span_before(positions, is_boi, positions, pol.boi_before)
                   | _span_before(positions, is_eoi, positions, pol.eoi_before))
        # Tokens at or just after the latest BOI/EOI.
        lb, le = _latest(last_boi, positions, is_boi), _latest(last_eoi, positions, is_eoi)
        new_pin = new_pin | ((positions - lb >= 0) & (positions - lb < pol.boi_after)) \
            | ((positions - le >= 0) & (positions - le < pol.eoi_after))
        new_pin = new_pin & token_mask
        last_boi, last_eoi = lb[:, -1], le[:, -1]

        # Ring tokens this chunk evicts that are pinned move into the pin region (FIFO): the k-th
        # pin of the row goes to F + k % P; of more than P in one chunk only the last P land.
        f, p, s, _ = pol.layout(c)
        leaving = token_mask & (slots >= s) & (slots < c) & _gather(valid, slots)
        take = leaving & _gather(pin, slots)
        k = _ranks(take)
        count = take.astype(jnp.int32).sum(axis=1)
        land = take & (k >= count[:, None] - p)
        pin_src = slots
        pin_dst = jnp.where(land, f + (pinned[:, None] + k) % p, c).astype(jnp.int32)
        moved = lambda a: a.at[rows, pin_dst].set(_gather(a, pin_src), mode="drop")  # noqa: E731
        pos, kind, valid, pin = moved(pos), moved(kind), moved(valid), moved(pin)
        pinned = pinned + count

    n_new = token_mask.astype(jnp.int32).sum(axis=1)
    last_pos = jnp.max(jnp.where(token_mask, positions, -1), axis=1)
    cache = dataclasses.replace(
        cache,
        pos=pos.at[rows, slots].set(positions, mode="drop"),
        valid=valid.at[rows, slots].set(True, mode="drop"),
        kind=kind.at[rows, slots].set(kinds, mode="drop"),
        pin=pin.at[rows, slots].set(new_pin, mode="drop"),
        length=cache.length + n_new,
        next_pos=jnp.where(n_new > 0, jnp.maximum(cache.next_pos, last_pos + 1), cache.next_pos),
        pinned=pinned,
        last_boi=last_boi,
        last_eoi=last_eoi,
    )
    cache = dataclasses.replace(cache, key_pos=_key_positions(cache))
    if pol.shifted:
        # A query sits at its own slot's place in the cache; padding (not written) sees everything.
        top = jnp.max(jnp.where(cache.valid, cache.key_pos, 0), axis=1, keepdims=True)
        q_pos = jnp.where(slots < c, _gather(cache.key_pos, slots), top)
    else:
        q_pos = positions
    return Write(slots=slots, positions=q_pos, pin_src=pin_src, pin_dst=pin_dst), cache


# ------------------------------------------------------------------------------------------ buffers


def pinned_values(buf, write: Write):
    """What each layer's pin moves copy — (L, B, T, K, D), or a tuple of (B, T, K, D) for per-layer
    buffers — read before any layer writes (reading a buffer that is being updated in place makes
    XLA copy the whole cache)."""
    if write.pin_src is None:
        return None
    if isinstance(buf, tuple):
        return tuple(pinned_values(b[None], write)[0] for b in buf)
    src = jnp.clip(write.pin_src, 0, buf.shape[2] - 1)
    return buf[:, jnp.arange(buf.shape[1])[:, None], src]


def write_layer(buf: jax.Array, layer, write: Write, new: jax.Array, moved: Optional[jax.Array] = None) -> jax.Array:
    """Copy this chunk's pinned evictees into the pin region (`moved`: their values from
    `pinned_values`, else read here), then scatter `new` (B, T, K, D) into `buf`: the stack
    (L, B, C, K, D) at layer `layer` (int or traced), or one layer's (B, C, K, D) when `layer` is None."""
    at = (jnp.arange(buf.shape[-4])[:, None],) if layer is None else (layer, jnp.arange(buf.shape[1])[:, None])
    if write.pin_src is not None:
        if moved is None:
            moved = buf[at + (jnp.clip(write.pin_src, 0, buf.shape[-3] - 1),)]
        buf = buf.at[at + (write.pin_dst,)].set(moved, mode="drop")
    return buf.at[at + (write.slots,)].set(new.astype(buf.dtype), mode="drop")


def read_layer(buf: jax.Array, layer) -> jax.Array:
    return buf if layer is None else jax.lax.dynamic_index_in_dim(buf, layer, axis=0, keepdims=False)


def attention_mask(cache: KVCache, q_positions: jax.Array) -> jax.Array:
    """(B, 1, T, C) bool: a query sees valid slots whose key position is not after its own."""
    m = cache.valid[:, None, :] & (cache.key_pos[:, None, :] <= q_positions[:, :, None])
    return m[:, None]


def causal_mask(positions: jax.Array, token_mask: Optional[jax.Array] = None) -> jax.Array:
    """(B, 1, T, T) for an uncached chunk: causal by position, padding keys hidden."""
    m = positions[:, None, :] <= positions[:, :, None]
    if token_mask is not None:
        m = m & token_mask.astype(jnp.bool_)[:, None, :]
    return m[:, None]


# ------------------------------------------------------------------------------------------ edits


def rewind(cache: KVCache, n: int) -> KVCache:
    """Forget the last `n` tokens written to every row (they become free slots; the next write
    reuses them and their positions). Used to replace a just-written span — the story loop writes
    `<img>` + image-token queries, reads their hidden states, then rewrites the image slots with
    the input-resampled features. Evictions the forgotten tokens caused are not undone, and they
    must not include a row's latest BOI/EOI or its first `sink_tokens` tokens."""
    pol, c = cache.policy, cache.capacity
    idx = cache.length[:, None] - n + jnp.arange(n, dtype=jnp.int32)[None, :]
    slots = jnp.where(idx >= 0, slot_of(pol, c, idx), c)
    rows = jnp.arange(cache.batch)[:, None]
    cache = dataclasses.replace(
        cache,
        valid=cache.valid.at[rows, slots].set(False, mode="drop"),
        pin=cache.pin.at[rows, slots].set(False, mode="drop"),
        length=jnp.maximum(cache.length - n, 0),
        next_pos=cache.next_pos - jnp.minimum(cache.length, n),
    )
    return dataclasses.replace(cache, key_pos=_key_positions(cache))


def occupancy(cache: KVCache) -> jax.Array:
    """(B,) number of valid slots."""
    return cache.valid.astype(jnp.int32).sum(axis=1)


def held(cache: KVCache, row: int = 0) -> list[tuple[int, int, int, int]]:
    """Host-side view of one row: (original pos, kind, key pos, slot) of every valid slot, by pos."""
    import numpy as np

    valid, pos, kind, key_pos = (np.asarray(a)[row] for a in (cache.valid, cache.pos, cache.kind, cache.key_pos))
    out = [(int(p), int(k), int(q), int(s)) for s, (p, k, q) in enumerate(zip(pos, kind, key_pos)) if valid[s]]
    return sorted(out)


def held_positions(kinds, policy: CachePolicy, capacity: int):
    """The stream positions a cache holds after every token of `kinds` (TEXT/BOI/IMG/EOI per
    token) was written, on the host, in stream order — the same set as the compiled cache (a
    chunked write holds what token-by-token writing does). Training samples use it to show the
    model a long story the way the story loop's cache will (`data_pipeline.samples.cache_view`)."""
    import numpy as np

    kinds = np.asarray(kinds)
    n = len(kinds)
    if policy.kind == "dense":
        if n > capacity:
            raise ValueError(f"a dense cache of {capacity} slots cannot hold {n} tokens")
        return np.arange(n)
    f, p, _, w = policy.layout(capacity)
    idx = np.arange(n)
    keep = (idx < f) | (idx >= max(f, n - w))
    if policy.pins:
        pinned = np.zeros(n, bool)
        for anchors, before, after in ((np.flatnonzero(kinds == BOI), policy.boi_before, policy.boi_after),
                                       (np.flatnonzero(kinds == EOI), policy.eoi_before, policy.eoi_after)):
            for a in anchors:
                pinned[max(a - before, 0):a + after] = True
        # Tokens that left the ring, in the order they left; the pin region keeps the last P of them.
        evicted = idx[(idx >= f) & (idx < n - w) & pinned]
        keep[evicted[max(len(evicted) - p, 0):]] = True
    return idx[keep]
