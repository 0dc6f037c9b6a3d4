"""Stage 1 — de-tokenizer pretraining (SEED-X's; the original never released it; spec §4.3, §8).

Per step, for a batch of single frames:

    features = ViT(frame at vit.image_size, keep-ratio crop)          frozen, no gradient
    latents  = VAE.encode(frame at data.sd_size, SDXL crop).sample · scaling_factor   frozen
    noise ~ N(0, 1);  t ~ U{0 … num_train_timesteps − 1};  noisy = DDPM add_noise (SDXL betas)
    (train.timestep_bias* draws t from a biased distribution, train.snr_gamma weighs the MSE)
    ctx, pooled = ResamplerXLV2(features)
    ε̂ = UNet(noisy, t, ctx, text_embeds=pooled, time_ids)            loss = mean (ε̂ − noise)²

Trained (train.trainable): `kv` — the resampler + every UNet to_k/to_v, self- and cross-attention,
as SDXLAdapter.set_trainable_v2 (the set stage 3 uses; stage 1's own is unverified); `unet` or
`full` — the resampler + the whole UNet. The ViT and VAE are always frozen.

This module also holds what stages 1 and 3 share (the denoising loss, the UNet FLOP formula) and
what all three share (the story examples, the frozen-ViT features, forward FLOPs by XLA cost
analysis).

Examples. `data.path` set: the dataset built by `seed-story data build`; otherwise synthetic
stories (`data_pipeline/synth.py`, train.synthetic_examples of them, drawn on the fly from
(train.seed, index)). Either way each record goes through the data pipeline's own `MakeSample`
(the stage's transforms and §5.2 sample layout; a too-long sample redraws a smaller g, as
`pipeline.sample_dataset`), with `data.stage` set to the train stage; only the arrays the loss
reads are kept.

Model FLOPs per example (what MFU divides by peak; remat recomputation not counted):

    ViT, VAE encoder (frozen, nothing upstream trains)   1 · F_fwd        (forward only)
    ResamplerXLV2 (trained)                              3 · F_fwd        (forward + input and weight gradients)
    UNet, trainable=kv                                   2 · F_fwd + F_kv (every block passes gradients down;
                                                                           weight gradients only for to_k/to_v)
    UNet, trainable=unet|full                            3 · F_fwd
F_fwd is XLA's cost analysis of one example's forward (abstract, nothing allocated); F_kv, the
weight-gradient FLOPs of the K/V projections, is 2 · tokens · in · out summed over them, tokens =
the block's latent pixels (attn1) or the resampler's queries (attn2).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from seed_story_jax.config import ConfigError, SchedulerConfig, SeedStoryConfig
from seed_story_jax.train.task import Bundle, Task, trainable_predicate

# Arrays each stage's loss reads (the pipeline also emits bookkeeping: record_index, g, ...).
STAGE1_KEYS = ("image", "sd_image", "time_ids")
DENOISER = ("detokenizer", "unet")  # the components stages 1 and 3 train
DENOISER_PRESETS = ("kv", "unet", "full")


# ------------------------------------------------------------------------------ examples


class SyntheticStories:
    """grain random-access source: record i is synthetic story `offset + i` of `seed`, drawn on
    access (deterministic), in the record layout of `data_pipeline.builder.StorySource`."""

    def __init__(self, num: int, *, frames: int = 10, size: int = 32, seed: int = 0, offset: int = 0):
        self.num, self.frames, self.size, self.seed, self.offset = num, frames, size, seed, offset

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, i: int) -> dict:
        from data_pipeline.synth import make_story

        if not 0 <= i < self.num:
            raise IndexError(f"story {i} out of range [0, {self.num})")
        index = self.offset + int(i)
        images, captions, _ = make_story(self.seed, index, self.frames, self.size)
        return {"key": f"synth-{self.seed}-{index}", "id": index, "chunk": 0, "captions": captions,
                "images": [_png(im) for im in images], "index": int(i)}

    def __repr__(self) -> str:  # grain compares data sources by repr on restore
        return (f"SyntheticStories(num={self.num}, frames={self.frames}, size={self.size}, seed={self.seed}, "
                f"offset={self.offset})")


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def synthetic_frame_size(data_cfg) -> int:
    """Side of drawn synthetic frames: the largest transform input, within [32, 128] (the transforms
    resize; bigger drawings only cost time)."""
    return int(min(128, max(32, data_cfg.image_size, data_cfg.sd_size if data_cfg.stage != 2 else 0)))


class _Select:
    """Keep only `keys` of an example (a grain map function)."""

    def __init__(self, keys: Sequence[str]):
        self.keys = tuple(keys)

    def __call__(self, ex: dict) -> dict:
        return {k: ex[k] for k in self.keys}

    def __repr__(self) -> str:
        return f"_Select({self.keys})"


def story_source(cfg: SeedStoryConfig, data_cfg):
    """The records: the built dataset at data.path, or synthetic stories."""
    t = cfg.train
    if data_cfg.path:
        from data_pipeline.builder import StorySource

        return StorySource(data_cfg.path, data_cfg.split)
    if t.data != "synthetic":
        raise ConfigError(f"train.data={t.data!r} needs data.path (a dataset from `seed-story data build`)")
    return SyntheticStories(t.synthetic_examples, frames=data_cfg.chunk, size=synthetic_frame_size(data_cfg),
                            seed=t.seed)


def stage_data(cfg: SeedStoryConfig, stage: int):
    if cfg.data is None:
        raise ConfigError(f"train.stage {stage} needs a `data:` section")
    return dataclasses.replace(cfg.data, stage=stage)


def story_examples(cfg: SeedStoryConfig, stage: int, keys: Sequence[str], tokenizer=None, *, source=None,
                   epochs: Optional[int] = None, seed: Optional[int] = None):
    """Random-access examples of `stage` (a grain MapDataset of dicts of numpy arrays).

    `epochs` passes over the records (default: enough for train.steps · train.batch_size examples),
    each with g drawn afresh; `source` overrides the records (e.g. held-out synthetic stories)."""
    import grain

    from data_pipeline.pipeline import MakeSample

    d = stage_data(cfg, stage)
    src = story_source(cfg, d) if source is None else source
    if len(src) == 0:
        raise ConfigError(f"{src!r}: no records")
    t = cfg.train
    if epochs is None:
        epochs = max(1, math.ceil(t.steps * t.batch_size / len(src)))
    seed = d.shuffle_seed if seed is None else seed
    make = MakeSample(tokenizer, stage=stage, max_length=d.max_length, num_img_tokens=d.num_img_tokens,
                      max_images=d.max_images, image_size=d.image_size, sd_size=d.sd_size,
                      quirky_time_ids=d.quirky_time_ids, too_long="shorter", cache_views=d.cache_views,
                      cache=cfg.cache)
    ds = grain.MapDataset.source(src).shuffle(seed=seed).random_map(make, seed=seed).repeat(epochs)
    return ds.map(_Select(keys))


# ------------------------------------------------------------------------------ model pieces


class _FoldInKeys:
    """nnx.Rngs stand-in for building the UNet: one key from `rngs`, then a Python counter folded in
    per parameter. flax's Rngs counter makes tracing quadratic in the number of params (two minutes
    for SDXL's abstract build, which every run and plan does); see models/unet.py `_KeyStream`."""

    def __init__(self, rngs: nnx.Rngs):
        self.key = rngs.params()
        self.n = 0

    def params(self):
        self.n += 1
        return jax.random.fold_in(self.key, self.n)


def build_component(name: str, cfg: SeedStoryConfig, rngs: nnx.Rngs) -> nnx.Module:
    from seed_story_jax.models import module_for

    section = getattr(cfg, name)
    if section is None:
        raise ConfigError(f"train.stage {cfg.train.stage} needs a `{name}:` section")
    return module_for(name).build(section, _FoldInKeys(rngs) if name == "unet" else rngs)


def vit_features(vit, images: jax.Array) -> jax.Array:
    """(..., S, S, 3) normalised images → (..., T, D) features of the frozen ViT (no gradient)."""
    from seed_story_jax.nn.sharding import constrain

    lead = images.shape[:-3]
    f = vit(constrain(images.reshape((-1,) + images.shape[-3:]), ("batch", None, None, None)))
    f = constrain(f.reshape(lead + f.shape[1:]), ("batch",) + (None,) * (len(lead) + 1))
    return jax.lax.stop_gradient(f)


@dataclasses.dataclass(frozen=True)
class Timesteps:
    """How the denoising loss draws and weighs timesteps (train.timestep_bias*, train.snr_gamma;
    diffusers' SDXL training options). The default is the original's: t uniform, plain MSE."""

    bias: str = "none"
    multiplier: float = 1.0
    portion: float = 0.25
    begin: int = 0
    end: int = 1000
    snr_gamma: float = 0.0

    @classmethod
    def from_train(cls, t) -> "Timesteps":
        return cls(t.timestep_bias, t.timestep_bias_multiplier, t.timestep_bias_portion, t.timestep_bias_begin,
                   t.timestep_bias_end, t.snr_gamma)

    def weights(self, scheduler: SchedulerConfig):
        """Sampling weights (num_train_timesteps,), or None for uniform (the original's draw)."""
        from seed_story_jax import schedulers as sch

        if self.bias == "none":
            return None
        return sch.timestep_bias_weights(scheduler, self.bias, self.multiplier, self.portion, self.begin, self.end)


def denoising_loss(model: Bundle, features: jax.Array, sd_image: jax.Array, time_ids: jax.Array, rng,
                   scheduler: SchedulerConfig, valid: Optional[jax.Array] = None,
                   timesteps: Timesteps = Timesteps()):
    """SDXLAdapter.forward's loss (spec §4.3, §5.4): DDPM ε-prediction MSE, fp32, on the VAE latents
    of `sd_image` (B, H, W, 3) in [-1, 1], conditioned on `features` (B, T, D) through the resampler.
    `valid` (B,) bool: rows that count (mean over them); `timesteps`: biased draws and Min-SNR
    weights (each row's MSE × its weight; the metric `mse` stays the unweighted mean). Returns
    (loss, metrics)."""
    from seed_story_jax import schedulers as sch
    from seed_story_jax.nn.sharding import constrain

    pin = lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1))  # noqa: E731 - see stage2.PinnedLlama
    k_lat, k_noise, k_t = jax.random.split(rng, 3)
    latents = model.vae.encode_latents(pin(sd_image), k_lat).astype(jnp.float32)
    latents = jax.lax.stop_gradient(pin(latents))
    noise = pin(jax.random.normal(k_noise, latents.shape, jnp.float32))
    t = sch.sample_timesteps(k_t, latents.shape[0], scheduler, timesteps.weights(scheduler))
    table = sch.alphas_cumprod(scheduler)
    noisy = sch.add_noise(table, latents, noise, t)
    ctx, pooled = model.detokenizer(pin(features))
    eps = pin(model.unet(pin(noisy), t, pin(ctx), text_embeds=pin(pooled), time_ids=time_ids))
    per_row = jnp.mean(jnp.square(eps.astype(jnp.float32) - noise), axis=(1, 2, 3))

    def mean(x):  # over the valid rows (an invalid row's value is never read: where, not a product)
        return x.mean() if valid is None else jnp.sum(jnp.where(valid, x, 0.0)) / jnp.maximum(valid.sum(), 1)

    mse = mean(per_row)
    if not timesteps.snr_gamma:
        return mse, {"mse": mse}
    return mean(per_row * sch.min_snr_weight(table, t, timesteps.snr_gamma)), {"mse": mse}


@dataclasses.dataclass(frozen=True)
class Stage1Loss:
    """loss_fn(model, batch, rng) of stage 1; hashable by value, so runs share compilations."""

    scheduler: SchedulerConfig
    timesteps: Timesteps = Timesteps()

    def __call__(self, model: Bundle, batch: dict, rng):
        feats = vit_features(model.vit, batch["image"])
        return denoising_loss(model, feats, batch["sd_image"], batch["time_ids"], rng, self.scheduler,
                              timesteps=self.timesteps)


# ------------------------------------------------------------------------------ FLOPs


def forward_flops(name: str, section, *inputs: jax.ShapeDtypeStruct, method: str = "") -> float:
    """XLA's FLOP count of one forward of component `name` (built abstractly) on `inputs`; `method`:
    a dotted attribute of the module to call instead of the module (e.g. "encode"). A stack of
    identical `layers` is counted from 1- and 2-layer copies (F₁ + (L − 1)·(F₂ − F₁), exact, and
    quick where lowering 48 unrolled layers is not); scanned stacks are unrolled (XLA counts a loop
    body once)."""
    shapes = tuple((x.shape, jnp.dtype(x.dtype).name) for x in inputs)
    if getattr(section, "scan_layers", False):
        section = dataclasses.replace(section, scan_layers=False)
    n = getattr(section, "layers", 0)
    if isinstance(n, int) and n > 2:
        f1, f2 = (_forward_flops(name, dataclasses.replace(section, layers=k), shapes, method) for k in (1, 2))
        return f1 + (n - 1) * (f2 - f1)
    return _forward_flops(name, section, shapes, method)


@functools.lru_cache(maxsize=16)
def _abstract(name: str, section):
    """(graphdef, abstract state) of component `name`, nothing allocated."""
    from seed_story_jax.models import module_for

    with nnx.use_eager_sharding(False):
        if name == "unet":
            from seed_story_jax.models.unet import abstract_model

            model = abstract_model(section)
        else:
            model = nnx.eval_shape(lambda: module_for(name).build(section, nnx.Rngs(0)))
    return nnx.split(model)


@functools.lru_cache(maxsize=64)
def _forward_flops(name: str, section, shapes: tuple, method: str) -> float:
    graphdef, state = _abstract(name, section)

    def fwd(state, *xs):
        return functools.reduce(getattr, method.split(".") if method else [], nnx.merge(graphdef, state))(*xs)

    args = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
    cost = jax.jit(fwd).lower(state, *args).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0))


def _f32(*shape) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def vit_flops(cfg: SeedStoryConfig) -> float:
    s = cfg.vit.image_size
    return forward_flops("vit", cfg.vit, _f32(1, s, s, 3))


def _unet_params(unet_cfg) -> list:
    """[(path keys, shape), ...] of the UNet's params."""
    return [(tuple(path), tuple(v.shape)) for path, v in _abstract("unet", unet_cfg)[1].flat_state()
            if issubclass(v.type, nnx.Param)]


def kv_weight_grad_flops(cfg: SeedStoryConfig, latent: int) -> float:
    """F_kv of the module docstring for one example whose latents are latent × latent."""
    from seed_story_jax.models.unet import is_kv_projection

    levels = len(cfg.unet.block_out_channels)
    queries = cfg.detokenizer.resampler.num_queries
    total = 0.0
    for keys, shape in _unet_params(cfg.unet):
        if not is_kv_projection(keys) or keys[-1] != "kernel":
            continue
        if keys[0] == "down_blocks":
            level = int(keys[1])
        elif keys[0] == "up_blocks":
            level = levels - 1 - int(keys[1])
        else:  # mid_block
            level = levels - 1
        side = math.ceil(latent / 2 ** level)
        tokens = side * side if "attn1" in keys else queries
        fan_in, fan_out = shape
        total += 2.0 * tokens * fan_in * fan_out
    return total


def denoiser_flops(cfg: SeedStoryConfig, predicate, features: jax.ShapeDtypeStruct) -> tuple[float, str]:
    """Resampler (trained) + UNet (by preset) + VAE encoder (frozen) FLOPs of one example, from
    `features` (1, T, D) on; and a note."""
    from seed_story_jax.models.detokenizer import vae_scale_factor

    d = cfg.data
    latent = d.sd_size // vae_scale_factor(cfg)
    r = cfg.detokenizer.resampler
    f_res = forward_flops("detokenizer", cfg.detokenizer, features)
    f_unet = forward_flops("unet", cfg.unet, _f32(1, latent, latent, cfg.unet.in_channels),
                           jax.ShapeDtypeStruct((1,), jnp.int32), _f32(1, r.num_queries, r.output1_dim + r.output2_dim),
                           _f32(1, r.output2_dim), _f32(1, 6))
    f_vae = forward_flops("vae", cfg.vae, _f32(1, d.sd_size, d.sd_size, 3), method="encode")
    whole_unet = all(predicate(("unet",) + keys) for keys, _ in _unet_params(cfg.unet))
    if whole_unet:
        unet_total, how = 3.0 * f_unet, "3·UNet"
    else:
        unet_total, how = 2.0 * f_unet + kv_weight_grad_flops(cfg, latent), "2·UNet + K/V weight grads"
    return 3.0 * f_res + unet_total + f_vae, f"3·resampler + {how} + VAE encoder (XLA forward cost analysis)"


# ------------------------------------------------------------------------------ the task


def check_denoiser(cfg: SeedStoryConfig, stage: int) -> None:
    t = cfg.train
    for name in ("vit", "detokenizer", "unet", "vae", "scheduler", "data"):
        if getattr(cfg, name) is None:
            raise ConfigError(f"train.stage {stage} needs a `{name}:` section")
    if not t.trainable_regex and t.trainable not in DENOISER_PRESETS:
        raise ConfigError(f"train.trainable={t.trainable!r}: stage {stage} trains the de-tokenizer; "
                          f"use one of {DENOISER_PRESETS}")
    d, r = cfg.data, cfg.detokenizer.resampler
    if d.image_size != cfg.vit.image_size:
        raise ConfigError(f"data.image_size ({d.image_size}) must equal vit.image_size ({cfg.vit.image_size})")
    from seed_story_jax.models.detokenizer import vae_scale_factor

    f = vae_scale_factor(cfg)
    if d.sd_size % (f * 2 ** (len(cfg.unet.block_out_channels) - 1)):
        raise ConfigError(f"data.sd_size ({d.sd_size}) must be a multiple of the VAE factor {f} times the UNet's "
                          f"downsampling {2 ** (len(cfg.unet.block_out_channels) - 1)}")
    if r.output1_dim + r.output2_dim != cfg.unet.cross_attention_dim:
        raise ConfigError(f"detokenizer.resampler.output1_dim + output2_dim ({r.output1_dim + r.output2_dim}) must "
                          f"equal unet.cross_attention_dim ({cfg.unet.cross_attention_dim})")


def stage1_task(cfg: SeedStoryConfig, *, examples: Any = None) -> Task:
    check_denoiser(cfg, 1)
    t = cfg.train
    if cfg.vit.output_dim != cfg.detokenizer.resampler.embedding_dim:
        raise ConfigError(f"vit.output_dim ({cfg.vit.output_dim}) must equal detokenizer.resampler.embedding_dim "
                          f"({cfg.detokenizer.resampler.embedding_dim}): the resampler reads ViT features")
    predicate = trainable_predicate(t.trainable, DENOISER, t.trainable_regex)
    if examples is None:
        examples = story_examples(cfg, 1, STAGE1_KEYS)
    v = cfg.vit
    f_vit = vit_flops(cfg)
    f_rest, note = denoiser_flops(cfg, predicate, _f32(1, v.n_queries, v.output_dim))
    names = ("vit", "detokenizer", "unet", "vae")

    def build(rngs: nnx.Rngs) -> Bundle:
        return Bundle(**{n: build_component(n, cfg, rngs) for n in names})

    return Task(
        name="stage1",
        build=build,
        trainable=predicate,
        loss_fn=Stage1Loss(cfg.scheduler, Timesteps.from_train(t)),
        examples=examples,
        flops_per_example=f_vit + f_rest,
        flops_note="ViT forward + " + note,
        key=("stage1", cfg.vit, cfg.detokenizer, cfg.unet, cfg.vae, cfg.scheduler, t.trainable, t.trainable_regex,
             _data_key(cfg.data)),
    )


def _data_key(d) -> tuple:
    """What of the data section shapes the examples (and so the compiled step)."""
    return (d.max_length, d.num_img_tokens, d.max_images, d.image_size, d.sd_size)
