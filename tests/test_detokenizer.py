"""The de-tokenizer's compiled sampling against a step-by-step torch loop (diffusers'
EulerDiscreteScheduler + UNet2DConditionModel + AutoencoderKL, the spec's ResamplerXLV2 reference),
all tiny and fp32.

Tolerances: final latents within 1e-4 relative to their max magnitude (50 Euler steps with
guidance 7.5 amplify fp32 rounding); decoded uint8 frames within 1 level."""

import dataclasses

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

import convert.unet as cunet
import convert.vae as cvae
from convert.resamplers import xlv2_from_torch
from seed_story_jax.config import DetokenizerConfig, ResamplerXLV2Config, SchedulerConfig, SeedStoryConfig
from seed_story_jax.models.detokenizer import Detokenizer, frame_keys, initial_noise, latent_shape
from seed_story_jax.schedulers import config_to_diffusers
from convert.torch_ref.resamplers import ResamplerXLV2 as TorchResamplerXLV2

STEPS = 50
BATCH = 2
SIZE = 32  # pixels; the tiny VAE halves it ⇒ 16×16 latents
RES = ResamplerXLV2Config(dim=32, depth=2, dim_head=8, heads=4, num_queries=16, embedding_dim=64,
                          output1_dim=16, output2_dim=16)


def _torch_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4),
        cross_attention_dim=RES.output1_dim + RES.output2_dim, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=RES.output2_dim + 6 * 8, norm_num_groups=8,
    ).eval()


def _torch_vae():
    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=SIZE, scaling_factor=0.13025,
    ).eval()


def _torch_resampler():
    torch.manual_seed(2)
    return TorchResamplerXLV2(RES.dim, RES.depth, RES.dim_head, RES.heads, RES.num_queries, RES.embedding_dim,
                              RES.output1_dim, RES.output2_dim, RES.ff_mult).eval()


def _np_sd(m):
    return {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def setup():
    unet, vae, res = _torch_unet(), _torch_vae(), _torch_resampler()
    ucfg = cunet.config_from_diffusers(dict(unet.config))
    vcfg = cvae.config_from_diffusers(dict(vae.config))
    cfg = SeedStoryConfig(
        unet=ucfg, vae=vcfg, scheduler=SchedulerConfig(),
        detokenizer=DetokenizerConfig(resampler=RES, num_inference_steps=STEPS, guidance_scale=7.5,
                                      height=SIZE, width=SIZE, seed=42, seed_policy="per_image"))
    params = {
        "unet": cunet.from_torch(_np_sd(unet), ucfg),
        "vae": cvae.from_torch(_np_sd(vae), vcfg),
        "detokenizer": xlv2_from_torch(_np_sd(res), RES),
    }
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((BATCH, 16, RES.embedding_dim)).astype(np.float32)
    uncond = rng.standard_normal((1, 16, RES.embedding_dim)).astype(np.float32)
    return dict(cfg=cfg, det=Detokenizer(cfg, params), unet=unet, vae=vae, res=res, feats=feats, uncond=uncond)


def _reference_loop(s, noise_nhwc, guidance):
    """The SDXL pipeline's loop written out step by step in torch."""
    unet, vae, res = s["unet"], s["vae"], s["res"]
    sched = EulerDiscreteScheduler.from_config(config_to_diffusers(SchedulerConfig()))
    sched.set_timesteps(STEPS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only fight over the shared cores
    try:
        return _loop(unet, vae, res, s, sched, noise_nhwc, guidance)
    finally:
        torch.set_num_threads(threads)


def _loop(unet, vae, res, s, sched, noise_nhwc, guidance):
    with torch.no_grad():
        ctx_c, pool_c = res(torch.from_numpy(s["feats"]))
        ctx_u, pool_u = res(torch.from_numpy(s["uncond"]))
        b = ctx_c.shape[0]
        ctx = torch.cat([ctx_u.expand_as(ctx_c), ctx_c])
        pooled = torch.cat([pool_u.expand_as(pool_c), pool_c])
        tids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32).repeat(2 * b, 1)
        latents = torch.from_numpy(np.asarray(noise_nhwc).transpose(0, 3, 1, 2).copy()) * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([latents] * 2), t)
            eps = unet(inp, t, encoder_hidden_states=ctx,
                       added_cond_kwargs={"text_embeds": pooled, "time_ids": tids}).sample
            eps_u, eps_c = eps.chunk(2)
            latents = sched.step(eps_u + guidance * (eps_c - eps_u), t, latents).prev_sample
        img = vae.decode(latents / vae.config.scaling_factor).sample
        img = (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return latents.numpy().transpose(0, 2, 3, 1), (img * 255).round().astype(np.uint8)


def test_sample_compiles_once_and_matches_torch_loop(setup, compile_counter):
    det, feats, uncond = setup["det"], setup["feats"], setup["uncond"]
    feats_b = feats[::-1].copy()
    with compile_counter() as first:
        images, latents = det.sample_arrays(feats, uncond)
        images = np.asarray(images)
    assert first.count == 1, f"a {STEPS}-step sample compiled {first.count} programs, expected 1"
    with compile_counter() as second:
        again = det.sample(feats_b, uncond, seed=7, guidance_scale=5.0)
    assert second.count == 0, f"a second sample of the same shape compiled {second.count} programs"
    assert images.shape == (BATCH, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert again.shape == images.shape and not np.array_equal(again, images)

    # Same initial noise as the JAX program drew (per_image: key(42) for every frame).
    shape = latent_shape(setup["cfg"], BATCH, SIZE, SIZE)
    noise = initial_noise(frame_keys(np.uint32(42), np.uint32(0), BATCH, True), shape)
    want_latents, want_images = _reference_loop(setup, noise, 7.5)
    got = np.asarray(latents, np.float64)
    err = np.max(np.abs(got - want_latents)) / np.max(np.abs(want_latents))
    assert err <= 1e-4, f"latents differ from the torch loop by {err:.2e} (relative to max)"
    assert np.max(np.abs(images.astype(int) - want_images.astype(int))) <= 1


def test_per_image_seed_gives_every_frame_the_same_noise(setup):
    shape = latent_shape(setup["cfg"], 3, SIZE, SIZE)
    same = np.asarray(initial_noise(frame_keys(np.uint32(42), np.uint32(0), 3, True), shape))
    assert np.array_equal(same[0], same[1]) and np.array_equal(same[0], same[2])
    free = np.asarray(initial_noise(frame_keys(np.uint32(42), np.uint32(0), 3, False), shape))
    assert not np.array_equal(free[0], free[1])
    nxt = np.asarray(initial_noise(frame_keys(np.uint32(42), np.uint32(1), 3, False), shape))
    assert not np.array_equal(free[0], nxt[0])
    # End to end: two frames with the same features come out identical under per_image.
    det, f = setup["det"], setup["feats"]
    twins = det.sample(np.stack([f[0], f[0]]), setup["uncond"])
    assert np.array_equal(twins[0], twins[1])


def test_progress_callback_reports_every_step(setup):
    seen = []
    det = setup["det"]
    det.sample(setup["feats"], setup["uncond"], on_step=seen.append)
    assert sorted(seen) == list(range(STEPS))


def test_bad_inputs_are_refused(setup):
    det = setup["det"]
    with pytest.raises(ValueError, match="uncond_features"):
        det.sample(setup["feats"], np.zeros((1, 16, 8), np.float32))
    with pytest.raises(ValueError, match="multiple of the VAE factor"):
        det.sample(setup["feats"], setup["uncond"], height=33)
    with pytest.raises(ValueError, match="needs config sections"):
        Detokenizer(dataclasses.replace(setup["cfg"], vae=None), {})


# ---------------------------------------------------------------------------------------------
# convert/detokenizer.py: the SDXLAdapter pytorch_model.bin laid over an SDXL base
# ---------------------------------------------------------------------------------------------


def _sdxl_base(tmp_path, s):
    base = tmp_path / "sdxl"
    s["unet"].save_pretrained(base / "unet", safe_serialization=True)
    s["vae"].save_pretrained(base / "vae", safe_serialization=True)
    EulerDiscreteScheduler.from_config(config_to_diffusers(SchedulerConfig())).save_pretrained(base / "scheduler")
    return base


# Shapes do not show how to_q's outputs split into heads; with an SDXL directory as the base the
# converter takes SEED-X's dim_head 64, so that test's resampler has it (a JAX base supplies its own).
RES64 = ResamplerXLV2Config(dim=64, depth=1, dim_head=64, heads=2, num_queries=16, embedding_dim=64,
                            output1_dim=16, output2_dim=16)


def _adapter_sd(s, unet_filter, res=None):
    """An SDXLAdapter-style state dict: the resampler, and a trained copy of the UNet's selected tensors."""
    sd = {"resampler." + k: v for k, v in _np_sd(res or s["res"]).items()}
    rng = np.random.default_rng(5)
    for k, v in _np_sd(s["unet"]).items():
        if unet_filter(k):
            sd["unet." + k] = (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype)
    return sd


def _save_bin(sd, path):
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
    return path


def _convert(*argv):
    from seed_story_jax.cli import main

    return main(["convert", *map(str, argv)])


def _is_kv(k):
    return k.endswith(("to_k.weight", "to_v.weight")) and (".attn1." in k or ".attn2." in k)


def test_convert_partial_overlay_over_sdxl_base_round_trips(setup, tmp_path):
    from convert.detokenizer import import_checkpoint
    from convert.io import read_state_dict
    from seed_story_jax.checkpoint import load_component, read_config

    base = _sdxl_base(tmp_path, setup)
    torch.manual_seed(3)
    res64 = TorchResamplerXLV2(RES64.dim, RES64.depth, RES64.dim_head, RES64.heads, RES64.num_queries,
                               RES64.embedding_dim, RES64.output1_dim, RES64.output2_dim)
    sd = _adapter_sd(setup, _is_kv, res64)
    src = _save_bin(sd, tmp_path / "pytorch_model.bin")
    ckpt = tmp_path / "ckpt"
    opts = type("O", (), {"base": str(base), "dtype": None})()
    report = import_checkpoint(src, ckpt, options=opts)
    n_kv = sum(1 for k in sd if k.startswith("unet."))
    assert n_kv > 0 and report["unet_tensors_overlaid"] == n_kv == report["unet_kv_tensors_overlaid"]
    full = _np_sd(setup["unet"])
    assert report["unet_tensors_from_base"] == len(full) - n_kv
    assert report["components"] == ["detokenizer", "unet", "vae"]
    cfg = read_config(ckpt)
    assert cfg.detokenizer.resampler == RES64
    assert cfg.scheduler == SchedulerConfig() and cfg.vae is not None

    # Overlaid K/V come from the file, everything else from the base.
    unet = cunet.to_torch(jax.tree.map(np.asarray, load_component(ckpt, "unet")), cfg.unet)
    for k, v in full.items():
        want = sd["unet." + k] if "unet." + k in sd else v
        np.testing.assert_array_equal(unet[k], want, err_msg=k)

    # Export writes back exactly the file's tensors, bit for bit.
    assert _convert(ckpt, tmp_path / "export") == 0
    back = read_state_dict(tmp_path / "export" / "pytorch_model.bin")
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_convert_full_file_over_jax_base(setup, tmp_path):
    from convert.io import read_state_dict
    from seed_story_jax.checkpoint import save_checkpoint
    from seed_story_jax.models.detokenizer import Detokenizer

    sd = _adapter_sd(setup, lambda k: True)
    src = _save_bin(sd, tmp_path / "pytorch_model.bin")
    # A JAX checkpoint as the base: its detokenizer section gives the head split (4 × 8).
    cfg = setup["cfg"]
    base = save_checkpoint(tmp_path / "base", cfg, {
        "unet": cunet.from_torch(_np_sd(setup["unet"]), cfg.unet), "vae": cvae.from_torch(_np_sd(setup["vae"]), cfg.vae)})
    sdxl = _sdxl_base(tmp_path, setup)
    assert _convert(sdxl, tmp_path / "x", "--kind", "detokenizer", "--base", base) == 2  # not an adapter file
    assert not (tmp_path / "x").exists()
    assert _convert(src, tmp_path / "ckpt", "--kind", "detokenizer", "--base", base) == 0
    Detokenizer.load(tmp_path / "ckpt")  # everything sampling needs is there
    assert _convert(tmp_path / "ckpt", tmp_path / "out.bin") == 0
    back = read_state_dict(tmp_path / "out.bin")
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


@pytest.mark.slow
def test_convert_verify(setup, tmp_path):
    """`--verify`: the resampler against the torch reference and the UNet against diffusers (≤ 1e-4)."""
    from convert.detokenizer import verify
    from seed_story_jax.checkpoint import save_checkpoint

    sd = _adapter_sd(setup, _is_kv)
    src = _save_bin(sd, tmp_path / "pytorch_model.bin")
    cfg = setup["cfg"]
    base = save_checkpoint(tmp_path / "base", cfg, {"unet": cunet.from_torch(_np_sd(setup["unet"]), cfg.unet)})
    assert _convert(src, tmp_path / "ckpt", "--kind", "detokenizer", "--base", base, "--verify") == 0
    result = verify(src, tmp_path / "ckpt")
    assert result["ok"] and result["resampler_max_rel"] <= 1e-5 and result["unet_max_rel"] <= 1e-4


def test_convert_refuses_bad_files(setup, tmp_path):
    from seed_story_jax.checkpoint import save_checkpoint

    cfg = setup["cfg"]
    base = save_checkpoint(tmp_path / "base", cfg, {"unet": cunet.from_torch(_np_sd(setup["unet"]), cfg.unet)})
    good = _adapter_sd(setup, _is_kv)
    cases = {
        "resampler.layers.1.0.to_kv.weight": lambda sd: sd.pop("resampler.layers.1.0.to_kv.weight"),
        "unet.down_blocks.9.nothing.weight": lambda sd: sd.__setitem__("unet.down_blocks.9.nothing.weight",
                                                                       np.zeros(3, np.float32)),
        "resampler.unet_proj_1.bias": lambda sd: sd.__setitem__("resampler.unet_proj_1.bias", np.zeros(5, np.float32)),
        "extra.weight": lambda sd: sd.__setitem__("extra.weight", np.zeros(3, np.float32)),
    }
    for i, (key, damage) in enumerate(cases.items()):
        sd = dict(good)
        damage(sd)
        src = _save_bin(sd, tmp_path / f"bad{i}.bin")
        dst = tmp_path / f"out{i}"
        from convert.detokenizer import import_checkpoint
        from seed_story_jax.errors import ConversionError

        with pytest.raises(ConversionError, match=key.replace(".", r"\.")):
            import_checkpoint(src, dst, options=type("O", (), {"base": str(base)})())
        assert _convert(src, dst, "--kind", "detokenizer", "--base", base) == 2
        assert not dst.exists()
    # A partial UNet with no base to lay it over.
    src = _save_bin(good, tmp_path / "partial.bin")
    assert _convert(src, tmp_path / "nobase", "--kind", "detokenizer") == 2
    assert not (tmp_path / "nobase").exists()


# ---------------------------------------------------------------------------------------------
# seed-story reconstruct
# ---------------------------------------------------------------------------------------------


def test_reconstruct_command(tmp_path):
    from PIL import Image

    from seed_story_jax.checkpoint import save_checkpoint
    from seed_story_jax.cli import main
    from seed_story_jax.config import load_config
    from seed_story_jax.models import abstract_params

    cfg = load_config("configs/tiny.yaml")
    rng = np.random.default_rng(1)
    # Random weights straight from the abstract shapes: no initialisers to compile.
    comps = {n: jax.tree.map(lambda a: (0.05 * rng.standard_normal(a.shape)).astype(a.dtype),
                             abstract_params(n, getattr(cfg, n)))
             for n in ("vit", "detokenizer", "unet", "vae")}
    ckpt = save_checkpoint(tmp_path / "ckpt", cfg, comps)
    img = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "out.png"
    assert main(["reconstruct", "--ckpt", str(ckpt), str(img), "--out", str(out), "--steps", "3"]) == 0
    with Image.open(out) as im:
        assert im.size == (cfg.detokenizer.width, cfg.detokenizer.height) and im.mode == "RGB"
    # Refusals: existing output, unreadable image — exit 2, nothing written.
    assert main(["reconstruct", "--ckpt", str(ckpt), str(img), "--out", str(out)]) == 2
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    assert main(["reconstruct", "--ckpt", str(ckpt), str(bad), "--out", str(tmp_path / "o2.png")]) == 2
    assert not (tmp_path / "o2.png").exists()
