"""Stage 2 — MLLM instruction tuning on stories (spec §5.3, the original's sft_storystream.sh).

Per step, for a batch of §5.2 samples (input_ids, labels, ids_cmp/gen masks (B, L); images
(B, M, S, S, 3) with embeds_cmp/gen masks (B, M)):

    features = ViT(every image slot)                       frozen, no gradient, computed in the step
    loss = lm_loss_scale · CE + rec_loss_scale · cosine    models/mllm.py `loss_fn` (spec §2.6)

CE is the next-token cross-entropy over labels != -100; cosine is 1 − cos between the output
resampler's regression from the hidden states at the target's <img_xxxxx> positions and the target
image's ViT features. Both are reported (`lm_loss`, `rec_loss`) beside the total (`loss`). LoRA
dropout is on in training (the step's rng).

Trained (train.trainable): `lora` — LoRA A/B on the seven projections (llm.lora: r 16, alpha 32)
+ every RMSNorm + embed_tokens + lm_head + both agent resamplers (the Llama's base kernels frozen;
438.5 M at 7B); `full` — the whole Llama + both resamplers. The ViT is always frozen.

Tokenizer (ids must match the checkpoint the run starts from): `train.init`/tokenizer when the
init checkpoint has one, else `data.path`/tokenizer; synthetic stories without either get a small
SentencePiece model trained on synthetic captions (deterministic, cached per process).

Model FLOPs per example (MFU's numerator; remat recomputation not counted):

    Llama over the L = data.max_length positions, per token (lm.py's formula):
        Σ 6·|w| trained / 4·|w| frozen matmul weights (LoRA ≈ 4N + 6·N_lora)  + 6·layers·L·H·D attention
    input resampler on the M image slots   3 · F_fwd each (trained; 1 · F_fwd if frozen)
    output resampler on max_gen targets    3 · F_fwd each (trained; 2 · F_fwd if frozen)
    ViT on the M image slots               1 · F_fwd each (frozen, nothing upstream trains)
F_fwd by XLA cost analysis of one abstract forward. Every slot is computed (static shapes), so the
ViT and input resampler work on empty slots is counted too: it is done.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from seed_story_jax.config import ConfigError, SeedStoryConfig
from seed_story_jax.train.stage1 import _f32, build_component, forward_flops, story_examples, vit_features, vit_flops
from seed_story_jax.train.task import Bundle, Task, trainable_predicate

STAGE2_KEYS = ("input_ids", "labels", "ids_cmp_mask", "ids_gen_mask", "images", "embeds_cmp_mask",
               "embeds_gen_mask")
AGENT = ("llm", "mllm")  # the components stage 2 trains
AGENT_PRESETS = ("lora", "full")
SYNTH_TOKENIZER_STORIES = 64


# ------------------------------------------------------------------------------ tokenizer


def story_tokenizer(cfg: SeedStoryConfig):
    """The tokenizer samples are encoded with (see the module docstring)."""
    from seed_story_jax.tokenizer import Tokenizer

    t, d = cfg.train, cfg.data
    for base in (t.init, d.path):
        if base and (Path(base) / "tokenizer").is_dir():
            tok = Tokenizer.load(Path(base) / "tokenizer")
            break
    else:
        if d.path:
            raise ConfigError(f"train.stage {t.stage} needs a tokenizer: none in train.init ({t.init or 'unset'}) "
                              f"or {d.path}/tokenizer")
        vocab = min(512, cfg.llm.vocab_size - 66)
        if vocab < 300:
            raise ConfigError(f"llm.vocab_size ({cfg.llm.vocab_size}) is too small for a synthetic-story tokenizer "
                              "(>= 366: 300 pieces + 66 image tokens)")
        tok = synthetic_tokenizer(t.seed, d.chunk, vocab)
    if tok.vocab_size > cfg.llm.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} ids but llm.vocab_size is {cfg.llm.vocab_size}")
    return tok


@functools.lru_cache(maxsize=4)
def synthetic_tokenizer(seed: int, frames: int, vocab: int):
    """A SentencePiece model (+ the 66 image tokens) trained on the captions of the first
    SYNTH_TOKENIZER_STORIES synthetic stories of `seed`."""
    from data_pipeline.synth import make_story
    from seed_story_jax.tokenizer import train_tiny_tokenizer

    texts = [c for i in range(SYNTH_TOKENIZER_STORIES) for c in make_story(seed, i, frames, 16)[1]]
    with tempfile.TemporaryDirectory() as tmp:
        return train_tiny_tokenizer(Path(tmp) / "tok", texts, vocab)


# ------------------------------------------------------------------------------ loss


class PinnedLlama:
    """The Llama as models/mllm.py's `forward` uses it (`embed`, then a call on the embeddings),
    with the activations pinned to the batch sharding: the embedding table gathered FSDP-style
    (lm.py's `embed_sharded`), the merged embeddings, logits and hidden states constrained by
    logical names. Without it GSPMD follows the table's `embed` sharding and every device computes
    the whole batch. A no-op outside the train step's activation rules."""

    def __init__(self, llm):
        self.llm = llm

    def embed(self, input_ids: jax.Array) -> jax.Array:
        from seed_story_jax.train.lm import embed_sharded

        return embed_sharded(self.llm, input_ids)

    def __call__(self, *, inputs_embeds: jax.Array, **kw):
        from seed_story_jax.nn.sharding import constrain

        logits, hidden, cache = self.llm(inputs_embeds=constrain(inputs_embeds, ("batch", "length", None)), **kw)
        if logits is not None:
            logits = constrain(logits, ("batch", "length", "vocab"))
        return logits, constrain(hidden, ("batch", "length", None)), cache


def agent_features(model: Bundle, batch: dict) -> jax.Array:
    """(B, M, T, D) ViT features of every image slot (frozen ViT, no gradient)."""
    return vit_features(model.vit, batch["images"])


def agent_loss(model: Bundle, batch: dict, dropout_key=None):
    """models/mllm.py's stage-2 objective (CE + cosine) on the bundle, activations pinned."""
    from seed_story_jax.models import mllm as M

    return M.loss_fn(PinnedLlama(model.llm), model.mllm, batch, agent_features(model, batch),
                     dropout_key=dropout_key)


def stage2_loss(model: Bundle, batch: dict, rng):
    total, m = agent_loss(model, batch, dropout_key=rng)
    return total, {"lm_loss": m["lm_loss"], "rec_loss": m["rec_loss"], "lm_tokens": m["lm_tokens"],
                   "gen_images": m["gen_images"]}


def eval_loss(model: Bundle, batch: dict):
    """Teacher-forced CE and cosine without dropout, with their counts (for token/image-weighted
    means over many batches): {lm_loss, lm_tokens, rec_loss, gen_images}."""
    _, m = agent_loss(model, batch)
    return {k: m[k] for k in ("lm_loss", "lm_tokens", "rec_loss", "gen_images")}


# ------------------------------------------------------------------------------ FLOPs


def llm_flops_per_token(cfg: SeedStoryConfig, predicate, seq_len: int, *, forward_only: bool = False) -> float:
    """lm.py's per-token formula; forward only: 2·|w| + 2·layers·L·H·D."""
    from seed_story_jax.train.lm import flops_per_token

    if not forward_only:
        with nnx.use_eager_sharding(False):
            return flops_per_token(cfg.llm, predicate, seq_len)
    with nnx.use_eager_sharding(False):
        back = flops_per_token(cfg.llm, lambda p: False, seq_len)  # 4·|w| + 6·layers·L·H·D
    attn = 6.0 * cfg.llm.num_layers * seq_len * cfg.llm.num_heads * cfg.llm.resolved_head_dim
    return (back - attn) / 2.0 + attn / 3.0


def resampler_flops(cfg: SeedStoryConfig) -> tuple[float, float]:
    """Forward FLOPs of one input-resampler call (one image) and one output-resampler call."""
    m = cfg.mllm
    ri, ro = m.input_resampler, m.output_resampler
    f_in = forward_flops("mllm", m, _f32(1, ri.input_tokens, ri.kv_dim), method="input_resampler")
    f_out = forward_flops("mllm", m, _f32(1, ro.input_tokens, ro.kv_dim), method="output_resampler")
    return f_in, f_out


def stage2_flops(cfg: SeedStoryConfig, predicate) -> float:
    d, m = cfg.data, cfg.mllm
    f_in, f_out = resampler_flops(cfg)
    trained = lambda sub: predicate(("mllm", sub, "q_proj", "kernel"))  # noqa: E731
    m_in = 3.0 if trained("input_resampler") else 1.0  # frozen: nothing upstream of it trains
    m_out = 3.0 if trained("output_resampler") else 2.0  # frozen: still passes gradients to the Llama
    return (llm_flops_per_token(cfg, predicate, d.max_length) * d.max_length
            + m_in * f_in * d.max_images + m_out * f_out * m.max_gen_images + vit_flops(cfg) * d.max_images)


# ------------------------------------------------------------------------------ the task


def check_agent(cfg: SeedStoryConfig, stage: int) -> None:
    for name in ("llm", "mllm", "vit", "data"):
        if getattr(cfg, name) is None:
            raise ConfigError(f"train.stage {stage} needs a `{name}:` section")
    d, m, v = cfg.data, cfg.mllm, cfg.vit
    if d.num_img_tokens != m.num_img_tokens:
        raise ConfigError(f"data.num_img_tokens ({d.num_img_tokens}) must equal mllm.num_img_tokens "
                          f"({m.num_img_tokens})")
    if d.image_size != v.image_size:
        raise ConfigError(f"data.image_size ({d.image_size}) must equal vit.image_size ({v.image_size})")
    ri = m.input_resampler
    if (v.n_queries, v.output_dim) != (ri.input_tokens, ri.kv_dim):
        raise ConfigError(f"the ViT gives {v.n_queries} × {v.output_dim} features; mllm.input_resampler reads "
                          f"input_tokens × kv_dim = {ri.input_tokens} × {ri.kv_dim}")
    if ri.embed_dim != cfg.llm.hidden_size:
        raise ConfigError(f"mllm.input_resampler.embed_dim ({ri.embed_dim}) must equal llm.hidden_size "
                          f"({cfg.llm.hidden_size})")


def stage2_task(cfg: SeedStoryConfig, *, tokenizer=None, examples: Any = None) -> Task:
    check_agent(cfg, 2)
    t = cfg.train
    if not t.trainable_regex:
        if t.trainable not in AGENT_PRESETS:
            raise ConfigError(f"train.trainable={t.trainable!r}: stage 2 trains the agent; use one of {AGENT_PRESETS}")
        if t.trainable == "lora" and cfg.llm.lora is None:
            raise ConfigError("train.trainable=lora needs an llm.lora section (rank, alpha, targets), "
                              "e.g. configs/george-7b.yaml's")
    predicate = trainable_predicate(t.trainable, AGENT, t.trainable_regex)
    if examples is None:
        examples = story_examples(cfg, 2, STAGE2_KEYS, tokenizer or story_tokenizer(cfg))
    names = ("vit", "llm", "mllm")

    def build(rngs: nnx.Rngs) -> Bundle:
        return Bundle(**{n: build_component(n, cfg, rngs) for n in names})

    from seed_story_jax.train.stage1 import _data_key

    return Task(
        name="stage2",
        build=build,
        trainable=predicate,
        loss_fn=stage2_loss,
        examples=examples,
        tokens_per_example=float(cfg.data.max_length),
        flops_per_example=stage2_flops(cfg, predicate),
        flops_note=("Llama: 6·|w| trained / 4·|w| frozen + 6·layers·L·H·D per token over data.max_length; "
                    "resamplers 3·F (trained) per slot/target; ViT 1·F per slot (XLA forward cost analysis)"),
        key=("stage2", cfg.vit, cfg.llm, cfg.mllm, t.trainable, t.trainable_regex, _data_key(cfg.data)),
    )


def eval_batches(task: Task, params: dict, frozen: dict, batches) -> dict:
    """Token-weighted CE and image-weighted cosine of a stage-2 task's model (`params` + `frozen` as
    the train state holds them) over `batches` (dicts of numpy arrays, equal shapes): {lm_loss,
    rec_loss, tokens, images, batches}. Teacher-forced, no dropout; one compiled function."""
    from seed_story_jax.train.state import trainable_filter

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: task.build(nnx.Rngs(0)))
    graphdef = nnx.split(abstract, trainable_filter(task.trainable), ...)[0]

    @jax.jit
    def run(params, frozen, batch):
        return eval_loss(nnx.merge(graphdef, params, frozen), batch)

    ce = cos = tokens = images = 0.0
    n = 0
    for b in batches:
        m = jax.device_get(run(params, frozen, {k: jnp.asarray(b[k]) for k in STAGE2_KEYS}))
        ce += float(m["lm_loss"]) * float(m["lm_tokens"])
        cos += float(m["rec_loss"]) * float(m["gen_images"])
        tokens += float(m["lm_tokens"])
        images += float(m["gen_images"])
        n += 1
    return {"lm_loss": ce / max(tokens, 1.0), "rec_loss": cos / max(images, 1.0), "tokens": tokens,
            "images": images, "batches": n}
