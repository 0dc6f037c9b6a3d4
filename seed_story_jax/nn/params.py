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


def torch_default_init(key, shape, dtype):
    """torch's nn.Linear / nn.Conv2d default weight init (kaiming_uniform, a=√5 → U(±1/√fan_in)),
    fan_in = every axis but the last (a (in, out) kernel, or an HWIO conv kernel). The init of the
    layers whose PyTorch originals keep torch's default: it matters only for models trained from
    scratch (the tiny ones), where a fixed std 0.02 on 32-64-wide layers starts every signal ~5×
    weaker per layer than the original."""
    fan_in = 1
    for s in shape[:-1]:
        fan_in *= s
    bound = 1.0 / (fan_in ** 0.5)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def mha_in_proj_init(embed_dim: int) -> Callable:
    """nn.MultiheadAttention's in_proj_weight init, for one of its q/k/v thirds: xavier_uniform over
    the fused (3E, E) matrix, U(±√(6 / 4E))."""
    bound = (6.0 / (4 * embed_dim)) ** 0.5

    def init(key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


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
