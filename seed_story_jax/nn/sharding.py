"""Logical axis names → mesh PartitionSpecs, from the config's rules table."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P


def logical_to_mesh(names: Sequence[str | None] | None, rules: Iterable[tuple[str, Any]], mesh_axes=None) -> P:
    """Map one logical spec to a PartitionSpec. A mesh axis is used at most once per spec (the first
    logical dim that claims it wins); axes absent from `mesh_axes` are dropped."""
    if names is None:
        return P()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in names:
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if a not in used and (mesh_axes is None or a in mesh_axes))
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def state_partition_specs(state: nnx.State, rules, mesh_axes=None):
    """PartitionSpecs (mesh axes) for every variable of an nnx state, from its logical names."""
    logical = nnx.get_partition_spec(state)
    return jax.tree.map(
        lambda s: logical_to_mesh(tuple(s) if s is not None else None, rules, mesh_axes),
        logical,
        is_leaf=lambda x: isinstance(x, P) or x is None,
    )
