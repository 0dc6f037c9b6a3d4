"""The SEED-Story sample builder against a hand-written expectation from spec §5.2."""

from __future__ import annotations

import re

import numpy as np
import pytest

from data_pipeline.samples import IGNORE, build_sample, image_string, story_texts
from seed_story_jax.errors import DataError


class WordTokenizer:
    """A test tokenizer whose ids are written by hand: words from a fixed table, "[INST]" one
    token, image markup parsed as added tokens (as the real Llama tokenizer does)."""

    bos_id, eos_id, pad_id, boi_id, eoi_id = 1, 2, 0, 30, 31
    WORDS = {"[INST]": 5, "a": 10, "b": 11, "c": 12, "d": 13, "e": 14, "f": 15, "g": 16}

    def __init__(self, n_img=64):
        self.img_ids = list(range(40, 40 + n_img))

    def encode(self, text):
        out = []
        for piece in re.findall(r"<img>|</img>|<img_\d{5}>|\[INST\]|[^\s<\[]+", text):
            if piece == "<img>":
                out.append(self.boi_id)
            elif piece == "</img>":
                out.append(self.eoi_id)
            elif piece.startswith("<img_"):
                out.append(self.img_ids[int(piece[5:10])])
            else:
                out.append(self.WORDS[piece])
        return out


CAPTIONS = ["a b", "c", "d e", "f", "g"]


def test_texts():
    im = "<img><img_00000><img_00001></img>"
    assert image_string(2) == im
    instruction, response = story_texts(CAPTIONS, 1, 2)
    assert instruction == "a b" + im + "[INST]c" + im  # first caption without separator
    assert response == "[INST]d e" + im
    assert story_texts(CAPTIONS, 0, 2) == ("a b" + im, "[INST]c" + im)
    with pytest.raises(ValueError):
        story_texts(CAPTIONS, 4, 2)  # g <= n - 2


def test_sample_parity_hand_written():
    """g = 1, 2 image tokens: images 0, 1 are inputs, image 2 the target."""
    tok = WordTokenizer()
    s = build_sample(CAPTIONS, 1, tok, num_img_tokens=2, max_length=24)
    BOS, EOS, PAD, BOI, EOI, I0, I1, INST = 1, 2, 0, 30, 31, 40, 41, 5
    X = IGNORE
    # pos:       0    1   2   3    4   5    6     7   8    9   10  11   12    13  14  15   16   17  18   19   20
    ids = [BOS, 10, 11, BOI, I0, I1, EOI, INST, 12, BOI, I0, I1, EOI, INST, 13, 14, BOI, I0, I1, EOI, EOS]
    # Instruction (BOS..pos 12) unsupervised; the response's "[INST]", caption and <img> are;
    # its 2 image tokens and </img> are not; EOS is predicted from </img> (label at pos 20).
    labels = [X] * 13 + [INST, 13, 14, BOI, X, X, X, EOS]
    assert s.length == 21
    assert s.input_ids.tolist() == ids + [PAD] * 3
    assert s.labels.tolist() == labels + [X] * 3
    assert s.attention_mask.tolist() == [1] * 21 + [0] * 3
    cmp = [False] * 24
    for p in (4, 5, 10, 11):
        cmp[p] = True
    gen = [False] * 24
    gen[17] = gen[18] = True
    assert s.ids_cmp_mask.tolist() == cmp
    assert s.ids_gen_mask.tolist() == gen
    assert s.embeds_cmp_mask.tolist() == [True, True, False]
    assert s.embeds_gen_mask.tolist() == [False, False, True]
    assert s.input_ids.dtype == np.int32 and s.labels.dtype == np.int32 and s.ids_cmp_mask.dtype == bool


def test_g_zero_and_last():
    tok = WordTokenizer()
    s = build_sample(CAPTIONS, 0, tok, num_img_tokens=2, max_length=64)
    assert s.input_ids[: s.length].tolist() == [1, 10, 11, 30, 40, 41, 31, 5, 12, 30, 40, 41, 31, 2]
    assert s.embeds_cmp_mask.tolist() == [True, False] and s.ids_cmp_mask.sum() == 2
    s = build_sample(CAPTIONS, 3, tok, num_img_tokens=2, max_length=64)  # all 5 images
    assert s.embeds_cmp_mask.tolist() == [True] * 4 + [False]
    assert s.ids_cmp_mask.sum() == 8 and s.ids_gen_mask.sum() == 2
    sup = s.labels[s.labels != IGNORE].tolist()
    assert sup == [5, 16, 30, 2]  # "[INST]" "g" <img> EOS


def test_drop_at_max_length():
    tok = WordTokenizer()
    assert build_sample(CAPTIONS, 1, tok, num_img_tokens=2, max_length=21) is None  # len 21 >= 21
    s = build_sample(CAPTIONS, 1, tok, num_img_tokens=2, max_length=22)  # len 21 < 22: kept, 1 pad
    assert s.length == 21 and s.input_ids[-1] == tok.pad_id and s.labels[-1] == IGNORE
    # Full size: 10 images spend 660 tokens.
    s = build_sample(["a"] * 10, 8, WordTokenizer(64), num_img_tokens=64, max_length=1280)
    assert s.length == 1 + 10 * (1 + 66) + 9 + 1  # BOS, 10 × (1-word caption + 66), 9 [INST], EOS
    assert s.ids_cmp_mask.sum() == 9 * 64 and s.ids_gen_mask.sum() == 64


def test_tokenizer_that_does_not_parse_markup_is_refused():
    class Plain(WordTokenizer):
        def encode(self, text):
            return [10 for _ in text.split("<")]

    with pytest.raises(DataError, match="added tokens"):
        build_sample(CAPTIONS, 1, Plain(), num_img_tokens=2, max_length=200)


# ------------------------------------------------------------------------------ cache views


def _long_captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = list("abcdefg")
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 6)))) for _ in range(n)]


def _held_by_the_cache(ids: list, tok, policy, capacity: int) -> list[int]:
    """Stream positions the real (compiled) cache holds after the whole sequence, written in chunks."""
    import jax.numpy as jnp

    from seed_story_jax import cache as kvc

    ids = np.asarray(ids)
    kinds = np.full(len(ids), kvc.TEXT, np.int8)
    kinds[ids == tok.boi_id], kinds[ids == tok.eoi_id] = kvc.BOI, kvc.EOI
    kinds[np.isin(ids, tok.img_ids)] = kvc.IMG
    cache = kvc.KVCache.create(1, 1, capacity, 1, 2, policy=policy)
    step = min(7, policy.max_chunk(capacity))
    for i in range(0, len(ids), step):
        k = kinds[i:i + step][None]
        _, cache = kvc.plan_write(cache, jnp.ones(k.shape, bool), kinds=jnp.asarray(k))
    return [h[0] for h in kvc.held(cache)]


@pytest.mark.parametrize("kind,capacity,sink_capacity", [("multimodal-sink", 80, 30), ("sink", 60, 4)])
def test_view_sample_is_what_the_story_cache_holds(kind, capacity, sink_capacity):
    """A long story's sample seen through the cache: exactly the tokens the compiled cache holds
    after writing the whole sample (every image that has one of them held whole), in stream order,
    with the response supervised as in the full sample and each kept image's record frame named."""
    from data_pipeline.samples import build_view_sample
    from seed_story_jax.cache import CachePolicy

    tok = WordTokenizer(4)
    caps = _long_captions(24)
    pol = CachePolicy(kind=kind, positions="shifted", pin_slots=sink_capacity - 4 if kind != "sink" else 0)
    for g in (3, 12, 22):
        full = build_sample(caps, g, tok, num_img_tokens=4, max_length=10_000)
        ids = full.input_ids[:full.length].tolist()
        held = set(_held_by_the_cache(ids, tok, pol, capacity))
        boi = [i for i, t in enumerate(ids) if t == tok.boi_id]
        want, images = set(held), []
        for j, b in enumerate(boi):
            if held & set(range(b, b + 6)):
                want |= set(range(b, b + 6))
                images.append(j)
        want = sorted(want)
        s = build_view_sample(caps, g, tok, pol, capacity, num_img_tokens=4, max_length=200, max_images=12)
        assert s.input_ids[:s.length].tolist() == [ids[i] for i in want]
        assert s.labels[:s.length].tolist() == [int(full.labels[i]) for i in want]
        assert s.image_ids.tolist() == images and images[-1] == g + 1
        assert s.ids_cmp_mask.sum() == 4 * (len(images) - 1) and s.ids_gen_mask.sum() == 4
        assert s.embeds_cmp_mask.tolist() == [True] * (len(images) - 1) + [False]
        if g == 22:
            assert s.length < full.length and want[:4] == [0, 1, 2, 3]  # evicted, first tokens kept
            if kind == "sink":  # no pins: the images kept are the latest ones
                assert images == list(range(images[0], g + 2))
            else:  # the pins hold images the same ring alone would have lost
                ring = CachePolicy(kind="sink", positions="shifted")
                alone = build_view_sample(caps, g, tok, ring, capacity - (sink_capacity - 4), num_img_tokens=4,
                                          max_length=200, max_images=12)
                assert set(alone.image_ids) < set(images)


def test_view_sample_without_eviction_is_the_sample():
    from data_pipeline.samples import build_view_sample
    from seed_story_jax.cache import CachePolicy

    tok = WordTokenizer(4)
    caps = _long_captions(8)
    pol = CachePolicy(kind="multimodal-sink", positions="shifted", pin_slots=20)
    a = build_sample(caps, 5, tok, num_img_tokens=4, max_length=300)
    b = build_view_sample(caps, 5, tok, pol, 256, num_img_tokens=4, max_length=300, max_images=10)
    for f in ("input_ids", "labels", "attention_mask", "ids_cmp_mask", "ids_gen_mask", "embeds_cmp_mask",
              "embeds_gen_mask", "image_ids"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


def test_view_sample_refuses_what_does_not_fit():
    from data_pipeline.samples import build_view_sample
    from seed_story_jax.cache import CachePolicy

    tok = WordTokenizer(4)
    caps = ["a b c d e f g a b c d e f g"] * 12
    pol = CachePolicy(kind="multimodal-sink", positions="shifted", pin_slots=10)
    with pytest.raises(DataError, match="do not fit in the ring"):
        build_view_sample(caps, 10, tok, pol, 30, num_img_tokens=4, max_length=200, max_images=12)
    with pytest.raises(DataError, match="data.max_images"):
        build_view_sample(_long_captions(24), 22, tok, CachePolicy(kind="multimodal-sink", positions="shifted",
                                                                   pin_slots=60), 120,
                          num_img_tokens=4, max_length=300, max_images=4)
