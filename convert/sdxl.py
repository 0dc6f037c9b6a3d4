"""The SDXL base layout (model_index.json, unet/, vae/, scheduler/) ↔ one JAX checkpoint.

Components `unet` (convert.unet) and `vae` (convert.vae); the scheduler's settings go to the config's
`scheduler:` section (no tensors). Text encoders and tokenizers are not part of the de-tokenizer and
are neither read nor written: the export's model_index.json names them null, so
`StableDiffusionXLPipeline.from_pretrained(export)` loads with them set to None.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from seed_story_jax.config import SchedulerConfig, SeedStoryConfig
from seed_story_jax.errors import ConversionError

KIND = "sdxl"
PIPELINE = "StableDiffusionXLPipeline"


def _read_index(src: Path) -> dict:
    p = src / "model_index.json"
    if not p.is_file():
        raise ConversionError(f"{src}: no model_index.json (not a diffusers pipeline folder)", file=p)
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"invalid JSON: {e}", file=p) from None
    if not isinstance(d, dict):
        raise ConversionError("top level must be an object", file=p)
    return d


def detect(src: Path) -> bool:
    src = Path(src)
    try:
        d = _read_index(src)
    except ConversionError:
        return False
    return str(d.get("_class_name", "")).startswith("StableDiffusionXL") and (src / "unet").is_dir()


def _need(src: Path, name: str) -> Path:
    p = src / name
    if not (p / "config.json").is_file():
        raise ConversionError(f"{src}: no {name}/config.json", file=p)
    return p


def read_pipeline(src, dtype=None) -> tuple[SeedStoryConfig, dict]:
    """An SDXL folder → (config with unet/vae/scheduler sections, {"unet": params, "vae": params})."""
    from convert import unet as CU
    from convert import vae as CV
    from seed_story_jax.schedulers import load_scheduler_config

    src = Path(src)
    index = _read_index(src)
    ucfg, uparams = CU.load_folder(_need(src, "unet"), dtype)
    vcfg, vparams, _ = CV.read_folder(_need(src, "vae"))
    if dtype is not None:
        vparams = CU.cast(vparams, dtype)
    scfg = load_scheduler_config(src / "scheduler") if (src / "scheduler").is_dir() else SchedulerConfig()
    ucfg = dataclasses.replace(ucfg, param_dtype=_dtype_name(uparams, "unet"))
    vcfg = dataclasses.replace(vcfg, param_dtype=_dtype_name(vparams, "vae"))
    name = str(index.get("_name_or_path") or src.name)
    return SeedStoryConfig(unet=ucfg, vae=vcfg, scheduler=scfg, name=name), {"unet": uparams, "vae": vparams}


def _dtype_name(params, what: str) -> str:
    from convert.layout import leaves

    dts = {str(np.asarray(x).dtype) for _, x in leaves(params)}
    if len(dts) != 1 or next(iter(dts)) not in ("float32", "bfloat16", "float16"):
        raise ConversionError(f"{what}: parameter dtypes {sorted(dts)}; pass --dtype")
    return dts.pop()


def import_checkpoint(src, dst, *, dtype=None, options=None) -> dict:
    from convert.layout import leaves
    from seed_story_jax.checkpoint import save_checkpoint

    cfg, comps = read_pipeline(src, dtype)
    save_checkpoint(dst, cfg, comps, kinds={"unet": "unet", "vae": "vae"},
                    extra={"convert_kind": KIND, "source": str(src)})
    count = {k: sum(int(np.prod(np.shape(x))) for _, x in leaves(v)) for k, v in comps.items()}
    return {"src": str(src), "dst": str(dst), "unet_params": count["unet"], "vae_params": count["vae"],
            "dtype": cfg.unet.param_dtype}


def model_index() -> dict:
    return {
        "_class_name": PIPELINE,
        "_diffusers_version": "0.42.1",
        "force_zeros_for_empty_prompt": True,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": [None, None],
        "text_encoder_2": [None, None],
        "tokenizer": [None, None],
        "tokenizer_2": [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def write_pipeline(dst, cfg: SeedStoryConfig, comps: dict) -> Path:
    """Write the SDXL layout atomically (nothing at `dst` unless everything was written)."""
    from convert import unet as CU
    from convert import vae as CV
    from seed_story_jax.atomic import atomic_path
    from seed_story_jax.schedulers import save_scheduler_config

    with atomic_path(dst, directory=True) as tmp:
        (tmp / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")
        CU.write_folder(tmp / "unet", cfg.unet, comps["unet"])
        CV.write_folder(cfg.vae, comps["vae"], tmp / "vae")
        save_scheduler_config(cfg.scheduler or SchedulerConfig(), tmp / "scheduler")
    return Path(dst)


def export_checkpoint(ckpt_dir, dst, *, options=None) -> dict:
    from convert.unet import _numpy_tree
    from seed_story_jax.checkpoint import load_checkpoint

    ck = load_checkpoint(ckpt_dir, ["unet", "vae"])
    if ck.config.unet is None or ck.config.vae is None:
        raise ConversionError(f"{ckpt_dir}: config.yaml needs unet and vae sections", file=ckpt_dir)
    comps = {k: _numpy_tree(v) for k, v in ck.params.items()}
    write_pipeline(dst, ck.config, comps)
    return {"src": str(ckpt_dir), "dst": str(dst)}


def verify(src, ckpt_dir, *, options=None) -> dict:
    """UNet and VAE each against diffusers (fp32, random inputs); the worse of the two decides."""
    from convert import unet as CU
    from convert import vae as CV

    src = Path(src)
    u = CU.verify(src / "unet", ckpt_dir, options=options)
    v = CV.verify(src / "vae", ckpt_dir, options=options)
    return {"max_abs": max(u["max_abs"], v["max_abs"]), "max_rel": max(u["max_rel"], v["max_rel"]),
            "tolerance": min(u["tolerance"], v["tolerance"]), "ok": bool(u["ok"] and v["ok"]),
            "unet": u, "vae": v}
