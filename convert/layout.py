"""Array layouts between torch and the port: Linear (out, in) ↔ kernel (in, out); Conv2d OIHW ↔ HWIO.

Shape alone decides (2-D: linear, 4-D: conv, anything else unchanged), which holds for the diffusers
families (UNet, VAE, resamplers) converted through these functions."""

from __future__ import annotations

import numpy as np


def to_jax_layout(x: np.ndarray) -> np.ndarray:
    if x.ndim == 4:  # OIHW → HWIO
        return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
    if x.ndim == 2:  # (out, in) → (in, out)
        return np.ascontiguousarray(x.T)
    return x


def to_torch_layout(x: np.ndarray) -> np.ndarray:
    if x.ndim == 4:  # HWIO → OIHW
        return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    if x.ndim == 2:
        return np.ascontiguousarray(x.T)
    return x


def torch_shape(shape: tuple) -> tuple:
    """The torch shape of a port array of `shape`."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def leaves(tree, prefix: tuple = ()):
    """(path tuple, leaf) of a nested-dict params tree, in insertion order."""
    from collections.abc import Mapping

    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v
