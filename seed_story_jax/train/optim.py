"""AdamW with the SEED-Story recipes' schedule: linear warmup, then cosine to `min_lr_ratio`.

The schedule is the original's `_get_cosine_schedule_with_warmup_lr_lambda` (src/train/schedular.py):

    step < warmup:  factor = step / max(1, warmup)
    otherwise:      p = (step - warmup) / max(1, steps - warmup)
                    factor = max(0, 0.5·((1 + m) + (1 − m)·cos(π·p)))        m = min_lr_ratio

`step` counts optimizer updates from 0 (torch's LambdaLR is stepped after each update, so update k
uses factor(k)); optax's schedule count is the same. Weight decay is decoupled (torch AdamW:
p ← p − lr·(adam + wd·p)) on every trainable parameter, as the original applies it without exclusions.
Gradients are clipped to global norm `clip_norm` before Adam.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from seed_story_jax.config import TrainConfig


def lr_factor(step, cfg: TrainConfig):
    """The schedule factor at update `step` (jnp scalar in, jnp scalar out; also takes Python ints)."""
    step = jnp.asarray(step, jnp.float32)
    warm = float(cfg.warmup_steps)
    m = cfg.min_lr_ratio
    p = (step - warm) / max(1.0, float(cfg.steps - cfg.warmup_steps))
    cosine = jnp.maximum(0.0, 0.5 * ((1.0 + m) + (1.0 - m) * jnp.cos(math.pi * p)))
    return jnp.where(step < warm, step / max(1.0, warm), cosine)


def lr_schedule(cfg: TrainConfig):
    return lambda count: cfg.lr * lr_factor(count, cfg)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(lr_schedule(cfg), b1=cfg.betas[0], b2=cfg.betas[1], eps=cfg.eps,
                        weight_decay=cfg.weight_decay)
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw
