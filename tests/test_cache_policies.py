"""The KV cache policies (seed_story_jax/cache.py, spec §3).

1. Without eviction every policy and position mode gives the uncached forward's logits (fp32, relative
   error ≤ 1e-5 to max |logit|), whatever the chunking, with padded rows and a rewind in the stream.
2. Eviction on hand-built token streams: after every chunk the cache holds exactly what a plain-list
   reference of the spec's rule holds — the first 4 tokens, the last W tokens, and (multimodal sink)
   the tokens of evicted images in [BOI−4, BOI+8) ∪ [EOI−8, EOI+4), first in first out once the pin
   region is full — with their original positions and kinds, keys/values moved with them, and key
   positions = original positions (`original`) or 0..n−1 by original order (`shifted`).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seed_story_jax import cache as kvc
from seed_story_jax.config import LlamaConfig
from seed_story_jax.models import llama as L

RTOL = 1e-5
CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _stream(segments, n_img: int):
    """Kinds of a token stream: ('t', k) = k text tokens, 'i' = <img> + n_img tokens + </img>."""
    kinds = []
    for s in segments:
        if s == "i":
            kinds += [kvc.BOI] + [kvc.IMG] * n_img + [kvc.EOI]
        else:
            kinds += [kvc.TEXT] * s[1]
    return np.array(kinds, np.int8)


# ------------------------------------------------------------------------------ 1. exactness


KINDS = _stream([("t", 7), "i", ("t", 9), "i", ("t", 5)], 4)  # 33 tokens


@pytest.fixture(scope="module")
def model():
    """(model, ids (2, T), the uncached forward's logits)."""
    from flax import nnx

    m = L.init_model(CFG, 0)
    ids = np.random.default_rng(1).integers(3, CFG.vocab_size, (2, len(KINDS))).astype(np.int32)
    full = jax.jit(lambda g, s, x: nnx.merge(g, s)(x)[0], static_argnums=0)(*nnx.split(m), ids)
    return m, ids, np.asarray(full)


def _fwd(graphdef, state, ids, mask, kinds, cache):
    from flax import nnx

    logits, _, cache = nnx.merge(graphdef, state)(ids, token_mask=mask, kinds=kinds, cache=cache)
    return logits, cache


_fwd = jax.jit(_fwd, static_argnums=0)
_rewind = jax.jit(kvc.rewind, static_argnums=1)


@jax.jit
def _write(cache, mask, kinds, new):
    write, cache = kvc.plan_write(cache, mask, kinds=kinds)
    return write, dataclasses.replace(cache, k=kvc.write_layer(cache.k, 0, write, new),
                                      v=kvc.write_layer(cache.v, 0, write, -new))


@pytest.mark.parametrize("positions", ["original", "shifted"])
@pytest.mark.parametrize("policy", ["dense", "sink", "multimodal-sink"])
def test_no_eviction_matches_uncached_forward(model, policy, positions):
    from flax import nnx

    model, ids, full = model
    graphdef, state = nnx.split(model)
    kinds, t = KINDS, len(KINDS)
    rng = np.random.default_rng(2)

    pol = kvc.CachePolicy(kind=policy, positions=positions, pin_slots=12 if policy == "multimodal-sink" else 0)
    cache = kvc.KVCache.for_model(CFG, 2, 4 + 12 + 40, policy=pol)  # ring of ≥ 40 > 33 tokens: no eviction
    # Row 1 starts one token behind (right padding), so rows sit at different ring offsets.
    starts, got = [0, 0], [[], []]
    chunks = [8, 1, 1, 8, 1, 8, 8, 1]  # two chunk sizes: two compilations per policy
    # A junk chunk written and rewound mid-stream must leave no trace.
    for c, size in enumerate(chunks):
        if c == 4:
            junk = rng.integers(3, CFG.vocab_size, (2, 8)).astype(np.int32)
            _, cache = _fwd(graphdef, state, jnp.asarray(junk), jnp.ones((2, 8), bool),
                            jnp.zeros((2, 8), jnp.int8), cache)
            cache = _rewind(cache, 8)
        tok = np.zeros((2, size), np.int32)
        mask = np.zeros((2, size), bool)
        knd = np.zeros((2, size), np.int8)
        for r in range(2):
            n = min(size - (1 if (r == 1 and c == 0) else 0), t - starts[r])  # row 1 lags one token
            tok[r, :n] = ids[r, starts[r]:starts[r] + n]
            knd[r, :n] = kinds[starts[r]:starts[r] + n]
            mask[r, :n] = True
        logits, cache = _fwd(graphdef, state, jnp.asarray(tok), jnp.asarray(mask), jnp.asarray(knd), cache)
        for r in range(2):
            n = int(mask[r].sum())
            got[r].append(np.asarray(logits[r, :n]))
            starts[r] += n
    assert starts == [t, t]
    for r in range(2):
        err = _rel(np.concatenate(got[r]), full[r])
        assert err <= RTOL, (policy, positions, r, err)
    assert np.asarray(kvc.occupancy(cache)).tolist() == [t, t]


@pytest.mark.parametrize("positions", ["original", "shifted"])
@pytest.mark.parametrize("policy", ["sink", "multimodal-sink"])
def test_after_eviction_attention_sees_exactly_the_held_tokens(policy, positions):
    """One layer, so a cached key/value depends on its token alone: after many evictions the next
    token's logits equal the uncached forward over the held tokens + it, at positions 0..n
    (shifted: keys re-rotated by place in cache) or at their original positions (original)."""
    from flax import nnx

    cfg = dataclasses.replace(CFG, num_layers=1)
    m = L.init_model(cfg, 3)
    graphdef, state = nnx.split(m)
    kinds = _stream([("t", 6), "i", ("t", 9), "i", "i", ("t", 12), "i", ("t", 3)], 4)
    ids = np.random.default_rng(4).integers(3, cfg.vocab_size, (1, len(kinds) + 1)).astype(np.int32)
    pol = kvc.CachePolicy(kind=policy, positions=positions, pin_slots=9 if policy == "multimodal-sink" else 0)
    cache = kvc.KVCache.for_model(cfg, 1, 4 + pol.pin_slots + 16, policy=pol)
    for i in range(0, len(kinds), 8):
        n = min(8, len(kinds) - i)
        tok, knd, mask = np.zeros((1, 8), np.int32), np.zeros((1, 8), np.int8), np.zeros((1, 8), bool)
        tok[0, :n], knd[0, :n], mask[0, :n] = ids[0, i:i + n], kinds[i:i + n], True
        _, cache = _fwd(graphdef, state, tok, mask, knd, cache)
    logits, cache = _fwd(graphdef, state, ids[:, -1:], np.ones((1, 1), bool), np.zeros((1, 1), np.int8), cache)
    held = [h[0] for h in kvc.held(cache)]
    assert len(held) == cache.capacity and held[-1] == len(kinds)  # full, evicted, new token last
    pos = np.arange(len(held)) if positions == "shifted" else np.array(held)
    want = m(jnp.asarray(ids[:, held]), positions=jnp.asarray(pos[None], jnp.int32))[0][:, -1]
    assert _rel(logits[:, 0], want) <= RTOL


@pytest.mark.parametrize("scan", [False, True])
def test_decode_step_updates_the_cache_in_place(scan):
    """A decode step writes its token's slot (and pin moves) into the cache buffers in place: the
    compiled step copies no whole cache buffer (a restack, a scan's stacked output or a copy before
    an in-place update would; each costs a full pass over the cache per token)."""
    from flax import nnx

    cfg = dataclasses.replace(CFG, scan_layers=scan)
    m = L.init_model(cfg, 0)
    pol = kvc.CachePolicy(kind="multimodal-sink", positions="shifted", pin_slots=12)
    cache = kvc.KVCache.for_model(cfg, 1, 4 + 12 + 40, policy=pol)
    assert isinstance(cache.k, tuple) != scan  # per-layer buffers for unrolled layers
    graphdef, state = nnx.split(m)
    step = jax.jit(lambda s, t, c: nnx.merge(graphdef, s)(t, cache=c)[::2], donate_argnums=2)
    hlo = step.lower(state, jnp.ones((1, 1), jnp.int32), cache).compile().as_text()
    buffers = {"f32[%s]" % ",".join(map(str, x.shape)) for x in jax.tree.leaves((cache.k, cache.v))}
    stacked = "f32[%d,1,56,%d,%d]" % (cfg.num_layers, cfg.num_kv_heads, cfg.resolved_head_dim)

    def result(ln):
        return ln.split("=")[1].strip().split("{")[0]

    lines = hlo.splitlines()
    assert any(result(ln) in buffers for ln in lines if "=" in ln and "parameter(" in ln)  # the check can see them
    copies = [ln for ln in lines if " copy(" in ln and result(ln) in buffers]
    restacks = [ln for ln in lines if " concatenate(" in ln and result(ln) == stacked]
    assert not copies and not restacks, (copies + restacks)[:3]


def test_chunk_longer_than_the_ring_is_refused():
    pol = kvc.CachePolicy(kind="multimodal-sink", pin_slots=8)
    cache = kvc.KVCache.create(1, 1, 4 + 8 + 20, 1, 2, policy=pol)  # ring 20, max chunk 20 − 8
    kvc.plan_write(cache, jnp.ones((1, 12), bool))
    with pytest.raises(ValueError, match="chunk of 13 tokens"):
        kvc.plan_write(cache, jnp.ones((1, 13), bool))
    with pytest.raises(ValueError, match="no ring"):
        kvc.KVCache.create(1, 1, 12, 1, 2, policy=pol)


# ------------------------------------------------------------------------------ 2. eviction


def reference_held(kinds: np.ndarray, upto: int, f: int, p: int, w: int, pins: bool, spans=(4, 8, 8, 4)):
    """The spec's rule on plain lists, token by token: positions held after the first `upto` tokens."""
    bb, ba, eb, ea = spans
    boi = [i for i, k in enumerate(kinds) if k == kvc.BOI]
    eoi = [i for i, k in enumerate(kinds) if k == kvc.EOI]

    def pinned(i):
        return any(b - bb <= i < b + ba for b in boi) or any(e - eb <= i < e + ea for e in eoi)

    first, ring, pinq = [], [], []
    for i in range(upto):
        if i < f:
            first.append(i)
            continue
        ring.append(i)
        if len(ring) > w:
            out = ring.pop(0)
            if pins and pinned(out):
                pinq.append(out)
                if len(pinq) > p:
                    pinq.pop(0)
    return sorted(first + pinq + ring), pinq


def _drive(kinds: np.ndarray, chunks, pol: kvc.CachePolicy, capacity: int, batch_offsets=(0,)):
    """Feed the stream in chunks through plan_write/write_layer with K = V = original position, and
    after each chunk yield (tokens written so far per row, cache)."""
    b = len(batch_offsets)
    cache = kvc.KVCache.create(1, b, capacity, 1, 2, policy=pol)
    done = [0] * b
    skip = list(batch_offsets)  # row r idles (pads) for its first `offset` chunk slots: rows out of step
    for size in chunks:
        mask = np.zeros((b, size), bool)
        knd = np.zeros((b, size), np.int8)
        for r in range(b):
            n = min(size, len(kinds) - done[r])
            idle = min(skip[r], n)
            skip[r] -= idle
            n -= idle
            mask[r, :n] = True
            knd[r, :n] = kinds[done[r]:done[r] + n]
        orig = np.zeros((b, size), np.float32)
        for r in range(b):
            orig[r] = done[r] + np.arange(size)
        new = np.ascontiguousarray(np.broadcast_to(orig[..., None, None], (b, size, 1, 2)))
        write, cache = _write(cache, mask, knd, new)
        for r in range(b):
            done[r] += int(mask[r].sum())
        yield list(done), cache, write


def _check_against_reference(kinds, chunks, pol, capacity, offsets=(0, 3)):
    f, p, s, w = pol.layout(capacity)
    evictions = 0
    for done, cache, write in _drive(kinds, chunks, pol, capacity, offsets):
        for r in range(len(offsets)):
            want, _ = reference_held(kinds, done[r], f, p, w, pol.pins,
                                     (pol.boi_before, pol.boi_after, pol.eoi_before, pol.eoi_after))
            got = kvc.held(cache, r)
            assert [g[0] for g in got] == want, (done[r], [g[0] for g in got], want)
            assert kvc.held_positions(kinds[:done[r]], pol, capacity).tolist() == want  # the host-side rule
            assert [g[1] for g in got] == [int(kinds[i]) for i in want]
            kp = [g[2] for g in got]
            assert kp == (list(range(len(want))) if pol.shifted else want)
            slots = np.array([g[3] for g in got], np.int32)
            k = np.asarray(cache.k)[0, r, slots, 0, 0]
            v = np.asarray(cache.v)[0, r, slots, 0, 1]
            np.testing.assert_array_equal(k, np.array(want, np.float32))  # keys/values moved with their token
            np.testing.assert_array_equal(v, -np.array(want, np.float32))
            # Query positions of the chunk's tokens: their own key positions.
            q, ws = np.asarray(write.positions)[r], np.asarray(write.slots)[r]
            real = ws < capacity
            np.testing.assert_array_equal(q[real], np.asarray(cache.key_pos)[r][ws[real]])
            evictions = max(evictions, done[r] - len(want))
    return evictions


@pytest.mark.parametrize("positions", ["original", "shifted"])
def test_multimodal_sink_holds_the_spec_tokens_64_token_images(positions):
    """Real image length (64 tokens): each evicted image leaves exactly its 24 span tokens — 4 text
    tokens before <img>, <img>, <img_00000..00006>, <img_00056..00063>, </img>, 3 after — and the pin
    region (2 images' worth + 6) overflows, dropping the oldest pinned tokens first."""
    kinds = _stream([("t", 9), "i", ("t", 14), "i", ("t", 6), "i", ("t", 11), "i", ("t", 20), "i", ("t", 5)], 64)
    pol = kvc.CachePolicy(kind="multimodal-sink", positions=positions, pin_slots=54)
    capacity = 4 + 54 + 120
    chunks = [66, 1, 1, 1, 66, 66, 1, 1, 66, 66, 1, 1, 66, 66, 66, 1, 1]
    assert sum(chunks) >= len(kinds)
    evictions = _check_against_reference(kinds, chunks, pol, capacity)
    assert evictions > 150  # several images evicted

    # The spec's list, checked directly on the first evicted image (pinned before the overflow).
    f, p, s, w = pol.layout(capacity)
    boi0 = int(np.flatnonzero(kinds == kvc.BOI)[0])
    eoi0 = int(np.flatnonzero(kinds == kvc.EOI)[0])
    upto = 9 + 66 + 14 + 66 + w  # image 0 and 1 are out of the ring, image 2 not yet
    _, pinq = reference_held(kinds, upto, f, p, w, True)
    first_image = [i for i in pinq if i <= eoi0 + 3]
    assert first_image == list(range(boi0 - 4, boi0 + 8)) + list(range(eoi0 - 8, eoi0 + 4))
    assert [int(kinds[i]) for i in first_image] == ([kvc.TEXT] * 4 + [kvc.BOI] + [kvc.IMG] * 7 + [kvc.IMG] * 8
                                                    + [kvc.EOI] + [kvc.TEXT] * 3)
    *_, (_, cache, _) = _drive(kinds, [66] * (upto // 66) + [1] * (upto % 66), pol, capacity)
    got = [g[0] for g in kvc.held(cache, 0)]
    assert set(first_image) <= set(got) and len(got) == f + len(pinq) + w


@pytest.mark.parametrize("positions", ["original", "shifted"])
@pytest.mark.parametrize("policy", ["sink", "multimodal-sink"])
def test_eviction_small_images_token_by_token_and_chunked(policy, positions):
    """4-token images (tiny config), spans overlapping each other and the first tokens; the pin
    region (10 slots) overflows many times. Same held set for token-by-token and chunked feeding."""
    segs = [("t", 2), "i", ("t", 3), "i", "i", ("t", 7), "i", ("t", 1), "i", ("t", 12), "i", ("t", 4), "i", ("t", 2)]
    kinds = _stream(segs, 4)
    pol = kvc.CachePolicy(kind=policy, positions=positions, pin_slots=10 if policy == "multimodal-sink" else 0)
    capacity = 4 + pol.pin_slots + 16
    assert _check_against_reference(kinds, [1] * len(kinds), pol, capacity) > 20
    assert _check_against_reference(kinds, [3, 8, 1, 8, 3, 8, 1, 1, 3, 8, 3, 8, 3, 8], pol, capacity) > 20


def test_rewind_then_rewrite_equals_writing_once():
    """The story loop's image step on a full ring: write <img> + image queries, forget the queries,
    write the image slots + </img> — the same cache as writing <img>, image, </img> once."""
    kinds = _stream([("t", 6), "i", ("t", 5), "i", ("t", 9)], 4)
    img = _stream(["i"], 4)
    for positions in ("original", "shifted"):
        pol = kvc.CachePolicy(kind="multimodal-sink", positions=positions, pin_slots=8)
        cap = 4 + 8 + 14
        *_, (_, cache, _) = _drive(kinds, [6, 6, 6, 6, 3], pol, cap)
        z = lambda n: np.zeros((1, n, 1, 2), np.float32)  # noqa: E731
        _, once = _write(cache, np.ones((1, 6), bool), img[None], z(6))
        _, twice = _write(cache, np.ones((1, 5), bool), img[None, :5], z(5))
        twice = _rewind(twice, 4)
        _, twice = _write(twice, np.ones((1, 5), bool), img[None, 1:], z(5))
        assert kvc.held(twice) == kvc.held(once)
        assert int(once.pinned[0]) > 8  # the pin region overflowed on the way
        for name in ("length", "next_pos", "pinned", "last_boi", "last_eoi", "pin"):
            np.testing.assert_array_equal(getattr(twice, name), getattr(once, name))
