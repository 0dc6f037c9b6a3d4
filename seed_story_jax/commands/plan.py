"""`seed-story plan CONFIG --topology v5p-128 [--stage N] [--search] [--json]`: does the train step fit?"""

from __future__ import annotations

import json
import os
import sys

HELP = "AOT-compile the train step for a TPU slice or GPU count and report per-chip memory"
DESCRIPTION = """Compile the real train step of CONFIG (its `train:` section; --stage overrides train.stage)
for a machine you do not have: a TPU slice described without hardware (needs libtpu: the `tpu`
extra, best in its own environment) or a GPU count. Prints per-chip bytes of trainable params
(fp32 master), frozen params, optimizer state, batch, temporaries (activations and workspace) and
the total against the chip's HBM; FLOPs per step. --search plans the same generation from its
smallest slice up and reports the first that fits."""


def add_arguments(p) -> None:
    p.add_argument("config", help="config name (configs/NAME.yaml) or path")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.batch_size=64")
    p.add_argument("--topology", required=True, help="v5p-128, v5e-64, v6e-8, v4-32, h100x8, ...")
    p.add_argument("--stage", type=int, default=None, help="override train.stage")
    p.add_argument("--search", action="store_true", help="find the smallest slice of this generation that fits")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args) -> int:
    from seed_story_jax.config import ConfigError, load_config, resolve_config_path
    from seed_story_jax.train.plan import PlanError, parse_topology, plan, search

    overrides = list(args.overrides) + ([f"train.stage={args.stage}"] if args.stage is not None else [])
    cfg = load_config(resolve_config_path(args.config), overrides)
    if cfg.train is None:
        raise ConfigError(f"{args.config}: no `train:` section")
    try:
        topo = parse_topology(args.topology)
    except PlanError as e:
        raise ConfigError(str(e)) from None
    if topo.platform == "gpu" and "jax" not in sys.modules:
        # a CPU proxy needs that many host devices, fixed before jax starts
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={topo.chips}".strip()
    if topo.platform == "tpu":
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # deviceless: no metadata server to ask
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    try:
        if args.search:
            result, tried = search(cfg, topo, progress=lambda m: print(m, file=sys.stderr))
            report = {"fits": result is not None, "smallest": result, "tried": tried}
        else:
            result = plan(cfg, topo)
            report = result
    except PlanError as e:
        print(f"seed-story plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    elif result is None:
        print(f"nothing in {args.topology}'s family fits (largest tried: {report['tried'][-1]['topology']})")
    else:
        _print(result)
    return 0 if (result is not None and result["fits"]) else 1


def _print(r: dict) -> None:
    b = r["bytes_per_chip"]
    print(f"topology        {r['topology']} ({r['devices']} devices, {r['compiled_for']})")
    print(f"mesh            {r['mesh']}   stage {r['stage']}   global batch {r['global_batch']} "
          f"({r['per_device_batch']:g} per device, grad_accum {r['grad_accum']})")
    print(f"params          {r['trainable_params']:,} trainable, {r['frozen_params']:,} frozen")
    print("per chip        bytes")
    for k, v in b.items():
        print(f"  {k:<30} {_human(v):>12}")
    print(f"  {'HBM':<30} {_human(r['hbm_per_chip']):>12}   -> {'FITS' if r['fits'] else 'DOES NOT FIT'}")
    if r.get("compiler_oom"):
        print(f"compiler: {r['compiler_oom']}")
    if r.get("batch_warning"):
        print(f"warning: {r['batch_warning']}")
    print(f"FLOPs/step      {r['model_flops_per_step']:.4g} model FLOPs ({r['flops_note']})")
    if r["xla_flops_loop_bodies_once"]:
        print(f"                {r['xla_flops_loop_bodies_once']:.4g} XLA cost analysis (scanned loop bodies counted once)")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)
