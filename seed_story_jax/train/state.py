"""The train state and its sharded initialisation.

    TrainState(step, params, opt_state, rng)   params: the trainable parameters (fp32 master copy)
    frozen                                     everything else the model holds (pure dict)

Both are built by one `jit` whose `out_shardings` come from the parameters' logical names, so each
device creates only its own shards: the full model never exists on one host. Params trees are pure
nested dicts (`nnx.State.to_pure_dict()` layout), which orbax saves and `nnx.merge` accepts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from seed_story_jax.nn.params import dtype_of
from seed_story_jax.train import rules as R


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: Any  # int32 scalar: optimizer updates done
    params: Any  # trainable params, fp32
    opt_state: Any
    rng: Any  # uint32 raw key data (checkpointable); typed inside the step


def trainable_filter(predicate: Callable[[tuple], bool]):
    """Params chosen by `predicate`, never a FrozenParam (derived tables the models store as params)."""
    from seed_story_jax.models.resamplers import FrozenParam

    return nnx.All(nnx.Param, nnx.Not(FrozenParam), lambda path, _: predicate(tuple(path)))


def _cast_floating(tree, dtype):
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _split(model, predicate):
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(predicate), ...)
    return graphdef, trainable, frozen


def abstract_setup(build: Callable[[nnx.Rngs], nnx.Module], predicate, tx, mesh, rules, *, seed: int = 0,
                   frozen_dtype: str = ""):
    """(init function, graphdef, abstract TrainState, abstract frozen, their shardings) without
    allocating anything."""
    fdtype = dtype_of(frozen_dtype) if frozen_dtype else None

    def make_model():
        with nnx.use_eager_sharding(False):
            return build(nnx.Rngs(seed))

    def init():
        graphdef, trainable, frozen = _split(make_model(), predicate)
        params = _cast_floating(trainable.to_pure_dict(), jnp.float32)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                           rng=jax.random.key_data(jax.random.key(seed + 1)))
        return state, _cast_floating(frozen.to_pure_dict(), fdtype)

    abstract_model = nnx.eval_shape(make_model)
    graphdef, tr_abs, fr_abs = _split(abstract_model, predicate)
    param_sh = R.state_shardings(tr_abs, mesh, rules)
    frozen_sh = R.state_shardings(fr_abs, mesh, rules)
    state_abs, frozen_abs = jax.eval_shape(init)
    rep = R.replicated(mesh)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, state_abs.opt_state, param_sh,
                                   transform_non_params=lambda _: rep,
                                   is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    state_sh = TrainState(step=rep, params=param_sh, opt_state=opt_sh, rng=rep)
    return init, graphdef, state_abs, frozen_abs, state_sh, frozen_sh


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying the target shardings (orbax restores straight into them)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def overlay_params(src: dict, trainable, frozen, trainable_sh, frozen_sh, *, where: str) -> None:
    """Write the leaves of `src` (one component's pure dict, e.g. from `checkpoint.load_component`)
    into the trainable and frozen trees (in place; `trainable` may be None), each resharded and cast
    to the tree it lands in. Every leaf of those trees must be found in `src`."""
    import numpy as np

    from seed_story_jax.checkpoint import CheckpointError

    def walk(src, t, f, t_sh, f_sh, path):
        for k in set(t or {}) | set(f or {}):
            sk = k if k in src else str(k)
            if sk not in src:
                raise CheckpointError(f"{where}: missing parameter {path}/{k}")
            v = src[sk]
            tv, fv = (t or {}).get(k), (f or {}).get(k)
            if isinstance(tv, dict) or isinstance(fv, dict):
                walk(v, tv, fv, (t_sh or {}).get(k), (f_sh or {}).get(k), f"{path}/{k}")
                continue
            target, tree, sh = (tv, t, t_sh) if tv is not None else (fv, f, f_sh)
            if tuple(np.shape(v)) != tuple(target.shape):
                raise CheckpointError(f"{where}: {path}/{k} has shape {tuple(np.shape(v))}, "
                                      f"the model expects {tuple(target.shape)}")
            tree[k] = jax.device_put(np.asarray(v).astype(target.dtype), sh[k])

    walk(src, trainable, frozen, trainable_sh, frozen_sh, "")
