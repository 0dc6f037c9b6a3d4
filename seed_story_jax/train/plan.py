"""AOT memory plan: compile the real train step for a machine we do not have and read its bytes.

TPU slices are described without hardware (`jax.experimental.topologies.get_topology_desc`, which
needs libtpu: `pip install 'seed-story-jax[tpu]'`); the train step is lowered with abstract inputs
(ShapeDtypeStructs) and compiled for those devices, and `memory_analysis()` gives per-chip bytes.
GPU counts (`h100x8`) compile on local GPUs when there are enough, else on as many virtual CPU
devices (a proxy: XLA:CPU fuses differently, so temporaries are indicative only).

Names: v4-N and v5p-N count TensorCores (2 per chip, one megacore device per chip); v5e-N and v6e-N
count chips; hNNNxK / aNNNxK are K GPUs.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Optional

GIB = 1 << 30

# generation → (HBM bytes per chip, TensorCores per chip in the name, 3-D torus)
TPU = {
    "v4": (32 * GIB, 2, True),
    "v5p": (95 * GIB, 2, True),
    "v5e": (16 * GIB, 1, False),
    "v6e": (32 * GIB, 1, False),
}
GPU_HBM = {"h100": 80 * GIB, "h200": 141 * 10**9, "a100": 80 * GIB}

LIBTPU_HINT = ("planning for TPU needs libtpu, which this environment lacks. Install it in a separate "
               "environment: python -m venv .venv-tpu && .venv-tpu/bin/pip install -e '.[tpu]' "
               "(or: pip install 'jax[tpu]==0.10.2'), then run `.venv-tpu/bin/seed-story plan ...`")


class PlanError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    platform: str  # "tpu" | "gpu"
    chips: int
    hbm_bytes: int
    topology_name: Optional[str] = None  # e.g. "v5p:4x4x4"
    chip_config: str = "default"
    host_bounds: tuple = (2, 2, 1)


def _torus(chips: int, dims: int) -> tuple[int, ...]:
    """Most balanced power-of-two torus with `chips` chips (smaller dims first, as TPU names read)."""
    if chips & (chips - 1):
        raise PlanError(f"{chips} chips: TPU slices come in powers of two")
    shape = [1] * dims
    i = 0
    while math.prod(shape) < chips:
        shape[i % dims] *= 2
        i += 1
    return tuple(sorted(shape))


def parse_topology(name: str) -> Topology:
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name.lower())
    if m:
        gen = "v5e" if m.group(1) == "v5litepod" else m.group(1)
        hbm, cores, three_d = TPU[gen]
        n = int(m.group(2))
        if n % cores:
            raise PlanError(f"{name}: {gen} names count {cores} cores per chip")
        chips = n // cores
        shape = _torus(chips, 3 if three_d else 2)
        if three_d and len(shape) == 3:
            shape = tuple(sorted(shape))
        topo = f"{gen}:" + "x".join(map(str, shape))
        bounds = (1, 1, 1) if chips == 1 else (2, 2, 1) if chips >= 4 else (chips, 1, 1)
        return Topology(name, "tpu", chips, hbm, topo, "megacore" if cores == 2 else "default", bounds)
    m = re.fullmatch(r"(h100|h200|a100)x(\d+)", name.lower())
    if m:
        return Topology(name, "gpu", int(m.group(2)), GPU_HBM[m.group(1)])
    raise PlanError(f"unknown topology {name!r}; examples: v5p-128, v5e-64, v6e-8, v4-32, h100x8")


def family(topo: Topology) -> list[str]:
    """Names of the same generation, smallest first (for --search)."""
    if topo.platform == "gpu":
        kind = topo.name.split("x")[0]
        return [f"{kind}x{n}" for n in (1, 2, 4, 8, 16, 32, 64, 128, 256)]
    gen = topo.topology_name.split(":")[0]
    cores = TPU[gen][1]
    return [f"{gen}-{c * cores}" for c in (1, 4, 8, 16, 32, 64, 128, 256, 512, 1024)]


def devices_for(topo: Topology):
    import jax

    if topo.platform == "tpu":
        import importlib.util

        if importlib.util.find_spec("libtpu") is None:
            raise PlanError(LIBTPU_HINT)
        try:
            from jax.experimental import topologies

            desc = topologies.get_topology_desc(topology_name=topo.topology_name, platform="tpu",
                                                chip_config_name=topo.chip_config,
                                                chips_per_host_bounds=topo.host_bounds, num_slices=1)
        except Exception as e:  # noqa: BLE001 - a shape libtpu refuses
            raise PlanError(f"{topo.name} ({topo.topology_name}): {type(e).__name__}: {e}") from None
        return list(desc.devices), "deviceless TPU topology"
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        gpus = []
    if len(gpus) >= topo.chips:
        return gpus[:topo.chips], "local GPUs"
    cpus = jax.devices("cpu")
    if len(cpus) < topo.chips:
        raise PlanError(f"{topo.name}: a CPU proxy needs {topo.chips} devices; set "
                        f"XLA_FLAGS=--xla_force_host_platform_device_count={topo.chips}")
    return cpus[:topo.chips], "CPU proxy (no GPU here): temporaries are indicative"


def _bytes_per_device(abstract, shardings) -> int:
    import jax

    total = 0
    for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings, is_leaf=lambda y: hasattr(y, "spec"))):
        total += math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
    return total


def plan(cfg, topo: Topology) -> dict:
    """Compile cfg's train step for `topo`; per-chip bytes, FLOPs, and whether it fits."""
    import jax

    from seed_story_jax.nn.sharding import activation_rules
    from seed_story_jax.train import rules as R
    from seed_story_jax.train.loop import prepare

    t = cfg.train
    devices, how = devices_for(topo)
    p = prepare(cfg, devices=devices)
    task, mesh, rules = p.task, p.mesh, p.rules
    state_abs, frozen_abs, state_sh, frozen_sh, batch_sh = p.state_abs, p.frozen_abs, p.state_sh, p.frozen_sh, p.batch_sh
    b = t.batch_size
    state_in, frozen_in, batch_abs = p.abstract_args()
    t0 = time.perf_counter()
    with activation_rules(mesh, rules):
        lowered = p.step_fn.lower(state_in, frozen_in, batch_abs)
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - the TPU compiler refuses programs that overflow HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        compiled, oom = None, str(e).split("RESOURCE_EXHAUSTED:")[-1].strip().splitlines()[0]
    if compiled is None:
        mem, cost = None, None
    else:
        mem, oom = compiled.memory_analysis(), ""
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    t2 = time.perf_counter()
    batch_split = R.batch_split(jax.tree.leaves(batch_sh)[0])

    params = _bytes_per_device(state_abs.params, state_sh.params)
    opt = _bytes_per_device(state_abs.opt_state, state_sh.opt_state)
    frozen = _bytes_per_device(frozen_abs, frozen_sh)
    batch = _bytes_per_device(batch_abs, batch_sh)
    # Every argument stays resident, used or not (XLA's argument size may leave out parameters the
    # step never reads, e.g. the VAE decoder in stage 1): count at least their sum.
    resident = params + opt + frozen + batch + _bytes_per_device(state_abs.step, state_sh.step) \
        + _bytes_per_device(state_abs.rng, state_sh.rng)
    if mem is None:  # only the compiler's message: temporaries alone overflow
        args = resident
        temp = _bytes_in(oom) or 0
        out = alias = code = 0
    else:
        temp = int(mem.temp_size_in_bytes)
        args = int(mem.argument_size_in_bytes)
        out = int(mem.output_size_in_bytes)
        alias = int(mem.alias_size_in_bytes)
        code = int(getattr(mem, "generated_code_size_in_bytes", 0))
    total = max(args, resident) + out - alias + temp + code
    model_flops = task.flops_per_example * b
    return {
        "topology": topo.name,
        "compiled_for": how,
        "devices": len(devices),
        "mesh": dict(zip(mesh.axis_names, (int(x) for x in mesh.devices.shape))),
        "stage": t.stage,
        "global_batch": b,
        "per_device_batch": b / batch_split,
        "batch_warning": R.batch_warning(mesh, b, rules),
        "grad_accum": t.grad_accum,
        "trainable_params": int(sum(x.size for x in jax.tree.leaves(state_abs.params))),
        "frozen_params": int(sum(x.size for x in jax.tree.leaves(frozen_abs))),
        "bytes_per_chip": {
            "params_trainable_fp32": params,
            "params_frozen": frozen,
            "optimizer_state": opt,
            "batch": batch,
            "temporaries_incl_activations": temp,
            "generated_code": code,
            "total": total,
        },
        "hbm_per_chip": topo.hbm_bytes,
        "fits": mem is not None and total <= topo.hbm_bytes,
        "compiler_oom": oom,
        # XLA's cost analysis counts a while-loop body once (not × trip count): with scanned layers it
        # is far below the real work, so the model FLOPs (formula) are the number to trust.
        "xla_flops_loop_bodies_once": float(cost.get("flops", 0.0)) * len(devices) if cost else None,
        "model_flops_per_step": model_flops,
        "flops_note": task.flops_note,
        "lower_s": round(t1 - t0, 1),
        "compile_s": round(t2 - t1, 1),
    }


def search(cfg, topo: Topology, *, progress=print) -> tuple[Optional[dict], list[dict]]:
    """Plan the family of `topo` from the smallest slice up; the first that fits, and all tried."""
    tried = []
    for name in family(topo):
        candidate = parse_topology(name)
        try:
            r = plan(cfg, candidate)
        except PlanError:
            raise
        except Exception as e:  # noqa: BLE001 - this slice cannot hold the mesh/batch: try larger
            progress(f"plan: {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            tried.append({"topology": name, "error": str(e).splitlines()[0][:200]})
            continue
        tried.append(r)
        progress(f"plan: {name}: {r['bytes_per_chip']['total'] / GIB:.2f} GiB of {r['hbm_per_chip'] / GIB:.0f} "
                 f"GiB per chip -> {'fits' if r['fits'] else 'does not fit'}")
        if r["fits"]:
            return r, tried
    return None, tried


def _bytes_in(msg: str) -> Optional[int]:
    """'... HLO temporaries (116.20G) exceeds ...' → bytes (the first size in the message)."""
    m = re.search(r"\(([\d.]+)([KMGT])\)", msg)
    if not m:
        return None
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2)))
