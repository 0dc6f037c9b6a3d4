"""Resamplers against plain PyTorch references written from the spec (convert/torch_ref/resamplers.py).

Tolerance: fp32 on CPU with matmul precision "highest"; outputs agree to 1e-5 relative to the
output's max magnitude (`_close`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert.resamplers import (qwen_resampler_from_torch, qwen_resampler_to_torch, xlv2_from_torch,
                                xlv2_to_torch)
from seed_story_jax.config import QwenResamplerConfig, ResamplerXLV2Config
from seed_story_jax.errors import ConversionError
from seed_story_jax.models.resamplers import TRAINABLE, FrozenParam, QwenResampler, ResamplerXLV2
from seed_story_jax.nn.params import count_params
from tests.init_stats import assert_init_like, qwen_resampler_init_
from convert.torch_ref import resamplers as ref

RTOL = 1e-5


def _close(got, want, rtol=RTOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12)
    assert err <= rtol, f"max error {err:.2e} relative to max |ref| > {rtol}"


def _sd(module: torch.nn.Module) -> dict:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("pos_embed"):
                continue  # the frozen sin-cos table stays what the module built
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim > 1 else 0.5) + (1.0 if "ln" in name and name.endswith("weight") else 0.0))


def _load(model: nnx.Module, params: dict) -> None:
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)


def _from_params(make, params: dict) -> nnx.Module:
    """Build abstractly (no eager initialisers to compile) and fill in converted params."""
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(make))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


@nnx.jit
def _run(model, x):
    return model(x)


def _build_qwen(grid, embed, heads, kv_dim, input_tokens, eps=1e-5):
    with nnx.use_eager_sharding(False):
        return QwenResampler(grid, embed, heads, kv_dim, input_tokens, eps, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "grid, input_tokens, kv_dim, eps",
    [(8, 256, 64, 1e-5), (16, 64, 64, 1e-5), (4, 64, 48, 1e-6)],
    ids=["input-256to64", "output-64to256", "kv_proj-64to16"],
)
def test_qwen_resampler_matches_torch(grid, input_tokens, kv_dim, eps):
    torch.manual_seed(0)
    t = ref.Resampler(grid, 64, 4, kv_dim=kv_dim, eps=eps).eval()
    _randomize(t, 1)
    sd = _sd(t)
    model = _build_qwen(grid, 64, 4, kv_dim, input_tokens, eps)
    # The module's own sin-cos table equals the reference's.
    np.testing.assert_allclose(np.asarray(model.pos_embed[...]), sd["pos_embed"], rtol=0, atol=1e-6)
    # Its key table is torch's bicubic resize of that table (float32 rounding of the sin-cos only).
    want_keys = ref.get_abs_pos(torch.from_numpy(sd["pos_embed"]), input_tokens).numpy()
    np.testing.assert_allclose(np.asarray(model.key_pos_embed[...]), want_keys, rtol=0, atol=2e-6)
    params = qwen_resampler_from_torch(sd, input_tokens=input_tokens)
    # Conversion derives the key table from the checkpoint's pos_embed exactly as torch does at run time.
    np.testing.assert_allclose(params["key_pos_embed"], want_keys, rtol=0, atol=1e-6)
    _load(model, params)
    x = np.random.default_rng(2).standard_normal((2, input_tokens, kv_dim)).astype(np.float32)
    with torch.no_grad():
        want = t(torch.from_numpy(x)).numpy()
    got = _run(model, x)
    assert got.shape == (2, grid * grid, 64)
    _close(got, want)
    # Export reproduces the torch state dict bit for bit.
    back = qwen_resampler_to_torch(params)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_qwen_resampler_rejects_wrong_token_count():
    model = _build_qwen(4, 32, 4, 32, 64)
    with pytest.raises(ValueError, match="64 input tokens"):
        model(np.zeros((1, 16, 32), np.float32))


@pytest.mark.parametrize("cfg, trainable", [
    (QwenResamplerConfig(grid_size=8, input_tokens=256), 67_403_776),
    (QwenResamplerConfig(grid_size=16, input_tokens=64), 68_190_208),
])
def test_qwen_resampler_full_size_counts(cfg, trainable):
    """Spec §2.3 trainable counts; the frozen sin-cos tables (pos_embed and its resized key copy)
    are carried as FrozenParam and excluded from the trainable set."""

    def make():
        with nnx.use_eager_sharding(False):
            m = QwenResampler.from_config(cfg, nnx.Rngs(0))
        return nnx.state(m, TRAINABLE).to_pure_dict(), nnx.state(m, FrozenParam).to_pure_dict()

    train, frozen = jax.eval_shape(make)
    assert count_params(train) == trainable
    n = cfg.grid_size**2
    assert frozen["pos_embed"].shape == (n, 4096)
    assert frozen["key_pos_embed"].shape == (cfg.input_tokens, 4096)
    # torch's own count of requires_grad parameters, on the meta device.
    with torch.device("meta"):
        t = ref.Resampler(cfg.grid_size, 4096, 32, kv_dim=4096)
    assert sum(p.numel() for p in t.parameters() if p.requires_grad) == trainable


TINY_XLV2 = ResamplerXLV2Config(dim=32, depth=2, dim_head=8, heads=4, num_queries=16, embedding_dim=64,
                                output1_dim=16, output2_dim=24)


def _tiny_xlv2_pair(seed=0):
    cfg = TINY_XLV2
    torch.manual_seed(seed)
    t = ref.ResamplerXLV2(cfg.dim, cfg.depth, cfg.dim_head, cfg.heads, cfg.num_queries, cfg.embedding_dim,
                          cfg.output1_dim, cfg.output2_dim, cfg.ff_mult).eval()
    _randomize(t, seed + 1)
    sd = _sd(t)
    params = xlv2_from_torch(sd, cfg)
    model = _from_params(lambda: ResamplerXLV2(cfg, rngs=nnx.Rngs(0)), params)
    return t, sd, model, params


def test_xlv2_matches_torch():
    t, sd, model, params = _tiny_xlv2_pair()
    # 20 tokens of 64 channels: token count differs from both dims, so a wrong axis cannot hide.
    x = np.random.default_rng(3).standard_normal((3, 20, 64)).astype(np.float32) * 4 + 1
    with torch.no_grad():
        want_p, want_pool = (a.numpy() for a in t(torch.from_numpy(x)))
    got_p, got_pool = _run(model, x)
    assert got_p.shape == (3, 16, 16 + 24) and got_pool.shape == (3, 24)
    _close(got_p, want_p)
    _close(got_pool, want_pool)
    back = xlv2_to_torch(params, TINY_XLV2)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_xlv2_normalizes_over_tokens_not_channels():
    """F.normalize(x) uses dim=1 = tokens: scaling one channel across all tokens cannot change the
    output, while scaling one token does. Both assertions flip if channels were normalized."""
    _, _, model, _ = _tiny_xlv2_pair()
    x = np.random.default_rng(4).standard_normal((1, 20, 64)).astype(np.float32)
    base_p, base_pool = (np.asarray(a) for a in _run(model, x))
    ch = x.copy()
    ch[:, :, 5] *= 7.0
    p, pool = _run(model, ch)
    _close(p, base_p)
    _close(pool, base_pool)
    tok = x.copy()
    tok[:, 3, :] *= 7.0
    p, _ = _run(model, tok)
    assert np.max(np.abs(np.asarray(p) - base_p)) > 1e-3 * np.max(np.abs(base_p))


def test_xlv2_refuses_bad_state_dict():
    _, sd, _, _ = _tiny_xlv2_pair()
    missing = dict(sd)
    del missing["layers.1.0.to_kv.weight"]
    with pytest.raises(ConversionError, match="layers.1.0.to_kv.weight"):
        xlv2_from_torch(missing, TINY_XLV2)
    bad = dict(sd)
    bad["unet_proj_2.weight"] = bad["unet_proj_2.weight"][:, :-1]
    with pytest.raises(ConversionError, match="unet_proj_2.weight"):
        xlv2_from_torch(bad, TINY_XLV2)


def test_xlv2_full_size_count():
    """Spec §4.1 (≈61.2 M): equal to the torch reference's count at full size (meta device)."""

    cfg = ResamplerXLV2Config()

    def make():
        with nnx.use_eager_sharding(False):
            return nnx.state(ResamplerXLV2(cfg, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()

    n = count_params(jax.eval_shape(make))
    with torch.device("meta"):
        t = ref.ResamplerXLV2()
    assert n == sum(p.numel() for p in t.parameters()) == 61_245_696
    # The registry's `detokenizer` component is this module.
    from seed_story_jax.config import DetokenizerConfig
    from seed_story_jax.models import abstract_params

    assert count_params(abstract_params("detokenizer", DetokenizerConfig())) == 61_245_696


# ------------------------------------------------------------------------------ random init


def test_xlv2_random_init_is_torchs_default():
    """ResamplerXLV2 keeps torch's nn.Linear default (U(±1/√fan_in)) and N(0, 1)/√dim latents: the
    tiny de-tokenizer trained from scratch starts as the original would."""
    cfg = ResamplerXLV2Config(dim=64, depth=2, dim_head=16, heads=4, num_queries=16, embedding_dim=64,
                              output1_dim=32, output2_dim=32, ff_mult=4, normalize=True)
    torch.manual_seed(0)
    t = ref.ResamplerXLV2(cfg.dim, cfg.depth, cfg.dim_head, cfg.heads, cfg.num_queries, cfg.embedding_dim,
                          cfg.output1_dim, cfg.output2_dim, cfg.ff_mult)
    with nnx.use_eager_sharding(False):
        ours = nnx.state(ResamplerXLV2(cfg, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()
    assert_init_like(ours, xlv2_from_torch(_sd(t), cfg))


def test_qwen_resampler_random_init_is_the_originals():
    """Qwen-VL's Resampler: trunc_normal(0.02) on every nn.Linear and the query (its _init_weights,
    written here from the original), nn.MultiheadAttention's xavier_uniform in_proj."""
    grid, embed, heads, kv_dim, tokens = 4, 64, 4, 48, 64
    torch.manual_seed(0)
    t = ref.Resampler(grid, embed, heads, kv_dim)
    qwen_resampler_init_(t)
    ours = nnx.state(_build_qwen(grid, embed, heads, kv_dim, tokens), nnx.Param).to_pure_dict()
    assert_init_like(ours, qwen_resampler_from_torch(_sd(t), input_tokens=tokens))
