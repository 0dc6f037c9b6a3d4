"""`seed-story train CONFIG [a.b=c ...] --workdir DIR`: run (or resume) a training job."""

from __future__ import annotations

import sys

HELP = "train (stage 0: causal LM; 1-3: SEED-Story stages); resumes from --workdir automatically"
DESCRIPTION = """Train the model a config describes, by its `train:` section. Checkpoints, metrics.jsonl and
TensorBoard files go to --workdir; rerunning the same command resumes from the newest complete
checkpoint. SIGTERM saves and exits. Several processes (hosts): give each one --coordinator,
--num-processes and --process-id (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID),
or --distributed on a TPU pod / SLURM where jax detects them."""


def add_arguments(p) -> None:
    p.add_argument("config", help="config name (configs/NAME.yaml) or path")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.steps=100")
    p.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics, config)")
    p.add_argument("--coordinator", default=None, help="multi-process: coordinator HOST:PORT (process 0's)")
    p.add_argument("--num-processes", type=int, default=None)
    p.add_argument("--process-id", type=int, default=None)
    p.add_argument("--distributed", action="store_true",
                   help="initialise jax.distributed by cluster auto-detection (TPU pods, SLURM, ...)")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="save and exit after this step (run the schedule in pieces); rerun to continue")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from seed_story_jax.config import ConfigError, load_config, resolve_config_path
    from seed_story_jax.train.mesh import initialize_distributed

    cfg = load_config(resolve_config_path(args.config), args.overrides)
    if cfg.train is None:
        raise ConfigError(f"{args.config}: no `train:` section")
    initialize_distributed(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)

    from seed_story_jax.train.loop import TrainingDiverged, run as train_run

    try:
        result = train_run(cfg, args.workdir, progress=not args.no_progress, stop_at=args.stop_at)
    except TrainingDiverged as e:
        print(f"seed-story train: stopped: {e}", file=sys.stderr)
        return 3
    print(f"train: {result.status} at step {result.step}; last checkpoint {result.last_checkpoint}", file=sys.stderr)
    return 0
