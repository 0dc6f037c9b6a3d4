"""SDXL-family UNet against diffusers' UNet2DConditionModel (torch, CPU, fp32), the shared conv blocks,
and the `unet` converter through `seed-story convert`.

Parity tolerance: 1e-4 relative to the reference output's largest magnitude (measured ~2e-6 in fp32).
Round trip diffusers → JAX → diffusers: bit-exact tensors.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.models.downsampling import Downsample2D as TorchDown
from diffusers.models.resnet import ResnetBlock2D as TorchResnet
from diffusers.models.upsampling import Upsample2D as TorchUp
from flax import nnx
from safetensors.numpy import load_file, save_file

from convert import unet as CU
from seed_story_jax.cli import main as cli
from seed_story_jax.config import ConfigError, UNetConfig, load_config
from seed_story_jax.models import unet as U
from seed_story_jax.nn import conv as C
from seed_story_jax.nn.params import count_params

RTOL = 1e-4
torch.set_num_threads(1)  # tiny models: extra intra-op threads only spin on a shared 2-core box

# A: the tiny.yaml UNet (SDXL-like: first block without attention; transformer depth 1 → 2; linear proj).
TINY_A = dict(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
              transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=32,
              use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
              projection_class_embeddings_input_dim=6 * 8 + 16, norm_num_groups=8, sample_size=16)
# B: three blocks, attention in other places, 1×1-conv projections, per-layer (asymmetric) transformer
# depths with diffusers' reverse_transformer_layers_per_block, sin-first embedding with freq_shift 1.
TINY_B = dict(block_out_channels=(16, 32, 32),
              down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
              transformer_layers_per_block=[[2], [1], [3]], reverse_transformer_layers_per_block=[[1, 1], [3, 1], [2, 1]],
              attention_head_dim=(2, 2, 4), cross_attention_dim=24, use_linear_projection=False,
              addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 12,
              norm_num_groups=4, sample_size=16, flip_sin_to_cos=False, freq_shift=1)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def _torch_unet(kwargs, seed=0):
    """A tiny diffusers UNet with every weight perturbed (norm scales ≠ 1, biases ≠ 0)."""
    torch.manual_seed(seed)
    m = TorchUNet(**kwargs).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


def _sd(m):
    return {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def ref_a():
    return _torch_unet(TINY_A)


@pytest.fixture(scope="module")
def ref_dir(ref_a, tmp_path_factory):
    d = tmp_path_factory.mktemp("diffusers") / "unet"
    ref_a.save_pretrained(d, safe_serialization=True)
    return d


# --------------------------------------------------------------------------------------------
# shared conv blocks (nn/conv.py)
# --------------------------------------------------------------------------------------------


def _conv_p(c):
    d = {"kernel": c.weight.detach().numpy().transpose(2, 3, 1, 0)}
    if c.bias is not None:
        d["bias"] = c.bias.detach().numpy()
    return d


def _nhwc(x):
    return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def _apply(factory, params, *args):
    """Build abstractly, then one jitted forward (eager construction would compile every init op)."""
    with nnx.use_eager_sharding(False):
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: factory(nnx.Rngs(0))))
    return np.asarray(jax.jit(lambda p, a: nnx.merge(graphdef, p)(*a))(params, args))


@pytest.mark.parametrize("temb", [None, 16])
def test_resnet_block_matches_diffusers(temb):
    torch.manual_seed(0)
    t = TorchResnet(in_channels=8, out_channels=16, temb_channels=temb, groups=4, eps=1e-6).eval()
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0, 0.3)
    gn = lambda g: {"scale": g.weight.detach().numpy(), "bias": g.bias.detach().numpy()}  # noqa: E731
    p = {"norm1": gn(t.norm1), "norm2": gn(t.norm2), "conv1": _conv_p(t.conv1), "conv2": _conv_p(t.conv2),
         "conv_shortcut": _conv_p(t.conv_shortcut)}
    if temb:
        p["time_emb_proj"] = {"kernel": t.time_emb_proj.weight.detach().numpy().T,
                              "bias": t.time_emb_proj.bias.detach().numpy()}
    x, e = torch.randn(2, 8, 6, 10), (torch.randn(2, temb) if temb else None)
    with torch.no_grad():
        ref = t(x, e).numpy().transpose(0, 2, 3, 1)
    out = _apply(lambda r: C.ResnetBlock2D(8, 16, temb_channels=temb, groups=4, eps=1e-6, rngs=r), p,
                 _nhwc(x), None if e is None else jnp.asarray(e.numpy()))
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("padding,hw", [(0, (8, 8)), (0, (7, 9)), (1, (7, 9))])
def test_downsample_matches_diffusers(padding, hw):
    """padding 1: the UNet's; padding 0: the VAE's asymmetric (0, 1, 0, 1) pad, odd sizes included."""
    torch.manual_seed(1)
    t = TorchDown(8, use_conv=True, out_channels=8, padding=padding, name="op")
    x = torch.randn(2, 8, *hw)
    with torch.no_grad():
        ref = t(x).numpy().transpose(0, 2, 3, 1)
    out = _apply(lambda r: C.Downsample2D(8, padding=padding, rngs=r), {"conv": _conv_p(t.conv)}, _nhwc(x))
    assert out.shape == ref.shape
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("size", [None, (11, 7)])
def test_upsample_matches_diffusers(size):
    torch.manual_seed(2)
    t = TorchUp(8, use_conv=True)
    x = torch.randn(2, 8, 5, 3)
    with torch.no_grad():
        ref = t(x, output_size=size).numpy().transpose(0, 2, 3, 1)
    with nnx.use_eager_sharding(False):
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: C.Upsample2D(8, rngs=nnx.Rngs(0))))
    out = np.asarray(jax.jit(lambda p, a: nnx.merge(graphdef, p)(a, size))({"conv": _conv_p(t.conv)}, _nhwc(x)))
    assert out.shape == ref.shape
    assert _rel(out, ref) < 1e-5


# --------------------------------------------------------------------------------------------
# UNet parity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,sizes", [(TINY_A, (16,)), (TINY_B, (10,))], ids=["A", "B"])
def test_unet_matches_diffusers(kwargs, sizes):
    """fp32 parity ≤ 1e-4 relative. B at 10×10: not a multiple of 2**num_upsamplers = 4, so the explicit
    upsample sizes diffusers forwards (5 → 3 → 5 → 10) are exercised too."""
    m = _torch_unet(kwargs)
    cfg = CU.config_from_diffusers(dict(m.config))
    params = CU.from_torch(_sd(m), cfg)
    for size in sizes:
        inputs = CU.random_inputs(cfg, size=size, seed=size)
        ref = CU.run_torch(m, inputs)
        out = CU.run_jax(cfg, params, inputs)
        assert out.shape == ref.shape
        assert _rel(out, ref) <= RTOL, (size, _rel(out, ref))


def test_tiny_yaml_unet_is_config_a():
    cfg = load_config("configs/tiny.yaml").unet
    assert dataclasses.replace(cfg, sample_size=16) == CU.config_from_diffusers(dict(TorchUNet(**TINY_A).config))
    assert cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim == 16  # pooled width


MICRO = dict(block_out_channels=(8, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1, transformer_layers_per_block=(1, 1),
             attention_head_dim=(2, 2), cross_attention_dim=8, use_linear_projection=True, addition_embed_type="text_time",
             addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 4, norm_num_groups=4, sample_size=8)


def _loss_and_grad(cfg, params, inp):
    graphdef, _ = nnx.split(U.abstract_model(cfg))

    def loss(p):
        out = nnx.merge(graphdef, p)(inp["sample"], inp["timesteps"], inp["encoder_hidden_states"],
                                     inp["text_embeds"], inp["time_ids"])
        return jnp.mean(jnp.square(out.astype(jnp.float32)))

    return jax.jit(jax.value_and_grad(loss))(params)


def _micro():
    m = _torch_unet(MICRO)
    cfg = CU.config_from_diffusers(dict(m.config))
    params = jax.tree.map(jnp.asarray, CU.from_torch(_sd(m), cfg))
    inp = {k: jnp.asarray(v) for k, v in CU.random_inputs(cfg, size=4).items()}
    inp["sample"] = inp["sample"].transpose(0, 2, 3, 1)
    return cfg, params, inp


def _count_primitive(jaxpr, name: str) -> int:
    n = 0
    for e in jaxpr.eqns:
        n += e.primitive.name == name
        for v in e.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _count_primitive(inner, name)
    return n


def _remat_sites(cfg) -> int:
    """Number of remat regions traced in the micro UNet's forward (tracing only, no compile)."""
    graphdef, abstract = nnx.split(U.abstract_model(cfg))
    inp = CU.random_inputs(cfg, size=4)
    inp["sample"] = inp["sample"].transpose(0, 2, 3, 1)

    def loss(p):
        return jnp.mean(jnp.square(nnx.merge(graphdef, p)(inp["sample"], inp["timesteps"], inp["encoder_hidden_states"],
                                                          inp["text_embeds"], inp["time_ids"])))

    return _count_primitive(jax.make_jaxpr(loss)(abstract.to_pure_dict()).jaxpr, "remat2")


def test_remat_knob_wraps_every_block():
    """remat "none" traces no remat regions; a policy wraps each resnet and each transformer block
    (micro UNet: 2 down + 2 mid + 2·2 up resnets, 1 + 1 + 2 transformer blocks). Values and gradients
    under remat: test_remat_whole_unet (slow: conv backward compiles slowly on CPU)."""
    cfg = CU.config_from_diffusers(dict(TorchUNet(**MICRO).config))
    assert _remat_sites(cfg) == 0
    assert _remat_sites(dataclasses.replace(cfg, remat="full")) == 8 + 4
    assert _remat_sites(dataclasses.replace(cfg, remat="save_qkv_proj")) == 8 + 4


@pytest.mark.slow
def test_remat_whole_unet():
    cfg, params, inp = _micro()
    l0, g0 = _loss_and_grad(cfg, params, inp)
    l1, g1 = _loss_and_grad(dataclasses.replace(cfg, remat="save_dots"), params, inp)
    assert abs(float(l0) - float(l1)) <= 1e-6 * abs(float(l0))
    kv = U.kv_projection_paths(g0)
    assert len(kv) == 4 * (1 + 1 + 2)  # k/v × attn1/attn2 × (down 1 + mid 1 + up 2 transformer blocks)
    for path in kv:
        a, b = g0, g1
        for key in path:
            a, b = a[key], b[key]
        assert float(jnp.max(jnp.abs(a))) > 0 and _rel(b, np.asarray(a)) < 1e-5, path


@pytest.mark.slow
def test_bf16_close_to_fp32():
    cfg, params, inp = _micro()
    l0, _ = _loss_and_grad(cfg, params, inp)
    bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    lb, gb = _loss_and_grad(dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16"), bf, inp)
    assert np.isfinite(float(lb)) and abs(float(lb) - float(l0)) < 0.05 * abs(float(l0))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(gb))


# --------------------------------------------------------------------------------------------
# full size and the trainable K/V set
# --------------------------------------------------------------------------------------------


def test_sdxl_base_abstract_param_count():
    cfg = load_config("configs/sdxl-base.yaml").unet
    assert cfg == UNetConfig()
    tree = U.abstract_params(cfg)
    assert count_params(tree) == 2_567_463_684  # diffusers' UNet2DConditionModel for SDXL base 1.0
    # spec §4.3: to_k/to_v of attn1 and attn2 in all 70 BasicTransformerBlocks = 280 Linears, no biases;
    # 10 blocks at C=640 and 60 at C=1280: 10·(2·640² + 2·2048·640) + 60·(2·1280² + 2·2048·1280).
    kv = U.kv_projection_paths(tree)
    assert len(kv) == 280 and all(p[-1] == "kernel" for p in kv)
    leaves = dict((tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p), x)
                  for p, x in jax.tree_util.tree_leaves_with_path(tree))
    assert sum(int(np.prod(leaves[p].shape)) for p in kv) == 545_587_200


def test_kv_set_is_set_trainable_v2(ref_a):
    """The K/V paths are exactly the params of torch modules whose name ends in to_k / to_v."""
    cfg = CU.config_from_diffusers(dict(ref_a.config))
    torch_kv = {f"{n}.{pn}" for n, mod in ref_a.named_modules() if n.endswith(("to_k", "to_v"))
                for pn, _ in mod.named_parameters()}
    ours = {CU.torch_key(p) for p in U.kv_projection_paths(U.abstract_params(cfg))}
    # k/v × attn1/attn2 × (down 2 layers · depth 2 + mid depth 2 + up 3 layers · depth 2) blocks
    assert ours == torch_kv and len(ours) == 4 * (4 + 2 + 6)


# --------------------------------------------------------------------------------------------
# converter through the CLI
# --------------------------------------------------------------------------------------------


def test_round_trip_bit_exact(ref_a, ref_dir, tmp_path, capsys):
    ck, out = tmp_path / "ck", tmp_path / "out"
    assert cli(["convert", "--kind", "unet", str(ref_dir), str(ck)]) == 0
    assert cli(["convert", str(ck), str(out)]) == 0
    a = load_file(ref_dir / "diffusion_pytorch_model.safetensors")
    b = load_file(out / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    m = TorchUNet.from_pretrained(out).eval()
    assert CU.config_from_diffusers(dict(m.config)) == CU.config_from_diffusers(dict(ref_a.config))
    inputs = CU.random_inputs(CU.config_from_diffusers(dict(m.config)), size=8)
    assert np.array_equal(CU.run_torch(m, inputs), CU.run_torch(ref_a, inputs))


def test_bin_and_detect_and_verify(ref_a, ref_dir, tmp_path, capsys):
    src = tmp_path / "bin"
    ref_a.save_pretrained(src, safe_serialization=False)
    assert (src / "diffusion_pytorch_model.bin").is_file() and CU.detect(src) and CU.detect(ref_dir)
    ck = tmp_path / "ck"
    assert cli(["convert", str(src), str(ck), "--verify", "--json"]) == 0  # kind detected
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "unet" and report["verify"]["ok"] and report["verify"]["max_rel"] < RTOL
    cfg, params = CU.load_folder(ref_dir)
    from seed_story_jax.checkpoint import load_checkpoint

    got = CU._numpy_tree(load_checkpoint(ck).params["unet"])
    for p, x in CU.leaves(params):
        y = got
        for k in p:
            y = y[k]
        assert np.array_equal(np.asarray(y), x)


def test_config_mapping_round_trip():
    for kw in (TINY_A, TINY_B):
        d = dict(TorchUNet(**kw).config)
        cfg = CU.config_from_diffusers(d)
        back = CU.config_to_diffusers(cfg)
        assert CU.config_from_diffusers(back) == cfg
        m = TorchUNet.from_config(back)
        assert set(m.state_dict()) == set(CU.expected_torch_shapes(cfg))
    with pytest.raises(Exception, match="class_embed_type"):
        CU.config_from_diffusers(dict(TorchUNet(**TINY_A).config) | {"class_embed_type": "timestep"})
    with pytest.raises(ConfigError):
        UNetConfig(transformer_layers_per_block=((1, 2), 2, 10)).validate()


def _broken(ref_dir, tmp_path, name, edit):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text((ref_dir / "config.json").read_text())
    sd = load_file(ref_dir / "diffusion_pytorch_model.safetensors")
    edit(sd, d)
    return d


@pytest.mark.parametrize("case,key", [
    ("missing", "conv_in.weight"),
    ("extra", "mid_block.bogus.weight"),
    ("misshapen", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
    ("truncated", "diffusion_pytorch_model.safetensors"),
])
def test_bad_inputs_refused(ref_dir, tmp_path, capsys, case, key):
    def edit(sd, d):
        f = d / "diffusion_pytorch_model.safetensors"
        if case == "missing":
            del sd[key]
        elif case == "extra":
            sd[key] = np.zeros((2, 2), np.float32)
        elif case == "misshapen":
            sd[key] = sd[key][:, :-1].copy()
        save_file(sd, f)
        if case == "truncated":
            data = f.read_bytes()
            f.write_bytes(data[: len(data) - 1000])

    src = _broken(ref_dir, tmp_path, case, edit)
    dst = tmp_path / f"out-{case}"
    rc = cli(["convert", "--kind", "unet", str(src), str(dst)])
    err = capsys.readouterr().err
    assert rc != 0 and key in err, err
    assert not dst.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(f".out-{case}")]


# --------------------------------------------------------------------------------------------
# the whole SDXL layout (convert/sdxl.py)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_dir(ref_a, tmp_path_factory):
    """A tiny SDXL folder written by diffusers itself (no text encoders)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(3)
    vae = AutoencoderKL(block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=8,
                        latent_channels=4, sample_size=32, scaling_factor=0.13025).eval()
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=ref_a, scheduler=sched)
    d = tmp_path_factory.mktemp("sdxl") / "sdxl-tiny"
    pipe.save_pretrained(d)
    return d


def test_sdxl_layout_round_trip(sdxl_dir, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    from convert import sdxl as CS
    from seed_story_jax.checkpoint import load_checkpoint

    assert CS.detect(sdxl_dir) and not CU.detect(sdxl_dir)
    ck, out = tmp_path / "ck", tmp_path / "out"
    assert cli(["convert", str(sdxl_dir), str(ck), "--json"]) == 0  # kind detected
    assert json.loads(capsys.readouterr().out)["kind"] == "sdxl"
    c = load_checkpoint(ck)
    assert sorted(c.params) == ["unet", "vae"]
    assert c.config.scheduler.timestep_spacing == "leading" and c.config.scheduler.steps_offset == 1
    assert c.config.unet == CU.config_from_diffusers(dict(TorchUNet(**TINY_A).config))
    assert cli(["convert", str(ck), str(out)]) == 0
    for sub in ("unet", "vae"):
        a = load_file(sdxl_dir / sub / "diffusion_pytorch_model.safetensors")
        b = load_file(out / sub / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), (sub, k)
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler" and pipe.text_encoder is None
    orig = json.loads((sdxl_dir / "scheduler" / "scheduler_config.json").read_text())
    for k in ("beta_start", "beta_end", "beta_schedule", "steps_offset", "timestep_spacing", "prediction_type"):
        assert pipe.scheduler.config[k] == orig[k], k


def test_sdxl_missing_vae_refused(sdxl_dir, tmp_path, capsys):
    import shutil

    src = tmp_path / "novae"
    shutil.copytree(sdxl_dir, src)
    shutil.rmtree(src / "vae")
    dst = tmp_path / "out"
    assert cli(["convert", "--kind", "sdxl", str(src), str(dst)]) != 0
    assert "vae/config.json" in capsys.readouterr().err
    assert not dst.exists()
