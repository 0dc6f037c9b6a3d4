"""NamedShardings on a mesh for states and batches, from the config's rules table and logical axis
names (the specs, fitted to each array's shape, come from nn/sharding.py), so any config compiles on
any mesh; the batch-split warning."""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from seed_story_jax.nn.sharding import fitted_spec


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
    spec = fitted_spec(("batch",), None, mesh, rules)
    want = spec[0] if len(spec) else None
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
