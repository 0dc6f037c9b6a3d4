"""The SEED-X / SEED-Story de-tokenizer checkpoint (`pytorch_model.bin` of `SDXLAdapter`) ↔ JAX.

The file holds `resampler.*` (ResamplerXLV2, spec §4.2) and `unet.*` (diffusers UNet keys, spec
§4.3). The original loads it with strict=False over the stock SDXL UNet, so the UNet part may be
anything from the trained K/V projections to the whole UNet: it is laid over a base, reported key
by key count, and the keys it held are remembered so export writes the same set back.

    seed-story convert --kind detokenizer pytorch_model.bin OUT --base SDXL_DIR   # or a JAX checkpoint
    seed-story convert OUT EXPORT_DIR        # → EXPORT_DIR/pytorch_model.bin (resampler.* + unet.*)

The output checkpoint has the components `detokenizer` (ResamplerXLV2), `unet` and, when the base
has one, `vae`, plus the base's scheduler config: everything `Detokenizer` needs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from convert.layout import leaves, to_jax_layout, torch_shape
from convert.resamplers import xlv2_from_torch, xlv2_keys, xlv2_to_torch
from seed_story_jax.config import (DetokenizerConfig, ResamplerXLV2Config, SchedulerConfig, SeedStoryConfig,
                                   UNetConfig)
from seed_story_jax.errors import ConversionError

KIND = "detokenizer"
RES = "resampler."
UNET = "unet."
WEIGHT_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.safetensors",
                "model.safetensors.index.json")
_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


# --------------------------------------------------------------------------------------------
# pure parts
# --------------------------------------------------------------------------------------------


def infer_resampler_config(shape_of, keys, base: Optional[ResamplerXLV2Config] = None) -> ResamplerXLV2Config:
    """ResamplerXLV2 sizes from the tensor shapes; the head split (not visible in shapes) and the
    rest from `base` (default: SEED-X's, dim_head 64)."""
    base = base or ResamplerXLV2Config()

    def shp(k):
        if RES + k not in keys:
            raise ConversionError("missing tensor", key=RES + k)
        return tuple(shape_of(RES + k))

    _, q, d = shp("latents")
    depth = len({k.split(".")[2] for k in keys if k.startswith(RES + "layers.")})
    inner = shp("layers.0.0.to_q.weight")[0]
    if inner % base.dim_head:
        raise ConversionError(f"to_q has {inner} outputs, not a multiple of dim_head {base.dim_head}",
                              key=RES + "layers.0.0.to_q.weight")
    return dataclasses.replace(
        base, dim=d, depth=depth, heads=inner // base.dim_head, num_queries=q,
        embedding_dim=shp("proj_in.weight")[1], output1_dim=shp("unet_proj_1.weight")[0],
        output2_dim=shp("unet_proj_2.weight")[0], ff_mult=shp("layers.0.1.1.weight")[0] // d)



def _unet_key_paths(ucfg: UNetConfig) -> dict[str, tuple[tuple, tuple]]:
    """diffusers key → (JAX path, JAX shape) for every UNet parameter."""
    import convert.unet as cu

    return {cu.torch_key(p): (p, tuple(x.shape)) for p, x in leaves(cu.abstract_params(ucfg))}


def _copy_tree(tree):
    return {k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def from_torch(state_dict: Mapping, cfg: SeedStoryConfig, *, base_unet: Optional[Mapping] = None,
               file=None) -> tuple[dict, dict]:
    """(SDXLAdapter state dict, config[, base UNet params]) → ({"detokenizer", "unet"?}, report).

    Every `resampler.*` tensor must be present. `unet.*` tensors are laid over `base_unet`; with no
    base they must be the whole UNet. Keys outside both prefixes, unknown UNet keys and wrong
    shapes are refused with the key named."""
    from convert.io import check_keys

    keys = list(state_dict)
    other = [k for k in keys if not (k.startswith(RES) or k.startswith(UNET))]
    if other:
        raise ConversionError(f"{len(other)} tensor(s) belong to neither resampler.* nor unet.*: "
                              f"{', '.join(other[:8])}", file=file, key=other[0])
    rcfg = cfg.detokenizer.resampler
    res_keys = [k for k in keys if k.startswith(RES)]
    res_sd = {k: np.asarray(state_dict[k]) for k in res_keys}
    check_keys(xlv2_keys(rcfg, RES), res_sd, file)
    out = {"detokenizer": xlv2_from_torch(res_sd, rcfg, RES)}
    report: dict[str, Any] = {"resampler_tensors": len(res_keys)}

    unet_keys = [k for k in keys if k.startswith(UNET)]
    if unet_keys or base_unet is not None:
        if cfg.unet is None:
            raise ConversionError("the checkpoint has unet.* tensors but the config has no unet section", file=file)
        table = _unet_key_paths(cfg.unet)
        names = [k[len(UNET):] for k in unet_keys]
        unknown = [UNET + n for n in names if n not in table]
        if unknown:
            raise ConversionError(f"{len(unknown)} unet tensor(s) the UNet config does not have: "
                                  f"{', '.join(unknown[:8])}", file=file, key=unknown[0])
        if base_unet is None and len(names) != len(table):
            missing = [UNET + n for n in table if n not in set(names)]
            raise ConversionError(f"the file holds {len(names)} of the UNet's {len(table)} tensors; pass "
                                  f"--base (an SDXL directory or a JAX checkpoint) to lay them over",
                                  file=file, key=missing[0])
        unet = _copy_tree(base_unet) if base_unet is not None else {}
        for n in names:
            path, jshape = table[n]
            a = np.asarray(state_dict[UNET + n])
            got = to_jax_layout(a)
            if tuple(got.shape) != jshape:
                raise ConversionError(f"tensor has shape {tuple(a.shape)}, expected {torch_shape(jshape)}",
                                      file=file, key=UNET + n)
            _set(unet, path, got)
        out["unet"] = unet
        kv = sum(1 for n in names if n.rsplit(".", 2)[-2] in ("to_k", "to_v"))
        report.update(unet_tensors_overlaid=len(names), unet_kv_tensors_overlaid=kv,
                      unet_tensors_from_base=len(table) - len(names))
    return out, report


def to_torch(params: Mapping, cfg: SeedStoryConfig, *, unet_keys: Optional[list[str]] = None) -> dict[str, np.ndarray]:
    """{"detokenizer", "unet"?} params → SDXLAdapter state dict. `unet_keys` (diffusers names, no
    prefix) limits the UNet part to those tensors, e.g. the set the source file held."""
    import convert.unet as cu

    sd = xlv2_to_torch(params["detokenizer"], cfg.detokenizer.resampler, RES)
    if "unet" in params:
        unet = cu.to_torch(params["unet"], cfg.unet)
        names = list(unet) if unet_keys is None else unet_keys
        missing = [n for n in names if n not in unet]
        if missing:
            raise ConversionError(f"the checkpoint's UNet has no tensor {missing[0]!r}", key=UNET + missing[0])
        sd.update({UNET + n: unet[n] for n in names})
    return sd


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def weights_file(src) -> Path:
    src = Path(src)
    if src.is_file():
        return src
    for name in WEIGHT_NAMES:
        if (src / name).is_file():
            return src / name
    raise ConversionError(f"{src}: no {' / '.join(WEIGHT_NAMES)}", file=src)


def detect(src) -> bool:
    from convert.io import open_state_dict

    src = Path(src)
    if src.is_file() and not src.name.endswith(_SUFFIXES + (".index.json",)):
        return False
    try:
        sd = open_state_dict(weights_file(src))
        return any(k.startswith(RES + "latents") for k in sd)
    except Exception:  # anything unreadable is simply not ours
        return False


def _numpy(tree):
    import jax

    return jax.tree.map(np.asarray, tree)




def read_base(base) -> tuple[SeedStoryConfig, dict]:
    """`--base`: an SDXL-layout directory (unet/, vae/, scheduler/) or a JAX checkpoint → (config
    with unet/vae/scheduler[/detokenizer] sections, {"unet", "vae"?} numpy params)."""
    import convert.unet as cu
    import convert.vae as cv
    from seed_story_jax.checkpoint import components_of, is_checkpoint, load_component, read_config
    from seed_story_jax.schedulers import load_scheduler_config

    base = Path(base)
    if is_checkpoint(base):
        cfg = read_config(base)
        have = components_of(base)
        if "unet" not in have or cfg.unet is None:
            raise ConversionError(f"{base}: the base checkpoint has no unet", file=base)
        params = {n: _numpy(load_component(base, n)) for n in ("unet", "vae") if n in have}
        return cfg, params
    if not (base / "unet" / "config.json").is_file():
        raise ConversionError(f"{base}: not an SDXL directory (no unet/config.json) nor a JAX checkpoint", file=base)
    ucfg, unet = cu.load_folder(base / "unet")
    params = {"unet": unet}
    vcfg = None
    if (base / "vae" / "config.json").is_file():
        vcfg, params["vae"], _ = cv.read_folder(base / "vae")
    scfg = load_scheduler_config(base / "scheduler") if (base / "scheduler").is_dir() else SchedulerConfig()
    return SeedStoryConfig(unet=ucfg, vae=vcfg, scheduler=scfg), params


def _cast(tree, dtype: Optional[str]):
    if dtype is None:
        return tree
    from seed_story_jax.nn.params import dtype_of

    dt = np.dtype(dtype_of(dtype))
    return {k: _cast(v, dtype) if isinstance(v, Mapping) else np.asarray(v).astype(dt) for k, v in tree.items()}


def _dtype_name(tree) -> str:
    dts = {str(np.asarray(a).dtype) for _, a in leaves(tree)}
    if len(dts) != 1:
        raise ConversionError(f"mixed parameter dtypes {sorted(dts)}; pass --dtype")
    return dts.pop()


def import_checkpoint(src, dst, *, dtype=None, options=None) -> dict:
    from convert.io import open_state_dict
    from seed_story_jax.checkpoint import save_checkpoint

    wf = weights_file(src)
    sd = open_state_dict(wf)
    base_dir = getattr(options, "base", None)
    if base_dir:
        bcfg, bparams = read_base(base_dir)
    else:
        bcfg, bparams = SeedStoryConfig(unet=UNetConfig(), scheduler=SchedulerConfig()), {}
    dcfg = bcfg.detokenizer or DetokenizerConfig()
    keys = list(sd)
    rcfg = infer_resampler_config(sd.shape, keys, dcfg.resampler)
    cfg = dataclasses.replace(bcfg, detokenizer=dataclasses.replace(dcfg, resampler=rcfg))
    params, report = from_torch(sd, cfg, base_unet=bparams.get("unet"), file=wf)
    if "vae" in bparams:
        params["vae"] = bparams["vae"]
    # One dtype per component: --dtype, else the resampler's own and the base UNet's (an overlay in
    # another dtype is cast to the base's, as the original loads it into the base model).
    params["detokenizer"] = _cast(params["detokenizer"], dtype)
    if "unet" in params:
        unet_dtype = dtype or (_dtype_name(bparams["unet"]) if "unet" in bparams else None)
        params["unet"] = _cast(params["unet"], unet_dtype)
    if "vae" in params:
        params["vae"] = _cast(params["vae"], dtype)
    sections = {"detokenizer": dataclasses.replace(cfg.detokenizer, resampler=dataclasses.replace(
        rcfg, param_dtype=_param_dtype(params["detokenizer"])))}
    if "unet" in params:
        sections["unet"] = dataclasses.replace(cfg.unet, param_dtype=_param_dtype(params["unet"]))
    if "vae" in params:
        sections["vae"] = dataclasses.replace(cfg.vae, param_dtype=_param_dtype(params["vae"]))
    cfg = dataclasses.replace(cfg, **sections)
    unet_src_keys = [k[len(UNET):] for k in keys if k.startswith(UNET)]
    save_checkpoint(dst, cfg, params, kinds={n: KIND if n == "detokenizer" else n for n in params},
                    extra={"convert_kind": KIND, "source": str(wf), "base": str(base_dir) if base_dir else None,
                           "source_unet_keys": unet_src_keys})
    report.update(src=str(wf), dst=str(dst), base=str(base_dir) if base_dir else None,
                  components=sorted(params), resampler=dataclasses.asdict(rcfg))
    return report


def _param_dtype(tree) -> str:
    name = _dtype_name(tree)
    if name not in ("float32", "bfloat16", "float16"):
        raise ConversionError(f"unsupported parameter dtype {name}; pass --dtype")
    return name


def export_checkpoint(ckpt_dir, dst, *, options=None) -> dict:
    """JAX checkpoint → DST/pytorch_model.bin (DST a directory) or DST itself (a .bin/.pt path),
    with the resampler and the UNet tensors the source file held (all of them if unknown)."""
    from convert.io import write_torch_pickle
    from seed_story_jax.atomic import atomic_path
    from seed_story_jax.checkpoint import components_of, load_component, read_config, read_manifest

    manifest = read_manifest(ckpt_dir)
    cfg = read_config(ckpt_dir)
    if cfg.detokenizer is None or "detokenizer" not in components_of(ckpt_dir):
        raise ConversionError(f"{ckpt_dir}: no detokenizer component", file=ckpt_dir)
    names = ["detokenizer"] + (["unet"] if "unet" in components_of(ckpt_dir) else [])
    params = {n: _numpy(load_component(ckpt_dir, n)) for n in names}
    unet_keys = manifest.get("source_unet_keys")
    sd = to_torch(params, cfg, unet_keys=unet_keys)
    dtype = getattr(options, "dtype", None)
    if dtype:
        sd = _cast(sd, dtype)
    dst = Path(dst)
    if dst.suffix in _SUFFIXES[:3]:
        write_torch_pickle(sd, dst)
        out = dst
    else:
        with atomic_path(dst, directory=True) as tmp:
            write_torch_pickle(sd, tmp / "pytorch_model.bin")
        out = dst / "pytorch_model.bin"
    return {"src": str(ckpt_dir), "dst": str(out), "tensors": len(sd),
            "unet_tensors": sum(1 for k in sd if k.startswith(UNET))}


# --------------------------------------------------------------------------------------------
# verify: torch references vs the port, fp32, same random inputs
# --------------------------------------------------------------------------------------------


def verify(src, ckpt_dir, *, options=None) -> dict:
    """ResamplerXLV2: the spec's torch reference loaded from SRC's `resampler.*` vs the checkpoint;
    UNet: diffusers' UNet2DConditionModel with the checkpoint's exported weights vs the port."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    import convert.unet as cu
    from convert.io import open_state_dict
    from convert.torch_ref.resamplers import ResamplerXLV2 as TorchXLV2
    from seed_story_jax.checkpoint import components_of, load_component, read_config
    from seed_story_jax.models.resamplers import ResamplerXLV2

    cfg = read_config(ckpt_dir)
    rcfg = dataclasses.replace(cfg.detokenizer.resampler, param_dtype="float32", dtype="float32")
    sd = open_state_dict(weights_file(src))
    ref = TorchXLV2(rcfg.dim, rcfg.depth, rcfg.dim_head, rcfg.heads, rcfg.num_queries, rcfg.embedding_dim,
                    rcfg.output1_dim, rcfg.output2_dim, rcfg.ff_mult).eval()
    ref.load_state_dict({k[len(RES):]: torch.from_numpy(np.array(sd[k], np.float32)) for k in sd
                         if k.startswith(RES)})
    x = np.random.default_rng(0).standard_normal((2, 256 if rcfg.embedding_dim >= 1024 else 16,
                                                  rcfg.embedding_dim)).astype(np.float32)
    with torch.no_grad():
        want = [a.numpy() for a in ref(torch.from_numpy(x))]
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: ResamplerXLV2(rcfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    p = _numpy(load_component(ckpt_dir, "detokenizer"))
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p))
    with jax.default_matmul_precision("highest"):
        got = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    errs = [_rel(g, w) for g, w in zip(got, want)]
    result = {"resampler_max_rel": max(e[1] for e in errs)}
    max_abs, max_rel = max(e[0] for e in errs), result["resampler_max_rel"]
    if "unet" in components_of(ckpt_dir):
        from diffusers import UNet2DConditionModel

        ucfg = cfg.unet
        tmodel = UNet2DConditionModel.from_config(cu.config_to_diffusers(ucfg)).eval()
        uparams = _numpy(load_component(ckpt_dir, "unet"))
        tmodel.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32))
                                for k, v in cu.to_torch(uparams, ucfg).items()})
        size = 8 * 2 ** (len(ucfg.block_out_channels) - 1) if ucfg.block_out_channels[0] >= 320 else 16
        inputs = cu.random_inputs(ucfg, size=size)
        ua, ur = _rel(cu.run_jax(ucfg, uparams, inputs), cu.run_torch(tmodel, inputs))
        result["unet_max_rel"] = ur
        max_abs, max_rel = max(max_abs, ua), max(max_rel, ur)
    tol = 1e-4
    result.update(max_abs=max_abs, max_rel=max_rel, tolerance=tol, ok=bool(max_rel <= tol))
    return result


def _rel(got, want) -> tuple[float, float]:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    a = float(np.max(np.abs(got - want)))
    return a, a / max(float(np.max(np.abs(want))), 1e-12)
