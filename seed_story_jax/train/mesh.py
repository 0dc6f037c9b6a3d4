"""The device mesh (`data`, `fsdp`, `tensor`) from MeshConfig, and multi-process start-up.

Sizes in MeshConfig are per slice (ICI); `dcn_data` slices multiply the `data` axis over the
data-centre network. One axis may be -1 and takes the devices left over. When every size is
fixed and their product is smaller than the device count, the first devices are used (so a
(1, 1, 1) mesh is the single-device run on an 8-device host).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np

from seed_story_jax.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")


def resolve_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Per-slice (data, fsdp, tensor) sizes with -1 filled in; raises ConfigError if they don't fit."""
    if cfg.dcn_data < 1 or n_devices % cfg.dcn_data:
        raise ConfigError(f"mesh.dcn_data={cfg.dcn_data} does not divide the {n_devices} devices")
    per_slice = n_devices // cfg.dcn_data
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if per_slice % fixed:
            raise ConfigError(f"mesh {tuple(sizes)}: fixed axes ({fixed}) do not divide {per_slice} devices per slice")
        sizes[sizes.index(-1)] = per_slice // fixed
    elif fixed > per_slice:
        raise ConfigError(f"mesh {tuple(sizes)} needs {fixed} devices per slice, only {per_slice} available")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence] = None):
    """A `jax.sharding.Mesh` over `devices` (default: all) with axes data, fsdp, tensor."""
    import jax
    from jax.experimental import mesh_utils
    from jax.sharding import AxisType, Mesh

    devices = list(jax.devices() if devices is None else devices)
    ici = resolve_shape(cfg, len(devices))
    n = math.prod(ici) * cfg.dcn_data
    devices = devices[:n]
    if cfg.dcn_data > 1:
        # Slices are TPU slices when the devices know theirs; otherwise each process is one. When the
        # granules do not number dcn_data (e.g. one process), consecutive device groups stand in.
        granule = not hasattr(devices[0], "slice_index")
        try:
            arr = mesh_utils.create_hybrid_device_mesh(
                ici, (cfg.dcn_data, 1, 1), devices, process_is_granule=granule, allow_split_physical_axes=True)
        except ValueError:
            arr = np.asarray(devices).reshape((cfg.dcn_data,) + ici).reshape((cfg.dcn_data * ici[0],) + ici[1:])
    elif len(devices) == 1:
        arr = np.asarray(devices).reshape(1, 1, 1)
    else:
        try:
            arr = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            arr = np.asarray(devices).reshape(ici)
    # Auto axes: shardings of parameters are given, the compiler propagates the rest.
    return Mesh(arr, AXES, axis_types=(AxisType.Auto,) * 3)


def initialize_distributed(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, auto: bool = False) -> bool:
    """Start `jax.distributed` from flags, else from the environment (JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID), else by cluster auto-detection when `auto` (TPU pods,
    SLURM, ...). Returns whether it ran. Must be called before any jax computation."""
    import jax

    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator is None and not auto:
        return False
    # CPU processes exchange collectives through gloo (ignored by GPU/TPU clients).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is not None and (num_processes is None or process_id is None):
        raise ConfigError("multi-process run: the coordinator address needs --num-processes and --process-id "
                          "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return True
