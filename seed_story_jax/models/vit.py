"""Qwen-VL's ViT-G/14 with its attention pool (spec §1.2): 448² image → 256 × 4096 features.

    patchify (conv1, no bias) + position table → ln_pre → 48 pre-LN blocks → attn_pool
    (Qwen's 2-D Resampler, models/resamplers.py) → ln_post → @ proj

Images come in NHWC (B, H, W, 3), already normalised (seed_story_jax/transforms.py).

Position tables. The original keeps a 16×16 learned table and bicubic-resizes it to the 32×32 patch
grid on every call (torch `F.interpolate`, A = -0.75, float32, then cast to the model dtype). Here
that resize is done once, with torch's semantics (`nn.posemb.torch_bicubic_resize`), and the result
is stored next to the original: `positional_embedding` (256 rows, exported bit-exactly) and
`positional_embedding_resized` (1024 rows, what the forward adds; a `FrozenParam`). The pool does
the same for its key table. The ViT is always frozen, so the two never drift apart; a converter or
init computes the derived tables (`derived_tables`).

Attention: the fused per-head-interleaved `in_proj` is split into q/k/v projections at conversion
(convert/vit.py), so the forward is plain multi-head attention through `nn.attention.attention`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from seed_story_jax.checkpoint import int_keys
from seed_story_jax.config import ViTConfig
from seed_story_jax.models.resamplers import FrozenParam, QwenResampler, key_pos_table, layer_norm
from seed_story_jax.nn.attention import attention
from seed_story_jax.nn.params import dtype_of, linear, param, torch_default_init
from seed_story_jax.nn.posemb import torch_bicubic_resize

# Params that are functions of other params (never exported; recomputed by converters).
DERIVED = (("positional_embedding_resized",), ("attn_pool", "key_pos_embed"))

_REMAT_POLICIES = {
    "full": lambda: None,  # save nothing: recompute the whole block
    "minimal": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_dots": lambda: jax.checkpoint_policies.checkpoint_dots,
    "save_qkv_proj": lambda: jax.checkpoint_policies.save_only_these_names("query_proj", "key_proj", "value_proj"),
}


def grid_of(cfg: ViTConfig) -> int:
    return cfg.image_size // cfg.patch_size


def resized_pos_table(table, grid: int) -> np.ndarray:
    """The patch-grid position table exactly as the original's `get_abs_pos` builds it (float32)."""
    return torch_bicubic_resize(np.asarray(table, np.float32), grid)


def _resize_traced(table: jax.Array, grid: int) -> jax.Array:
    """The same resize as a constant matrix, for init under tracing (`eval_shape`, random init).
    Conversion always uses the numpy function on the real table."""
    n = table.shape[0]
    m = jnp.asarray(torch_bicubic_resize(np.eye(n, dtype=np.float32), grid))  # (grid², n)
    return jnp.dot(m, table.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


class Block(nnx.Module):
    """x + attn(ln_1(x)); x + mlp(ln_2(x)). LayerNorm eps 1e-6, exact-erf GELU, no mask."""

    def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
        c, pd = cfg.width, cfg.param_dtype
        lin = dict(use_bias=True, param_dtype=pd, dtype=cfg.dtype, kernel_init=torch_default_init)  # nn.Linear default
        self.heads = cfg.heads
        self.dtype = dtype_of(cfg.dtype)
        self.ln_1 = layer_norm(rngs, c, cfg.ln_eps, pd)
        self.q_proj = linear(rngs, c, c, ("embed", "heads"), **lin)
        self.k_proj = linear(rngs, c, c, ("embed", "heads"), **lin)
        self.v_proj = linear(rngs, c, c, ("embed", "heads"), **lin)
        self.out_proj = linear(rngs, c, c, ("heads", "embed"), **lin)
        self.ln_2 = layer_norm(rngs, c, cfg.ln_eps, pd)
        self.c_fc = linear(rngs, c, cfg.mlp_width, ("embed", "mlp"), **lin)
        self.c_proj = linear(rngs, cfg.mlp_width, c, ("mlp", "embed"), **lin)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, c = x.shape
        h = self.heads
        d = c // h
        y = self.ln_1(x).astype(self.dtype)
        q = checkpoint_name(self.q_proj(y), "query_proj").reshape(b, t, h, d)
        k = checkpoint_name(self.k_proj(y), "key_proj").reshape(b, t, h, d)
        v = checkpoint_name(self.v_proj(y), "value_proj").reshape(b, t, h, d)
        o = attention(q, k, v, scale=1.0 / math.sqrt(d))
        x = x + self.out_proj(o.reshape(b, t, c))
        y = self.ln_2(x).astype(self.dtype)
        y = jax.nn.gelu(self.c_fc(y), approximate=False)
        return x + self.c_proj(y)


def _run_block(block: Block, x: jax.Array) -> jax.Array:
    return block(x)


class QwenViT(nnx.Module):
    """images (B, H, W, 3) normalised, H = W = image_size → (B, n_queries, output_dim)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        self.dtype = dtype_of(cfg.dtype)
        c, p, pd = cfg.width, cfg.patch_size, cfg.param_dtype
        grid = grid_of(cfg)

        self.conv1 = param(rngs, torch_default_init, (p, p, 3, c),
                           ("kernel_h", "kernel_w", "conv_in", "embed"), pd)
        self.positional_embedding = param(rngs, nnx.initializers.normal(c ** -0.5), (cfg.pos_grid ** 2, c),
                                          ("length", "embed"), pd)
        resized = _resize_traced(self.positional_embedding[...], grid).astype(dtype_of(pd))
        self.positional_embedding_resized = FrozenParam(resized, out_sharding=("length", "embed"))
        self.ln_pre = layer_norm(rngs, c, cfg.ln_eps, pd)

        if cfg.scan_layers:
            @nnx.split_rngs(splits=cfg.layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(r):
                return Block(cfg, r)

            self.blocks = make_blocks(rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.layers)])

        pool_grid = int(round(math.sqrt(cfg.n_queries)))
        self.attn_pool = QwenResampler(pool_grid, cfg.output_dim, cfg.pool_heads, c, grid * grid, cfg.ln_eps,
                                       param_dtype=pd, dtype=cfg.dtype, rngs=rngs)
        self.ln_post = layer_norm(rngs, cfg.output_dim, cfg.ln_eps, pd)
        self.proj = param(rngs, nnx.initializers.normal(cfg.output_dim ** -0.5), (cfg.output_dim, cfg.output_dim),
                          ("embed", "embed"), pd)

    def _trunk(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        step = _run_block
        if cfg.remat != "none":
            step = nnx.remat(_run_block, policy=_REMAT_POLICIES[cfg.remat](), prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(h, block):
                return step(block, h)

            return body(x, self.blocks)
        for block in self.blocks:
            x = step(block, x)
        return x

    def __call__(self, images: jax.Array) -> jax.Array:
        cfg, dt = self.cfg, self.dtype
        b, hgt, wid, ch = images.shape
        if (hgt, wid, ch) != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"QwenViT expects (B, {cfg.image_size}, {cfg.image_size}, 3) NHWC images, "
                             f"got {images.shape}")
        p, g = cfg.patch_size, grid_of(cfg)
        # conv1 with stride = kernel is a matmul over non-overlapping patches; tokens row-major (h, w).
        patches = images.astype(dt).reshape(b, g, p, g, p, 3)
        x = jnp.einsum("bhiwjc,ijcd->bhwd", patches, self.conv1[...].astype(dt)).reshape(b, g * g, cfg.width)
        x = x + self.positional_embedding_resized[...].astype(dt)
        x = self.ln_pre(x).astype(dt)
        x = self._trunk(x)
        x = self.attn_pool(x)
        x = self.ln_post(x).astype(dt)
        return x @ self.proj[...].astype(dt)


def build(cfg: ViTConfig, rngs: nnx.Rngs) -> QwenViT:
    return QwenViT(cfg, rngs=rngs)


def derived_tables(params: dict, cfg: ViTConfig, dtype=None) -> dict:
    """The stored derived tables, computed (float32, torch semantics) from the params that define
    them and cast to `dtype` (default: the source table's): {DERIVED path: array}."""
    pos = params["positional_embedding"]
    pool_pos = params["attn_pool"]["pos_embed"]
    out_pos = resized_pos_table(pos, grid_of(cfg))
    out_pool = key_pos_table(pool_pos, grid_of(cfg) ** 2)
    return {
        DERIVED[0]: out_pos.astype(dtype or pos.dtype),
        DERIVED[1]: out_pool.astype(dtype or pool_pos.dtype),
    }


# --------------------------------------------------------------------------------------------
# Using a converted model
# --------------------------------------------------------------------------------------------


def load(ckpt_dir, *, dtype=None) -> QwenViT:
    """The ViT of a checkpoint directory (only its `vit` component is read). `dtype`: compute dtype
    override (default: the config's)."""
    import dataclasses

    from seed_story_jax.checkpoint import load_component, read_config

    cfg = read_config(ckpt_dir).vit
    if cfg is None:
        from seed_story_jax.checkpoint import CheckpointError

        raise CheckpointError(f"{ckpt_dir}: config has no `vit` section")
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    return from_params(cfg, load_component(ckpt_dir, "vit"))


def from_params(cfg: ViTConfig, params: dict) -> QwenViT:
    """A model holding `params` (a converted or restored tree), built abstractly first so no random
    init runs."""
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0)))
    set_params(model, params)
    return model


def set_params(model: QwenViT, params: dict) -> None:
    """Write a params tree (the checkpoint format) into `model`; orbax turns list indices into strings."""
    state = nnx.state(model, nnx.Param)
    state.replace_by_pure_dict(int_keys(params))
    nnx.update(model, state)




def make_encoder(model: QwenViT):
    """A jitted `encode(images) -> features` (compiled once per batch shape): pure function of the
    split (graphdef, state), so no module traversal per call."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, images):
        return nnx.merge(graphdef, state)(images)

    return functools.partial(run, state)


def encode_batches(encoder, images, batch_size: int, *, progress: bool = False) -> np.ndarray:
    """Features of N images (each (H, W, 3) float32) in batches of `batch_size`; the last batch is
    padded, so `encoder` (from `make_encoder`) compiles once. Returns (N, n_queries, output_dim) float32."""
    from tqdm import tqdm

    n = len(images)
    out = []
    with tqdm(total=n, unit="img", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            chunk = np.stack(images[start:start + batch_size]).astype(np.float32)
            real = chunk.shape[0]
            if real < batch_size:
                chunk = np.concatenate([chunk, np.zeros((batch_size - real,) + chunk.shape[1:], np.float32)])
            out.append(np.asarray(encoder(chunk), np.float32)[:real])
            bar.update(real)
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def uncond_features(model: QwenViT, batch: int = 1) -> jax.Array:
    """The de-tokenizer's unconditional input (spec §4.4): ViT features of the all-zero *normalised*
    image (the mean-colour picture), (batch, n_queries, output_dim)."""
    s = model.cfg.image_size
    return make_encoder(model)(jnp.zeros((batch, s, s, 3), jnp.float32))
