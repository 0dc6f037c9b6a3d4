"""Logical axis names → NamedShardings on a mesh, from the config's rules table (nn/sharding.py),
fitted to each array's shape: a mesh axis that does not divide a dimension is dropped for that
dimension (e.g. the 32066-row vocabulary over tensor=4), so any config compiles on any mesh."""

from __future__ import annotations

import contextlib
import contextvars
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


def fitted_spec(names, shape, mesh, rules) -> P:
    """The rules' PartitionSpec for logical `names`, fitted to `shape` as `fit_spec` does, except that
    a mesh axis a dimension cannot take stays free for a later one: the 3-channel input of a patch
    conv (`conv_in` → fsdp) leaves fsdp to its `embed` dimension instead of replicating the kernel.
    A mesh axis is still used at most once per spec."""
    if names is None:
        return P()
    table = dict(rules)
    used: set = set()
    out = []
    for i, dim in enumerate(shape):
        name = names[i] if i < len(names) else None
        target = table.get(name) if name is not None else None
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if a not in used and a in mesh.axis_names)
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = axes[:-1]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def logical_sharding(names, shape, mesh, rules) -> NamedSharding:
    return NamedSharding(mesh, fitted_spec(tuple(names) if names is not None else None, shape, mesh, rules))


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


def batch_split(sharding: NamedSharding) -> int:
    """Into how many parts the leading (example) axis is cut."""
    entry = sharding.spec[0] if len(sharding.spec) else None
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return math.prod(sharding.mesh.shape[a] for a in axes)


def batch_warning(mesh, batch_size: int, rules) -> str:
    """A message when the batch cannot be split as the rules ask (then each device holds more)."""
    want = logical_to_mesh(("batch",), rules, mesh.axis_names)[0]
    axes = () if want is None else (want,) if isinstance(want, str) else tuple(want)
    n = math.prod(mesh.shape[a] for a in axes)
    got = batch_split(batch_sharding(mesh, (batch_size,), rules))
    if got == n:
        return ""
    msg = (f"global batch {batch_size} is not a multiple of the {n} batch shards ({' × '.join(axes)}); "
           f"it is split {got} ways, so each device holds {batch_size // got} examples instead of "
           f"{batch_size / n:g}: choose a multiple of {n}")
    devices = mesh.devices.size
    g = math.gcd(batch_size, devices)
    if got < g:  # the rest of the devices can split the model instead (tensor parallelism)
        msg += f", or keep it and split it {g} ways: mesh.data=1 mesh.fsdp={g} mesh.tensor={devices // g}"
    return msg


# ------------------------------------------------------------------------------ activations

_RULES: contextvars.ContextVar = contextvars.ContextVar("seed_story_activation_rules", default=None)


@contextlib.contextmanager
def activation_rules(mesh, rules):
    """Trace under `mesh` with `rules`, so `constrain` pins activations (the train step)."""
    import jax

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
    import jax

    rules = _RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, fitted_spec(tuple(names), x.shape, mesh, rules))
