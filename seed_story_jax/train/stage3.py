"""Stage 3 — de-tokenizer adaptation to the agent's regressed features (spec §5.4, the original's
adapt_storystream.sh).

Per step, for a batch of §5.2 samples plus the target frame (sd_image (B, S, S, 3) in [-1, 1],
time_ids (B, 6)):

    features = ViT(every image slot)                                frozen, no gradient
    rec      = agent teacher-forced on the sample (models/mllm.py `forward`, no dropout):
               output resampler on the hidden states at the target's <img_xxxxx> positions
               → (B, 256, 4096) regressed ViT-like features          frozen, no gradient
    loss     = stage 1's denoising MSE with `rec` as the de-tokenizer's input
               (VAE latents of sd_image · scaling_factor, DDPM noise, t ~ U{0 … 999})

Trained (train.trainable): `kv` (the recipe) — the de-tokenizer resampler + every UNet to_k/to_v
(SDXLAdapter.set_trainable_v2); `unet`/`full` — the resampler + the whole UNet. The ViT, the
agent (Llama and both resamplers) and the VAE are frozen. Also logged: `agent_rec_loss`, the
frozen agent's cosine loss on the batch (how good the features the de-tokenizer adapts to are).

time_ids: the original computes them with its crop offsets swapped (spec §5.4: a landscape frame's
horizontal offset lands in the crop_top slot). That quirk is FIXED by default here: the data
pipeline writes [orig_h, orig_w, crop_top, crop_left, size, size] (DataConfig.quirky_time_ids
= False); `data.quirky_time_ids=true` reproduces the original's values.

Model FLOPs per example (remat not counted): forward only for everything frozen — ViT and input
resampler on the M slots (1 · F_fwd each), the Llama over data.max_length positions (2·|w| +
2·layers·L·H·D per token), the output resampler on the target (1 · F_fwd) — plus stage 1's
de-tokenizer accounting (3·resampler + 2·UNet + K/V weight gradients for kv, 3·UNet otherwise, +
VAE encoder); F_fwd by XLA cost analysis.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from seed_story_jax.config import ConfigError, SchedulerConfig, SeedStoryConfig
from seed_story_jax.train.stage1 import (DENOISER, Timesteps, _data_key, _f32, build_component, check_denoiser,
                                         denoiser_flops, denoising_loss, story_examples, vit_flops)
from seed_story_jax.train.stage2 import (PinnedLlama, agent_features, check_agent, llm_flops_per_token,
                                         resampler_flops, story_tokenizer)
from seed_story_jax.train.task import Bundle, Task, trainable_predicate

STAGE3_KEYS = ("input_ids", "ids_cmp_mask", "ids_gen_mask", "images", "embeds_cmp_mask", "embeds_gen_mask",
               "sd_image", "time_ids")


def regressed_features(model: Bundle, batch: dict):
    """The frozen agent's teacher-forced regression of each row's target image: ((B, T, E) features,
    (B,) valid, its cosine loss to the target's ViT features)."""
    from seed_story_jax.models import mllm as M

    feats = agent_features(model, batch)
    out = M.forward(PinnedLlama(model.llm), model.mllm, batch["input_ids"], feats, batch["ids_cmp_mask"],
                    batch["embeds_cmp_mask"], batch["ids_gen_mask"], batch["embeds_gen_mask"], max_gen=1)
    cos, _ = M.cosine_loss(out.rec, out.target, out.gen_valid)
    return jax.lax.stop_gradient(out.rec[:, 0]), out.gen_valid[:, 0], jax.lax.stop_gradient(cos)


@dataclasses.dataclass(frozen=True)
class Stage3Loss:
    """loss_fn(model, batch, rng) of stage 3; hashable by value, so runs share compilations."""

    scheduler: SchedulerConfig
    timesteps: Timesteps = Timesteps()

    def __call__(self, model: Bundle, batch: dict, rng):
        rec, valid, agent_cos = regressed_features(model, batch)
        loss, metrics = denoising_loss(model, rec, batch["sd_image"], batch["time_ids"], rng, self.scheduler, valid,
                                       self.timesteps)
        return loss, {**metrics, "agent_rec_loss": agent_cos}


def stage3_flops(cfg: SeedStoryConfig, predicate) -> tuple[float, str]:
    d, o = cfg.data, cfg.mllm.output_resampler
    f_in, f_out = resampler_flops(cfg)
    agent = ((vit_flops(cfg) + f_in) * d.max_images + f_out
             + llm_flops_per_token(cfg, predicate, d.max_length, forward_only=True) * d.max_length)
    f_det, note = denoiser_flops(cfg, predicate, _f32(1, o.grid_size ** 2, o.embed_dim))
    return agent + f_det, "agent forward (ViT, resamplers, Llama 2·|w| + 2·layers·L·H·D per token) + " + note


def stage3_task(cfg: SeedStoryConfig, *, tokenizer=None, examples: Any = None) -> Task:
    check_agent(cfg, 3)
    check_denoiser(cfg, 3)
    t = cfg.train
    o, r = cfg.mllm.output_resampler, cfg.detokenizer.resampler
    if o.embed_dim != r.embedding_dim:
        raise ConfigError(f"mllm.output_resampler.embed_dim ({o.embed_dim}) must equal "
                          f"detokenizer.resampler.embedding_dim ({r.embedding_dim}): the de-tokenizer reads "
                          "the agent's regressed features")
    predicate = trainable_predicate(t.trainable, DENOISER, t.trainable_regex)
    if examples is None:
        examples = story_examples(cfg, 3, STAGE3_KEYS, tokenizer or story_tokenizer(cfg))
    flops, note = stage3_flops(cfg, predicate)
    names = ("vit", "llm", "mllm", "detokenizer", "unet", "vae")

    def build(rngs: nnx.Rngs) -> Bundle:
        return Bundle(**{n: build_component(n, cfg, rngs) for n in names})

    return Task(
        name="stage3",
        build=build,
        trainable=predicate,
        loss_fn=Stage3Loss(cfg.scheduler, Timesteps.from_train(t)),
        examples=examples,
        flops_per_example=flops,
        flops_note=note,
        key=("stage3", cfg.vit, cfg.llm, cfg.mllm, cfg.detokenizer, cfg.unet, cfg.vae, cfg.scheduler, t.trainable,
             t.trainable_regex, _data_key(cfg.data)),
    )
