"""Typed, frozen configuration: YAML files → nested dataclasses, `a.b=c` overrides, validation.

A YAML file may name others under `base:` (paths relative to it); they are deep-merged first, so
`george-7b.yaml` can be built from `llama2-7b.yaml` + `qwen-vit-g.yaml` + `sdxl-base.yaml`.

Each section dataclass below belongs to one model module; its owner adds fields there. Nothing here
imports jax, so `seed-story --help` and config validation stay fast.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "minimal", "save_dots", "save_qkv_proj")


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names which."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# --------------------------------------------------------------------------------------------
# Section dataclasses
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """peft-style LoRA: y = x W + (x A B) · alpha / r on the named projections."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self, where: str) -> None:
        _check(self.rank > 0, f"{where}.rank must be > 0, got {self.rank}")
        valid = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        bad = set(self.targets) - valid
        _check(not bad, f"{where}.targets: unknown projections {sorted(bad)}; valid: {sorted(valid)}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32066
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    param_dtype: str = "float32"
    dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"
    lora: Optional[LoRAConfig] = None

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def validate(self, where: str = "llm") -> None:
        _check(self.num_heads % self.num_kv_heads == 0,
               f"{where}: num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        _check(self.head_dim is not None or self.hidden_size % self.num_heads == 0,
               f"{where}: hidden_size ({self.hidden_size}) not divisible by num_heads ({self.num_heads})")
        _check(self.resolved_head_dim % 2 == 0, f"{where}: head_dim must be even for RoPE")
        _check(self.param_dtype in DTYPES, f"{where}.param_dtype must be one of {DTYPES}")
        _check(self.dtype in DTYPES, f"{where}.dtype must be one of {DTYPES}")
        _check(self.remat in REMAT_POLICIES, f"{where}.remat must be one of {REMAT_POLICIES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers"):
            _check(getattr(self, name) > 0, f"{where}.{name} must be > 0")
        if self.lora is not None:
            self.lora.validate(f"{where}.lora")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (-1 takes the rest) and the logical → mesh rules table."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1  # slices (multi-slice / multi-host data parallelism)
    rules: tuple[tuple[str, Any], ...] = (
        ("batch", ("data", "fsdp")),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("q_lora", None),
        ("lora_rank", None),
        ("norm", None),
        ("conv_in", None),
        ("conv_out", "tensor"),
        ("kernel_h", None),
        ("kernel_w", None),
        ("layers", None),
        ("queries", None),
        ("length", None),
        ("cache_batch", ("data", "fsdp")),
        ("cache_heads", "tensor"),
        ("cache_len", None),
    )

    def validate(self, where: str = "mesh") -> None:
        sizes = [self.data, self.fsdp, self.tensor]
        _check(sum(1 for s in sizes if s == -1) <= 1, f"{where}: at most one axis may be -1")
        _check(all(s == -1 or s >= 1 for s in sizes), f"{where}: axis sizes must be >= 1 or -1")


@dataclasses.dataclass(frozen=True)
class SeedStoryConfig:
    """A whole model or job: every section is optional so one file can hold just a Llama."""

    llm: Optional[LlamaConfig] = None
    mesh: MeshConfig = MeshConfig()
    name: str = ""

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value) and hasattr(value, "validate"):
                value.validate(f.name)


# --------------------------------------------------------------------------------------------
# Machinery
# --------------------------------------------------------------------------------------------


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(tp: Any, value: Any, path: str) -> Any:
    tp = _unwrap_optional(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), f"{path}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, path)
    origin = typing.get_origin(tp)
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        return tuple(_freeze(v) for v in value)
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        _check(isinstance(value, bool), f"{path}: expected true/false, got {value!r}")
        return value
    if tp is str:
        _check(isinstance(value, str), f"{path}: expected a string, got {value!r}")
        return value
    return _freeze(value)


def _freeze(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types name their path."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    _check(not unknown, f"{path or cls.__name__}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """Plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(x) for x in cfg]
    return cfg


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml_tree(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """Read a YAML config and the `base:` files it names, merged (later wins)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    _check(path.resolve() not in _seen, f"{path}: circular `base:` include")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    _check(isinstance(data, dict), f"{path}: top level must be a mapping")
    bases = data.pop("base", []) or []
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for b in bases:
        merged = _deep_merge(merged, load_yaml_tree(path.parent / b, _seen + (path.resolve(),)))
    return _deep_merge(merged, data)


def apply_overrides(tree: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """`a.b=c` overrides; values parse as YAML (`llm.num_layers=2`, `llm.lora=null`)."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        _check("=" in item, f"override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        _check(all(parts), f"override {item!r}: empty key segment")
        node = tree
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            _check(isinstance(node[p], dict), f"override {item!r}: {p} is not a section")
            node = node[p]
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: bad value: {e}") from None
    return tree


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> SeedStoryConfig:
    tree = apply_overrides(load_yaml_tree(path), overrides)
    try:
        cfg = from_dict(SeedStoryConfig, tree)
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg


def config_from_tree(tree: dict) -> SeedStoryConfig:
    cfg = from_dict(SeedStoryConfig, tree)
    cfg.validate()
    return cfg


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(name_or_path: str) -> Path:
    """`tiny` → configs/tiny.yaml; a path is taken as is."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return CONFIG_DIR / f"{name_or_path}.yaml"
