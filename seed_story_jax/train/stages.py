"""Stage number → Task. Each stage is a loss function, a trainable predicate and its examples."""

from __future__ import annotations

import dataclasses

from seed_story_jax.config import ConfigError, SeedStoryConfig
from seed_story_jax.train.task import Task


def apply_train_overrides(cfg: SeedStoryConfig) -> SeedStoryConfig:
    """Force train.dtype / train.remat onto every model section that has those fields."""
    t = cfg.train
    changes = {}
    for f in dataclasses.fields(cfg):
        sec = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(sec) or f.name in ("train", "mesh", "data"):
            continue
        names = {x.name for x in dataclasses.fields(sec)}
        kw = {}
        if t.dtype and "dtype" in names:
            kw["dtype"] = t.dtype
        if t.remat and "remat" in names:
            kw["remat"] = t.remat
        if kw:
            changes[f.name] = dataclasses.replace(sec, **kw)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def make_task(cfg: SeedStoryConfig) -> Task:
    if cfg.train is None:
        raise ConfigError("the config has no `train:` section")
    cfg = apply_train_overrides(cfg)
    if cfg.train.stage == 0:
        from seed_story_jax.train.lm import lm_task

        return lm_task(cfg)
    if cfg.train.stage == 1:
        from seed_story_jax.train.stage1 import stage1_task

        return stage1_task(cfg)
    if cfg.train.stage == 2:
        from seed_story_jax.train.stage2 import stage2_task

        return stage2_task(cfg)
    if cfg.train.stage == 3:
        from seed_story_jax.train.stage3 import stage3_task

        return stage3_task(cfg)
    raise ConfigError(f"train.stage must be 0, 1, 2 or 3, got {cfg.train.stage}")
