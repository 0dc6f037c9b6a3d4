"""The JAX checkpoint directory: params per component (orbax), config and tokenizer side by side.

    DIR/manifest.json      {"format": ..., "components": {name: {"kind": ...}}, ...}
    DIR/config.yaml        the SeedStoryConfig the params belong to
    DIR/params/<name>/     one component (llm, vit, unet, vae, detokenizer, ...): parts.json + part-NNNNN/
                           orbax pytrees of bounded size (see ComponentWriter); older checkpoints hold a
                           single orbax pytree there, and load the same
    DIR/tokenizer/         tokenizer files, when the model has text

Components load independently, so `encode` reads only the ViT. Params are nested dicts of arrays
shaped like `nnx.state(model, nnx.Param).to_pure_dict()`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from seed_story_jax.atomic import atomic_path
from seed_story_jax.config import SeedStoryConfig, config_from_tree, dump_config, read_yaml

FORMAT = "seed-story-jax/1"
PARTS_FORMAT = "seed-story-jax-parts/1"
PARTS_INDEX = "parts.json"
PART_BYTES = 256 * 1024**2  # one orbax save per part: bounds the host copies orbax makes while writing


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
    p = Path(path) / "config.yaml"
    return config_from_tree(read_yaml(p.read_text()) or {})


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointer()


class ComponentWriter:
    """Streams one component's params into root/params/name, a bounded part at a time.

        params/<name>/parts.json       {"format": PARTS_FORMAT, "parts": [{"dir", "paths", "bytes"}], "empty": [...]}
        params/<name>/part-00000/      an orbax pytree holding the leaves listed under that part

    Leaves are grouped in insertion order into parts of at most `part_bytes` (or one larger
    tensor alone); a full part is saved and dropped at once, so writing a model holds one part
    (plus whatever tensor the caller is building), never the whole tree. orbax's own host copies
    during a save scale with what it is given, which is why one whole-tree save cost ~0.6x extra.

    Use as a context manager: a clean exit writes parts.json (the component exists only then);
    an exception removes the component directory. `root` is normally the temporary directory of
    `checkpoint_writer`/`save_checkpoint`, which makes the whole checkpoint atomic.
    """

    def __init__(self, root: str | os.PathLike, name: str, *, part_bytes: int = PART_BYTES):
        self.dir = Path(root) / "params" / name
        if self.dir.exists():
            raise CheckpointError(f"{self.dir}: component {name!r} already written")
        self.dir.mkdir(parents=True)
        self.part_bytes = int(part_bytes)
        self._tree: dict = {}
        self._paths: list[tuple[str, ...]] = []
        self._bytes = 0
        self._parts: list[dict] = []
        self._empty: list[list[str]] = []
        self._seen: set[tuple[str, ...]] = set()
        self._closed = False

    def add(self, path: Iterable, array: Any) -> None:
        """Add one leaf at `path` (a tuple of dict keys; ints become strings on disk and ints again
        on load). An empty dict is recorded as an empty subtree."""
        if self._closed:
            raise CheckpointError(f"{self.dir}: writer already closed")
        key = tuple(str(k) for k in path)
        if not key or key in self._seen:
            raise CheckpointError(f"{self.dir}: {'empty' if not key else 'duplicate'} path {'/'.join(key)!r}")
        self._seen.add(key)
        if isinstance(array, dict):
            if array:
                raise CheckpointError(f"{self.dir}: {'/'.join(key)}: add leaves, not subtrees")
            self._empty.append(list(key))
            return
        if not (hasattr(array, "dtype") and hasattr(array, "shape")):
            array = np.asarray(array)
        n = int(array.nbytes)
        if self._paths and self._bytes + n > self.part_bytes:
            self.flush()
        _set_path(self._tree, key, array)
        self._paths.append(key)
        self._bytes += n
        if self._bytes >= self.part_bytes:
            self.flush()

    def flush(self) -> None:
        """Save the pending leaves as the next part and let them go."""
        if not self._paths:
            return
        d = self.dir / f"part-{len(self._parts):05d}"
        _checkpointer().save(d.resolve(), self._tree)
        self._parts.append({"dir": d.name, "paths": [list(p) for p in self._paths], "bytes": self._bytes})
        self._tree, self._paths, self._bytes = {}, [], 0

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        index = {"format": PARTS_FORMAT, "parts": self._parts, "empty": self._empty}
        (self.dir / PARTS_INDEX).write_text(json.dumps(index))
        self._closed = True

    def __enter__(self) -> "ComponentWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._tree, self._paths = {}, []
            shutil.rmtree(self.dir, ignore_errors=True)


def _set_path(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _leaves(tree: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, leaf) in dict order; an empty dict is yielded as a leaf so it survives the round trip."""
    if isinstance(tree, dict) and (tree or prefix):
        if not tree:
            yield prefix, tree
        for k, v in tree.items():
            yield from _leaves(v, prefix + (k,))
    elif isinstance(tree, (list, tuple)):
        raise CheckpointError(f"params tree at {'/'.join(map(str, prefix)) or '<root>'}: lists are not supported")
    elif not isinstance(tree, dict):
        yield prefix, tree


def write_component(root: Path, name: str, params: dict, *, part_bytes: int = PART_BYTES) -> None:
    """Save one component's params into root/params/name (root is being built atomically)."""
    with ComponentWriter(root, name, part_bytes=part_bytes) as w:
        for path, leaf in _leaves(params):
            w.add(path, leaf)


class CheckpointWriter:
    """The open temporary checkpoint of `checkpoint_writer`: one ComponentWriter per component."""

    def __init__(self, root: Path, part_bytes: int):
        self.root, self.part_bytes, self.components = root, part_bytes, []

    def component(self, name: str) -> ComponentWriter:
        self.components.append(name)
        return ComponentWriter(self.root, name, part_bytes=self.part_bytes)

    def write(self, name: str, params: dict) -> None:
        self.components.append(name)
        write_component(self.root, name, params, part_bytes=self.part_bytes)


@contextlib.contextmanager
def checkpoint_writer(
    path: str | os.PathLike,
    config: SeedStoryConfig,
    *,
    kinds: Optional[dict[str, str]] = None,
    tokenizer_dir: Optional[str | os.PathLike] = None,
    extra: Optional[dict] = None,
    overwrite: bool = False,
    part_bytes: int = PART_BYTES,
) -> Iterator[CheckpointWriter]:
    """Build a checkpoint atomically, streaming components in:

        with checkpoint_writer(dst, cfg) as ck, ck.component("llm") as w:
            for path, array in ...: w.add(path, array)

    Config, tokenizer and manifest are written on a clean exit, then the directory is renamed
    into place; any exception leaves nothing behind."""
    kinds = kinds or {}
    with atomic_path(path, directory=True, overwrite=overwrite) as tmp:
        ck = CheckpointWriter(tmp, part_bytes)
        yield ck
        (tmp / "config.yaml").write_text(dump_config(config))
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        manifest = {
            "format": FORMAT,
            "components": {n: {"kind": kinds.get(n, n)} for n in ck.components},
            **(extra or {}),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))


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
    with checkpoint_writer(path, config, kinds=kinds, tokenizer_dir=tokenizer_dir, extra=extra,
                           overwrite=overwrite) as ck:
        for name, params in components.items():
            ck.write(name, params)
    return Path(path)


def int_keys(tree):
    """Orbax stores every dict key as a string; nnx list indices (layer numbers) are ints again."""
    if isinstance(tree, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): int_keys(v) for k, v in tree.items()}
    return tree


def load_component(path: str | os.PathLike, name: str, target: Any = None) -> dict:
    """Restore one component (list indices back to ints). `target`: optional abstract tree
    (ShapeDtypeStruct with shardings) to restore sharded. Reads the parts layout of
    `ComponentWriter` and the older single-pytree layout alike."""
    p = Path(path) / "params" / name
    if not p.is_dir():
        raise CheckpointError(f"{Path(path)}: no component {name!r} (have: {components_of(path)})")
    if (p / PARTS_INDEX).is_file():
        return int_keys(_load_parts(p, target))
    return int_keys(_restore(p, target))


def _restore(d: Path, target: Any):
    import orbax.checkpoint as ocp

    if target is None:
        return _checkpointer().restore(d.resolve())
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    return _checkpointer().restore(d.resolve(), args=args)


def component_metadata(path: str | os.PathLike, name: str) -> dict:
    """One component's tree of orbax leaf metadata (each with .shape and .dtype), read without
    loading any array; either layout. Keys stay as stored (strings)."""
    p = Path(path) / "params" / name
    if not p.is_dir():
        raise CheckpointError(f"{Path(path)}: no component {name!r} (have: {components_of(path)})")
    dirs = [p]
    if (p / PARTS_INDEX).is_file():
        dirs = [p / part["dir"] for part in _read_index(p)["parts"]]
    out: dict = {}
    for d in dirs:
        try:
            meta = _checkpointer().metadata(d.resolve())
        except Exception as e:  # orbax raises assorted errors on a damaged directory
            raise CheckpointError(f"{d}: cannot read orbax metadata ({type(e).__name__}: {e})") from None
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        if not isinstance(tree, dict):
            raise CheckpointError(f"{d}: no pytree metadata")
        _merge(out, tree)
    return out


def _read_index(d: Path) -> dict:
    index_file = d / PARTS_INDEX
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index_file}: invalid JSON ({e})") from None
    if index.get("format") != PARTS_FORMAT:
        raise CheckpointError(f"{index_file}: format {index.get('format')!r}, expected {PARTS_FORMAT!r}")
    return index


def _lookup(tree: Any, path: Iterable[str], where: Path):
    for k in path:
        if isinstance(tree, dict) and k in tree:
            tree = tree[k]
        elif isinstance(tree, dict) and k.isdigit() and int(k) in tree:
            tree = tree[int(k)]
        else:
            raise CheckpointError(f"{where}: target has no {'/'.join(path)!r} (the checkpoint does)")
    return tree


def _load_parts(d: Path, target: Any) -> dict:
    index = _read_index(d)
    if target is not None:
        have = {tuple(p) for part in index["parts"] for p in part["paths"]}
        extra = [p for p, x in _leaves(target) if not _is_empty(x) and tuple(map(str, p)) not in have]
        if extra:
            raise CheckpointError(f"{d}: checkpoint has no {'/'.join(map(str, extra[0]))!r} (the target does)")
    out: dict = {}
    for part in index["parts"]:
        sub = None
        if target is not None:
            sub = {}
            for path in part["paths"]:
                _set_path(sub, tuple(path), _lookup(target, path, d))
        _merge(out, _restore(d / part["dir"], sub))
    for path in index.get("empty", []):
        _set_path(out, tuple(path), {})
    return out


def _is_empty(x) -> bool:
    return isinstance(x, dict) and not x


def _merge(into: dict, tree: dict) -> None:
    for k, v in tree.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


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
