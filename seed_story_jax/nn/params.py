"""Parameters with logical axis names, and dtype helpers.

Models name axes logically (`embed`, `mlp`, `heads`, ...); `nn.sharding` maps those names to mesh
axes from the config's rules table. Models never name mesh axes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str | jnp.dtype):
    if isinstance(name, str):
        try:
            return _DTYPES[name]
        except KeyError:
            raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None
    return name


def param(
    rngs: nnx.Rngs,
    init: Callable,
    shape: Sequence[int],
    names: Sequence[str | None],
    dtype,
) -> nnx.Param:
    """An nnx.Param initialised by `init(key, shape, dtype)` carrying logical axis `names`."""
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
    value = init(rngs.params(), tuple(shape), dtype_of(dtype))
    return nnx.Param(value, out_sharding=tuple(names))


def linear(
    rngs: nnx.Rngs,
    in_features: int,
    out_features: int,
    names: tuple[str | None, str | None],
    *,
    use_bias: bool = False,
    param_dtype="float32",
    dtype="float32",
    kernel_init: Callable | None = None,
) -> nnx.Linear:
    """nnx.Linear whose kernel (in, out) and bias (out,) carry logical axis names."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype_of(dtype),
        param_dtype=dtype_of(param_dtype),
        kernel_init=kernel_init or nnx.initializers.normal(0.02),
        rngs=rngs,
        kernel_metadata={"out_sharding": tuple(names)},
        bias_metadata={"out_sharding": (names[1],)},
    )


def count_params(tree) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
