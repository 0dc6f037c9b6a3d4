"""Stage 0: a plain causal-LM objective on the `llm` section — the training machinery's own proof,
and text-only fine-tuning for users.

Model FLOPs per token (what MFU divides by peak), written out:

    Σ over matmul weights w (every `kernel`, `lora_a`, `lora_b`; the embedding lookup is free):
        6·|w| if w is trained   (forward 2 + input gradient 2 + weight gradient 2)
        4·|w| if w is frozen    (forward 2 + input gradient 2; no weight gradient — the LoRA case)
    + 6·L·T·H·D  attention scores and values: forward 4·T·H·D per token per layer over the full
                 T×T square, halved for causality (MaxText's accounting), ×3 for the backward.

Full fine-tuning gives the familiar 6N + attention; LoRA gives ≈ 4N + 6·N_lora + attention.
Remat recomputation is not counted (MFU, not HFU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from seed_story_jax.config import SeedStoryConfig
from seed_story_jax.train.data import SyntheticLM
from seed_story_jax.nn.sharding import constrain
from seed_story_jax.train.task import Bundle, Task, trainable_predicate

MATMUL_LEAVES = ("kernel", "lora_a", "lora_b")


def cross_entropy(logits, labels):
    """Mean next-token CE in fp32 over labels != -100; returns (loss, number of tokens)."""
    logits = logits.astype(jnp.float32)
    valid = labels != -100
    safe = jnp.where(valid, labels, 0)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    n = jnp.maximum(valid.sum(), 1)
    return jnp.sum(jnp.where(valid, logz - picked, 0.0)) / n, valid.sum()


def embed_sharded(llm, ids):
    """The token lookup, FSDP style: the table is gathered whole along `embed` first (as every other
    weight is before use), so the rows come out split by batch like `ids`, not by `embed`."""
    table = constrain(llm.embed_tokens["embedding"][...], ("vocab", None))
    return constrain(jnp.take(table, ids, axis=0).astype(llm.dtype), ("batch", "length", None))


def lm_loss(model: Bundle, batch: dict, rng):
    h = embed_sharded(model.llm, batch["input_ids"])
    logits, _, _ = model.llm(inputs_embeds=h, dropout_key=rng)
    logits = constrain(logits, ("batch", "length", "vocab"))
    loss, n = cross_entropy(logits, batch["labels"])
    return loss, {"tokens": n.astype(jnp.float32)}


def flops_per_token(cfg, predicate, seq_len: int) -> float:
    """The formula in the module docstring, over the model's abstract parameter tree."""
    from seed_story_jax.models import llama

    abstract = nnx.eval_shape(lambda: Bundle(llm=llama.build(cfg, nnx.Rngs(0))))
    flat = nnx.state(abstract, nnx.Param).flat_state()
    total = 0.0
    for path, var in flat:
        if str(path[-1]) in MATMUL_LEAVES:
            total += (6.0 if predicate(tuple(path)) else 4.0) * var.value.size
    h, d = cfg.num_heads, cfg.resolved_head_dim
    return total + 6.0 * cfg.num_layers * seq_len * h * d


def lm_task(cfg: SeedStoryConfig) -> Task:
    from seed_story_jax.config import ConfigError
    from seed_story_jax.models import llama

    t = cfg.train
    if cfg.llm is None:
        raise ConfigError("train.stage 0 needs an `llm:` section")
    if t.data != "synthetic":
        raise ConfigError(f"train.data: stage 0 reads only 'synthetic' for now, got {t.data!r}")
    llm_cfg = cfg.llm
    predicate = trainable_predicate(t.trainable, ("llm",), t.trainable_regex)
    examples = SyntheticLM(llm_cfg.vocab_size, t.seq_len, t.synthetic_examples, seed=t.seed)
    with nnx.use_eager_sharding(False):
        fpt = flops_per_token(llm_cfg, predicate, t.seq_len)
    return Task(
        name="lm",
        build=lambda rngs: Bundle(llm=llama.build(llm_cfg, rngs)),
        trainable=predicate,
        loss_fn=lm_loss,
        examples=examples,
        tokens_per_example=float(t.seq_len),
        flops_per_example=fpt * t.seq_len,
        flops_note="6·|w| trained / 4·|w| frozen matmul weights + 6·L·T·H·D causal attention, per token",
        key=("lm", llm_cfg, t.trainable, t.trainable_regex),
    )

