"""Logical axis names → mesh PartitionSpecs from the config's rules table, fitted to each array's
shape (a mesh axis that does not divide a dimension is dropped for it: the 32066-row vocabulary over
tensor=4), and the activation constraints models place by those names while the train step traces
under `activation_rules`. train/rules.py builds NamedShardings for states and batches from these."""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
from jax.sharding import PartitionSpec as P


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


def fitted_spec(names, shape, mesh, rules) -> P:
    """The rules' PartitionSpec for logical `names`, fitted to `shape` as `fit_spec` does, except that
    a mesh axis a dimension cannot take stays free for a later one: the 3-channel input of a patch
    conv (`conv_in` → fsdp) leaves fsdp to its `embed` dimension instead of replicating the kernel.
    A mesh axis is still used at most once per spec. `shape` None: the rules' spec, unfitted."""
    if names is None:
        return P()
    table = dict(rules)
    used: set = set()
    out = []
    for i, dim in enumerate((None,) * len(names) if shape is None else shape):
        name = names[i] if i < len(names) else None
        target = table.get(name) if name is not None else None
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if a not in used and a in mesh.axis_names)
        while axes and dim is not None and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


# ------------------------------------------------------------------------------ activations

_RULES: contextvars.ContextVar = contextvars.ContextVar("seed_story_activation_rules", default=None)


@contextlib.contextmanager
def activation_rules(mesh, rules):
    """Trace under `mesh` with `rules`, so `constrain` pins activations (the train step)."""
    token = _RULES.set(tuple(rules))
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _RULES.reset(token)


def constrain(x, names):
    """Pin an activation's sharding by logical names (fitted to its shape); a no-op outside
    `activation_rules`. Without it GSPMD may follow a weight's sharding instead: the embedding
    lookup would leave activations split over `embed` and the batch replicated on every device."""
    rules = _RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, fitted_spec(tuple(names), x.shape, mesh, rules))
