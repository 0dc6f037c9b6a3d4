"""Checkpoint converters, one module per family, each mirroring its model module.

A converter module defines:
    KIND: str
    detect(src: Path) -> bool                     is SRC a torch-format source of this kind?
    from_torch(state_dict, config) -> params      pure, numpy in / numpy out
    to_torch(params, config) -> state_dict        pure, the inverse (bit-exact)
    import_checkpoint(src, dst, *, dtype, options) -> dict   reader + from_torch + writer; a report
    export_checkpoint(ckpt_dir, dst, *, options) -> dict     loader + to_torch + writer
    verify(src, ckpt_dir, *, options) -> dict     torch reference vs port on the same random input:
                                                  {"max_abs": .., "max_rel": .., "tolerance": .., "ok": bool}
`options` is the argparse namespace of `seed-story convert` (base, keep_lora, ...).
"""

from __future__ import annotations

import importlib
from pathlib import Path

KINDS = {
    "llama": "convert.llama",
    "vit": "convert.vit",
    "unet": "convert.unet",
    "vae": "convert.vae",
    "sdxl": "convert.sdxl",
    "detokenizer": "convert.detokenizer",
    "agent": "convert.agent",
}


def available_kinds() -> list[str]:
    out = []
    for kind, mod in KINDS.items():
        try:
            importlib.import_module(mod)
            out.append(kind)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    return out


def converter(kind: str):
    from seed_story_jax.errors import ConversionError

    if kind not in KINDS:
        raise ConversionError(f"unknown kind {kind!r}; known: {sorted(KINDS)}")
    try:
        return importlib.import_module(KINDS[kind])
    except ModuleNotFoundError as e:
        if e.name == KINDS[kind]:
            raise ConversionError(f"kind {kind!r} has no converter yet") from None
        raise


def detect_kind(src: Path) -> str:
    from seed_story_jax.errors import ConversionError

    src = Path(src)
    if not src.exists():
        raise ConversionError(f"{src}: no such file or directory", file=src)
    hits = [k for k in available_kinds() if converter(k).detect(src)]
    if not hits:
        raise ConversionError(f"{src}: cannot tell what checkpoint this is; pass --kind", file=src)
    if len(hits) > 1:
        raise ConversionError(f"{src}: ambiguous checkpoint ({', '.join(hits)}); pass --kind", file=src)
    return hits[0]
