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


def build_sample(captions: Sequence[str], g: int, tokenizer, *, num_img_tokens: int = 64,
                 max_length: int = 1280) -> Optional[Sample]:
    """The sample for images 0..g+1 of `captions`; None when it is dropped for length."""
    instruction, response = story_texts(captions, g, num_img_tokens)
    enc_in = list(tokenizer.encode(instruction))
    enc_out = list(tokenizer.encode(response))
    ids = [tokenizer.bos_id] + enc_in + enc_out + [tokenizer.eos_id]
    labels = [IGNORE] * (1 + len(enc_in)) + enc_out + [tokenizer.eos_id]
    n = len(ids)
    if n >= max_length:
        return None
    ids_a = np.full(max_length, tokenizer.pad_id, np.int32)
    ids_a[:n] = ids
    lab = np.full(max_length, IGNORE, np.int32)
    lab[:n] = labels
    attn = np.zeros(max_length, np.int32)
    attn[:n] = 1

    boi = np.flatnonzero(ids_a[:n] == tokenizer.boi_id)
    eoi = np.flatnonzero(ids_a[:n] == tokenizer.eoi_id)
    n_img = g + 2
    if len(boi) != n_img or len(eoi) != n_img or np.any(eoi - boi - 1 != num_img_tokens) or np.any(eoi < boi):
        # The original would silently build wrong masks here; it means the tokenizer does not parse
        # the image markup as single added tokens (or a caption holds markup).
        raise DataError(f"tokenizer produced {len(boi)} <img> and {len(eoi)} </img> tokens for {n_img} images "
                        f"(expected {num_img_tokens} image tokens between each pair): does it parse the image "
                        f"markup as added tokens?")
    cmp = np.zeros(max_length, bool)
    for b, e in zip(boi[:-1], eoi[:-1]):
        cmp[b + 1:e] = True
    gen = np.zeros(max_length, bool)
    gen[boi[-1] + 1:eoi[-1]] = True
    lab[boi[-1] + 1:eoi[-1] + 1] = IGNORE
    embeds_cmp = np.array([True] * (g + 1) + [False])
    return Sample(ids_a, attn, lab, cmp, gen, embeds_cmp, ~embeds_cmp, n)
