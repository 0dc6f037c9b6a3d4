"""Convolutional building blocks shared by the SDXL UNet and the VAE (diffusers' semantics).

Layout: activations are NHWC (batch, height, width, channels) — what XLA convolutions prefer on
TPU/GPU. Conv kernels are HWIO `(kernel_h, kernel_w, conv_in, conv_out)`; a torch `Conv2d.weight`
(OIHW, `(out, in, kh, kw)`) maps as `kernel = weight.transpose(2, 3, 1, 0)` and back as
`weight = kernel.transpose(3, 2, 0, 1)`. Biases are `(conv_out,)`. GroupNorm params are `scale`/`bias`
`(norm,)` = torch `weight`/`bias`. Linear kernels are `(in, out)` = torch `weight.T`.

Param names per module (what converters map):
  Conv2d          kernel (kh, kw, in, out), bias (out,)
  GroupNorm       scale (C,), bias (C,)
  ResnetBlock2D   norm1, conv1, [time_emb_proj: nnx.Linear], norm2, conv2, [conv_shortcut: 1×1 Conv2d]
  Downsample2D    conv   (torch: `downsamplers.0.conv`)
  Upsample2D      conv   (torch: `upsamplers.0.conv`)

Norms run in fp32 and return the input dtype; convs compute in `dtype` with params stored in
`param_dtype`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx

from seed_story_jax.nn.params import dtype_of, linear, param, torch_default_init
from seed_story_jax.nn.sharding import constrain

Padding = Union[int, Sequence[tuple[int, int]]]


class Conv2d(nnx.Module):
    """2-D convolution, NHWC in/out, HWIO kernel. `padding`: an int (same on all sides, torch's
    `padding=`) or explicit ((top, bottom), (left, right))."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        *,
        stride: int = 1,
        padding: Padding = 1,
        use_bias: bool = True,
        rngs: nnx.Rngs,
        param_dtype="float32",
        dtype="float32",
    ):
        self.stride = stride
        self.padding = ((padding, padding), (padding, padding)) if isinstance(padding, int) else tuple(
            tuple(p) for p in padding)
        self.dtype = dtype_of(dtype)
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = param(rngs, torch_default_init, shape, ("kernel_h", "kernel_w", "conv_in", "conv_out"), param_dtype)
        if use_bias:
            fan_in = in_channels * kernel_size * kernel_size

            def bias_init(key, shape, dt):
                b = 1.0 / fan_in ** 0.5
                return jax.random.uniform(key, shape, dt, -b, b)

            self.bias = param(rngs, bias_init, (out_channels,), ("conv_out",), param_dtype)
        else:
            self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        # Gathered over `conv_in` at use, as FSDP means: left to itself, XLA's SPMD partitioner
        # (jax 0.10.2, CPU) gets the backward wrong — 20-30 % off on a (2, 2, 2) mesh — when the
        # kernel's input channels and the batch are both split over fsdp (tests/test_sharded_conv.py).
        kernel = constrain(self.kernel[...], ("kernel_h", "kernel_w", None, "conv_out"))
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm over the channel (last) axis of NHWC or (B, T, C) inputs; statistics in fp32."""

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5, *, rngs: nnx.Rngs,
                 param_dtype="float32"):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels not divisible into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (num_channels,), ("norm",), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (num_channels,), ("norm",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        c = shape[-1]
        xf = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, c // self.num_groups)
        mean = jnp.mean(xf, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=(1, 3), keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class ResnetBlock2D(nnx.Module):
    """diffusers ResnetBlock2D (time_embedding_norm "default", swish, output_scale_factor 1, no up/down):
    h = conv1(silu(norm1(x))) [+ time_emb_proj(silu(temb))]; h = conv2(silu(norm2(h)));
    out = shortcut(x) + h, shortcut a 1×1 conv when channels change. `temb_channels=None`: no time input
    (the VAE)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: Optional[int] = None,
        *,
        temb_channels: Optional[int] = None,
        groups: int = 32,
        eps: float = 1e-6,
        rngs: nnx.Rngs,
        param_dtype="float32",
        dtype="float32",
    ):
        out_channels = out_channels or in_channels
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.norm1 = GroupNorm(in_channels, groups, eps, rngs=rngs, param_dtype=param_dtype)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, **kw)
        if temb_channels is not None:
            self.time_emb_proj = linear(rngs, temb_channels, out_channels, ("embed", "conv_out"), use_bias=True,
                                        kernel_init=torch_default_init, **_pd(param_dtype, dtype))
        else:
            self.time_emb_proj = None
        self.norm2 = GroupNorm(out_channels, groups, eps, rngs=rngs, param_dtype=param_dtype)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, **kw)
        self.conv_shortcut = Conv2d(in_channels, out_channels, 1, padding=0, **kw) if in_channels != out_channels else None

    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :].astype(h.dtype)
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x.astype(h.dtype) + h


class Downsample2D(nnx.Module):
    """Stride-2 3×3 conv. `padding=1`: the UNet's symmetric padding; `padding=0`: the VAE encoder's
    asymmetric zero pad (0 top/left, 1 bottom/right), as diffusers' F.pad(x, (0, 1, 0, 1))."""

    def __init__(self, channels: int, out_channels: Optional[int] = None, *, padding: int = 1, rngs: nnx.Rngs,
                 param_dtype="float32", dtype="float32"):
        pad = ((0, 1), (0, 1)) if padding == 0 else padding
        self.conv = Conv2d(channels, out_channels or channels, 3, stride=2, padding=pad, rngs=rngs,
                           param_dtype=param_dtype, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


def upsample_nearest(x: jax.Array, output_size: Optional[tuple[int, int]] = None) -> jax.Array:
    """torch F.interpolate(mode="nearest") on NHWC: ×2, or to `output_size` (src = floor(dst·in/out))."""
    if output_size is None:
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    (h, w), (oh, ow) = x.shape[1:3], output_size
    rows = (jnp.arange(oh) * h) // oh
    cols = (jnp.arange(ow) * w) // ow
    return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
    """Nearest ×2 (or to `output_size`) then a 3×3 conv, as diffusers' Upsample2D(use_conv=True)."""

    def __init__(self, channels: int, out_channels: Optional[int] = None, *, rngs: nnx.Rngs,
                 param_dtype="float32", dtype="float32"):
        self.conv = Conv2d(channels, out_channels or channels, 3, padding=1, rngs=rngs,
                           param_dtype=param_dtype, dtype=dtype)

    def __call__(self, x: jax.Array, output_size: Optional[tuple[int, int]] = None) -> jax.Array:
        return self.conv(upsample_nearest(x, output_size))


def _pd(param_dtype, dtype) -> dict:
    return {"param_dtype": param_dtype, "dtype": dtype}
