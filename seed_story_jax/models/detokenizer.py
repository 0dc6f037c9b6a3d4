"""The de-tokenizer: ViT-like features → ResamplerXLV2 → SDXL conditioning → CFG Euler sampling →
VAE decode → uint8 frames (spec §4.4), the whole thing ONE compiled program per (batch, steps,
image size).

    det = Detokenizer(cfg, {"detokenizer": ..., "unet": ..., "vae": ...})   # params trees
    frames = det.sample(features, uncond_features)                          # (B, H, W, 3) uint8

* CFG as the SDXL pipeline does it: batch order [uncond, cond], eps = eps_u + g·(eps_c − eps_u),
  skipped when g ≤ 1. The unconditional branch is the resampler applied to `uncond_features` =
  ViT(all-zero normalised image) (`models.vit.uncond_features`), passed in by the caller.
* Seeds: `per_image` (the original: the generator is re-seeded to `seed` for every image, so every
  frame starts from the same noise) or `free` (one key stream: frame noise from
  split(fold_in(key(seed), call_index), B), the call index advancing on every `sample`).
* Size conditioning: time ids [H, W, 0, 0, H, W] for both branches (the pipeline default).
* The loop is `lax.fori_loop` over the schedule tables (data, not constants), so guidance, seed
  and the tables never trigger a recompile; only the batch, the step count, the image size and
  the CFG on/off switch are static.

`build(cfg, rngs)` is the registry's entry for the `detokenizer` component: the ResamplerXLV2.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seed_story_jax.checkpoint import int_keys
from seed_story_jax.config import DetokenizerConfig, SeedStoryConfig
from seed_story_jax.models.resamplers import ResamplerXLV2
from seed_story_jax.models.vae import to_uint8
from seed_story_jax.schedulers import EulerSchedule, euler_schedule, euler_step, scale_model_input

COMPONENTS = ("detokenizer", "unet", "vae")


def build(cfg: DetokenizerConfig, rngs: nnx.Rngs) -> ResamplerXLV2:
    return ResamplerXLV2(cfg.resampler, rngs=rngs)


def vae_scale_factor(cfg: SeedStoryConfig) -> int:
    return 2 ** (len(cfg.vae.block_out_channels) - 1)


def latent_shape(cfg: SeedStoryConfig, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
    f = vae_scale_factor(cfg)
    if height % f or width % f:
        raise ValueError(f"image size {height}×{width} is not a multiple of the VAE factor {f}")
    return (batch, height // f, width // f, cfg.unet.in_channels)


def default_time_ids(height: int, width: int) -> np.ndarray:
    """SDXL size conditioning at inference: original (H, W), crop (0, 0), target (H, W)."""
    return np.array([height, width, 0, 0, height, width], np.float32)


def frame_keys(seed: jax.Array, stream: jax.Array, batch: int, per_image: bool) -> jax.Array:
    """(batch,) PRNG keys for the frames' initial noise (traceable: seed and stream are data)."""
    base = jax.random.key(seed)
    if per_image:
        return jnp.broadcast_to(base, (batch,))
    return jax.random.split(jax.random.fold_in(base, stream), batch)


def initial_noise(keys: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """N(0, 1) latents (B, h, w, c), float32, frame b drawn from keys[b] alone."""
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(keys)


# ---------------------------------------------------------------------------------------------
# Progress: the compiled loop reports each finished step through one host callback
# ---------------------------------------------------------------------------------------------

class _Progress:
    # A module-level slot, not thread-local: XLA runs host callbacks on its own threads.
    fn: Optional[Callable[[int], None]] = None


_progress = _Progress()


def _tick(i) -> None:
    fn = _progress.fn
    if fn is not None:
        fn(int(i))


# ---------------------------------------------------------------------------------------------
# The one compiled program. Module level, with the graphdefs static: every Detokenizer of the same
# model shares the compile cache.
# ---------------------------------------------------------------------------------------------


def _program(states, features, uncond_features, seed, stream, schedule: EulerSchedule, guidance, time_ids,
             *, graphdefs, latents: tuple[int, ...], use_cfg: bool, per_image: bool):
    g = dict(graphdefs)
    resampler = nnx.merge(g["detokenizer"], states["detokenizer"])
    unet = nnx.merge(g["unet"], states["unet"])
    vae = nnx.merge(g["vae"], states["vae"])
    b = features.shape[0]
    ctx, pooled = resampler(features)
    tids = jnp.broadcast_to(time_ids, (b, time_ids.shape[-1]))
    if use_cfg:
        ctx_u, pooled_u = resampler(uncond_features)
        ctx = jnp.concatenate([jnp.broadcast_to(ctx_u, ctx.shape), ctx], axis=0)
        pooled = jnp.concatenate([jnp.broadcast_to(pooled_u, pooled.shape), pooled], axis=0)
        tids = jnp.concatenate([tids, tids], axis=0)
    x = initial_noise(frame_keys(seed, stream, b, per_image), (b,) + latents) * schedule.init_noise_sigma

    def step(i, x):
        inp = scale_model_input(x, schedule.sigmas[i])
        if use_cfg:
            inp = jnp.concatenate([inp, inp], axis=0)
        eps = unet(inp, schedule.timesteps[i], ctx, pooled, tids).astype(jnp.float32)
        if use_cfg:
            eps_u, eps_c = jnp.split(eps, 2, axis=0)
            eps = eps_u + guidance * (eps_c - eps_u)
        jax.debug.callback(_tick, i)  # a no-op on the host unless a caller is listening
        return euler_step(schedule, i, x, eps)

    x = jax.lax.fori_loop(0, schedule.num_steps, step, x)
    return to_uint8(vae.decode_latents(x)), x


_run = jax.jit(_program, static_argnames=("graphdefs", "latents", "use_cfg", "per_image"))


# ---------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------




class Detokenizer:
    """Compiled de-tokenizer sampling for one config; params are bound once at construction."""

    def __init__(self, cfg: SeedStoryConfig, params: Mapping[str, Any]):
        from seed_story_jax.models import module_for

        missing = [n for n in COMPONENTS + ("scheduler",) if getattr(cfg, n) is None]
        if missing:
            raise ValueError(f"the de-tokenizer needs config sections {missing}")
        absent = [n for n in COMPONENTS if n not in params]
        if absent:
            raise ValueError(f"the de-tokenizer needs params for {absent}")
        self.cfg = cfg
        self.dcfg: DetokenizerConfig = cfg.detokenizer
        self._graphdefs, self._states = {}, {}
        for name in COMPONENTS:
            mod = module_for(name)
            section = getattr(cfg, name)
            with nnx.use_eager_sharding(False):
                abstract = nnx.eval_shape(lambda: mod.build(section, nnx.Rngs(0)))
            graphdef, state = nnx.split(abstract)
            nnx.replace_by_pure_dict(state, int_keys(params[name]))
            self._graphdefs[name], self._states[name] = graphdef, state
        self._stream = 0

    @classmethod
    def load(cls, ckpt_dir) -> "Detokenizer":
        from seed_story_jax.checkpoint import load_component, read_config

        cfg = read_config(ckpt_dir)
        return cls(cfg, {n: load_component(ckpt_dir, n) for n in COMPONENTS})

    # -- public API ---------------------------------------------------------------------------

    def sample_arrays(
        self,
        features,
        uncond_features,
        *,
        num_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        seed: Optional[int] = None,
        seed_policy: Optional[str] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        time_ids=None,
        on_step: Optional[Callable[[int], None]] = None,
    ) -> tuple[jax.Array, jax.Array]:
        """(uint8 frames (B, H, W, 3), final latents (B, h, w, c) float32), as device arrays.

        features (B, N, C) — one row per frame; uncond_features (1, N, C) or (B, N, C).
        `on_step(i)` is called on the host after step i (the compiled loop always reports through
        a host callback, so listening or not is the same program)."""
        d = self.dcfg
        steps = num_steps or d.num_inference_steps
        g = d.guidance_scale if guidance_scale is None else guidance_scale
        policy = seed_policy or d.seed_policy
        if policy not in ("per_image", "free"):
            raise ValueError(f"seed_policy must be per_image or free, got {policy!r}")
        h, w = height or d.height, width or d.width
        latents = latent_shape(self.cfg, 1, h, w)[1:]  # refuses sizes the VAE cannot produce
        features = features if isinstance(features, jax.Array) else np.asarray(features)
        uncond_features = uncond_features if isinstance(uncond_features, jax.Array) else np.asarray(uncond_features)
        if features.ndim != 3:
            raise ValueError(f"features must be (frames, tokens, channels), got shape {features.shape}")
        if uncond_features.ndim != 3 or uncond_features.shape[1:] != features.shape[1:] \
                or uncond_features.shape[0] not in (1, features.shape[0]):
            raise ValueError(f"uncond_features shape {uncond_features.shape} does not match features "
                             f"{features.shape} (want (1 or B, N, C))")
        schedule = euler_schedule(self.cfg.scheduler, steps)
        tids = default_time_ids(h, w) if time_ids is None else np.asarray(time_ids, np.float32)
        seed = d.seed if seed is None else seed
        stream = self._stream
        if policy == "free":
            self._stream += 1
        _progress.fn = on_step
        try:
            return _run(self._states, features, uncond_features, np.uint32(seed), np.uint32(stream),
                        schedule, np.float32(g), tids, graphdefs=tuple(sorted(self._graphdefs.items())),
                        latents=latents, use_cfg=bool(g > 1.0), per_image=policy == "per_image")
        finally:
            if on_step is not None:
                jax.effects_barrier()
            _progress.fn = None

    def sample(self, features, uncond_features, **kw) -> np.ndarray:
        """uint8 frames (B, H, W, 3) on the host; keyword arguments as `sample_arrays`."""
        images, _ = self.sample_arrays(features, uncond_features, **kw)
        return np.asarray(images)
