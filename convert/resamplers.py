"""Resampler weights ↔ torch state dicts (pure numpy, bit-exact both ways).

Used by the converters of the modules that contain resamplers: `convert/vit.py` (`attn_pool.`),
`convert/agent.py` (`input_resampler.`, `output_resampler.`) and `convert/detokenizer.py`
(`resampler.`). torch Linear weights are (out, in); Flax kernels are (in, out).

The Qwen key table (`key_pos_embed`) is not in torch state dicts: it is recomputed from
`pos_embed` in float32 with torch bicubic semantics on import and dropped on export.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from seed_story_jax.errors import ConversionError


def _get(sd: Mapping, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    if key not in sd:
        raise ConversionError("missing tensor", key=key)
    a = np.asarray(sd[key])
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ConversionError(f"tensor has shape {tuple(a.shape)}, expected {tuple(shape)}", key=key)
    return a


def _t(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a).T)


def _linear_in(sd, key, out_dim=None, in_dim=None, bias=True) -> dict:
    shape = None if out_dim is None else (out_dim, in_dim)
    p = {"kernel": _t(_get(sd, key + ".weight", shape))}
    if bias:
        p["bias"] = _get(sd, key + ".bias", None if out_dim is None else (out_dim,))
    return p


def _linear_out(p: dict, key: str, out: dict) -> None:
    out[key + ".weight"] = _t(p["kernel"])
    if "bias" in p:
        out[key + ".bias"] = np.asarray(p["bias"])


def _ln_in(sd, key, dim=None) -> dict:
    shape = None if dim is None else (dim,)
    return {"scale": _get(sd, key + ".weight", shape), "bias": _get(sd, key + ".bias", shape)}


def _ln_out(p: dict, key: str, out: dict) -> None:
    out[key + ".weight"] = np.asarray(p["scale"])
    out[key + ".bias"] = np.asarray(p["bias"])


# --------------------------------------------------------------------------------------------
# Qwen-VL Resampler: query, pos_embed, kv_proj?, attn (nn.MultiheadAttention), ln_q, ln_kv
# --------------------------------------------------------------------------------------------


def qwen_resampler_keys(prefix: str, grid_size: int, embed_dim: int, kv_dim: int) -> dict[str, tuple]:
    """Every torch key (with its shape) of a Qwen Resampler under `prefix` (e.g. 'attn_pool.')."""
    n, e = grid_size * grid_size, embed_dim
    keys = {
        "query": (n, e),
        "pos_embed": (n, e),
        "attn.in_proj_weight": (3 * e, e),
        "attn.in_proj_bias": (3 * e,),
        "attn.out_proj.weight": (e, e),
        "attn.out_proj.bias": (e,),
        "ln_q.weight": (e,),
        "ln_q.bias": (e,),
        "ln_kv.weight": (e,),
        "ln_kv.bias": (e,),
    }
    if kv_dim != embed_dim:
        keys["kv_proj.weight"] = (e, kv_dim)
    return {prefix + k: v for k, v in keys.items()}


def qwen_resampler_from_torch(sd: Mapping, prefix: str = "", *, input_tokens: int) -> dict:
    """torch state dict (keys under `prefix`) → QwenResampler params. `input_tokens` sizes the key
    position table (256 for the agent's input resampler, 64 for the output one, 1024 for the ViT)."""
    from seed_story_jax.models.resamplers import key_pos_table

    query = _get(sd, prefix + "query")
    n, e = query.shape
    pos = _get(sd, prefix + "pos_embed", (n, e))
    w = _get(sd, prefix + "attn.in_proj_weight", (3 * e, e))
    b = _get(sd, prefix + "attn.in_proj_bias", (3 * e,))
    params = {
        "query": query,
        "pos_embed": pos,
        "key_pos_embed": key_pos_table(pos, input_tokens).astype(pos.dtype),
        "ln_q": _ln_in(sd, prefix + "ln_q", e),
        "ln_kv": _ln_in(sd, prefix + "ln_kv", e),
        "q_proj": {"kernel": _t(w[:e]), "bias": b[:e]},
        "k_proj": {"kernel": _t(w[e:2 * e]), "bias": b[e:2 * e]},
        "v_proj": {"kernel": _t(w[2 * e:]), "bias": b[2 * e:]},
        "out_proj": _linear_in(sd, prefix + "attn.out_proj", e, e),
    }
    if prefix + "kv_proj.weight" in sd:
        params["kv_proj"] = {"kernel": _t(_get(sd, prefix + "kv_proj.weight"))}
        if params["kv_proj"]["kernel"].shape[1] != e:
            raise ConversionError(f"kv_proj maps to {params['kv_proj']['kernel'].shape[1]}, expected {e}",
                                  key=prefix + "kv_proj.weight")
    return params


def qwen_resampler_to_torch(params: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """QwenResampler params → torch state dict (the key table is derived, so it is not exported)."""
    out: dict[str, np.ndarray] = {
        prefix + "query": np.asarray(params["query"]),
        prefix + "pos_embed": np.asarray(params["pos_embed"]),
    }
    if "kv_proj" in params:
        out[prefix + "kv_proj.weight"] = _t(params["kv_proj"]["kernel"])
    out[prefix + "attn.in_proj_weight"] = np.concatenate(
        [_t(params[k]["kernel"]) for k in ("q_proj", "k_proj", "v_proj")], axis=0)
    out[prefix + "attn.in_proj_bias"] = np.concatenate(
        [np.asarray(params[k]["bias"]) for k in ("q_proj", "k_proj", "v_proj")], axis=0)
    _linear_out(params["out_proj"], prefix + "attn.out_proj", out)
    _ln_out(params["ln_q"], prefix + "ln_q", out)
    _ln_out(params["ln_kv"], prefix + "ln_kv", out)
    return out


# --------------------------------------------------------------------------------------------
# ResamplerXLV2: latents, proj_in, layers.{j}.0 (PerceiverAttention), layers.{j}.1 (FF Sequential),
# norm_out, unet_proj_1/2, unet_attnpool.{positional_embedding, q/k/v_proj, c_proj}
# --------------------------------------------------------------------------------------------


def xlv2_keys(cfg, prefix: str = "") -> dict[str, tuple]:
    """Every torch key (with its shape) of a ResamplerXLV2 built from `cfg` under `prefix`."""
    d, inner, m = cfg.dim, cfg.dim_head * cfg.heads, cfg.dim * cfg.ff_mult
    keys = {
        "latents": (1, cfg.num_queries, d),
        "proj_in.weight": (d, cfg.embedding_dim), "proj_in.bias": (d,),
        "norm_out.weight": (d,), "norm_out.bias": (d,),
        "unet_proj_1.weight": (cfg.output1_dim, d), "unet_proj_1.bias": (cfg.output1_dim,),
        "unet_proj_2.weight": (cfg.output2_dim, d), "unet_proj_2.bias": (cfg.output2_dim,),
        "unet_attnpool.positional_embedding": (cfg.num_queries + 1, d),
        "unet_attnpool.c_proj.weight": (cfg.output2_dim, d), "unet_attnpool.c_proj.bias": (cfg.output2_dim,),
    }
    for p in ("q_proj", "k_proj", "v_proj"):
        keys[f"unet_attnpool.{p}.weight"] = (d, d)
        keys[f"unet_attnpool.{p}.bias"] = (d,)
    for j in range(cfg.depth):
        a, f = f"layers.{j}.0.", f"layers.{j}.1."
        keys.update({
            a + "norm1.weight": (d,), a + "norm1.bias": (d,), a + "norm2.weight": (d,), a + "norm2.bias": (d,),
            a + "to_q.weight": (inner, d), a + "to_kv.weight": (2 * inner, d), a + "to_out.weight": (d, inner),
            f + "0.weight": (d,), f + "0.bias": (d,), f + "1.weight": (m, d), f + "3.weight": (d, m),
        })
    return {prefix + k: v for k, v in keys.items()}


def _check_shapes(sd: Mapping, expected: dict[str, tuple]) -> None:
    for k, shape in expected.items():
        _get(sd, k, shape)


def xlv2_from_torch(sd: Mapping, cfg, prefix: str = "") -> dict:
    """torch ResamplerXLV2 state dict (keys under `prefix`, e.g. 'resampler.') → params."""
    _check_shapes(sd, xlv2_keys(cfg, prefix))
    g = lambda k: np.asarray(sd[prefix + k])  # noqa: E731
    inner = cfg.dim_head * cfg.heads
    layers = {}
    for j in range(cfg.depth):
        a, f = f"layers.{j}.0.", f"layers.{j}.1."
        kv = g(a + "to_kv.weight")
        layers[j] = {
            "attn": {
                "norm1": _ln_in(sd, prefix + a + "norm1"),
                "norm2": _ln_in(sd, prefix + a + "norm2"),
                "to_q": {"kernel": _t(g(a + "to_q.weight"))},
                "to_k": {"kernel": _t(kv[:inner])},
                "to_v": {"kernel": _t(kv[inner:])},
                "to_out": {"kernel": _t(g(a + "to_out.weight"))},
            },
            "ff": {
                "norm": _ln_in(sd, prefix + f + "0"),
                "fc1": {"kernel": _t(g(f + "1.weight"))},
                "fc2": {"kernel": _t(g(f + "3.weight"))},
            },
        }
    pool = prefix + "unet_attnpool."
    return {
        "latents": g("latents"),
        "proj_in": _linear_in(sd, prefix + "proj_in"),
        "layers": layers,
        "norm_out": _ln_in(sd, prefix + "norm_out"),
        "unet_proj_1": _linear_in(sd, prefix + "unet_proj_1"),
        "unet_proj_2": _linear_in(sd, prefix + "unet_proj_2"),
        "unet_attnpool": {
            "positional_embedding": g("unet_attnpool.positional_embedding"),
            **{p: _linear_in(sd, pool + p) for p in ("q_proj", "k_proj", "v_proj", "c_proj")},
        },
    }


def xlv2_to_torch(params: Mapping, cfg, prefix: str = "") -> dict[str, np.ndarray]:
    """ResamplerXLV2 params → torch state dict with the original key names."""
    out: dict[str, np.ndarray] = {prefix + "latents": np.asarray(params["latents"])}
    _linear_out(params["proj_in"], prefix + "proj_in", out)
    _ln_out(params["norm_out"], prefix + "norm_out", out)
    layers = params["layers"]
    for j in range(cfg.depth):
        layer = layers[j] if j in layers else layers[str(j)]  # orbax restores int keys as strings
        a, f = f"{prefix}layers.{j}.0.", f"{prefix}layers.{j}.1."
        at, ff = layer["attn"], layer["ff"]
        _ln_out(at["norm1"], a + "norm1", out)
        _ln_out(at["norm2"], a + "norm2", out)
        out[a + "to_q.weight"] = _t(at["to_q"]["kernel"])
        out[a + "to_kv.weight"] = np.concatenate([_t(at["to_k"]["kernel"]), _t(at["to_v"]["kernel"])], axis=0)
        out[a + "to_out.weight"] = _t(at["to_out"]["kernel"])
        _ln_out(ff["norm"], f + "0", out)
        out[f + "1.weight"] = _t(ff["fc1"]["kernel"])
        out[f + "3.weight"] = _t(ff["fc2"]["kernel"])
    _linear_out(params["unet_proj_1"], prefix + "unet_proj_1", out)
    _linear_out(params["unet_proj_2"], prefix + "unet_proj_2", out)
    pool = params["unet_attnpool"]
    out[prefix + "unet_attnpool.positional_embedding"] = np.asarray(pool["positional_embedding"])
    for p in ("q_proj", "k_proj", "v_proj", "c_proj"):
        _linear_out(pool[p], f"{prefix}unet_attnpool.{p}", out)
    return out
