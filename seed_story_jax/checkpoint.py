"""The JAX checkpoint directory: params per component (orbax), config and tokenizer side by side.

    DIR/manifest.json      {"format": ..., "components": {name: {"kind": ...}}, ...}
    DIR/config.yaml        the SeedStoryConfig the params belong to
    DIR/params/<name>/     one orbax pytree per component (llm, vit, unet, vae, detokenizer, ...)
    DIR/tokenizer/         tokenizer files, when the model has text

Components load independently, so `encode` reads only the ViT. Params are nested dicts of arrays
shaped like `nnx.state(model, nnx.Param).to_pure_dict()`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from seed_story_jax.atomic import atomic_path
from seed_story_jax.config import SeedStoryConfig, config_from_tree, dump_config

FORMAT = "seed-story-jax/1"


class CheckpointError(ValueError):
    pass


@dataclasses.dataclass
class Checkpoint:
    path: Path
    config: SeedStoryConfig
    params: dict[str, Any]
    manifest: dict

    @property
    def tokenizer_dir(self) -> Optional[Path]:
        p = self.path / "tokenizer"
        return p if p.is_dir() else None


def is_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "manifest.json").is_file() and (p / "config.yaml").is_file()


def read_manifest(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not is_checkpoint(p):
        raise CheckpointError(f"{p}: not a seed-story-jax checkpoint (no manifest.json/config.yaml)")
    manifest = json.loads((p / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{p}/manifest.json: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def read_config(path: str | os.PathLike) -> SeedStoryConfig:
    import yaml

    p = Path(path) / "config.yaml"
    return config_from_tree(yaml.safe_load(p.read_text()) or {})


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointer()


def write_component(root: Path, name: str, params: dict) -> None:
    """Save one component's params into root/params/name (root is being built atomically)."""
    target = root / "params" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    tree = _to_saveable(params)
    _checkpointer().save(target.resolve(), tree)


def _to_saveable(tree):
    import jax

    return jax.tree.map(lambda x: x if hasattr(x, "dtype") else np.asarray(x), tree)


def save_checkpoint(
    path: str | os.PathLike,
    config: SeedStoryConfig,
    components: dict[str, dict],
    *,
    kinds: Optional[dict[str, str]] = None,
    tokenizer_dir: Optional[str | os.PathLike] = None,
    extra: Optional[dict] = None,
    overwrite: bool = False,
) -> Path:
    """Write a complete checkpoint atomically. `components`: name → params tree."""
    kinds = kinds or {}
    with atomic_path(path, directory=True, overwrite=overwrite) as tmp:
        for name, params in components.items():
            write_component(tmp, name, params)
        (tmp / "config.yaml").write_text(dump_config(config))
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        manifest = {
            "format": FORMAT,
            "components": {n: {"kind": kinds.get(n, n)} for n in components},
            **(extra or {}),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return Path(path)


def int_keys(tree):
    """Orbax stores every dict key as a string; nnx list indices (layer numbers) are ints again."""
    if isinstance(tree, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): int_keys(v) for k, v in tree.items()}
    return tree


def load_component(path: str | os.PathLike, name: str, target: Any = None) -> dict:
    """Restore one component (list indices back to ints). `target`: optional abstract tree
    (ShapeDtypeStruct with shardings) to restore sharded."""
    p = Path(path) / "params" / name
    if not p.is_dir():
        raise CheckpointError(f"{Path(path)}: no component {name!r} (have: {components_of(path)})")
    import orbax.checkpoint as ocp

    if target is None:
        return int_keys(_checkpointer().restore(p.resolve()))
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    return int_keys(_checkpointer().restore(p.resolve(), args=args))


def components_of(path: str | os.PathLike) -> list[str]:
    d = Path(path) / "params"
    return sorted(x.name for x in d.iterdir() if x.is_dir()) if d.is_dir() else []


def load_checkpoint(path: str | os.PathLike, components: Optional[Iterable[str]] = None) -> Checkpoint:
    p = Path(path)
    manifest = read_manifest(p)
    config = read_config(p)
    names = list(components) if components is not None else list(manifest["components"])
    params = {n: load_component(p, n) for n in names}
    return Checkpoint(path=p, config=config, params=params, manifest=manifest)
