"""The SEED-Story training sample, exactly as `decode_long_story_data` builds it (spec §5.2).

For a record of n frames and a given g in [0, n-2] (images 0..g are inputs, g+1 is the target):

    instruction = cap[0] + IMG + Σ_{i<g} ("[INST]" + cap[i+1] + IMG)
    response    = "[INST]" + cap[g+1] + IMG
    input_ids   = [BOS] + enc(instruction) + enc(response) + [EOS]      (two separate encodes)
    labels      = [-100] * (1 + len(enc(instruction))) + enc(response) + [EOS]
    labels[last <img> + 1 : last </img> + 1] = -100    (64 image tokens and </img> unsupervised;
                                                          EOS is predicted from </img>)

A sample with len(input_ids) >= max_length is dropped (None); otherwise it is right-padded with the
pad id (attention 0, labels -100, masks False). The tokenizer is anything with `encode(text)` (no
BOS/EOS, image markup parsed as its added tokens), `bos_id`, `eos_id`, `pad_id`, `boi_id`, `eoi_id`
— `seed_story_jax.tokenizer.Tokenizer` is the real one.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from seed_story_jax.errors import DataError

BOI = "<img>"
EOI = "</img>"
IMG = "<img_{:05d}>"
SEP = "[INST]"  # plain text, no [/INST]; the first caption has none
IGNORE = -100


def image_string(num_img_tokens: int) -> str:
    return BOI + "".join(IMG.format(i) for i in range(num_img_tokens)) + EOI


def story_texts(captions: Sequence[str], g: int, num_img_tokens: int) -> tuple[str, str]:
    """(instruction, response) for images 0..g as inputs and image g+1 as the target."""
    if not 0 <= g <= len(captions) - 2:
        raise ValueError(f"g must be in [0, {len(captions) - 2}], got {g}")
    im = image_string(num_img_tokens)
    instruction = captions[0] + im
    for i in range(g):
        instruction += SEP + captions[i + 1] + im
    response = SEP + captions[g + 1] + im
    return instruction, response


@dataclasses.dataclass
class Sample:
    input_ids: np.ndarray  # (L,) int32
    attention_mask: np.ndarray  # (L,) int32
    labels: np.ndarray  # (L,) int32
    ids_cmp_mask: np.ndarray  # (L,) bool: the <img_xxxxx> slots of input images 0..g
    ids_gen_mask: np.ndarray  # (L,) bool: the <img_xxxxx> slots of the target image g+1
    embeds_cmp_mask: np.ndarray  # (g+2,) bool: [True]*(g+1) + [False]
    embeds_gen_mask: np.ndarray  # (g+2,) bool: [False]*(g+1) + [True]
    length: int  # tokens before padding
    image_ids: np.ndarray  # (images,) the record frame of each image slot: 0..g+1, or a cache view's


def build_sample(captions: Sequence[str], g: int, tokenizer, *, num_img_tokens: int = 64,
                 max_length: int = 1280) -> Optional[Sample]:
    """The sample for images 0..g+1 of `captions`; None when it is dropped for length."""
    ids, labels = _encode(captions, g, tokenizer, num_img_tokens)
    if len(ids) >= max_length:
        return None
    return _finish(ids, labels, np.arange(g + 2), tokenizer, num_img_tokens, max_length)


def build_view_sample(captions: Sequence[str], g: int, tokenizer, policy, capacity: int, *,
                      num_img_tokens: int = 64, max_length: int = 1280, max_images: int = 10) -> Sample:
    """The sample for image g+1 of a long story as the story loop's cache shows it: the tokens a
    `policy` cache of `capacity` slots (seed_story_jax/cache.py) holds after the whole sample was
    written — its first tokens, the pinned image spans (multimodal sink) and the recent ring — in
    stream order, at positions 0..n−1 (the cache's `shifted` positions). Cached tokens are
    re-encoded in this context rather than the one they were written in (a window's
    approximation). An image with any held token is held whole, as the model merges images whole;
    the response (caption g+1 and its image) must fit in the ring. `image_ids` names each kept
    image's frame."""
    from seed_story_jax.cache import BOI, EOI, IMG, TEXT, held_positions

    ids, labels = _encode(captions, g, tokenizer, num_img_tokens)
    ids_a = np.asarray(ids)
    kinds = np.full(len(ids), TEXT, np.int8)
    boi, eoi = np.flatnonzero(ids_a == tokenizer.boi_id), np.flatnonzero(ids_a == tokenizer.eoi_id)
    _check_images(boi, eoi, g + 2, num_img_tokens)
    kinds[boi], kinds[eoi] = BOI, EOI
    for b, e in zip(boi, eoi):
        kinds[b + 1:e] = IMG
    keep = np.zeros(len(ids), bool)
    keep[held_positions(kinds, policy, capacity)] = True
    images = []
    for j, (b, e) in enumerate(zip(boi, eoi)):
        if keep[b:e + 1].any():
            keep[b:e + 1] = True
            images.append(j)
    start = int(np.flatnonzero(np.asarray(labels) != IGNORE)[0])  # the response: "[INST]" caption g+1 IMG EOS
    if not keep[start:].all():
        raise DataError(f"caption {g + 1} and its image ({len(ids) - start} tokens) do not fit in the ring of a "
                        f"{policy.kind} cache of {capacity} slots")
    if len(images) > max_images:
        raise DataError(f"the {policy.kind} cache of {capacity} slots holds parts of {len(images)} images, more "
                        f"than data.max_images ({max_images}): raise data.max_images")
    kept = np.flatnonzero(keep)
    if len(kept) >= max_length:
        raise DataError(f"the {policy.kind} cache view of {len(kept)} tokens does not fit data.max_length "
                        f"({max_length}): raise it above the cache's capacity ({capacity}) plus a frame")
    return _finish([ids[i] for i in kept], [labels[i] for i in kept], np.asarray(images), tokenizer,
                   num_img_tokens, max_length)


def _encode(captions: Sequence[str], g: int, tokenizer, num_img_tokens: int) -> tuple[list, list]:
    instruction, response = story_texts(captions, g, num_img_tokens)
    enc_in = list(tokenizer.encode(instruction))
    enc_out = list(tokenizer.encode(response))
    ids = [tokenizer.bos_id] + enc_in + enc_out + [tokenizer.eos_id]
    labels = [IGNORE] * (1 + len(enc_in)) + enc_out + [tokenizer.eos_id]
    return ids, labels


def _check_images(boi, eoi, n_img: int, num_img_tokens: int) -> None:
    if len(boi) != n_img or len(eoi) != n_img or np.any(eoi - boi - 1 != num_img_tokens) or np.any(eoi < boi):
        # The original would silently build wrong masks here; it means the tokenizer does not parse
        # the image markup as single added tokens (or a caption holds markup).
        raise DataError(f"tokenizer produced {len(boi)} <img> and {len(eoi)} </img> tokens for {n_img} images "
                        f"(expected {num_img_tokens} image tokens between each pair): does it parse the image "
                        f"markup as added tokens?")


def _finish(ids: list, labels: list, image_ids: np.ndarray, tokenizer, num_img_tokens: int,
            max_length: int) -> Sample:
    """Padded arrays and masks of a token sequence whose last image is the target."""
    n = len(ids)
    ids_a = np.full(max_length, tokenizer.pad_id, np.int32)
    ids_a[:n] = ids
    lab = np.full(max_length, IGNORE, np.int32)
    lab[:n] = labels
    attn = np.zeros(max_length, np.int32)
    attn[:n] = 1
    boi = np.flatnonzero(ids_a[:n] == tokenizer.boi_id)
    eoi = np.flatnonzero(ids_a[:n] == tokenizer.eoi_id)
    n_img = len(image_ids)
    _check_images(boi, eoi, n_img, num_img_tokens)
    cmp = np.zeros(max_length, bool)
    for b, e in zip(boi[:-1], eoi[:-1]):
        cmp[b + 1:e] = True
    gen = np.zeros(max_length, bool)
    gen[boi[-1] + 1:eoi[-1]] = True
    lab[boi[-1] + 1:eoi[-1] + 1] = IGNORE
    embeds_cmp = np.array([True] * (n_img - 1) + [False])
    return Sample(ids_a, attn, lab, cmp, gen, embeds_cmp, ~embeds_cmp, n, np.asarray(image_ids, np.int64))
