"""AutoencoderKL (the SDXL VAE): encoder for training latents, decoder for sampled images. NHWC.

The module tree mirrors diffusers' (`encoder.down_blocks.0.resnets.1.conv1`, `decoder.up_blocks.2.
upsamplers.0.conv`, `encoder.mid_block.attentions.0.to_out.0`, `quant_conv`, ...), so the converter
is a name walk: lists are nnx.List (integer keys), conv kernels HWIO, linear kernels (in, out).

The decoder computes in `decode_dtype` (fp32 or bf16): the SDXL VAE's activations exceed fp16's
range at 1024², bf16 has fp32's exponent. Norms and the attention softmax are fp32 throughout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from seed_story_jax.config import VAEConfig
from seed_story_jax.nn.attention import attention
from seed_story_jax.nn.conv import Conv2d, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D
from seed_story_jax.nn.params import dtype_of, linear, torch_default_init

EPS = 1e-6  # every VAE norm (resnets, attention, conv_norm_out)


@struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior (diffusers' DiagonalGaussianDistribution), NHWC, float32."""

    mean: jax.Array
    logvar: jax.Array  # clamped to [-30, 20]

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, jnp.float32)

    def mode(self) -> jax.Array:
        return self.mean

    @classmethod
    def from_moments(cls, h: jax.Array) -> "DiagonalGaussian":
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))


class AttentionBlock(nnx.Module):
    """The mid-block's single-head spatial self-attention: group norm → q/k/v → attention → to_out,
    plus the input (diffusers Attention with residual_connection, rescale_output_factor 1)."""

    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs, param_dtype, dtype):
        self.dtype = dtype_of(dtype)
        self.group_norm = GroupNorm(channels, groups, EPS, rngs=rngs, param_dtype=param_dtype)
        kw = dict(use_bias=True, param_dtype=param_dtype, dtype=dtype, kernel_init=torch_default_init)
        self.to_q = linear(rngs, channels, channels, ("embed", "heads"), **kw)
        self.to_k = linear(rngs, channels, channels, ("embed", "heads"), **kw)
        self.to_v = linear(rngs, channels, channels, ("embed", "heads"), **kw)
        self.to_out = nnx.List([linear(rngs, channels, channels, ("heads", "embed"), **kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, h * w, 1, c).astype(self.dtype)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        o = attention(q, k, v).reshape(b, h, w, c)
        return self.to_out[0](o) + x.astype(self.dtype)


class MidBlock(nnx.Module):
    """UNetMidBlock2D without time embedding: resnet, (attention, resnet)."""

    def __init__(self, cfg: VAEConfig, channels: int, *, rngs: nnx.Rngs, dtype):
        kw = dict(groups=cfg.norm_num_groups, eps=EPS, rngs=rngs, param_dtype=cfg.param_dtype, dtype=dtype)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, **kw) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(channels, cfg.norm_num_groups, rngs=rngs,
                                                   param_dtype=cfg.param_dtype, dtype=dtype)]
                                   if cfg.mid_block_add_attention else [])

    def __call__(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownBlock(nnx.Module):
    """DownEncoderBlock2D: resnets, then a stride-2 conv with diffusers' asymmetric (0, 1) padding."""

    def __init__(self, cfg: VAEConfig, cin: int, cout: int, downsample: bool, *, rngs: nnx.Rngs, dtype):
        kw = dict(groups=cfg.norm_num_groups, eps=EPS, rngs=rngs, param_dtype=cfg.param_dtype, dtype=dtype)
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, **kw)
                                 for i in range(cfg.layers_per_block)])
        self.downsamplers = nnx.List([Downsample2D(cout, cout, padding=0, rngs=rngs, param_dtype=cfg.param_dtype,
                                                   dtype=dtype)] if downsample else [])

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        for d in self.downsamplers:
            x = d(x)
        return x


class UpBlock(nnx.Module):
    """UpDecoderBlock2D: layers_per_block + 1 resnets, then nearest ×2 and a conv."""

    def __init__(self, cfg: VAEConfig, cin: int, cout: int, upsample: bool, *, rngs: nnx.Rngs, dtype):
        kw = dict(groups=cfg.norm_num_groups, eps=EPS, rngs=rngs, param_dtype=cfg.param_dtype, dtype=dtype)
        self.resnets = nnx.List([ResnetBlock2D(cin if i == 0 else cout, cout, **kw)
                                 for i in range(cfg.layers_per_block + 1)])
        self.upsamplers = nnx.List([Upsample2D(cout, cout, rngs=rngs, param_dtype=cfg.param_dtype, dtype=dtype)]
                                   if upsample else [])

    def __call__(self, x):
        for r in self.resnets:
            x = r(x)
        for u in self.upsamplers:
            x = u(x)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype):
        ch = cfg.block_out_channels
        pd = cfg.param_dtype
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1, rngs=rngs, param_dtype=pd, dtype=dtype)
        self.down_blocks = nnx.List([
            DownBlock(cfg, ch[max(i - 1, 0)], ch[i], i < len(ch) - 1, rngs=rngs, dtype=dtype)
            for i in range(len(ch))])
        self.mid_block = MidBlock(cfg, ch[-1], rngs=rngs, dtype=dtype)
        self.conv_norm_out = GroupNorm(ch[-1], cfg.norm_num_groups, EPS, rngs=rngs, param_dtype=pd)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1, rngs=rngs, param_dtype=pd, dtype=dtype)

    def __call__(self, x):
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype):
        rev = tuple(reversed(cfg.block_out_channels))
        pd = cfg.param_dtype
        self.conv_in = Conv2d(cfg.latent_channels, rev[0], 3, padding=1, rngs=rngs, param_dtype=pd, dtype=dtype)
        self.mid_block = MidBlock(cfg, rev[0], rngs=rngs, dtype=dtype)
        self.up_blocks = nnx.List([
            UpBlock(cfg, rev[max(i - 1, 0)], rev[i], i < len(rev) - 1, rngs=rngs, dtype=dtype)
            for i in range(len(rev))])
        self.conv_norm_out = GroupNorm(rev[-1], cfg.norm_num_groups, EPS, rngs=rngs, param_dtype=pd)
        self.conv_out = Conv2d(rev[-1], cfg.out_channels, 3, padding=1, rngs=rngs, param_dtype=pd, dtype=dtype)

    def __call__(self, z):
        x = self.conv_in(z)
        x = self.mid_block(x)
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """Images in [-1, 1], NHWC (B, H, W, 3); latents NHWC (B, H/8, W/8, 4) for the SDXL layout."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        enc_dtype, dec_dtype = cfg.dtype, cfg.decode_dtype
        pd = cfg.param_dtype
        lc = cfg.latent_channels
        self.encoder = Encoder(cfg, rngs=rngs, dtype=enc_dtype)
        self.decoder = Decoder(cfg, rngs=rngs, dtype=dec_dtype)
        self.quant_conv = (Conv2d(2 * lc, 2 * lc, 1, padding=0, rngs=rngs, param_dtype=pd, dtype=enc_dtype)
                           if cfg.use_quant_conv else None)
        self.post_quant_conv = (Conv2d(lc, lc, 1, padding=0, rngs=rngs, param_dtype=pd, dtype=dec_dtype)
                                if cfg.use_post_quant_conv else None)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return DiagonalGaussian.from_moments(h)

    def decode(self, z: jax.Array) -> jax.Array:
        """Raw latents → images (float32, not clamped), as diffusers' `vae.decode(z).sample`."""
        z = z.astype(dtype_of(self.cfg.decode_dtype))
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        posterior = self.encode(x)
        return self.decode(posterior.mode() if key is None else posterior.sample(key))

    # The scaled-latent convenience the diffusion model sees (z · scaling_factor).
    def encode_latents(self, x: jax.Array, key: jax.Array) -> jax.Array:
        return self.encode(x).sample(key) * self.cfg.scaling_factor

    def decode_latents(self, latents: jax.Array) -> jax.Array:
        return self.decode(latents.astype(jnp.float32) / self.cfg.scaling_factor)


def build(cfg: VAEConfig, rngs: nnx.Rngs) -> AutoencoderKL:
    return AutoencoderKL(cfg, rngs=rngs)


def to_uint8(images: jax.Array) -> jax.Array:
    """Decoded images in [-1, 1] → uint8 [0, 255] as the pipeline's postprocess (clamp, ×255, round)."""
    x = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return jnp.round(x * 255.0).astype(jnp.uint8)
