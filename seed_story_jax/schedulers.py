"""Noise schedules: Euler discrete (sampling) and DDPM forward noising (training), as diffusers does them.

The tables (training betas → ᾱ, the inference timesteps and sigmas) are computed once in numpy with
diffusers' precision choices: torch.linspace in float32 (we take float64 linspace rounded to float32,
within one ulp of torch, whose own result depends on the CPU's vector width), torch's float32 cumprod
that accumulates in float64, sigma interpolation by `np.interp` in float64, tables stored as float32.
The per-step math is pure jnp in float32 and indexes the tables with a traced step number, so a whole
denoising loop fits in one `lax.fori_loop`:

    sched = euler_schedule(cfg, 50)
    x = noise * sched.init_noise_sigma
    def body(i, x):
        eps = model(scale_model_input(x, sched.sigmas[i]), sched.timesteps[i])
        return euler_step(sched, i, x, eps)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from seed_story_jax.config import TIMESTEP_BIAS, SchedulerConfig

# ---------------------------------------------------------------------------------------------
# Training tables
# ---------------------------------------------------------------------------------------------


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    return np.linspace(np.float64(np.float32(start)), np.float64(np.float32(end)), n).astype(np.float32)


def betas(cfg: SchedulerConfig) -> np.ndarray:
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "scaled_linear":
        root = _linspace_f32(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n)
        return root * root
    if cfg.beta_schedule == "linear":
        return _linspace_f32(cfg.beta_start, cfg.beta_end, n)
    raise ValueError(f"scheduler.beta_schedule {cfg.beta_schedule!r} is not supported")


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """ᾱ_t, float32 (torch.cumprod on float32 accumulates in float64)."""
    alphas = np.float32(1.0) - betas(cfg)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Euler discrete (EulerDiscreteScheduler with s_churn = 0)
# ---------------------------------------------------------------------------------------------


@struct.dataclass
class EulerSchedule:
    """The static tables of one sampling run: a pytree of arrays, passed into jitted loops as data."""

    timesteps: jax.Array  # (n,) float32, the model's timestep inputs, e.g. 981, 961, ..., 1
    sigmas: jax.Array  # (n + 1,) float32, the last one 0
    init_noise_sigma: jax.Array  # () float32: initial latents = N(0, 1) · init_noise_sigma

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]


def inference_timesteps(cfg: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
    n_train = cfg.num_train_timesteps
    if not 1 <= num_inference_steps <= n_train:
        raise ValueError(f"num_inference_steps must be in [1, {n_train}], got {num_inference_steps}")
    if cfg.timestep_spacing == "leading":
        ratio = n_train // num_inference_steps
        t = (np.arange(0, num_inference_steps) * ratio).round()[::-1].copy().astype(np.float32)
        return t + np.float32(cfg.steps_offset)
    if cfg.timestep_spacing == "trailing":
        ratio = n_train / num_inference_steps
        t = np.arange(n_train, 0, -ratio).round().copy().astype(np.float32)
        return t - np.float32(1)
    if cfg.timestep_spacing == "linspace":
        return np.linspace(0, n_train - 1, num_inference_steps, dtype=np.float32)[::-1].copy()
    raise ValueError(f"scheduler.timestep_spacing {cfg.timestep_spacing!r} is not supported")


def euler_schedule(cfg: SchedulerConfig, num_inference_steps: int) -> EulerSchedule:
    """Timesteps, sigmas and the initial noise scale for `num_inference_steps` (numpy, then float32)."""
    if cfg.interpolation_type != "linear":
        raise ValueError(f"scheduler.interpolation_type {cfg.interpolation_type!r} is not supported (linear)")
    ac = alphas_cumprod(cfg)
    train_sigmas = np.sqrt((np.float32(1) - ac) / ac)  # float32, as torch computes it
    t = inference_timesteps(cfg, num_inference_steps)
    sig = np.interp(t, np.arange(0, len(train_sigmas)), train_sigmas)  # float64
    sig = np.concatenate([sig, [0.0]]).astype(np.float32)
    smax = sig.max()
    if cfg.timestep_spacing in ("linspace", "trailing"):
        init = smax
    else:
        init = np.sqrt(smax * smax + np.float32(1))
    return EulerSchedule(timesteps=t, sigmas=sig, init_noise_sigma=np.float32(init))


def scale_model_input(x: jax.Array, sigma: jax.Array) -> jax.Array:
    """x / √(σ² + 1) in float32 (σ is a scalar from the schedule)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return x.astype(jnp.float32) / jnp.sqrt(sigma * sigma + 1.0)


def euler_step(schedule: EulerSchedule, i: jax.Array | int, x: jax.Array, eps: jax.Array) -> jax.Array:
    """One Euler step from sigmas[i] to sigmas[i+1] for an epsilon prediction; float32 result.

    Written as diffusers does (x0 = x − σ·ε; d = (x − x0)/σ; x + d·(σ_next − σ)), not the shorter
    x + (σ_next − σ)·ε, so the rounding matches too."""
    sigmas = jnp.asarray(schedule.sigmas, jnp.float32)
    sigma = sigmas[i]
    sigma_next = sigmas[i + 1]
    x = x.astype(jnp.float32)
    eps = eps.astype(jnp.float32)
    x0 = x - sigma * eps
    d = (x - x0) / sigma
    return x + d * (sigma_next - sigma)


# ---------------------------------------------------------------------------------------------
# DDPM forward noising (training)
# ---------------------------------------------------------------------------------------------


def add_noise(alphas_cumprod_table: jax.Array, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """√ᾱ_t·x0 + √(1−ᾱ_t)·noise (DDPMScheduler.add_noise); t: (B,) integer timesteps; float32."""
    ac = jnp.asarray(alphas_cumprod_table, jnp.float32)[t]
    shape = (-1,) + (1,) * (x0.ndim - 1)
    a = jnp.sqrt(ac).reshape(shape)
    b = jnp.sqrt(1.0 - ac).reshape(shape)
    return a * x0.astype(jnp.float32) + b * noise.astype(jnp.float32)


def sample_timesteps(key: jax.Array, batch: int, cfg: SchedulerConfig, weights=None) -> jax.Array:
    """t ~ U{0, …, num_train_timesteps − 1}, int32, one per sample; with `weights`
    (num_train_timesteps,), t is drawn with probability proportional to them instead."""
    if weights is None:
        return jax.random.randint(key, (batch,), 0, cfg.num_train_timesteps, dtype=jnp.int32)
    w = np.asarray(weights, np.float64)
    if w.shape != (cfg.num_train_timesteps,):
        raise ValueError(f"timestep weights must be ({cfg.num_train_timesteps},), got {w.shape}")
    logits = jnp.asarray(np.log(w / w.sum()), jnp.float32)
    return jax.random.categorical(key, logits, shape=(batch,)).astype(jnp.int32)


def timestep_bias_weights(cfg: SchedulerConfig, strategy: str = "none", multiplier: float = 1.0,
                          portion: float = 0.25, begin: int = 0, end: int = 1000) -> np.ndarray:
    """Sampling weights over the training timesteps, diffusers' `generate_timestep_weights`
    (train_text_to_image_sdxl.py --timestep_bias_*): 1 everywhere, × `multiplier` on the biased
    range — `earlier` the first `portion` of the timesteps (low noise: detail), `later` the last
    `portion` (high noise: layout and colour, what conditioning decides), `range` [begin, end)."""
    n = cfg.num_train_timesteps
    if strategy not in TIMESTEP_BIAS:
        raise ValueError(f"timestep bias must be one of {TIMESTEP_BIAS}, got {strategy!r}")
    if multiplier <= 0:
        raise ValueError(f"timestep bias multiplier must be > 0 (a zero weight removes timesteps), got {multiplier}")
    w = np.ones(n, np.float64)
    if strategy == "none":
        return w
    if strategy == "range":
        if not 0 <= begin < end <= n:
            raise ValueError(f"timestep bias range [{begin}, {end}) must lie within [0, {n})")
        lo, hi = begin, end
    else:
        if not 0.0 < portion <= 1.0:
            raise ValueError(f"timestep bias portion must be in (0, 1], got {portion}")
        k = max(1, int(n * portion))
        lo, hi = (0, k) if strategy == "earlier" else (n - k, n)
    w[lo:hi] *= multiplier
    return w


def min_snr_weight(alphas_cumprod_table, t: jax.Array, gamma: float) -> jax.Array:
    """Min-SNR-γ loss weight of ε-prediction (Hang et al. 2023; diffusers' --snr_gamma):
    min(SNR_t, γ) / SNR_t with SNR_t = ᾱ_t / (1 − ᾱ_t). It caps what the nearly clean timesteps
    (high SNR, little to learn from the conditioning) weigh in the loss; float32 (B,)."""
    ac = jnp.asarray(alphas_cumprod_table, jnp.float32)[t]
    snr = ac / (1.0 - ac)
    return jnp.minimum(snr, jnp.float32(gamma)) / snr


@struct.dataclass
class DDPMNoise:
    """The training-side table as a pytree, for train steps: `noise.add_noise(x0, eps, t)`."""

    alphas_cumprod: jax.Array  # (num_train_timesteps,) float32

    @classmethod
    def from_config(cls, cfg: SchedulerConfig) -> "DDPMNoise":
        return cls(alphas_cumprod=alphas_cumprod(cfg))

    def add_noise(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        return add_noise(self.alphas_cumprod, x0, noise, t)

    def sample_timesteps(self, key: jax.Array, batch: int) -> jax.Array:
        return jax.random.randint(key, (batch,), 0, self.alphas_cumprod.shape[0], dtype=jnp.int32)


# ---------------------------------------------------------------------------------------------
# diffusers scheduler_config.json ↔ SchedulerConfig
# ---------------------------------------------------------------------------------------------

_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
           "timestep_spacing", "steps_offset", "interpolation_type")

# keys that would change the math if set away from these values: refused rather than ignored
_MUST_BE = {
    "trained_betas": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "rescale_betas_zero_snr": False,
    "final_sigmas_type": "zero",
    "timestep_type": "discrete",
    "sigma_min": None,
    "sigma_max": None,
}

# what SDXL base's scheduler_config.json carries besides our fields (kept so DDPM/DDIM load it alike)
_SDXL_EXTRAS = {"clip_sample": False, "sample_max_value": 1.0, "set_alpha_to_one": False,
                "skip_prk_steps": True, "trained_betas": None, "use_karras_sigmas": False}

# diffusers' own defaults for keys a config file may leave out (EulerDiscreteScheduler.__init__)
_DIFFUSERS_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                       "beta_schedule": "linear", "prediction_type": "epsilon", "timestep_spacing": "linspace",
                       "steps_offset": 0, "interpolation_type": "linear"}


def config_from_diffusers(d: dict, *, file: str | os.PathLike | None = None) -> SchedulerConfig:
    from seed_story_jax.config import ConfigError

    where = f"{file}: " if file else ""
    for key, allowed in _MUST_BE.items():
        if d.get(key, allowed) != allowed:
            raise ConfigError(f"{where}scheduler key {key!r} = {d[key]!r} is not supported (need {allowed!r})")
    vals = {k: d.get(k, _DIFFUSERS_DEFAULTS[k]) for k in _FIELDS}
    vals["num_train_timesteps"] = int(vals["num_train_timesteps"])
    vals["steps_offset"] = int(vals["steps_offset"])
    vals["beta_start"] = float(vals["beta_start"])
    vals["beta_end"] = float(vals["beta_end"])
    cfg = SchedulerConfig(**vals)
    try:
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None
    return cfg


def config_to_diffusers(cfg: SchedulerConfig, class_name: str = "EulerDiscreteScheduler") -> dict:
    d = {"_class_name": class_name}
    d.update({k: getattr(cfg, k) for k in _FIELDS})
    d.update(_SDXL_EXTRAS)
    return dict(sorted(d.items()))


def load_scheduler_config(path: str | os.PathLike) -> SchedulerConfig:
    """A scheduler folder (with scheduler_config.json) or the json file itself."""
    from seed_story_jax.config import ConfigError

    p = Path(path)
    if p.is_dir():
        p = p / "scheduler_config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: invalid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: top level must be an object")
    return config_from_diffusers(d, file=p)


def save_scheduler_config(cfg: SchedulerConfig, path: str | os.PathLike, *,
                          class_name: str = "EulerDiscreteScheduler") -> Path:
    """Write a scheduler folder's scheduler_config.json (atomically); `path` is the folder."""
    from seed_story_jax.atomic import atomic_path

    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    dst = p / "scheduler_config.json"
    with atomic_path(dst) as tmp:
        tmp.write_text(json.dumps(config_to_diffusers(cfg, class_name), indent=2) + "\n")
    return dst
