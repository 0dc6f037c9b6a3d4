"""AutoencoderKL against diffusers (torch, CPU, fp32) and its converter through `seed-story convert`.

Parity tolerance: 1e-4 relative to the reference's largest magnitude (measured ~2e-6 in fp32).
Round trip diffusers → JAX → diffusers: bit-exact tensors.
"""

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from diffusers import AutoencoderKL as TorchVAE
from safetensors.numpy import load_file, save_file

from convert import vae as CV
from seed_story_jax.cli import main as cli
from seed_story_jax.config import ConfigError, VAEConfig, load_config
from seed_story_jax.models import abstract_params
from seed_story_jax.models.vae import DiagonalGaussian
from seed_story_jax.nn.params import count_params

RTOL = 1e-4
TINY = dict(block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=8, latent_channels=4,
            sample_size=32, scaling_factor=0.13025)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def ref():
    """A tiny diffusers VAE with every weight perturbed (norm scales ≠ 1, biases ≠ 0)."""
    torch.manual_seed(0)
    m = TorchVAE(**TINY).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.fixture(scope="module")
def ref_dir(ref, tmp_path_factory):
    d = tmp_path_factory.mktemp("diffusers") / "vae"
    ref.save_pretrained(d, safe_serialization=True)
    return d


def _sd(m):
    return {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}


def _port(ref, **over):
    cfg = dataclasses.replace(CV.config_from_diffusers(dict(ref.config)), **over)
    return cfg, CV.model_from_params(cfg, CV.from_torch(_sd(ref), cfg))


def _jit(model, method):
    """model.method under jax.jit (one compile instead of hundreds of eager ops)."""
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, *a: getattr(nnx.merge(graphdef, state), method)(*a))
    return lambda *a: fn(state, *a)


def test_encode_decode_parity(ref):
    """Posterior mean/logvar and a decode, non-square input, fp32: ≤ 1e-4 relative (measured ~2e-6)."""
    cfg, model = _port(ref)
    assert cfg == dataclasses.replace(load_config("configs/tiny.yaml").vae, scaling_factor=cfg.scaling_factor)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 24, 40)).astype(np.float32)
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(x)).latent_dist
        z = post.mean + 0.5 * torch.randn_like(post.mean)
        dec = ref.decode(z).sample.numpy()
    graphdef, state = nnx.split(model)
    key = jax.random.key(3)

    @jax.jit
    def run(state, x, z, key):
        m = nnx.merge(graphdef, state)
        return m.encode(x), m.decode(z), m.encode_latents(x, key), m.decode_latents(z * cfg.scaling_factor)

    p, got, lat, got_scaled = run(state, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                  jnp.asarray(z.numpy().transpose(0, 2, 3, 1)), key)
    assert _rel(np.asarray(p.mean).transpose(0, 3, 1, 2), post.mean.numpy()) <= RTOL
    assert _rel(np.asarray(p.logvar).transpose(0, 3, 1, 2), post.logvar.numpy()) <= RTOL
    assert got.dtype == jnp.float32 and got.shape == (2, 24, 40, 3)
    assert _rel(np.asarray(got).transpose(0, 3, 1, 2), dec) <= RTOL
    # sampling: mean + std·N(0, 1); the diffusion model's latents are that × scaling_factor
    eps = jax.random.normal(key, p.mean.shape)
    np.testing.assert_allclose(p.sample(key), p.mean + jnp.exp(0.5 * p.logvar) * eps, rtol=1e-6)
    np.testing.assert_allclose(lat, p.sample(key) * 0.13025, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_scaled, got, rtol=1e-5, atol=1e-5)
    # logvar is clamped like diffusers' DiagonalGaussianDistribution
    big = DiagonalGaussian.from_moments(jnp.concatenate([jnp.zeros((1, 2, 2, 4)), jnp.full((1, 2, 2, 4), 99.0)], -1))
    assert float(big.logvar.max()) == 20.0


def test_full_size_sdxl_vae_param_count():
    n = count_params(abstract_params("vae", VAEConfig()))
    with torch.device("meta"):
        sdxl = TorchVAE(**{**TINY, "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32,
                           "layers_per_block": 2, "down_block_types": ["DownEncoderBlock2D"] * 4,
                           "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 1024})
    assert n == sum(p.numel() for p in sdxl.parameters()) == 83_653_863


def test_bf16_decode_of_a_large_latent_stays_finite(ref):
    """The SDXL VAE's decoder activations pass fp16's 65504 at 1024² (NaN/black images). Here a large
    latent through an amplified conv_in does the same at toy size: an fp16 decode breaks, bf16
    (fp32's exponent range) stays finite and within bf16 rounding of the fp32 torch reference."""
    z = np.random.default_rng(2).standard_normal((1, 4, 16, 16)).astype(np.float32) * 1000.0
    big = copy.deepcopy(ref)
    with torch.no_grad():
        big.decoder.conv_in.weight.mul_(100.0)
        h = big.decoder.conv_in(big.post_quant_conv(torch.from_numpy(z)))
        want = big.decode(torch.from_numpy(z)).sample.numpy().transpose(0, 2, 3, 1)
    assert float(h.abs().max()) > 65504  # past fp16's range
    z = jnp.asarray(z.transpose(0, 2, 3, 1))
    outs = {}
    for dt in ("bfloat16", "float16"):  # float16 bypasses validate() only to show the failure
        cfg, model = _port(big, decode_dtype=dt)
        outs[dt] = np.asarray(_jit(model, "decode")(z))
    assert np.isfinite(want).all() and np.isfinite(outs["bfloat16"]).all()
    assert not np.isfinite(outs["float16"]).all()
    assert _rel(outs["bfloat16"], want) < 0.05
    with pytest.raises(ConfigError, match="decode_dtype"):
        VAEConfig(decode_dtype="float16").validate()


def test_round_trip_is_bit_exact_and_loads_in_diffusers(ref, ref_dir, tmp_path, capsys):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert CV.detect(ref_dir) and not CV.detect(tmp_path)
    assert cli(["convert", str(ref_dir), str(ckpt), "--kind", "vae", "--verify"]) == 0
    assert "'ok': True" in capsys.readouterr().out  # --verify: torch reference vs port within 1e-4
    assert cli(["convert", str(ckpt), str(out), "--kind", "vae"]) == 0
    a = load_file(ref_dir / "diffusion_pytorch_model.safetensors")
    b = load_file(out / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    src_cfg = json.loads((ref_dir / "config.json").read_text())
    out_cfg = json.loads((out / "config.json").read_text())
    drop = ("_diffusers_version", "_name_or_path", "latents_mean", "latents_std", "shift_factor",
            "mid_block_add_attention", "use_quant_conv", "use_post_quant_conv")
    assert {k: v for k, v in src_cfg.items() if k not in drop} == {k: v for k, v in out_cfg.items() if k not in drop}
    again = TorchVAE.from_pretrained(out).eval()
    x = torch.from_numpy(np.random.default_rng(4).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32))
    with torch.no_grad():
        assert torch.equal(again(x).sample, ref(x).sample)


def test_legacy_attention_names_and_bin_files(ref, tmp_path):
    """Old checkpoints: query/key/value/proj_attn in a pickled .bin (read by the restricted loader)."""
    legacy = {}
    for k, v in ref.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[k] = v.clone()
    assert any(".proj_attn." in k for k in legacy)
    src = tmp_path / "legacy"
    src.mkdir()
    torch.save(legacy, src / "diffusion_pytorch_model.bin")
    (src / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **TINY}))
    cfg, params, _ = CV.read_folder(src)
    want = CV.from_torch(_sd(ref), cfg)
    jax.tree.map(np.testing.assert_array_equal, params, want)
    both = {**_sd(ref), "encoder.mid_block.attentions.0.query.weight": np.zeros((32, 32), np.float32)}
    with pytest.raises(Exception, match="to_q"):
        CV.from_torch(both, cfg)


def _broken(ref_dir, tmp_path, edit):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "config.json").write_text((ref_dir / "config.json").read_text())
    sd = load_file(ref_dir / "diffusion_pytorch_model.safetensors")
    edit(sd, src)
    return src


@pytest.mark.parametrize("case, needle", [
    ("missing", "decoder.conv_out.bias"),
    ("extra", "decoder.extra.weight"),
    ("misshapen", "encoder.conv_in.weight"),
    ("truncated", "diffusion_pytorch_model.safetensors"),
    ("bad_config", "act_fn"),
])
def test_bad_inputs_are_refused(ref_dir, tmp_path, capsys, case, needle):
    def edit(sd, src):
        if case == "missing":
            del sd["decoder.conv_out.bias"]
        elif case == "extra":
            sd["decoder.extra.weight"] = np.zeros(3, np.float32)
        elif case == "misshapen":
            sd["encoder.conv_in.weight"] = sd["encoder.conv_in.weight"][:, :2].copy()
        elif case == "bad_config":
            (src / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()),
                                                         "act_fn": "gelu"}))
        path = src / "diffusion_pytorch_model.safetensors"
        save_file(sd, path)
        if case == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])

    src = _broken(ref_dir, tmp_path, edit)
    dst = tmp_path / "ckpt"
    assert cli(["convert", str(src), str(dst), "--kind", "vae"]) != 0
    err = capsys.readouterr().err
    assert needle in err, err
    assert not dst.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_config_mapping_round_trip():
    cfg = VAEConfig()
    d = CV.config_to_diffusers(cfg)
    assert d["scaling_factor"] == 0.13025 and d["block_out_channels"] == [128, 256, 512, 512]
    assert CV.config_from_diffusers(d) == cfg
    off = VAEConfig(block_out_channels=(16, 32), norm_num_groups=8, use_quant_conv=False,
                    mid_block_add_attention=False)
    assert CV.config_from_diffusers(CV.config_to_diffusers(off)) == off
    with pytest.raises(ConfigError, match="shift_factor"):
        CV.config_from_diffusers({**d, "shift_factor": 0.1})
