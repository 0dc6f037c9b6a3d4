"""diffusers UNet2DConditionModel folder (config.json + diffusion_pytorch_model.safetensors / .bin) ↔ JAX.

Names: the JAX tree mirrors diffusers' module tree (see models/unet.py) up to five renames; leaves
`kernel` ↔ `weight` (Linear transposed, Conv HWIO ↔ OIHW), `scale` ↔ `weight`, `bias` ↔ `bias`.
Config: diffusers' config.json ↔ UNetConfig (`attention_head_dim` there = `num_attention_heads` here).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from seed_story_jax.config import SeedStoryConfig, UNetConfig
from convert.layout import leaves, to_jax_layout, to_torch_layout, torch_shape
from seed_story_jax.errors import ConversionError

KIND = "unet"
COMPONENT = "unet"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json",
                "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.safetensors.index.json")

# JAX module name → diffusers module path segment(s), matched on whole segments.
_RENAMES = {("to_out",): ("to_out", "0"), ("ff", "proj"): ("ff", "net", "0", "proj"), ("ff", "out"): ("ff", "net", "2"),
            ("downsampler",): ("downsamplers", "0"), ("upsampler",): ("upsamplers", "0")}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}

# diffusers config keys we read, and the values we support for the ones UNetConfig does not carry.
_FIXED = {
    "act_fn": "silu", "center_input_sample": False, "class_embed_type": None, "num_class_embeds": None,
    "dual_cross_attention": False, "only_cross_attention": False, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "mid_block_scale_factor": 1, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "num_attention_heads": None,
    "attention_type": "default", "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None, "dropout": 0.0,
}
# accepted but irrelevant to the forward in fp32 (upcast only changes the torch softmax dtype)
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "upcast_attention", "addition_embed_type_num_heads",
            "_use_default_values"}


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


def _as_tuple(v, n, what):
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise ConversionError(f"config.json: {what} has {len(v)} entries, expected {n}", key=what)
        return tuple(tuple(x) if isinstance(x, (list, tuple)) else x for x in v)
    return (v,) * n


def config_from_diffusers(d: Mapping[str, Any], *, file=None) -> UNetConfig:
    """diffusers config.json dict → UNetConfig; unsupported settings are refused by name."""
    for k, want in _FIXED.items():
        v = d.get(k, want)
        ok = (not any(v)) if (k == "only_cross_attention" and isinstance(v, list)) else v == want
        if not ok:
            raise ConversionError(f"unsupported UNet setting {k}={d[k]!r} (supported: {want!r})", file=file, key=k)
    known = set(_FIXED) | _IGNORED | {f for f in UNetConfig.__dataclass_fields__} | {
        "attention_head_dim", "layers_per_block", "cross_attention_dim", "projection_class_embeddings_input_dim"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConversionError(f"unknown UNet config keys {unknown}", file=file, key=unknown[0])
    try:
        n = len(d["block_out_channels"])
        lpb = d.get("layers_per_block", 2)
        if isinstance(lpb, (list, tuple)):
            if len(set(lpb)) != 1:
                raise ConversionError(f"per-block layers_per_block {lpb} is not supported", file=file, key="layers_per_block")
            lpb = lpb[0]
        cad = d.get("cross_attention_dim", 1280)
        if isinstance(cad, (list, tuple)):
            if len(set(cad)) != 1:
                raise ConversionError(f"per-block cross_attention_dim {cad} is not supported", file=file,
                                      key="cross_attention_dim")
            cad = cad[0]
        rev = d.get("reverse_transformer_layers_per_block")
        cfg = UNetConfig(
            in_channels=d.get("in_channels", 4),
            out_channels=d.get("out_channels", 4),
            block_out_channels=tuple(d["block_out_channels"]),
            down_block_types=tuple(d["down_block_types"]),
            up_block_types=tuple(d["up_block_types"]),
            layers_per_block=lpb,
            transformer_layers_per_block=_as_tuple(d.get("transformer_layers_per_block", 1), n,
                                                   "transformer_layers_per_block"),
            reverse_transformer_layers_per_block=None if rev is None else _as_tuple(rev, n, "reverse_transformer_layers_per_block"),
            num_attention_heads=_as_tuple(d.get("attention_head_dim", 8), n, "attention_head_dim"),
            cross_attention_dim=cad,
            use_linear_projection=d.get("use_linear_projection", False),
            addition_embed_type=d.get("addition_embed_type"),
            addition_time_embed_dim=d.get("addition_time_embed_dim") or 256,
            projection_class_embeddings_input_dim=d.get("projection_class_embeddings_input_dim") or 0,
            norm_num_groups=d.get("norm_num_groups", 32),
            norm_eps=float(d.get("norm_eps", 1e-5)),
            flip_sin_to_cos=d.get("flip_sin_to_cos", True),
            freq_shift=d.get("freq_shift", 0),
            downsample_padding=d.get("downsample_padding", 1),
            conv_in_kernel=d.get("conv_in_kernel", 3),
            conv_out_kernel=d.get("conv_out_kernel", 3),
            sample_size=d.get("sample_size") or 128,
        )
        cfg.validate()
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, ConversionError):
            raise
        raise ConversionError(f"bad UNet config: {e}", file=file) from None
    return cfg


def config_to_diffusers(cfg: UNetConfig) -> dict:
    """UNetConfig → a diffusers config.json dict that UNet2DConditionModel.from_config accepts."""
    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v

    out = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.42.1",
        "sample_size": cfg.sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "flip_sin_to_cos": cfg.flip_sin_to_cos,
        "freq_shift": cfg.freq_shift,
        "down_block_types": list(cfg.down_block_types),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": list(cfg.up_block_types),
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "downsample_padding": cfg.downsample_padding,
        "norm_num_groups": cfg.norm_num_groups,
        "norm_eps": cfg.norm_eps,
        "cross_attention_dim": cfg.cross_attention_dim,
        "transformer_layers_per_block": plain(cfg.transformer_layers_per_block),
        "reverse_transformer_layers_per_block": plain(cfg.reverse_transformer_layers_per_block),
        "attention_head_dim": list(cfg.num_attention_heads),
        "use_linear_projection": cfg.use_linear_projection,
        "addition_embed_type": cfg.addition_embed_type,
        "addition_time_embed_dim": cfg.addition_time_embed_dim if cfg.addition_embed_type else None,
        "projection_class_embeddings_input_dim": (cfg.projection_class_embeddings_input_dim
                                                  if cfg.addition_embed_type else None),
        "conv_in_kernel": cfg.conv_in_kernel,
        "conv_out_kernel": cfg.conv_out_kernel,
    }
    for k, v in _FIXED.items():
        out.setdefault(k, v)
    out["upcast_attention"] = False
    return out


# --------------------------------------------------------------------------------------------
# names and tensors
# --------------------------------------------------------------------------------------------


def torch_key(path: tuple) -> str:
    """JAX params path (tuple of str/int) → diffusers state-dict key."""
    parts = [str(p) for p in path]
    *mods, leaf = parts
    out: list[str] = []
    i = 0
    while i < len(mods):
        for pat, rep in _RENAMES.items():
            if tuple(mods[i:i + len(pat)]) == pat:
                out.extend(rep)
                i += len(pat)
                break
        else:
            out.append(mods[i])
            i += 1
    return ".".join(out + [_LEAF[leaf]])






def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def abstract_params(cfg: UNetConfig):
    from seed_story_jax.models.unet import abstract_params as ap

    return ap(cfg)


def expected_torch_shapes(cfg: UNetConfig) -> dict[str, tuple]:
    """diffusers key → torch shape, for every parameter the config implies."""
    return {torch_key(p): torch_shape(tuple(x.shape)) for p, x in leaves(abstract_params(cfg))}


def from_torch(state_dict: Mapping[str, np.ndarray], cfg: UNetConfig, *, file=None) -> dict:
    """diffusers state dict (numpy) → JAX params tree; missing/unexpected/misshapen keys refused."""
    from convert.io import check_keys

    abstract = abstract_params(cfg)
    expected = {torch_key(p): torch_shape(tuple(x.shape)) for p, x in leaves(abstract)}
    check_keys(expected, state_dict, file)
    params: dict = {}
    for path, _ in leaves(abstract):
        _set(params, path, to_jax_layout(np.asarray(state_dict[torch_key(path)])))
    return params


def to_torch(params: Mapping, cfg: UNetConfig) -> dict[str, np.ndarray]:
    """JAX params tree → diffusers state dict (numpy), the exact inverse of from_torch."""
    return {torch_key(p): to_torch_layout(np.asarray(x)) for p, x in leaves(params)}


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def weights_file(src: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (src / name).is_file():
            return src / name
    raise ConversionError(f"{src}: no diffusers weights ({' / '.join(WEIGHT_NAMES)})", file=src)


def read_config_json(src: Path) -> dict:
    p = Path(src) / "config.json"
    if not p.is_file():
        raise ConversionError(f"{src}: no config.json", file=p)
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"invalid JSON: {e}", file=p) from None
    if d.get("_class_name") not in (None, "UNet2DConditionModel"):
        raise ConversionError(f"_class_name {d.get('_class_name')!r} is not UNet2DConditionModel", file=p,
                              key="_class_name")
    return d


def detect(src: Path) -> bool:
    src = Path(src)
    if not (src / "config.json").is_file():
        return False
    try:
        d = json.loads((src / "config.json").read_text())
    except (json.JSONDecodeError, OSError):
        return False
    return d.get("_class_name") == "UNet2DConditionModel" and any((src / n).is_file() for n in WEIGHT_NAMES)


def load_folder(src: Path, dtype=None) -> tuple[UNetConfig, dict]:
    """A diffusers UNet folder → (UNetConfig, params). `dtype`: cast floats (None keeps the source's)."""
    from convert.io import open_state_dict

    src = Path(src)
    cfg = config_from_diffusers(read_config_json(src), file=src / "config.json")
    wf = weights_file(src)
    params = from_torch(open_state_dict(wf), cfg, file=wf)
    if dtype is not None:
        params = cast(params, dtype)
    return cfg, params


def cast(params, dtype):
    import ml_dtypes

    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    out: dict = {}
    for p, x in leaves(params):
        _set(out, p, np.asarray(x).astype(np_dtype))
    return out


def write_folder(dst: Path, cfg: UNetConfig, params) -> None:
    """config.json + diffusion_pytorch_model.safetensors into an existing (temporary) directory."""
    from convert.io import write_safetensors

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(config_to_diffusers(cfg), indent=2) + "\n")
    write_safetensors(to_torch(params, cfg), dst / "diffusion_pytorch_model.safetensors")


def _param_dtype(params) -> str:
    leaf = next(iter(leaves(params)))[1]
    return str(np.dtype(leaf.dtype)) if str(leaf.dtype) != "bfloat16" else "bfloat16"


def import_checkpoint(src, dst, *, dtype=None, options=None) -> dict:
    import dataclasses

    from seed_story_jax.checkpoint import save_checkpoint

    cfg, params = load_folder(Path(src), dtype)
    pd = _param_dtype(params)
    cfg = dataclasses.replace(cfg, param_dtype=pd if pd in ("float32", "bfloat16", "float16") else "float32")
    save_checkpoint(dst, SeedStoryConfig(unet=cfg, name=Path(src).name), {COMPONENT: params},
                    kinds={COMPONENT: KIND}, extra={"convert_kind": KIND, "source": str(src)})
    n = sum(int(np.prod(x.shape)) for _, x in leaves(params))
    return {"src": str(src), "dst": str(dst), "params": n, "tensors": len(list(leaves(params))), "dtype": pd}


def export_checkpoint(ckpt_dir, dst, *, options=None) -> dict:
    from seed_story_jax.atomic import atomic_path
    from seed_story_jax.checkpoint import load_checkpoint

    ck = load_checkpoint(ckpt_dir, [COMPONENT])
    if ck.config.unet is None:
        raise ConversionError(f"{ckpt_dir}: config has no unet section", file=ckpt_dir)
    params = _numpy_tree(ck.params[COMPONENT])
    with atomic_path(dst, directory=True) as tmp:
        write_folder(tmp, ck.config.unet, params)
    return {"src": str(ckpt_dir), "dst": str(dst), "tensors": len(list(leaves(params)))}


def _numpy_tree(tree) -> dict:
    """numpy leaves, and list indices back to ints (orbax restores nnx.List keys as '0', '1', ...)."""
    out: dict = {}
    for p, x in leaves(tree):
        _set(out, tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in p), np.asarray(x))
    return out


# --------------------------------------------------------------------------------------------
# verify: diffusers torch vs the port, fp32, same random inputs
# --------------------------------------------------------------------------------------------


def random_inputs(cfg: UNetConfig, batch: int = 2, size: int = 16, seq: int = 8, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    out = {
        "sample": rng.standard_normal((batch, cfg.in_channels, size, size)).astype(np.float32),
        "timesteps": np.array([999.0, 17.0, 500.0, 1.0][:batch], np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, seq, cfg.cross_attention_dim)).astype(np.float32),
    }
    if cfg.addition_embed_type == "text_time":
        out["text_embeds"] = rng.standard_normal((batch, pooled)).astype(np.float32)
        out["time_ids"] = np.tile(np.array([[size * 8, size * 8, 0, 0, size * 8, size * 8]], np.float32), (batch, 1))
    return out


_FWD = None


def _nchw_forward():
    """One jitted NCHW forward for every config (graphdef is static), so equal shapes compile once."""
    global _FWD
    if _FWD is None:
        import functools

        import jax
        from flax import nnx

        @functools.partial(jax.jit, static_argnums=0)
        def fwd(graphdef, state, inp):
            m = nnx.merge(graphdef, state)
            return m(inp["sample"].transpose(0, 2, 3, 1), inp["timesteps"], inp["encoder_hidden_states"],
                     inp.get("text_embeds"), inp.get("time_ids")).transpose(0, 3, 1, 2)

        _FWD = fwd
    return _FWD


def run_jax(cfg: UNetConfig, params, inputs: dict) -> np.ndarray:
    """The port on NCHW numpy inputs (as torch takes them) → NCHW numpy output, fp32."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from seed_story_jax.models.unet import abstract_model

    cfg = dataclasses.replace(cfg, param_dtype="float32", dtype="float32", remat="none")
    graphdef, _ = nnx.split(abstract_model(cfg))
    state = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _numpy_tree(params))
    with jax.default_matmul_precision("highest"):
        return np.asarray(_nchw_forward()(graphdef, state, {k: jnp.asarray(v) for k, v in inputs.items()}))


def run_torch(model, inputs: dict) -> np.ndarray:
    import torch

    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    added = {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]} if "time_ids" in t else None
    with torch.no_grad():
        return model(t["sample"], t["timesteps"], t["encoder_hidden_states"], added_cond_kwargs=added).sample.numpy()


def verify(src, ckpt_dir, *, options=None) -> dict:
    """Load the diffusers folder in torch (fp32) and the JAX checkpoint; compare on random inputs."""
    import torch
    from diffusers import UNet2DConditionModel

    from seed_story_jax.checkpoint import load_checkpoint

    ck = load_checkpoint(ckpt_dir, [COMPONENT])
    cfg = ck.config.unet
    model = UNet2DConditionModel.from_pretrained(str(src), torch_dtype=torch.float32).eval()
    inputs = random_inputs(cfg, size=16 if cfg.block_out_channels[0] < 320 else 32)
    ref = run_torch(model, inputs)
    out = run_jax(cfg, ck.params[COMPONENT], inputs)
    max_abs = float(np.max(np.abs(out - ref)))
    max_rel = max_abs / max(float(np.max(np.abs(ref))), 1e-12)
    tol = 1e-4
    return {"max_abs": max_abs, "max_rel": max_rel, "tolerance": tol, "ok": bool(max_rel <= tol)}
