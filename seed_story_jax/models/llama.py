"""Llama decoder (Llama-2 / HF `LlamaForCausalLM` numerics) in Flax NNX.

    model(input_ids | inputs_embeds, positions=, token_mask=, kinds=, cache=, dropout_key=)
        -> (logits, hidden, new_cache)

`hidden` is the output of the final RMSNorm (what SEED-Story regresses image features from).
Params tree (`nnx.state(model, nnx.Param).to_pure_dict()`), HF names without the `model.` prefix:

    embed_tokens/embedding (vocab, embed)        norm/scale (embed,)      lm_head/kernel (embed, vocab)
    layers/<i>/self_attn/{q,k,v,o}_proj/kernel   layers/<i>/mlp/{gate,up,down}_proj/kernel   (in, out)
    layers/<i>/{input,post_attention}_layernorm/scale
    ... /lora_a (in, r), /lora_b (r, out)       when cfg.lora targets the projection (nnx.LoRAParam)

With `scan_layers` the layers are one module whose params carry a leading `layers` axis
(`layers/self_attn/q_proj/kernel` is (L, embed, heads)) and the forward is a `lax.scan`, so
compile time does not grow with depth. `stack_layers` / `unstack_layers` convert between layouts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from seed_story_jax import cache as kvc
from seed_story_jax.config import LlamaConfig
from seed_story_jax.nn.attention import attention
from seed_story_jax.nn.layers import LoRALinear, RMSNorm, SwiGLU, apply_rope, rope_cos_sin
from seed_story_jax.nn.params import dtype_of, param

_REMAT = {
    "full": lambda: None,  # save nothing: recompute the whole layer
    "minimal": lambda: jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_dots": lambda: jax.checkpoint_policies.checkpoint_dots,
    "save_qkv_proj": lambda: jax.checkpoint_policies.save_only_these_names("q_proj", "k_proj", "v_proj"),
}


def _lora_kwargs(cfg: LlamaConfig) -> dict[str, dict]:
    if cfg.lora is None:
        return {}
    kw = dict(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout)
    return {t: kw for t in cfg.lora.targets}


def _split(key: Optional[jax.Array], n: int) -> list:
    return [None] * n if key is None else list(jax.random.split(key, n))


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim
        e, q, kv = cfg.hidden_size, cfg.num_heads * self.head_dim, cfg.num_kv_heads * self.head_dim
        lora = _lora_kwargs(cfg)
        kw = dict(rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype, init_std=cfg.initializer_range)
        self.q_proj = LoRALinear(e, q, ("embed", "heads"), **lora.get("q_proj", {}), **kw)
        self.k_proj = LoRALinear(e, kv, ("embed", "kv_heads"), **lora.get("k_proj", {}), **kw)
        self.v_proj = LoRALinear(e, kv, ("embed", "kv_heads"), **lora.get("v_proj", {}), **kw)
        self.o_proj = LoRALinear(q, e, ("heads", "embed"), **lora.get("o_proj", {}), **kw)

    @staticmethod
    def rotate_keys(k: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        # The one place keys get their positions ("original" caches store what this returns;
        # "shifted" caches store raw keys and rotate them here when reading).
        return apply_rope(k, cos, sin)

    def __call__(self, x, cos, sin, mask, kv_io, dropout_key=None):
        """kv_io: None (attend within x) or (k, v, layer, write, moved): the stacked cache buffers
        (L, B, C, K, D) and this layer's index (int or traced) — or this layer's own (B, C, K, D)
        buffers and None — the chunk's planned write and this layer's pinned evictees (k, v) or
        None; returns the updated buffers."""
        b, t, _ = x.shape
        dk = _split(dropout_key, 4)
        q = checkpoint_name(self.q_proj(x, dk[0]), "q_proj").reshape(b, t, self.num_heads, self.head_dim)
        k = checkpoint_name(self.k_proj(x, dk[1]), "k_proj").reshape(b, t, self.num_kv_heads, self.head_dim)
        v = checkpoint_name(self.v_proj(x, dk[2]), "v_proj").reshape(b, t, self.num_kv_heads, self.head_dim)
        q = apply_rope(q, cos, sin)
        if kv_io is None:
            out, new_kv = attention(q, self.rotate_keys(k, cos, sin), v, mask=mask), None
        else:
            k_all, v_all, layer, write, moved = kv_io
            moved = (None, None) if moved is None else moved
            shifted = write.key_cos is not None  # cache holds pre-RoPE keys, rotated by place in cache
            # Scatter the chunk's slots into the stack in place and read this layer back: a step
            # never rewrites the whole cache.
            k_all = kvc.write_layer(k_all, layer, write, k if shifted else self.rotate_keys(k, cos, sin), moved[0])
            v_all = kvc.write_layer(v_all, layer, write, v, moved[1])
            k_buf, v_buf = kvc.read_layer(k_all, layer), kvc.read_layer(v_all, layer)
            ks = self.rotate_keys(k_buf, write.key_cos, write.key_sin) if shifted else k_buf
            out, new_kv = attention(q, ks.astype(q.dtype), v_buf.astype(q.dtype), mask=mask), (k_all, v_all)
        return self.o_proj(out.reshape(b, t, -1), dk[3]), new_kv


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        norm = dict(eps=cfg.rms_norm_eps, rngs=rngs, param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.self_attn = Attention(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, rngs=rngs, lora=_lora_kwargs(cfg),
                          param_dtype=cfg.param_dtype, dtype=cfg.dtype, init_std=cfg.initializer_range)

    def __call__(self, h, cos, sin, mask, kv_io, dropout_key=None):
        ka, km = _split(dropout_key, 2)
        a, new_kv = self.self_attn(self.input_layernorm(h), cos, sin, mask, kv_io, ka)
        h = h + a
        h = h + self.mlp(self.post_attention_layernorm(h), km)
        return h, new_kv


def _stacked_layers(cfg: LlamaConfig, rngs: nnx.Rngs) -> DecoderLayer:
    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=cfg.num_layers,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return DecoderLayer(cfg, rngs=r)

    return make(rngs)


class Llama(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype_of(cfg.dtype)
        init = nnx.initializers.normal(cfg.initializer_range)
        self.embed_tokens = nnx.Dict(
            embedding=param(rngs, init, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.param_dtype))
        if cfg.scan_layers:
            self.layers = _stacked_layers(cfg, rngs)
        else:
            self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs,
                            param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Dict(
                kernel=param(rngs, init, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype))

    # ------------------------------------------------------------------ pieces the MLLM reuses

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens["embedding"][...], input_ids, axis=0).astype(self.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.cfg.tie_word_embeddings:
            w = self.embed_tokens["embedding"][...].astype(self.dtype).T
        else:
            w = self.lm_head["kernel"][...].astype(self.dtype)
        return hidden.astype(self.dtype) @ w

    def new_cache(self, batch: int, capacity: int, dtype=None) -> kvc.KVCache:
        return kvc.KVCache.for_model(self.cfg, batch, capacity, dtype)

    # ------------------------------------------------------------------ forward

    def __call__(
        self,
        input_ids: Optional[jax.Array] = None,
        inputs_embeds: Optional[jax.Array] = None,
        *,
        positions: Optional[jax.Array] = None,
        token_mask: Optional[jax.Array] = None,
        kinds: Optional[jax.Array] = None,
        cache: Optional[kvc.KVCache] = None,
        dropout_key: Optional[jax.Array] = None,
        compute_logits: bool = True,
    ):
        """Returns (logits or None, final-norm hidden (B, T, E), new cache or None).

        token_mask (B, T): False marks padding (not attended to, not written to the cache).
        positions (B, T): RoPE positions; default arange(T) without a cache, else the cache's counter.
        kinds (B, T): slot kinds for the cache metadata (cache.TEXT/BOI/IMG/EOI).
        dropout_key: enables LoRA dropout (training); None is eval."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        b, t = h.shape[:2]
        if token_mask is None:
            token_mask = jnp.ones((b, t), jnp.bool_)
        limit = None
        if cache is None:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            mask = kvc.causal_mask(positions, token_mask)
            write, kv = None, None
        else:
            write, cache = kvc.plan_write(cache, token_mask, positions, kinds)
            positions = write.positions
            if cache.policy.shifted:  # every position is a place in the cache: below its capacity
                limit = cache.capacity
                write = kvc.with_key_rope(write, *rope_cos_sin(cache.key_pos, self.cfg.resolved_head_dim,
                                                               self.cfg.rope_theta, limit))
            mask = kvc.attention_mask(cache, positions)
            kv = (cache.k, cache.v)
        cos, sin = rope_cos_sin(positions, self.cfg.resolved_head_dim, self.cfg.rope_theta, limit)
        h, kv = self._layers(h, cos, sin, mask, kv, write, dropout_key)
        hidden = self.norm(h)
        logits = self.logits(hidden) if compute_logits else None
        if cache is not None:
            cache = dataclasses.replace(cache, k=kv[0], v=kv[1])
        return logits, hidden, cache

    def _layers(self, h, cos, sin, mask, kv, write, dropout_key):
        """Run the decoder stack; kv: None or the stacked (k, v) cache buffers (L, B, C, K, D),
        threaded through the layers (scan: in the carry) and updated in place — the output of a
        scan (ys) or a restack would rewrite the whole cache at every step."""
        n = self.cfg.num_layers
        keys = None if dropout_key is None else jax.random.split(dropout_key, n)
        moved = None
        if kv is not None and write.pin_src is not None:
            moved = (kvc.pinned_values(kv[0], write), kvc.pinned_values(kv[1], write))

        def apply(graphdef, state, h, kv, layer, moved, key):
            mod = nnx.merge(graphdef, state)
            return mod(h, cos, sin, mask, None if kv is None else (kv[0], kv[1], layer, write, moved), key)

        if self.cfg.remat != "none":
            apply = jax.checkpoint(apply, policy=_REMAT[self.cfg.remat](), static_argnums=(0,))

        layered = kv is not None and isinstance(kv[0], tuple)
        if self.cfg.scan_layers:
            if layered:
                raise ValueError("a model with scanned layers needs a stacked cache (KVCache.for_model makes one)")
            graphdef, state = nnx.split(self.layers)

            def body(carry, xs):
                h, kv = carry
                st, layer, moved, key = xs
                return apply(graphdef, st, h, kv, layer, moved, key), None

            (h, kv), _ = jax.lax.scan(body, (h, kv), (state, jnp.arange(n), moved, keys))
            return h, kv
        bufs = list(zip(*kv)) if layered else None
        for i, layer_mod in enumerate(self.layers):
            graphdef, state = nnx.split(layer_mod)
            mv = None if moved is None else (moved[0][i], moved[1][i])
            key = None if keys is None else keys[i]
            if layered:  # this layer's own buffers (layer index None)
                h, bufs[i] = apply(graphdef, state, h, bufs[i], None, mv, key)
            else:
                h, kv = apply(graphdef, state, h, kv, i, mv, key)
        if layered:
            kv = tuple(zip(*bufs))
        return h, kv


def build(cfg: LlamaConfig, rngs: nnx.Rngs) -> Llama:
    return Llama(cfg, rngs=rngs)


# ---------------------------------------------------------------------- params tree utilities


def is_stacked(params: dict) -> bool:
    return "self_attn" in params["layers"]


def stack_layers(params: dict) -> dict:
    """Unrolled layers {0: {...}, 1: {...}} (int or str keys) → one tree with a leading layer axis."""
    if is_stacked(params):
        return params
    layers = params["layers"]
    ordered = [layers[k] for k in sorted(layers, key=int)]
    out = dict(params)
    out["layers"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *ordered)
    return out


def unstack_layers(params: dict) -> dict:
    if not is_stacked(params):
        return params
    stacked = params["layers"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    out = dict(params)
    out["layers"] = {i: jax.tree.map(lambda x: x[i], stacked) for i in range(n)}
    return out


def relayout(params: dict, cfg: LlamaConfig) -> dict:
    """Params in the layer layout `cfg.scan_layers` asks for."""
    return stack_layers(params) if cfg.scan_layers else unstack_layers(params)


def abstract_model(cfg: LlamaConfig) -> Llama:
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))


def init_model(cfg: LlamaConfig, seed: int = 0) -> Llama:
    """Random init in one compiled function (eager init compiles every initializer op separately);
    under an active mesh the params come out sharded by their logical names."""
    graphdef = nnx.split(abstract_model(cfg))[0]

    @jax.jit
    def make(key):
        with nnx.use_eager_sharding(False):
            return nnx.split(Llama(cfg, rngs=nnx.Rngs(params=key)))[1]

    return nnx.merge(graphdef, make(jax.random.key(seed)))


def from_params(cfg: LlamaConfig, params: dict, *, where: str = "params") -> Llama:
    """A model holding `params` (either layer layout); names and shapes are checked against cfg."""
    model = abstract_model(cfg)
    graphdef, state = nnx.split(model)
    params = relayout(params, cfg)
    expected = nnx.state(model, nnx.Param).to_pure_dict()
    _check_tree(expected, params, where)
    state.replace_by_pure_dict(params, replace_fn=lambda var, x: var.replace(jnp.asarray(x)))
    return nnx.merge(graphdef, state)


def _check_tree(expected: Any, got: Any, where: str, path: str = "") -> None:
    from seed_story_jax.errors import ConversionError

    if isinstance(expected, dict):
        if not isinstance(got, dict):
            raise ConversionError(f"{where}: {path or '/'} should be a mapping", key=path)
        exp = {str(k): v for k, v in expected.items()}
        got_s = {str(k): v for k, v in got.items()}
        missing, extra = sorted(set(exp) - set(got_s)), sorted(set(got_s) - set(exp))
        if missing:
            raise ConversionError(f"{where}: missing parameter", key=f"{path}/{missing[0]}".lstrip("/"))
        if extra:
            raise ConversionError(f"{where}: unexpected parameter", key=f"{path}/{extra[0]}".lstrip("/"))
        for k in exp:
            _check_tree(exp[k], got_s[k], where, f"{path}/{k}")
        return
    if tuple(expected.shape) != tuple(np.shape(got)):
        raise ConversionError(f"{where}: shape {tuple(np.shape(got))}, expected {tuple(expected.shape)}",
                              key=path.lstrip("/"))
