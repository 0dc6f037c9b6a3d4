"""diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.{safetensors,bin}) ↔ JAX `vae`.

Our module tree mirrors diffusers' names (see models/vae.py), so the mapping is a walk over our
params tree: path `a.0.b` + leaf; `kernel` ↔ `weight` (conv HWIO ↔ OIHW, linear (in, out) ↔ (out, in)),
GroupNorm `scale` ↔ `weight`, `bias` ↔ `bias`. Old checkpoints name the mid-block attention
`query/key/value/proj_attn`; import accepts those (as diffusers does), export writes
`to_q/to_k/to_v/to_out.0`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from seed_story_jax.config import ConfigError, VAEConfig
from convert.layout import leaves, to_jax_layout, to_torch_layout, torch_shape
from seed_story_jax.errors import ConversionError

KIND = "vae"
COMPONENT = "vae"
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json",
                "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

# ---------------------------------------------------------------------------------------------
# config.json ↔ VAEConfig
# ---------------------------------------------------------------------------------------------

# AutoencoderKL.__init__ defaults, for keys a config.json leaves out
_DEFAULTS = {"in_channels": 3, "out_channels": 3, "block_out_channels": [64], "layers_per_block": 1,
             "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32,
             "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None,
             "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True,
             "mid_block_add_attention": True}
_INTS = ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups", "sample_size")
_BOOLS = ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention")


def config_from_diffusers(d: Mapping, *, file=None, **overrides) -> VAEConfig:
    """diffusers AutoencoderKL config.json → VAEConfig; settings we do not implement are refused.
    `overrides`: our own fields (param_dtype, dtype, decode_dtype)."""
    where = f"{file}: " if file else ""

    def bad(msg):
        return ConfigError(f"{where}{msg}")

    cls = d.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise bad(f"_class_name is {cls!r}, expected 'AutoencoderKL'")
    v = {k: d.get(k, dv) for k, dv in _DEFAULTS.items()}
    if v["act_fn"] != "silu":
        raise bad(f"act_fn {v['act_fn']!r} is not supported (silu)")
    for k in ("shift_factor", "latents_mean", "latents_std"):
        if v[k] is not None:
            raise bad(f"{k} = {v[k]!r} is not supported (null)")
    ch = v["block_out_channels"]
    if not isinstance(ch, (list, tuple)) or not ch or not all(isinstance(c, int) for c in ch):
        raise bad(f"block_out_channels must be a list of integers, got {ch!r}")
    n = len(ch)
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = d.get(key, [want])
        if list(types) != [want] * n:
            raise bad(f"{key} must be {n} × {want!r}, got {types!r}")
    for k in _INTS:
        if not isinstance(v[k], int) or isinstance(v[k], bool):
            raise bad(f"{k} must be an integer, got {v[k]!r}")
    for k in _BOOLS:
        if not isinstance(v[k], bool):
            raise bad(f"{k} must be true/false, got {v[k]!r}")
    cfg = VAEConfig(
        in_channels=v["in_channels"], out_channels=v["out_channels"], block_out_channels=tuple(ch),
        layers_per_block=v["layers_per_block"], latent_channels=v["latent_channels"],
        norm_num_groups=v["norm_num_groups"], scaling_factor=float(v["scaling_factor"]),
        sample_size=v["sample_size"], mid_block_add_attention=v["mid_block_add_attention"],
        use_quant_conv=v["use_quant_conv"], use_post_quant_conv=v["use_post_quant_conv"],
        force_upcast=v["force_upcast"], **overrides)
    try:
        cfg.validate()
    except ConfigError as e:
        raise bad(str(e)) from None
    return cfg


def config_to_diffusers(cfg: VAEConfig) -> dict:
    n = len(cfg.block_out_channels)
    d = {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": list(cfg.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "force_upcast": cfg.force_upcast,
        "in_channels": cfg.in_channels,
        "latent_channels": cfg.latent_channels,
        "layers_per_block": cfg.layers_per_block,
        "norm_num_groups": cfg.norm_num_groups,
        "out_channels": cfg.out_channels,
        "sample_size": cfg.sample_size,
        "scaling_factor": cfg.scaling_factor,
        "up_block_types": ["UpDecoderBlock2D"] * n,
    }
    # written only when they differ from diffusers' defaults, as the SDXL config.json does
    for k in ("mid_block_add_attention", "use_quant_conv", "use_post_quant_conv"):
        if getattr(cfg, k) is not True:
            d[k] = getattr(cfg, k)
    return d


# ---------------------------------------------------------------------------------------------
# params ↔ state dict (pure numpy)
# ---------------------------------------------------------------------------------------------


def _abstract(cfg: VAEConfig) -> dict:
    """ShapeDtypeStruct tree of the params (models.abstract_params, via the cached skeleton)."""
    return _skeleton(cfg)[1].to_pure_dict()



def _torch_key(path: tuple) -> str:
    *mods, leaf = path
    return ".".join(str(m) for m in mods) + "." + {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)





def torch_keys(cfg: VAEConfig) -> dict[str, tuple]:
    """Every diffusers key of this config with its torch shape."""
    return {_torch_key(p): torch_shape(tuple(x.shape)) for p, x in leaves(_abstract(cfg))}


def _renamed(sd: Mapping, file=None) -> Mapping:
    """`sd` with the legacy attention names replaced (still lazy for a LazyStateDict)."""
    from convert.io import LazyStateDict

    names: dict[str, str] = {}
    for k in sd.keys():
        new = _modern_name(k)
        if new in names:
            raise ConversionError(f"both {names[new]!r} and {k!r} name the same tensor", file=file, key=new)
        names[new] = k
    if all(a == b for a, b in names.items()):
        return sd
    if isinstance(sd, LazyStateDict):
        return LazyStateDict({new: sd._ref(old) for new, old in names.items()}, sd.path, sd.metadata)
    return {new: sd[old] for new, old in names.items()}


def _modern_name(k: str) -> str:
    parts = k.split(".")
    if len(parts) >= 3 and "attentions" in parts and parts[-2] in _LEGACY:
        parts[-2] = _LEGACY[parts[-2]]
        return ".".join(parts)
    return k


def from_torch(state_dict: Mapping, cfg: VAEConfig, *, file=None) -> dict:
    """diffusers AutoencoderKL state dict → our params tree (dtype kept). Missing, unexpected and
    misshapen keys are refused, naming the key."""
    from convert.io import check_keys

    sd = _renamed(state_dict, file)
    abstract = _abstract(cfg)
    expected = {_torch_key(p): torch_shape(tuple(x.shape)) for p, x in leaves(abstract)}
    check_keys(expected, sd, file)
    out: dict = {}
    for path, _ in leaves(abstract):
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = to_jax_layout(np.asarray(sd[_torch_key(path)]))
    return out


def to_torch(params: Mapping, cfg: VAEConfig | None = None) -> dict[str, np.ndarray]:
    """Our params tree → diffusers AutoencoderKL state dict (modern attention names)."""
    return {_torch_key(p): to_torch_layout(np.asarray(a)) for p, a in leaves(params)}


# ---------------------------------------------------------------------------------------------
# Folders and checkpoints
# ---------------------------------------------------------------------------------------------


def _read_config(folder: Path) -> dict:
    p = folder / "config.json"
    if not p.is_file():
        raise ConversionError("no config.json", file=folder)
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"invalid JSON: {e}", file=p) from None
    if not isinstance(d, dict):
        raise ConversionError("config.json must hold an object", file=p)
    return d


def _model_folder(src: Path) -> Path:
    """The VAE folder itself, or an SDXL-layout root's `vae/`."""
    src = Path(src)
    if src.is_dir() and not (src / "config.json").is_file() and (src / "vae" / "config.json").is_file():
        return src / "vae"
    return src


def detect(src: Path) -> bool:
    src = Path(src)
    if not (src.is_dir() and (src / "config.json").is_file()):
        return False
    try:
        return json.loads((src / "config.json").read_text()).get("_class_name") == "AutoencoderKL"
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


def weights_path(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        p = folder / name
        if p.is_file():
            return p
    raise ConversionError(f"no weights file (looked for {', '.join(WEIGHT_NAMES)})", file=folder)


def read_folder(src: Path, **overrides) -> tuple[VAEConfig, dict, Path]:
    """A diffusers AutoencoderKL folder → (config, params, weights file)."""
    from convert.io import open_state_dict

    folder = _model_folder(src)
    cfg = config_from_diffusers(_read_config(folder), file=folder / "config.json", **overrides)
    wp = weights_path(folder)
    target = wp.parent if wp.name.endswith(".index.json") else wp
    sd = open_state_dict(target)
    params = from_torch(sd, cfg, file=wp)
    return cfg, params, wp


def _cast(params: dict, dtype: str | None) -> dict:
    if dtype is None:
        return params
    from seed_story_jax.nn.params import dtype_of

    dt = np.dtype(dtype_of(dtype))
    return {k: _cast(v, dtype) if isinstance(v, dict) else np.asarray(v).astype(dt) for k, v in params.items()}


def _dtype_name(params: dict) -> str:
    dts = {np.asarray(a).dtype for _, a in leaves(params)}
    if len(dts) != 1:
        raise ConversionError(f"mixed parameter dtypes {sorted(map(str, dts))}; pass --dtype")
    name = str(dts.pop())
    if name not in ("float32", "bfloat16", "float16"):
        raise ConversionError(f"unsupported parameter dtype {name}; pass --dtype")
    return name


def import_checkpoint(src, dst, *, dtype=None, options=None) -> dict:
    from seed_story_jax.checkpoint import save_checkpoint
    from seed_story_jax.config import SeedStoryConfig
    from seed_story_jax.nn.params import count_params

    cfg, params, wp = read_folder(Path(src))
    params = _cast(params, dtype)
    pd = _dtype_name(params)
    cfg = _replace(cfg, param_dtype=pd)
    save_checkpoint(dst, SeedStoryConfig(vae=cfg), {COMPONENT: params}, kinds={COMPONENT: KIND},
                    extra={"convert_kind": KIND, "source": str(src)})
    return {"src": str(wp), "dst": str(dst), "tensors": sum(1 for _ in leaves(params)),
            "params": count_params(params), "dtype": pd}


def _replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def write_folder(cfg: VAEConfig, params: Mapping, dst, *, dtype: str | None = None) -> Path:
    """Write a diffusers AutoencoderKL folder atomically (config.json + safetensors)."""
    from convert.io import write_safetensors
    from seed_story_jax.atomic import atomic_path

    sd = to_torch(_cast(dict(params), dtype) if dtype else params, cfg)
    with atomic_path(dst, directory=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(config_to_diffusers(cfg), indent=2, sort_keys=True) + "\n")
        write_safetensors(sd, tmp / "diffusion_pytorch_model.safetensors")
    return Path(dst)


def _load(ckpt_dir) -> tuple[VAEConfig, dict]:
    from seed_story_jax.checkpoint import CheckpointError, load_component, read_config

    cfg = read_config(ckpt_dir).vae
    if cfg is None:
        raise CheckpointError(f"{ckpt_dir}: config.yaml has no vae section")
    params = load_component(ckpt_dir, COMPONENT)
    import jax

    return cfg, jax.tree.map(np.asarray, params)


def export_checkpoint(ckpt_dir, dst, *, options=None) -> dict:
    cfg, params = _load(ckpt_dir)
    dtype = getattr(options, "dtype", None)
    write_folder(cfg, params, dst, dtype=dtype)
    return {"src": str(ckpt_dir), "dst": str(dst), "tensors": sum(1 for _ in leaves(params))}


@functools.lru_cache(maxsize=8)
def _skeleton(cfg: VAEConfig):
    """(graphdef, abstract state) of the model; built once per config (tracing it takes seconds)."""
    from flax import nnx

    from seed_story_jax.models.vae import build

    with nnx.use_eager_sharding(False):
        return nnx.split(nnx.eval_shape(lambda: build(cfg, nnx.Rngs(0))))


def model_from_params(cfg: VAEConfig, params: Mapping):
    """An AutoencoderKL module holding `params` (no random init of the full model)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, abstract = _skeleton(cfg)
    state = jax.tree.map(lambda x: x, abstract)  # a fresh container; the cached one stays abstract
    state.replace_by_pure_dict(jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def verify(src, ckpt_dir, *, options=None, size: int = 64, seed: int = 0) -> dict[str, Any]:
    """diffusers' AutoencoderKL (torch, fp32) vs the port (fp32) on one random image: posterior mean,
    logvar and the decoded image. Relative max error against the reference's max magnitude."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import AutoencoderKL as TorchVAE
    from flax import nnx

    cfg, params = _load(ckpt_dir)
    cfg = dataclasses.replace(cfg, param_dtype="float32", dtype="float32", decode_dtype="float32")
    model = model_from_params(cfg, _cast(params, "float32"))
    ref = TorchVAE.from_pretrained(str(_model_folder(Path(src))), torch_dtype=torch.float32).eval()
    x = np.random.default_rng(seed).uniform(-1, 1, (1, cfg.in_channels, size, size)).astype(np.float32)
    with torch.no_grad():
        post = ref.encode(torch.from_numpy(x)).latent_dist
        want = [post.mean.numpy(), post.logvar.numpy(), ref.decode(post.mean).sample.numpy()]
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x):
        m = nnx.merge(graphdef, state)
        p = m.encode(x)
        return p.mean, p.logvar, m.decode(p.mean)

    got = [np.asarray(a).transpose(0, 3, 1, 2) for a in run(state, jnp.asarray(x.transpose(0, 2, 3, 1)))]
    max_abs = max(float(np.max(np.abs(g - w))) for g, w in zip(got, want))
    max_rel = max(float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-6)) for g, w in zip(got, want))
    tol = 1e-4
    return {"max_abs": max_abs, "max_rel": max_rel, "tolerance": tol, "ok": max_rel <= tol}
