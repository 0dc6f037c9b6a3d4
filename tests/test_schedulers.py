"""Euler and DDPM schedules against diffusers' EulerDiscreteScheduler / DDPMScheduler (torch, CPU).

Tolerance: 1e-5 relative for sigmas and trajectories. Our float32 training betas are float64
linspace rounded once; torch's float32 linspace differs from that by ≤ 1 ulp depending on the CPU's
vector width, so the tables agree to ~1e-7, not bit for bit. Timesteps are integers: exact.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler

from seed_story_jax import schedulers as S
from seed_story_jax.config import ConfigError, SchedulerConfig

SDXL = SchedulerConfig()  # the defaults are SDXL base's scheduler_config.json
RTOL = 1e-5


def _ref(cfg=SDXL, cls=EulerDiscreteScheduler):
    return cls.from_config(S.config_to_diffusers(cfg, cls.__name__))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def test_training_tables_match_diffusers():
    ref = _ref()
    ac = S.alphas_cumprod(SDXL)
    assert ac.dtype == np.float32
    np.testing.assert_allclose(S.betas(SDXL), ref.betas.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(ac, ref.alphas_cumprod.numpy(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("steps", [50, 5, 30, 7])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_euler_timesteps_and_sigmas(steps, spacing):
    cfg = SchedulerConfig(timestep_spacing=spacing)
    ref = _ref(cfg)
    ref.set_timesteps(steps)
    sched = S.euler_schedule(cfg, steps)
    np.testing.assert_array_equal(sched.timesteps, ref.timesteps.numpy())
    assert sched.sigmas.dtype == np.float32 and sched.sigmas[-1] == 0.0
    np.testing.assert_allclose(sched.sigmas, ref.sigmas.numpy(), rtol=RTOL, atol=0)
    np.testing.assert_allclose(sched.init_noise_sigma, float(ref.init_noise_sigma), rtol=RTOL)


def test_sdxl_50_steps_are_the_documented_ones():
    sched = S.euler_schedule(SDXL, 50)
    np.testing.assert_array_equal(sched.timesteps, np.arange(981, 0, -20, dtype=np.float32))
    # leading spacing: the initial noise scale is √(σ_max² + 1), not σ_max
    smax = float(sched.sigmas[0])
    assert abs(float(sched.init_noise_sigma) - (smax ** 2 + 1) ** 0.5) < 1e-5 * smax


def _fake_eps(x, t):
    """A deterministic stand-in for the UNet, the same formula in numpy/torch and jnp."""
    lib = torch if isinstance(x, torch.Tensor) else jnp
    return lib.tanh(x) * 0.7 + 0.3 * lib.sin(x * 3.0 + t / 100.0)


@pytest.mark.parametrize("steps", [5, 50])
def test_euler_trajectory_matches_diffusers(steps, compile_counter):
    """The pipeline's loop (init noise, scale_model_input, step) under lax.fori_loop, ≤ 1e-5 relative."""
    noise = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    ref = _ref()
    ref.set_timesteps(steps)
    x = torch.from_numpy(noise) * ref.init_noise_sigma
    for t in ref.timesteps:
        eps = _fake_eps(ref.scale_model_input(x, t), t)
        x = ref.step(eps, t, x).prev_sample
    expected = x.numpy()

    sched = S.euler_schedule(SDXL, steps)

    @jax.jit
    def sample(sched, noise):
        def body(i, x):
            eps = _fake_eps(S.scale_model_input(x, sched.sigmas[i]), sched.timesteps[i])
            return S.euler_step(sched, i, x, eps)

        return jax.lax.fori_loop(0, sched.num_steps, body, noise * sched.init_noise_sigma)

    got = np.asarray(sample(sched, noise))
    assert _rel(got, expected) <= RTOL, _rel(got, expected)
    # the schedule is data: a second run with other noise compiles nothing
    noise2 = jnp.asarray(noise[::-1].copy())
    with compile_counter() as cc:
        sample(sched, noise2).block_until_ready()
    assert cc.count == 0


def test_ddpm_add_noise_matches_diffusers():
    rng = np.random.default_rng(1)
    x0 = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal((4, 4, 8, 8)).astype(np.float32)
    t = np.array([0, 1, 500, 999], np.int64)
    ref = _ref(cls=DDPMScheduler)
    expected = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    table = S.alphas_cumprod(SDXL)
    got = np.asarray(jax.jit(S.add_noise)(table, x0, noise, t.astype(np.int32)))
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=1e-6)
    # NHWC latents noise the same way (only the batch axis is indexed)
    got_nhwc = np.asarray(S.add_noise(table, x0.transpose(0, 2, 3, 1), noise.transpose(0, 2, 3, 1), t))
    np.testing.assert_allclose(got_nhwc, expected.transpose(0, 2, 3, 1), rtol=RTOL, atol=1e-6)
    ddpm = S.DDPMNoise.from_config(SDXL)  # the pytree form a train step takes
    got_tree = jax.jit(lambda d, x, n, t: d.add_noise(x, n, t))(ddpm, x0, noise, t.astype(np.int32))
    np.testing.assert_array_equal(np.asarray(got_tree), got)


def test_sample_timesteps_cover_the_range():
    for t in (S.sample_timesteps(jax.random.key(0), 20000, SDXL),
              S.DDPMNoise.from_config(SDXL).sample_timesteps(jax.random.key(0), 20000)):
        t = np.asarray(t)
        assert t.dtype == np.int32 and t.min() == 0 and t.max() == 999
        assert abs(t.mean() - 499.5) < 10


def test_scheduler_config_json_round_trip(tmp_path):
    sdxl_json = {  # SDXL base 1.0 scheduler/scheduler_config.json
        "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
        "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
        "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
    }
    src = tmp_path / "scheduler"
    src.mkdir()
    (src / "scheduler_config.json").write_text(json.dumps(sdxl_json))
    cfg = S.load_scheduler_config(src)
    assert cfg == SDXL
    out = tmp_path / "out" / "scheduler"
    S.save_scheduler_config(cfg, out)
    assert S.load_scheduler_config(out) == cfg
    written = json.loads((out / "scheduler_config.json").read_text())
    assert {k: v for k, v in written.items() if k != "_diffusers_version"} == \
        {k: v for k, v in sdxl_json.items() if k != "_diffusers_version"}
    ref = EulerDiscreteScheduler.from_pretrained(out)
    assert ref.config.timestep_spacing == "leading" and ref.config.steps_offset == 1


@pytest.mark.parametrize("key, value", [("use_karras_sigmas", True), ("trained_betas", [0.1, 0.2]),
                                        ("prediction_type", "v_prediction"), ("timestep_spacing", "odd")])
def test_unsupported_scheduler_settings_are_refused(tmp_path, key, value):
    d = S.config_to_diffusers(SDXL)
    d[key] = value
    (tmp_path / "scheduler_config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=key):
        S.load_scheduler_config(tmp_path)


def test_timestep_bias_weights_follow_diffusers_generate_timestep_weights():
    # diffusers' train_text_to_image_sdxl.py, written out: ones, × multiplier on the biased slice
    n = SDXL.num_train_timesteps
    later = S.timestep_bias_weights(SDXL, "later", 3.0, 0.25)
    assert later.shape == (n,) and (later[:750] == 1).all() and (later[750:] == 3).all()
    earlier = S.timestep_bias_weights(SDXL, "earlier", 2.0, 0.1)
    assert (earlier[:100] == 2).all() and (earlier[100:] == 1).all()
    rng = S.timestep_bias_weights(SDXL, "range", 5.0, begin=200, end=500)
    assert (rng[200:500] == 5).all() and rng.sum() == n + 4 * 300
    assert (S.timestep_bias_weights(SDXL, "none", 7.0) == 1).all()
    for bad, match in [(dict(strategy="latest"), "one of"), (dict(strategy="later", multiplier=0.0), "> 0"),
                       (dict(strategy="later", portion=1.5), "portion"),
                       (dict(strategy="range", begin=500, end=1001), r"\[500, 1001\)")]:
        with pytest.raises(ValueError, match=match):
            S.timestep_bias_weights(SDXL, **bad)


def test_biased_timesteps_are_drawn_in_proportion():
    w = S.timestep_bias_weights(SDXL, "later", 3.0, 0.5)
    t = np.asarray(jax.jit(lambda k: S.sample_timesteps(k, 40000, SDXL, w))(jax.random.key(3)))
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= 999
    # P(t >= 500) = 3·500 / (3·500 + 500) = 0.75; binomial stderr over 40000 draws ≈ 0.002
    assert abs((t >= 500).mean() - 0.75) < 0.01
    with pytest.raises(ValueError, match=r"\(1000,\)"):
        S.sample_timesteps(jax.random.key(0), 4, SDXL, w[:10])


def test_min_snr_weight_matches_diffusers_compute_snr():
    from diffusers.training_utils import compute_snr

    t = np.array([0, 1, 10, 100, 400, 500, 800, 999])
    snr = compute_snr(_ref(cls=DDPMScheduler), torch.from_numpy(t))
    for gamma in (1.0, 5.0):
        # the SDXL script's epsilon weights: min(snr, γ) / snr
        expected = (torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr).numpy()
        got = np.asarray(S.min_snr_weight(S.alphas_cumprod(SDXL), jnp.asarray(t, jnp.int32), gamma))
        np.testing.assert_allclose(got, expected, rtol=RTOL)
        assert got[0] < 0.01 and got[-1] == 1.0  # nearly clean timesteps weigh little, noisy ones fully
