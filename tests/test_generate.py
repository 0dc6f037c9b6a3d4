"""Decoding: greedy parity with transformers' generate, cache vs no cache, compile-once, sampling, EOS."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from seed_story_jax import cache as kvc
from seed_story_jax.config import LlamaConfig
from seed_story_jax.generate import Generator, GenerateOptions, bucket, sample_logits
from tests.test_llama import converted, hf_llama, rel_err

CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=256)
PROMPTS = [[1, 5, 9, 33, 7, 80, 4], [1, 100, 3]]
NO_EOS = dict(eos_token_id=None)


@pytest.fixture(scope="module")
def ref():
    return hf_llama(CFG, seed=3)


@pytest.fixture(scope="module")
def gen(ref):
    return Generator(converted(ref, CFG))


def test_greedy_matches_transformers_generate(ref, gen):
    """32 new tokens, token-identical, for a ragged batch (each row against its own HF run)."""
    out = gen.generate(PROMPTS, GenerateOptions(max_new_tokens=32, **NO_EOS))
    ref.generation_config.eos_token_id = None
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            want = ref.generate(torch.tensor([p]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                pad_token_id=0)[0, len(p):].numpy()
        np.testing.assert_array_equal(out.tokens[i], want)
    assert out.num_generated.tolist() == [32, 32]


def test_cached_decoding_equals_uncached_forward(gen):
    """Prefill a ragged batch, decode token by token through the cache, and compare every step's
    logits with one uncached forward over the whole sequence. Tolerance 1e-5 relative."""
    seqs = np.random.default_rng(0).integers(3, CFG.vocab_size, (2, 20)).astype(np.int32)
    lengths = np.array([7, 4], np.int32)
    tokens = np.where(np.arange(16)[None] < lengths[:, None], seqs[:, :16], 0).astype(np.int32)
    logits, hidden, cache = gen.prefill(tokens, lengths, gen.new_cache(2, 64))
    assert cache.length.tolist() == [7, 4] and cache.next_pos.tolist() == [7, 4]
    assert cache.valid.sum(1).tolist() == [7, 4]  # padding was not written
    got = [np.asarray(logits)]
    for t in range(6):
        tok = seqs[np.arange(2), lengths + t]
        logits, _, cache = gen.step(tok, cache)
        got.append(np.asarray(logits))
    model = nnx.merge(gen.graphdef, gen.state)
    for row in range(2):
        n = lengths[row]
        full = np.asarray(jax.jit(lambda ids: model(ids)[0])(jnp.asarray(seqs[row:row + 1, : n + 6])))[0]
        want = full[n - 1: n + 6]
        assert rel_err(np.stack([g[row] for g in got]), want) <= 1e-5
    assert np.asarray(cache.pos[0, :13]).tolist() == list(range(13))


def test_hundred_decode_steps_compile_once(gen, compile_counter):
    tokens, lengths = gen.pad_prompts(PROMPTS)
    toks = [jnp.asarray([t, t + 1], jnp.int32) for t in range(3, 103)]  # built outside the counted block
    cache = gen.new_cache(2, 128)
    _, _, cache = gen.prefill(tokens, lengths, cache)
    logits, _, cache = gen.step(toks[0], cache)  # the first step compiles
    with compile_counter() as c:
        for t in toks[1:]:
            logits, _, cache = gen.step(t, cache)
        jax.block_until_ready(logits)
    assert c.count == 0
    assert int(cache.length[0]) == PROMPTS[0].__len__() + 100


def test_prompts_in_one_bucket_share_compilations(gen, compile_counter):
    opts = GenerateOptions(max_new_tokens=16, **NO_EOS)
    gen.generate([[1, 2, 3], [1, 9]], opts)
    assert bucket(3) == bucket(11) == 16
    with compile_counter() as c:
        out = gen.generate([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 7, 7, 7]], opts)
    assert c.count == 0 and out.tokens.shape == (2, 16)


def test_sampling_is_deterministic_per_seed(gen):
    opts = GenerateOptions(max_new_tokens=24, temperature=1.0, top_k=20, top_p=0.9, seed=7, **NO_EOS)
    a = gen.generate(PROMPTS, opts).tokens
    b = gen.generate(PROMPTS, opts).tokens
    c = gen.generate(PROMPTS, GenerateOptions(**{**opts.__dict__, "seed": 8})).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # top_k = 1 is greedy whatever the temperature and seed
    g = gen.generate(PROMPTS, GenerateOptions(max_new_tokens=24, **NO_EOS)).tokens
    k1 = gen.generate(PROMPTS, GenerateOptions(**{**opts.__dict__, "top_k": 1, "temperature": 5.0})).tokens
    np.testing.assert_array_equal(g, k1)


def test_top_k_top_p_support():
    logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.15, 0.1] + [1e-6] * 4]))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = jax.jit(jax.vmap(lambda k, tk, tp: sample_logits(logits, k, 1.0, tk, tp, greedy=False),
                            in_axes=(0, None, None)))
    assert set(np.asarray(draw(keys, 2, 1.0)).ravel()) == {0, 1}
    assert set(np.asarray(draw(keys, 0, 0.7)).ravel()) == {0, 1}  # 0.5 < 0.7 ⇒ keep the 2nd, not the 3rd
    assert set(np.asarray(draw(keys, 0, 0.8)).ravel()) == {0, 1, 2}
    assert set(np.asarray(draw(keys, 0, 1.0)).ravel()) >= {0, 1, 2, 3}


def test_eos_stops_and_pads(gen):
    base = gen.generate(PROMPTS, GenerateOptions(max_new_tokens=24, **NO_EOS)).tokens
    eos = int(base[0, 5])
    first = [int(np.argmax(row == eos)) if (row == eos).any() else None for row in base]
    out = gen.generate(PROMPTS, GenerateOptions(max_new_tokens=24, eos_token_id=eos, pad_token_id=0))
    for i, f in enumerate(first):
        if f is None:
            assert out.num_generated[i] == 24
            np.testing.assert_array_equal(out.tokens[i], base[i])
        else:
            assert out.num_generated[i] == f + 1
            np.testing.assert_array_equal(out.tokens[i, : f + 1], base[i, : f + 1])
            assert (out.tokens[i, f + 1:] == 0).all()


def test_logits_processor_runs_inside_the_compiled_step(ref):
    """A processor that forces token 42 right after token 17 is emitted, and 17 at step 3."""
    def force(logits, last, generated, step):
        forced = jnp.where(step == 3, 17, jnp.where(last == 17, 42, -1))
        onehot = jax.nn.one_hot(forced, logits.shape[-1], dtype=jnp.bool_)
        return jnp.where((forced >= 0)[:, None], jnp.where(onehot, 1e9, -1e9), logits)

    gen = Generator(converted(ref, CFG), processor=force)
    out = gen.generate(PROMPTS, GenerateOptions(max_new_tokens=8, **NO_EOS)).tokens
    assert (out[:, 3] == 17).all() and (out[:, 4] == 42).all()


def test_cache_mask_comes_from_slot_metadata():
    """Slots are not "the first n": a slot is seen iff it is valid and its position is not later."""
    cache = kvc.KVCache.create(1, 1, 6, 1, 2)
    w, cache = kvc.plan_write(cache, jnp.asarray([[True, False, True]]))
    assert w.slots.tolist() == [[0, 6, 1]]  # padding goes nowhere (slot == capacity is dropped)
    assert w.positions.tolist() == [[0, 0, 1]]
    assert cache.valid.tolist() == [[True, True, False, False, False, False]]
    w, cache = kvc.plan_write(cache, jnp.asarray([[True, True]]), positions=jnp.asarray([[10, 2]]))
    assert w.slots.tolist() == [[2, 3]] and int(cache.next_pos[0]) == 11
    m = kvc.attention_mask(cache, jnp.asarray([[2, 10]]))
    assert m[0, 0].tolist() == [[True, True, False, True, False, False], [True, True, True, True, False, False]]
