"""Qwen-VL ViT-G/14 (`qwen_vit_G.pt`, or the `transformer.visual.*` tensors of a Qwen-VL-Chat
directory) ↔ the `vit` component of a JAX checkpoint. Mirrors seed_story_jax/models/vit.py.

Layout changes (all exact, bit-preserving):
* conv1 (O, I, kh, kw) → (kh, kw, I, O); Linear weights (out, in) → kernels (in, out).
* `attn.in_proj` is per-head interleaved: output channel h·3d + j·d + i holds q (j=0), k (1), v (2)
  of head h (spec §1.2). It is split into q/k/v projections here and re-interleaved on export.
* The attention pool goes through convert/resamplers.py (the agent's resamplers use the same code).
* Derived tables (models/vit.py `DERIVED`) are computed on import and dropped on export.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from convert.resamplers import qwen_resampler_from_torch, qwen_resampler_keys, qwen_resampler_to_torch
from seed_story_jax.config import SeedStoryConfig, ViTConfig
from seed_story_jax.errors import ConversionError

KIND = "vit"
QWEN_PREFIX = "transformer.visual."  # where a Qwen-VL-Chat checkpoint keeps its ViT
_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _np_dtype(name: str):
    import ml_dtypes

    return {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
            "bfloat16": np.dtype(ml_dtypes.bfloat16)}[name]


def _dtype_name(dt) -> str:
    for name in ("float32", "float16", "bfloat16"):
        if np.dtype(dt) == _np_dtype(name):
            return name
    raise ConversionError(f"unsupported tensor dtype {np.dtype(dt)} (expected float32, float16 or bfloat16)")


# --------------------------------------------------------------------------------------------
# Key map
# --------------------------------------------------------------------------------------------


def torch_keys(cfg: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the original state dict with its shape, in the original's order."""
    c, m, o = cfg.width, cfg.mlp_width, cfg.output_dim
    p = cfg.patch_size
    keys: dict[str, tuple[int, ...]] = {
        "positional_embedding": (cfg.pos_grid ** 2, c),
        "proj": (o, o),
        "conv1.weight": (c, 3, p, p),
        "ln_pre.weight": (c,),
        "ln_pre.bias": (c,),
    }
    for i in range(cfg.layers):
        b = f"transformer.resblocks.{i}."
        keys.update({
            b + "ln_1.weight": (c,), b + "ln_1.bias": (c,),
            b + "ln_2.weight": (c,), b + "ln_2.bias": (c,),
            b + "attn.in_proj.weight": (3 * c, c), b + "attn.in_proj.bias": (3 * c,),
            b + "attn.out_proj.weight": (c, c), b + "attn.out_proj.bias": (c,),
            b + "mlp.c_fc.weight": (m, c), b + "mlp.c_fc.bias": (m,),
            b + "mlp.c_proj.weight": (c, m), b + "mlp.c_proj.bias": (c,),
        })
    pool = qwen_resampler_keys("attn_pool.", _pool_grid(cfg), o, c)
    order = ["pos_embed", "query", "kv_proj.weight", "attn.in_proj_weight", "attn.in_proj_bias",
             "attn.out_proj.weight", "attn.out_proj.bias", "ln_q.weight", "ln_q.bias", "ln_kv.weight", "ln_kv.bias"]
    keys.update({"attn_pool." + k: pool["attn_pool." + k] for k in order if "attn_pool." + k in pool})
    keys.update({"ln_post.weight": (o,), "ln_post.bias": (o,)})
    return keys


def _pool_grid(cfg: ViTConfig) -> int:
    return int(round(math.sqrt(cfg.n_queries)))


class _Cast(Mapping):
    """A read-only view of a state dict whose tensors come out in one dtype (no copy when equal)."""

    def __init__(self, sd: Mapping, dtype):
        self._sd, self._dtype = sd, dtype

    def __getitem__(self, key):
        return np.asarray(self._sd[key]).astype(self._dtype, copy=False)

    def __iter__(self):
        return iter(self._sd)

    def __len__(self):
        return len(self._sd)

    def __contains__(self, key):
        return key in self._sd


def from_torch(state_dict: Mapping, cfg: ViTConfig) -> dict:
    """Original state dict (numpy arrays) → params tree of models/vit.QwenViT, in cfg.param_dtype.
    Keys and shapes are checked first (missing, unexpected or misshapen tensors are named)."""
    from seed_story_jax.models.vit import grid_of, resized_pos_table

    check_state_dict(state_dict, cfg)
    sd = _Cast(state_dict, _np_dtype(cfg.param_dtype))
    c, h = cfg.width, cfg.heads
    d = c // h

    def lin(key):
        return {"kernel": sd[key + ".weight"].T, "bias": sd[key + ".bias"]}

    def ln(key):
        return {"scale": sd[key + ".weight"], "bias": sd[key + ".bias"]}

    blocks = {}
    for i in range(cfg.layers):
        b = f"transformer.resblocks.{i}."
        w = sd[b + "attn.in_proj.weight"].reshape(h, 3, d, c)
        bias = sd[b + "attn.in_proj.bias"].reshape(h, 3, d)
        qkv = {name: {"kernel": w[:, j].reshape(c, c).T, "bias": bias[:, j].reshape(c)}
               for j, name in enumerate(("q_proj", "k_proj", "v_proj"))}
        blocks[i] = {"ln_1": ln(b + "ln_1"), **qkv, "out_proj": lin(b + "attn.out_proj"),
                     "ln_2": ln(b + "ln_2"), "c_fc": lin(b + "mlp.c_fc"), "c_proj": lin(b + "mlp.c_proj")}
    if cfg.scan_layers:
        import jax

        blocks = jax.tree.map(lambda *xs: np.stack(xs), *[blocks[i] for i in range(cfg.layers)])

    pos = sd["positional_embedding"]
    return {
        "conv1": sd["conv1.weight"].transpose(2, 3, 1, 0),
        "positional_embedding": pos,
        "positional_embedding_resized": resized_pos_table(pos, grid_of(cfg)).astype(pos.dtype),
        "ln_pre": ln("ln_pre"),
        "blocks": blocks,
        "attn_pool": qwen_resampler_from_torch(sd, "attn_pool.", input_tokens=grid_of(cfg) ** 2),
        "ln_post": ln("ln_post"),
        "proj": sd["proj"],
    }


def iter_torch(params: Mapping, cfg: ViTConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Params tree → (key, tensor) in the original state dict's order, one tensor at a time."""
    c, h = cfg.width, cfg.heads
    d = c // h
    arr = np.asarray  # views where possible: the writers make tensors contiguous one at a time
    blocks = params["blocks"]

    def block(i):
        if cfg.scan_layers:
            return _map(lambda x: x[i], blocks)
        return blocks[i] if i in blocks else blocks[str(i)]  # orbax restores int keys as strings

    yield "positional_embedding", arr(params["positional_embedding"])
    yield "proj", arr(params["proj"])
    yield "conv1.weight", arr(np.asarray(params["conv1"]).transpose(3, 2, 0, 1))
    yield "ln_pre.weight", arr(params["ln_pre"]["scale"])
    yield "ln_pre.bias", arr(params["ln_pre"]["bias"])
    for i in range(cfg.layers):
        p, b = block(i), f"transformer.resblocks.{i}."
        names = ("q_proj", "k_proj", "v_proj")
        w = np.stack([np.asarray(p[n]["kernel"]).T.reshape(h, d, c) for n in names], axis=1)
        bias = np.stack([np.asarray(p[n]["bias"]).reshape(h, d) for n in names], axis=1)
        yield b + "ln_1.weight", arr(p["ln_1"]["scale"])
        yield b + "ln_1.bias", arr(p["ln_1"]["bias"])
        yield b + "ln_2.weight", arr(p["ln_2"]["scale"])
        yield b + "ln_2.bias", arr(p["ln_2"]["bias"])
        yield b + "attn.in_proj.weight", arr(w.reshape(3 * c, c))
        yield b + "attn.in_proj.bias", arr(bias.reshape(3 * c))
        yield b + "attn.out_proj.weight", arr(np.asarray(p["out_proj"]["kernel"]).T)
        yield b + "attn.out_proj.bias", arr(p["out_proj"]["bias"])
        yield b + "mlp.c_fc.weight", arr(np.asarray(p["c_fc"]["kernel"]).T)
        yield b + "mlp.c_fc.bias", arr(p["c_fc"]["bias"])
        yield b + "mlp.c_proj.weight", arr(np.asarray(p["c_proj"]["kernel"]).T)
        yield b + "mlp.c_proj.bias", arr(p["c_proj"]["bias"])
    pool = qwen_resampler_to_torch(params["attn_pool"], "attn_pool.")
    for k in torch_keys(cfg):
        if k.startswith("attn_pool."):
            yield k, arr(pool.pop(k))
    if pool:
        raise ConversionError(f"attention pool params give unexpected tensors {sorted(pool)}")
    yield "ln_post.weight", arr(params["ln_post"]["scale"])
    yield "ln_post.bias", arr(params["ln_post"]["bias"])


def to_torch(params: Mapping, cfg: ViTConfig) -> dict[str, np.ndarray]:
    """Params tree → the original state dict (bit-exact inverse of `from_torch`)."""
    return dict(iter_torch(params, cfg))


def _map(fn, tree):
    if isinstance(tree, Mapping):
        return {k: _map(fn, v) for k, v in tree.items()}
    return fn(tree)


def check_state_dict(sd: Mapping, cfg: ViTConfig, file=None) -> None:
    """Refuse missing, unexpected or misshapen tensors, naming them (convert/io.py's check)."""
    from convert.io import check_keys

    check_keys(torch_keys(cfg), sd, file)


# --------------------------------------------------------------------------------------------
# Sources: qwen_vit_G.pt (or any single file / sharded dir of the 594 tensors), Qwen-VL-Chat dirs
# --------------------------------------------------------------------------------------------


class _Prefixed(Mapping):
    """The tensors of a lazy state dict under `prefix`, with the prefix removed."""

    def __init__(self, sd, prefix: str):
        self._sd, self._prefix = sd, prefix
        self._keys = [k[len(prefix):] for k in sd if k.startswith(prefix)]

    def __getitem__(self, key):
        return self._sd[self._prefix + key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key):
        return isinstance(key, str) and (self._prefix + key) in self._sd

    def shape(self, key):
        return self._sd.shape(self._prefix + key)

    def dtype(self, key):
        return self._sd.dtype(self._prefix + key)

    def source(self, key):
        return self._sd.source(self._prefix + key)


def open_source(src) -> tuple[Mapping, dict]:
    """A lazy state dict of the ViT's tensors (original key names) and facts about the source
    ({"layout": "qwen-vit" | "qwen-vl-chat", "visual_config": dict | None})."""
    from convert.io import open_state_dict

    src = Path(src)
    sd = open_state_dict(src)
    if any(k.startswith(QWEN_PREFIX) for k in sd):
        visual = None
        cfg_file = src / "config.json" if src.is_dir() else None
        if cfg_file is not None and cfg_file.is_file():
            visual = json.loads(cfg_file.read_text()).get("visual")
        return _Prefixed(sd, QWEN_PREFIX), {"layout": "qwen-vl-chat", "visual_config": visual}
    return sd, {"layout": "qwen-vit", "visual_config": None}


def detect(src) -> bool:
    src = Path(src)
    if src.is_file() and src.suffix not in _SUFFIXES:
        return False
    try:
        sd, _ = open_source(src)
        return "conv1.weight" in sd and "attn_pool.query" in sd and "transformer.resblocks.0.attn.in_proj.weight" in sd
    except Exception:  # anything unreadable is simply not ours
        return False


def infer_config(sd: Mapping, visual_config: dict | None = None) -> ViTConfig:
    """The ViTConfig of a source without a seed-story config: sizes from tensor shapes; head counts
    and image size (which no shape reveals) from Qwen-VL's `config.json["visual"]` (pool heads =
    output_dim // 128, as Qwen-VL derives them), or, for a bare state dict, those of the released
    ViT-G/14 — only when every shape is the released model's."""
    shape = (lambda k: tuple(sd.shape(k))) if hasattr(sd, "shape") else (lambda k: tuple(np.shape(sd[k])))
    for k in ("conv1.weight", "positional_embedding", "proj", "attn_pool.query", "transformer.resblocks.0.mlp.c_fc.weight"):
        if k not in sd:
            raise ConversionError("missing tensor", key=k)
    width, _, patch, _ = shape("conv1.weight")
    layers = 0
    while f"transformer.resblocks.{layers}.ln_1.weight" in sd:
        layers += 1
    pos_rows = shape("positional_embedding")[0]
    pos_grid = int(round(math.sqrt(pos_rows)))
    if pos_grid * pos_grid != pos_rows:
        raise ConversionError(f"positional_embedding has {pos_rows} rows, not a square grid", key="positional_embedding")
    sizes = dict(width=width, patch_size=patch, layers=layers, pos_grid=pos_grid,
                 mlp_width=shape("transformer.resblocks.0.mlp.c_fc.weight")[0],
                 output_dim=shape("proj")[0], n_queries=shape("attn_pool.query")[0])
    released = ViTConfig()
    if visual_config:
        heads = int(visual_config.get("heads", released.heads))
        cfg = dataclasses.replace(released, **sizes, heads=heads, pool_heads=max(1, sizes["output_dim"] // 128),
                                  image_size=int(visual_config.get("image_size", released.image_size)))
    else:
        cfg = dataclasses.replace(released, **sizes)
        if cfg != released:
            diff = {k: v for k, v in sizes.items() if getattr(released, k) != v}
            raise ConversionError(f"not the released ViT-G/14 ({diff}); its head counts and image size cannot be "
                                  f"read from the tensors: pass --config with the model's `vit` section")
    if cfg.width % cfg.heads or cfg.output_dim % cfg.pool_heads:
        raise ConversionError(f"width {cfg.width} / output_dim {cfg.output_dim} not divisible by heads {cfg.heads} / "
                              f"{cfg.pool_heads}; pass --config with the model's `vit` section", key="conv1.weight")
    return cfg


def _base_config(options) -> ViTConfig | None:
    name = getattr(options, "config", None)
    if not name:
        return None
    from seed_story_jax.config import load_config, resolve_config_path

    cfg = load_config(resolve_config_path(name)).vit
    if cfg is None:
        raise ConversionError(f"{name}: config has no `vit` section")
    return cfg


def import_checkpoint(src, dst, *, dtype=None, options=None) -> dict:
    from seed_story_jax.checkpoint import save_checkpoint

    sd, facts = open_source(src)
    cfg = _base_config(options) or infer_config(sd, facts["visual_config"])
    src_dtype = _dtype_name(sd.dtype("conv1.weight") if hasattr(sd, "dtype") else np.asarray(sd["conv1.weight"]).dtype)
    dtype = dtype or src_dtype
    cfg = dataclasses.replace(cfg, param_dtype=dtype, dtype=dtype)
    cfg.validate()
    check_state_dict(sd, cfg, file=src)
    params = from_torch(sd, cfg)
    expected = torch_keys(cfg)
    save_checkpoint(dst, SeedStoryConfig(vit=cfg, name="qwen-vit"), {"vit": params}, kinds={"vit": KIND},
                    extra={"convert_kind": KIND, "source": str(src), "source_layout": facts["layout"],
                           "source_dtype": src_dtype})
    return {"src": str(src), "dst": str(dst), "layout": facts["layout"], "tensors": len(expected),
            "elements": int(sum(math.prod(s) for s in expected.values())), "source_dtype": src_dtype,
            "param_dtype": dtype}


def export_checkpoint(ckpt_dir, dst, *, options=None) -> dict:
    """`vit` component → `.pt`/`.bin` (torch pickle) or `.safetensors` with the original keys."""
    from convert.io import write_safetensors, write_torch_pickle
    from seed_story_jax.checkpoint import load_component, read_config

    cfg = read_config(ckpt_dir).vit
    if cfg is None:
        raise ConversionError(f"{ckpt_dir}: checkpoint config has no `vit` section", file=ckpt_dir)
    params = _map(np.asarray, load_component(ckpt_dir, "vit"))
    state_dict = to_torch(params, cfg)
    dst = Path(dst)
    if dst.suffix == ".safetensors":
        write_safetensors(state_dict, dst)
    else:
        write_torch_pickle(state_dict, dst)
    return {"src": str(ckpt_dir), "dst": str(dst), "tensors": len(state_dict),
            "elements": int(sum(a.size for a in state_dict.values())), "dtype": cfg.param_dtype}


def verify(src, ckpt_dir, *, options=None) -> dict:
    """The plain torch reference (convert/torch_ref/qwen_vit.py) on the source tensors vs the JAX
    port on the checkpoint, both float32, one random normalised image. max_rel = max|Δ| / max|torch|."""
    import jax
    import torch

    from convert.torch_ref import qwen_vit as ref
    from seed_story_jax.checkpoint import is_checkpoint, load_component, read_config
    from seed_story_jax.models import vit as vit_model

    if is_checkpoint(src):
        raise ConversionError(f"{src}: verify needs the torch-format source", file=src)
    cfg = dataclasses.replace(read_config(ckpt_dir).vit, param_dtype="float32", dtype="float32")
    sd, _ = open_source(src)
    torch_model = ref.load_state_dict(ref.from_config(cfg), {k: sd[k] for k in torch_keys(cfg)})
    params = _map(lambda x: np.asarray(x, np.float32), load_component(ckpt_dir, "vit"))
    # Derived tables recomputed in fp32 from the fp32 tables, as the fp32 torch model does at run time.
    for path, table in vit_model.derived_tables(params, cfg, np.float32).items():
        node = params
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = table
    x = np.random.default_rng(0).standard_normal((1, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(vit_model.make_encoder(vit_model.from_params(cfg, params))(x), np.float64)
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2)).double().numpy()
    max_abs = float(np.abs(ours - theirs).max())
    max_rel = max_abs / float(np.abs(theirs).max())
    tol = 1e-5 if cfg.layers <= 4 else 1e-3  # 48 fp32 layers accumulate more rounding
    return {"max_abs": max_abs, "max_rel": max_rel, "tolerance": tol, "ok": bool(max_rel <= tol)}
