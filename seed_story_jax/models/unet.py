"""SDXL-family UNet2DConditionModel (diffusers' torch class is the reference; spec §4.5).

Public call (NHWC, the layout of every image tensor in this project):

    eps = unet(sample, timesteps, encoder_hidden_states, text_embeds, time_ids)
      sample                 (B, H, W, in_channels)   latents, NHWC
      timesteps              scalar or (B,)           float or int
      encoder_hidden_states  (B, S, cross_attention_dim)
      text_embeds            (B, P) pooled embedding  (addition_embed_type "text_time")
      time_ids               (B, 6) SDXL size/crop conditioning
      → eps                  (B, H, W, out_channels)

The module tree mirrors diffusers' names (down_blocks.i.resnets.j, .attentions.j.transformer_blocks.k
.attn1.to_q, mid_block, up_blocks, conv_in/out, time_embedding, add_embedding) except five renames the
converter applies: `to_out` = `to_out.0`, `ff.proj` = `ff.net.0.proj`, `ff.out` = `ff.net.2`,
`downsampler` = `downsamplers.0`, `upsampler` = `upsamplers.0`. Leaves: `kernel` (Linear: (in, out) =
weight.T; Conv: HWIO = OIHW.transpose(2,3,1,0)), `scale` (= norm weight), `bias`.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from seed_story_jax.config import UNetConfig
from seed_story_jax.nn.attention import attention
from seed_story_jax.nn.conv import Conv2d, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D
from seed_story_jax.nn.params import dtype_of, linear, torch_default_init

TRANSFORMER_GROUPNORM_EPS = 1e-6  # diffusers' Transformer2DModel hard-codes it
TRANSFORMER_LAYERNORM_EPS = 1e-5  # BasicTransformerBlock's default, the UNet never changes it


def remat_policy(name: str):
    """Config remat name → (enabled, jax.checkpoint policy)."""
    cp = jax.checkpoint_policies
    table = {
        "none": (False, None),
        "full": (True, cp.nothing_saveable),
        "minimal": (True, cp.dots_with_no_batch_dims_saveable),
        "save_dots": (True, cp.checkpoint_dots),
        "save_qkv_proj": (True, cp.save_only_these_names("query_proj", "key_proj", "value_proj")),
    }
    if name not in table:
        raise ValueError(f"unknown remat policy {name!r}; known: {sorted(table)}")
    return table[name]


def _maybe_remat(remat: str, module, *args):
    enabled, policy = remat_policy(remat)
    if not enabled:
        return module(*args)
    return nnx.remat(lambda m, *a: m(*a), policy=policy)(module, *args)


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """diffusers' get_timestep_embedding in fp32: (N,) → (N, dim)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def layer_norm(rngs, dim: int, eps: float, param_dtype) -> nnx.LayerNorm:
    """torch LayerNorm semantics: fp32 statistics (two-pass variance), scale/bias named `norm`."""
    return nnx.LayerNorm(dim, epsilon=eps, dtype=jnp.float32, param_dtype=dtype_of(param_dtype),
                         use_fast_variance=False, rngs=rngs,
                         scale_metadata={"out_sharding": ("norm",)}, bias_metadata={"out_sharding": ("norm",)})


class TimestepEmbedding(nnx.Module):
    """linear_1 → SiLU → linear_2 (diffusers TimestepEmbedding, act silu, no cond/post act)."""

    def __init__(self, in_dim: int, dim: int, *, rngs, param_dtype, dtype):
        kw = dict(use_bias=True, param_dtype=param_dtype, dtype=dtype, kernel_init=torch_default_init)
        self.linear_1 = linear(rngs, in_dim, dim, ("embed", "mlp"), **kw)
        self.linear_2 = linear(rngs, dim, dim, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


class Attention(nnx.Module):
    """diffusers Attention (AttnProcessor2_0): to_q/k/v without bias, to_out.0 with bias, scale 1/√d."""

    def __init__(self, dim: int, heads: int, context_dim: Optional[int] = None, *, rngs, param_dtype, dtype):
        self.heads = heads
        kv_in = context_dim or dim
        kw = dict(param_dtype=param_dtype, dtype=dtype, kernel_init=torch_default_init)
        self.to_q = linear(rngs, dim, dim, ("embed", "heads"), use_bias=False, **kw)
        self.to_k = linear(rngs, kv_in, dim, ("embed", "kv_heads"), use_bias=False, **kw)
        self.to_v = linear(rngs, kv_in, dim, ("embed", "kv_heads"), use_bias=False, **kw)
        self.to_out = linear(rngs, dim, dim, ("heads", "embed"), use_bias=True, **kw)

    def __call__(self, x, context=None):
        context = x if context is None else context
        b, t, c = x.shape
        q = checkpoint_name(self.to_q(x), "query_proj")
        k = checkpoint_name(self.to_k(context), "key_proj")
        v = checkpoint_name(self.to_v(context), "value_proj")
        split = lambda y: y.reshape(y.shape[0], y.shape[1], self.heads, -1)  # noqa: E731
        out = attention(split(q), split(k), split(v))
        return self.to_out(out.reshape(b, t, c))


class FeedForward(nnx.Module):
    """GEGLU: proj (dim → 2·4dim) split into value, gate; value · gelu_exact(gate) → out (4dim → dim)."""

    def __init__(self, dim: int, *, rngs, param_dtype, dtype, mult: int = 4):
        kw = dict(use_bias=True, param_dtype=param_dtype, dtype=dtype, kernel_init=torch_default_init)
        self.proj = linear(rngs, dim, 2 * mult * dim, ("embed", "mlp"), **kw)
        self.out = linear(rngs, mult * dim, dim, ("mlp", "embed"), **kw)

    def __call__(self, x):
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return self.out(value * jax.nn.gelu(gate, approximate=False))


class BasicTransformerBlock(nnx.Module):
    """LN → self-attn → LN → cross-attn → LN → GEGLU FF, each residual (norm_type "layer_norm")."""

    def __init__(self, dim: int, heads: int, context_dim: int, *, rngs, param_dtype, dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.dtype = dtype_of(dtype)
        self.norm1 = layer_norm(rngs, dim, TRANSFORMER_LAYERNORM_EPS, param_dtype)
        self.attn1 = Attention(dim, heads, **kw)
        self.norm2 = layer_norm(rngs, dim, TRANSFORMER_LAYERNORM_EPS, param_dtype)
        self.attn2 = Attention(dim, heads, context_dim, **kw)
        self.norm3 = layer_norm(rngs, dim, TRANSFORMER_LAYERNORM_EPS, param_dtype)
        self.ff = FeedForward(dim, **kw)

    def __call__(self, x, context):
        d = self.dtype
        x = x + self.attn1(self.norm1(x).astype(d))
        x = x + self.attn2(self.norm2(x).astype(d), context)
        return x + self.ff(self.norm3(x).astype(d))


class Transformer2D(nnx.Module):
    """diffusers Transformer2DModel, continuous input: GroupNorm(eps 1e-6) → proj_in (Linear, or 1×1 conv
    when not use_linear_projection) → blocks over H·W tokens → proj_out → + residual."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int,
                 use_linear_projection: bool, remat: str, *, rngs, param_dtype, dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.use_linear_projection = use_linear_projection
        self.remat = remat
        self.norm = GroupNorm(channels, groups, TRANSFORMER_GROUPNORM_EPS, rngs=rngs, param_dtype=param_dtype)
        if use_linear_projection:
            lk = dict(use_bias=True, param_dtype=param_dtype, dtype=dtype, kernel_init=torch_default_init)
            self.proj_in = linear(rngs, channels, channels, ("conv_in", "embed"), **lk)
            self.proj_out = linear(rngs, channels, channels, ("embed", "conv_out"), **lk)
        else:
            self.proj_in = Conv2d(channels, channels, 1, padding=0, **kw)
            self.proj_out = Conv2d(channels, channels, 1, padding=0, **kw)
        self.transformer_blocks = nnx.List(
            [BasicTransformerBlock(channels, heads, context_dim, **kw) for _ in range(depth)])

    def __call__(self, x, context):
        b, h, w, c = x.shape
        y = self.norm(x)
        if self.use_linear_projection:
            y = self.proj_in(y.reshape(b, h * w, c))
        else:
            y = self.proj_in(y).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            y = _maybe_remat(self.remat, block, y, context)
        if self.use_linear_projection:
            y = self.proj_out(y).reshape(b, h, w, c)
        else:
            y = self.proj_out(y.reshape(b, h, w, c))
        return y + x


class DownBlock(nnx.Module):
    """DownBlock2D / CrossAttnDownBlock2D: [resnet (→ transformer)] × layers, then a stride-2 conv."""

    def __init__(self, cfg: UNetConfig, i: int, in_ch: int, out_ch: int, temb: int, *, rngs):
        kw = dict(rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        n = cfg.layers_per_block
        self.remat = cfg.remat
        self.resnets = nnx.List([
            ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, temb_channels=temb, groups=cfg.norm_num_groups,
                          eps=cfg.norm_eps, **kw) for j in range(n)])
        if cfg.down_block_types[i] == "CrossAttnDownBlock2D":
            depths = cfg.layers_of(cfg.transformer_layers_per_block[i], n)
            self.attentions = nnx.List([
                Transformer2D(out_ch, cfg.num_attention_heads[i], depths[j], cfg.cross_attention_dim,
                              cfg.norm_num_groups, cfg.use_linear_projection, cfg.remat, **kw) for j in range(n)])
        else:
            self.attentions = None
        last = i == len(cfg.block_out_channels) - 1
        self.downsampler = None if last else Downsample2D(out_ch, padding=cfg.downsample_padding, **kw)

    def __call__(self, x, temb, context):
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = _maybe_remat(self.remat, resnet, x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
            skips.append(x)
        if self.downsampler is not None:
            x = self.downsampler(x)
            skips.append(x)
        return x, skips


class MidBlock(nnx.Module):
    """UNetMidBlock2DCrossAttn: resnet → transformer → resnet."""

    def __init__(self, cfg: UNetConfig, temb: int, *, rngs):
        kw = dict(rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        c = cfg.block_out_channels[-1]
        self.remat = cfg.remat
        self.resnets = nnx.List([ResnetBlock2D(c, c, temb_channels=temb, groups=cfg.norm_num_groups,
                                               eps=cfg.norm_eps, **kw) for _ in range(2)])
        depth = cfg.layers_of(cfg.transformer_layers_per_block[-1], 1)[0]
        self.attentions = nnx.List([Transformer2D(c, cfg.num_attention_heads[-1], depth, cfg.cross_attention_dim,
                                                  cfg.norm_num_groups, cfg.use_linear_projection, cfg.remat, **kw)])

    def __call__(self, x, temb, context):
        x = _maybe_remat(self.remat, self.resnets[0], x, temb)
        x = self.attentions[0](x, context)
        return _maybe_remat(self.remat, self.resnets[1], x, temb)


class UpBlock(nnx.Module):
    """UpBlock2D / CrossAttnUpBlock2D: [concat skip → resnet (→ transformer)] × (layers+1), then ×2 up."""

    def __init__(self, cfg: UNetConfig, i: int, *, rngs):
        kw = dict(rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        rev = tuple(reversed(cfg.block_out_channels))
        nb = len(rev)
        out_ch, prev_ch, in_ch = rev[i], rev[max(i - 1, 0)], rev[min(i + 1, nb - 1)]
        n = cfg.layers_per_block + 1
        temb = cfg.block_out_channels[0] * 4
        self.remat = cfg.remat
        self.resnets = nnx.List([
            ResnetBlock2D((prev_ch if j == 0 else out_ch) + (in_ch if j == n - 1 else out_ch), out_ch,
                          temb_channels=temb, groups=cfg.norm_num_groups, eps=cfg.norm_eps, **kw)
            for j in range(n)])
        if cfg.up_block_types[i] == "CrossAttnUpBlock2D":
            if cfg.reverse_transformer_layers_per_block is not None:
                depths = cfg.layers_of(cfg.reverse_transformer_layers_per_block[i], n)
            else:
                depths = cfg.layers_of(tuple(reversed(cfg.transformer_layers_per_block))[i], n)
            heads = tuple(reversed(cfg.num_attention_heads))[i]
            self.attentions = nnx.List([
                Transformer2D(out_ch, heads, depths[j], cfg.cross_attention_dim, cfg.norm_num_groups,
                              cfg.use_linear_projection, cfg.remat, **kw) for j in range(n)])
        else:
            self.attentions = None
        self.upsampler = None if i == nb - 1 else Upsample2D(out_ch, **kw)

    def __call__(self, x, skips, temb, context, upsample_size=None):
        for j, resnet in enumerate(self.resnets):
            x = jnp.concatenate([x, skips[-1 - j].astype(x.dtype)], axis=-1)
            x = _maybe_remat(self.remat, resnet, x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
        if self.upsampler is not None:
            x = self.upsampler(x, upsample_size)
        return x


class UNet2DConditionModel(nnx.Module):
    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        kw = dict(rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        lk = dict(param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.dtype = dtype_of(cfg.dtype)
        c0 = cfg.block_out_channels[0]
        temb = 4 * c0
        self.conv_in = Conv2d(cfg.in_channels, c0, cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2, **kw)
        self.time_embedding = TimestepEmbedding(c0, temb, rngs=rngs, **lk)
        if cfg.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb, rngs=rngs, **lk)
        else:
            self.add_embedding = None
        chans = cfg.block_out_channels
        self.down_blocks = nnx.List([
            DownBlock(cfg, i, chans[max(i - 1, 0)], chans[i], temb, rngs=rngs) for i in range(len(chans))])
        self.mid_block = MidBlock(cfg, temb, rngs=rngs)
        self.up_blocks = nnx.List([UpBlock(cfg, i, rngs=rngs) for i in range(len(chans))])
        self.conv_norm_out = GroupNorm(c0, cfg.norm_num_groups, cfg.norm_eps, rngs=rngs, param_dtype=cfg.param_dtype)
        self.conv_out = Conv2d(c0, cfg.out_channels, cfg.conv_out_kernel, padding=(cfg.conv_out_kernel - 1) // 2, **kw)

    def __call__(self, sample, timesteps, encoder_hidden_states, text_embeds=None, time_ids=None):
        cfg = self.cfg
        b, h, w, _ = sample.shape
        d = self.dtype
        t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (b,))
        emb = self.time_embedding(
            timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).astype(d))
        if self.add_embedding is not None:
            if text_embeds is None or time_ids is None:
                raise ValueError("addition_embed_type 'text_time' needs text_embeds and time_ids")
            tid = timestep_embedding(jnp.asarray(time_ids).reshape(-1), cfg.addition_time_embed_dim,
                                     cfg.flip_sin_to_cos, cfg.freq_shift).reshape(b, -1)
            add = jnp.concatenate([text_embeds.astype(jnp.float32), tid], axis=-1).astype(d)
            emb = emb + self.add_embedding(add)
        context = encoder_hidden_states.astype(d)

        # diffusers forwards explicit upsample sizes when H or W is not a multiple of 2**num_upsamplers.
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        forward_size = h % factor != 0 or w % factor != 0

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, emb, context)
            skips.extend(s)
        x = self.mid_block(x, emb, context)
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            mine, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[1:3]) if (forward_size and skips) else None
            x = block(x, mine, emb, context, size)
        x = jax.nn.silu(self.conv_norm_out(x))
        return self.conv_out(x)


def build(cfg: UNetConfig, rngs: nnx.Rngs) -> UNet2DConditionModel:
    return UNet2DConditionModel(cfg, rngs=rngs)


class _KeyStream:
    """Stand-in for nnx.Rngs under jax.eval_shape. flax's Rngs counter update reads the tracer's
    `.sharding`, whose error message walks the whole jaxpr: tracing becomes quadratic in the number of
    params (~60 s for SDXL's 1,680). Shapes need no real randomness, so fold a Python counter in."""

    def __init__(self, seed: int = 0):
        self.key = jax.random.key(seed)
        self.n = 0

    def params(self):
        self.n += 1
        return jax.random.fold_in(self.key, self.n)


def abstract_model(cfg: UNetConfig) -> UNet2DConditionModel:
    """The module with ShapeDtypeStruct params, for `nnx.split` → graphdef (fast: see _KeyStream)."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: build(cfg, _KeyStream()))


def abstract_params(cfg: UNetConfig):
    """ShapeDtypeStruct tree of the params."""
    return nnx.state(abstract_model(cfg), nnx.Param).to_pure_dict()


def is_kv_projection(path, _value=None) -> bool:
    """nnx filter / predicate: params of `to_k`/`to_v` in attn1 or attn2 of any transformer block —
    spec §4.3's trainable UNet set (SDXLAdapter.set_trainable_v2)."""
    keys = [str(p) for p in path]
    return any(k in ("to_k", "to_v") and i > 0 and keys[i - 1] in ("attn1", "attn2")
               for i, k in enumerate(keys))


def kv_projection_paths(params) -> set[tuple]:
    """Paths (tuples of keys) of every K/V projection leaf in a params tree (pure dict or State)."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    out = set()
    for path, _ in leaves:
        keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
        if is_kv_projection(keys):
            out.add(keys)
    return out
