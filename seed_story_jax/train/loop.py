"""The training loop: resume from the workdir, step, log, checkpoint, stop cleanly.

    WORKDIR/config.yaml            the resolved config of the run
    WORKDIR/checkpoints/<step>/    orbax: state (step, params, opt_state, rng), data (iterator state)
    WORKDIR/metrics.jsonl          one line per logged step; WORKDIR/tb/ TensorBoard event files

Checkpoints are written by an orbax CheckpointManager (async, keep N) into a temporary directory
that is renamed into place once complete, so a kill mid-save leaves no directory that looks like a
checkpoint; a run always resumes from the newest complete one (falling back to older ones if one
fails to restore). A non-finite loss or gradient norm stops the run without saving (the step leaves
the state untouched), so the last good checkpoint stays the newest. SIGTERM (preemption) saves the
current step and exits cleanly.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np

from seed_story_jax.config import SeedStoryConfig, dump_config
from seed_story_jax.train import data as D
from seed_story_jax.nn.sharding import activation_rules
from seed_story_jax.train import rules as R
from seed_story_jax.train import state as S
from seed_story_jax.train.mesh import make_mesh
from seed_story_jax.train.metrics import MetricsWriter, peak_flops
from seed_story_jax.train.optim import lr_schedule, make_optimizer
from seed_story_jax.profiling import compile_count
from seed_story_jax.train.step import jit_train_step, make_train_step
from seed_story_jax.train.task import example_spec


class TrainingDiverged(RuntimeError):
    """A step produced a non-finite loss or gradient norm."""


@dataclasses.dataclass
class RunResult:
    status: str  # "done" | "preempted" | "stopped" (stop_at reached)
    step: int
    last_checkpoint: Optional[int]
    state: Any = None  # the final TrainState (sharded jax arrays)
    frozen: Any = None  # the frozen params


def checkpoint_manager(workdir: Path, keep: int, async_save: bool):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                        enable_async_checkpointing=async_save)
    return ocp.CheckpointManager((workdir / "checkpoints").resolve(), options=opts,
                                 item_names=("state", "data", "frozen"))


def restore_latest(mngr, abstract_state, abstract_frozen=None):
    """(step, state, data state, frozen or None) of the newest checkpoint that restores, or None when
    there is none. Each step directory appears only once orbax has finished it (temporary name, then
    rename). Newer steps that fail to restore while an older one works (files lost after the commit)
    are moved aside with a message; when none restores, nothing is touched and the error says why
    (usually a config that no longer matches the run)."""
    import orbax.checkpoint as ocp

    from seed_story_jax.checkpoint import CheckpointError

    failed = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            items = dict(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
            if abstract_frozen is not None:
                items["frozen"] = ocp.args.StandardRestore(abstract_frozen)
            out = mngr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - judged below, once we know whether an older one works
            failed.append((step, e))
            continue
        for bad_step, e in failed:
            bad = Path(mngr.directory) / str(bad_step)
            aside = bad.with_name(f"{bad_step}.unreadable-{int(time.time())}")
            print(f"train: checkpoint {bad} does not restore ({type(e).__name__}: {str(e)[:300]}); "
                  f"moved to {aside.name}", file=sys.stderr)
            if jax.process_index() == 0 and bad.exists():
                bad.rename(aside)
        if failed:
            _sync("unreadable-checkpoint")
            mngr.reload()
        return step, out["state"], out["data"], out.get("frozen") if abstract_frozen is not None else None
    if failed:
        step, e = failed[0]
        raise CheckpointError(f"{mngr.directory}: no checkpoint restores with this config (newest, step {step}: "
                              f"{type(e).__name__}: {str(e)[:500]}); a changed model or train section? "
                              f"Use a new --workdir to start over")
    return None


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class _Fault:
    """Test-only fault injection, SEED_STORY_FAULT="KIND:STEP": kill_at (SIGKILL after the step),
    kill_in_save (SIGKILL while the async save of that step is in flight), term_at (SIGTERM)."""

    def __init__(self):
        spec = os.environ.get("SEED_STORY_FAULT", "")
        self.kind, _, n = spec.partition(":")
        self.step = int(n) if n else -1

    def hit(self, kind: str, step: int) -> None:
        if self.kind == kind and self.step == step:
            os.kill(os.getpid(), signal.SIGTERM if kind == "term_at" else signal.SIGKILL)


def run(cfg: SeedStoryConfig, workdir: str | os.PathLike, *, task=None, devices=None, progress: bool = True,
        stop_at: Optional[int] = None) -> RunResult:
    """Train (or resume) `cfg` in `workdir` until train.steps, or until step `stop_at` (then save and
    return "stopped": time-limited jobs run the schedule in pieces)."""
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    t = cfg.train
    workdir = Path(workdir)
    primary = jax.process_index() == 0
    p = prepare(cfg, task=task, devices=devices)
    task, mesh, rules = p.task, p.mesh, p.rules
    state_abs, frozen_abs, state_sh, frozen_sh = p.state_abs, p.frozen_abs, p.state_sh, p.frozen_sh

    if primary:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.yaml").write_text(dump_config(cfg))
    mngr = checkpoint_manager(workdir, t.keep, t.async_checkpoint)
    restored = restore_latest(mngr, S.with_shardings(state_abs, state_sh),
                              S.with_shardings(frozen_abs, frozen_sh) if t.save_frozen else None)
    if restored is None:
        state, frozen = p.initial_state()
    elif restored[3] is not None:
        frozen = restored[3]
    else:  # frozen params are not in the checkpoint: rebuilt from the seed, or from train.init
        _, frozen = p.initial_state(frozen_only=True)

    b, batch_sh, step_fn = t.batch_size, p.batch_sh, p.step_fn
    rows = D.local_rows(jax.tree.leaves(batch_sh)[0], b)
    if primary and (warning := R.batch_warning(mesh, b, rules)):
        print(f"train: warning: {warning}", file=sys.stderr)
    it = D.batch_iterator(task.examples, b, rows, seed=t.seed)
    if restored is not None:
        start, state, data_state, _ = restored
        it.set_state(data_state)
        print(f"train: resumed from {workdir / 'checkpoints' / str(start)}", file=sys.stderr)
    else:
        start = 0
    last_ckpt = start if restored is not None else None

    writer = MetricsWriter(workdir, enabled=primary)
    stop = {"signal": False}
    old_handler = signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("signal", True)) \
        if _main_thread() else None
    fault = _Fault()
    n_dev = mesh.devices.size
    peak = peak_flops(mesh.devices.flat[0])
    end = t.steps if stop_at is None else min(t.steps, stop_at)
    bar = tqdm(total=t.steps, initial=start, disable=not (progress and primary), desc="train", unit="step",
               dynamic_ncols=True)
    status = "done"

    def save(step: int) -> None:
        nonlocal last_ckpt
        if last_ckpt == step:
            return
        items = dict(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(it.get_state()))
        if t.save_frozen:
            items["frozen"] = ocp.args.StandardSave(frozen)
        mngr.save(step, args=ocp.args.Composite(**items))
        last_ckpt = step
        fault.hit("kill_in_save", step)

    def check_finite(step: int) -> None:
        # A non-finite step leaves state.step behind the loop's count (see step.py).
        if int(jax.device_get(state.step)) != step:
            mngr.wait_until_finished()
            raise TrainingDiverged(
                f"non-finite loss or gradient norm before step {step}; stopped without saving. "
                f"Last good checkpoint: {last_ckpt if last_ckpt is not None else 'none'} "
                f"in {workdir / 'checkpoints'}")

    try:
        window_t, window_steps = time.perf_counter(), 0
        step = start
        compiles_after_first = None
        while step < end:
            batch = D.to_global(next(it), batch_sh, rows, b)
            with activation_rules(mesh, rules):
                state, metrics = step_fn(state, frozen, batch)
            step += 1
            window_steps += 1
            bar.update(1)
            fault.hit("kill_at", step)
            fault.hit("term_at", step)
            if compiles_after_first is None:
                jax.block_until_ready(metrics)
                compiles_after_first = compile_count()
            if step % t.log_every == 0 or step == end:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                check_finite(step)
                dt = time.perf_counter() - window_t
                # XLA compilations since the first step: anything but 0 is a retrace (a perf bug)
                m["compiles"] = compile_count() - compiles_after_first
                m["step_time"] = dt / window_steps
                m["examples_per_s"] = window_steps * b / dt
                if task.tokens_per_example:
                    m["tokens_per_s"] = m["examples_per_s"] * task.tokens_per_example
                if task.flops_per_example and peak:
                    m["mfu"] = m["examples_per_s"] * task.flops_per_example / (n_dev * peak)
                writer.write(step, m)
                bar.set_postfix(loss=f"{m['loss']:.4f}")
                window_t, window_steps = time.perf_counter(), 0
            if step % t.checkpoint_every == 0 or step == t.steps:
                check_finite(step)
                save(step)
            if _agree(stop["signal"], step, t.log_every):
                check_finite(step)
                save(step)
                status = "preempted"
                print(f"train: SIGTERM: saved step {step}; rerun the same command to resume", file=sys.stderr)
                break
        else:
            if step < t.steps:
                check_finite(step)
                save(step)
                status = "stopped"
        mngr.wait_until_finished()
    finally:
        bar.close()
        writer.close()
        mngr.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    return RunResult(status=status, step=step, last_checkpoint=last_ckpt, state=state, frozen=frozen)


def _abstract_setup(t, task, key, tx, mesh, rules):
    """`S.abstract_setup`, kept per (task key, train config, mesh, rules) and the task's very `build`
    and `trainable` functions (its `init` runs `build`): tracing a model's construction costs
    seconds, and `compile_step` then `run` of one task set it up once."""
    def make():
        return S.abstract_setup(task.build, task.trainable, tx, mesh, rules, seed=t.seed, frozen_dtype=t.frozen_dtype)

    return _cached(("setup", key, task.build, task.trainable), make)


def _batch_shardings(spec, b: int, mesh, rules):
    return jax.tree.map(lambda s: R.batch_sharding(mesh, (b,) + s[0], rules), spec,
                        is_leaf=lambda x: isinstance(x, tuple))


def _step_fn(t, task, key, spec, graphdef, tx, mesh, state_sh, frozen_sh, batch_sh):
    return _cached(("step", key, task.loss_fn, str(spec)), lambda: jit_train_step(
        make_train_step(graphdef, task.loss_fn, tx, grad_accum=t.grad_accum, lr_fn=lr_schedule(t), mesh=mesh,
                        batch_spec=jax.tree.leaves(batch_sh)[0].spec[:1] or (None,)),
        state_sh, frozen_sh, batch_sh, mesh))


@dataclasses.dataclass
class Prepared:
    """A run's pieces before any state exists: the task, mesh, optimizer, abstract state and
    shardings, and the jitted step (cached per task key and train config)."""

    cfg: SeedStoryConfig
    task: Any
    mesh: Any
    rules: Any
    tx: Any
    init: Any
    init_key: Any
    graphdef: Any
    state_abs: Any
    frozen_abs: Any
    state_sh: Any
    frozen_sh: Any
    spec: dict
    batch_sh: Any
    step_fn: Any

    def initial_state(self, *, frozen_only: bool = False):
        return initial_state(self.cfg, self.init, self.init_key, self.tx, self.state_abs, self.frozen_abs,
                             self.state_sh, self.frozen_sh, frozen_only=frozen_only)

    def abstract_args(self):
        """(state, frozen, batch) as ShapeDtypeStructs with their shardings: what the step takes."""
        b = self.cfg.train.batch_size
        batch = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct((b,) + tuple(s[0]), s[1], sharding=sh), self.spec,
                             self.batch_sh, is_leaf=lambda x: isinstance(x, tuple))
        return S.with_shardings(self.state_abs, self.state_sh), S.with_shardings(self.frozen_abs, self.frozen_sh), batch


def prepare(cfg: SeedStoryConfig, *, task=None, devices=None) -> Prepared:
    from seed_story_jax.train.stages import make_task

    t = cfg.train
    task = task or make_task(cfg)
    mesh = make_mesh(cfg.mesh, devices)
    rules = cfg.mesh.rules
    tx = make_optimizer(t)
    key = None if task.key is None else (task.key, t, mesh, rules)
    init, graphdef, state_abs, frozen_abs, state_sh, frozen_sh = _abstract_setup(t, task, key, tx, mesh, rules)
    # what the initial state depends on (not the schedule, batch or logging)
    init_key = None if task.key is None else (task.key, t.seed, t.frozen_dtype, t.clip_norm > 0, mesh, rules)
    spec = example_spec(task)
    batch_sh = _batch_shardings(spec, t.batch_size, mesh, rules)
    step_fn = _step_fn(t, task, key, spec, graphdef, tx, mesh, state_sh, frozen_sh, batch_sh)
    return Prepared(cfg, task, mesh, rules, tx, init, init_key, graphdef, state_abs, frozen_abs, state_sh,
                    frozen_sh, spec, batch_sh, step_fn)


def compile_step(cfg: SeedStoryConfig, *, task=None, devices=None) -> None:
    """Compile the train step that `run(cfg, ..., task=task)` uses, without running it or reading
    any checkpoint: the same jitted function (cached per task key and train config), lowered for
    the same shardings. With JAX's persistent compilation cache on, a later `run` — in this
    process or another — loads the executable instead of compiling it; the demo compiles later
    stages' steps in a thread while an earlier stage compiles and trains (XLA compiles on one
    core). The numbers are the same: one program, compiled once."""
    p = prepare(cfg, task=task, devices=devices)
    with activation_rules(p.mesh, p.rules):
        p.step_fn.lower(*p.abstract_args()).compile()


_JITTED: dict = {}


def _cached(key, make):
    """Jitted functions of a task are kept per (task.key, train config, mesh, rules), so a second run
    in the same process (a notebook, the tests) reuses their compilations."""
    if key[1] is None:
        return make()
    if key not in _JITTED:
        if len(_JITTED) >= 16:
            _JITTED.pop(next(iter(_JITTED)))
        _JITTED[key] = make()
    return _JITTED[key]


def initial_state(cfg, init, init_key, tx, state_abs, frozen_abs, state_sh, frozen_sh, *, frozen_only=False):
    """(TrainState, frozen) of a fresh run — or (None, frozen) with `frozen_only` (a resume whose
    checkpoint lacks the frozen params). Components that train.init provides are read from it; only
    the others get random values, from a jit of `init` that returns just theirs (XLA drops the rest
    of the initialiser, so a run that loads everything compiles no random init: minutes for SDXL).
    The values equal a full random init overlaid with train.init's; the optimizer state is
    `tx.init` of the initial params and the rng is `init`'s."""
    t = cfg.train
    comps = set(state_abs.params) | set(frozen_abs)
    loaded = _init_components(t.init, comps) if t.init else []
    missing = sorted(comps - set(loaded), key=str)
    keep = lambda tree: {k: v for k, v in tree.items() if k in missing}  # noqa: E731
    params, frozen = {}, {}
    if missing:
        def random_part():
            state, fr = init()
            return ({} if frozen_only else keep(state.params)), keep(fr)

        out_sh = ({} if frozen_only else keep(state_sh.params), keep(frozen_sh))
        params, frozen = _cached(("init", init_key, tuple(missing), frozen_only),
                                 lambda: jax.jit(random_part, out_shardings=out_sh))()
    if loaded:
        copy = lambda tree: {k: jax.tree.map(lambda x: x, v) for k, v in tree.items() if k in loaded}  # noqa: E731
        lp, lf = (None if frozen_only else copy(state_abs.params)), copy(frozen_abs)
        _overlay_init(cfg, t.init, lp, lf, None if frozen_only else state_sh.params, frozen_sh, comps=loaded)
        params, frozen = {**params, **(lp or {})}, {**frozen, **lf}
    if frozen_only:
        return None, frozen
    seed = t.seed

    def fresh(params):
        return S.TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params),
                            rng=jax.random.key_data(jax.random.key(seed + 1)))

    state = _cached(("fresh", init_key), lambda: jax.jit(fresh, out_shardings=state_sh, donate_argnums=0))(params)
    return state, frozen


def _init_components(path: str, comps) -> list:
    from seed_story_jax.checkpoint import CheckpointError, components_of

    have = components_of(path)
    loaded = [c for c in have if c in comps]
    if not loaded:
        raise CheckpointError(f"train.init {path}: none of its components {have} is in this model")
    return loaded


def _overlay_init(cfg, path: str, params, frozen, params_sh, frozen_sh, *, comps) -> None:
    """Load components `comps` of checkpoint `path` into `params` (may be None: then only the frozen
    ones) and `frozen`, in place."""
    from seed_story_jax.checkpoint import load_component
    from seed_story_jax.models import module_for

    for comp in comps:
        loaded = load_component(path, comp)
        relayout = getattr(module_for(comp), "relayout", None)
        if relayout is not None:
            loaded = relayout(loaded, getattr(cfg, comp))
        S.overlay_params(loaded, (params or {}).get(comp), frozen.get(comp),
                         (params_sh or {}).get(comp), frozen_sh.get(comp), where=f"{path} component {comp}")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _agree(flag: bool, step: int, every: int) -> bool:
    """Every process stops at the same step: single process checks each step; several agree
    (all-gather) every `every` steps."""
    if jax.process_count() == 1:
        return flag
    if step % every:
        return False
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
