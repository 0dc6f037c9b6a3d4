"""Logical axis names → NamedShardings on a mesh, from the config's rules table (nn/sharding.py),
fitted to each array's shape: a mesh axis that does not divide a dimension is dropped for that
dimension (e.g. the 32066-row vocabulary over tensor=4), so any config compiles on any mesh."""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from seed_story_jax.nn.sharding import logical_to_mesh

def fit_spec(spec: P, shape, mesh) -> P:
    """Drop trailing mesh axes of a dimension until their product divides it."""
    out = []
    for i, dim in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def logical_sharding(names, shape, mesh, rules) -> NamedSharding:
    spec = logical_to_mesh(tuple(names) if names is not None else None, rules, mesh.axis_names)
    return NamedSharding(mesh, fit_spec(spec, shape, mesh))


def state_shardings(state, mesh, rules) -> Any:
    """Pure dict of NamedShardings for an (abstract) nnx.State whose variables carry `out_sharding`."""
    from flax import nnx

    logical = nnx.get_partition_spec(state).to_pure_dict()
    shapes = state.to_pure_dict()
    return jax.tree.map(
        lambda spec, x: logical_sharding(tuple(spec), x.shape, mesh, rules),
        logical, shapes, is_leaf=lambda s: isinstance(s, P))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh, shape, rules) -> NamedSharding:
    """Examples split as the rules map `batch` (data × fsdp by default), fitted to the batch size."""
    names = ("batch",) + (None,) * (len(shape) - 1)
    return logical_sharding(names, shape, mesh, rules)
