"""The training loop on the tiny Llama (stage 0, causal LM on structured random tokens), in process on
the 8 virtual CPU devices: loss falls, meshes agree, params are sharded by the rules, checkpoints move
between meshes, resume is exact, the NaN guard keeps the last good checkpoint.

Tolerance between different meshes: 1e-5 relative on the loss (fp32; sharded reductions sum in a
different order). Same mesh after a resume: bit-exact."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from seed_story_jax.config import load_config
from seed_story_jax.train import loop
from seed_story_jax.train.metrics import read_jsonl

MESH_TOL = 1e-5
ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")

# Every run has steps=40 (the schedule is part of the compiled step) so runs of one mesh share one
# compilation; short runs stop early with stop_at.
BASE = [
    "train.steps=40", "train.batch_size=8", "train.seq_len=16", "train.log_every=1", "train.checkpoint_every=3",
    "train.lr=0.003", "train.warmup_steps=1", "train.min_lr_ratio=1.0", "train.keep=5",
    "train.synthetic_examples=512", "train.seed=0",
]


def _cfg(*over, mesh=(2, 2, 2)):
    return load_config(TINY, BASE + _mesh(mesh) + list(over))


def _mesh(mesh):
    return [f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}", f"mesh.tensor={mesh[2]}"]


def _losses(workdir):
    """step → loss, the last line for a step winning (a resumed run rewrites the steps it redoes)."""
    return {m["step"]: m["loss"] for m in read_jsonl(workdir / "metrics.jsonl")}


@pytest.fixture(scope="module")
def ref222(tmp_path_factory):
    """6 steps on mesh (2, 2, 2), checkpoints at 3 and 6."""
    wd = tmp_path_factory.mktemp("ref222")
    res = loop.run(_cfg(), wd, progress=False, stop_at=6)
    assert res.status == "stopped" and res.step == 6 and res.last_checkpoint == 6
    return wd, res


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """All 40 steps on one device."""
    wd = tmp_path_factory.mktemp("one")
    res = loop.run(_cfg(mesh=(1, 1, 1)), wd, progress=False)
    assert res.status == "done" and res.step == 40
    return wd


def test_mesh_222_matches_single_device_and_loss_falls(ref222, one_device):
    ref, got = _losses(ref222[0]), _losses(one_device)
    for s in range(1, 6):
        assert got[s] == pytest.approx(ref[s], rel=MESH_TOL), f"step {s}"
    first, last = np.mean([got[s] for s in range(1, 6)]), np.mean([got[s] for s in range(36, 41)])
    assert first > 6.5 and last < first - 0.5, (first, last)  # ln(1024) = 6.93 at the start
    lines = read_jsonl(one_device / "metrics.jsonl")
    assert all(m["compiles"] == 0 for m in lines), "the train step recompiled"
    assert all(m["finite"] == 1.0 for m in lines) and lines[-1]["tokens_per_s"] > 0


def test_params_sharded_as_the_rules_say(ref222):
    _, res = ref222
    p = res.state.params["llm"]
    layer = p["layers"][0]
    expect = {
        "embed": (p["embed_tokens"]["embedding"], P("tensor", "fsdp")),  # (vocab, embed)
        "q": (layer["self_attn"]["q_proj"]["kernel"], P("fsdp", "tensor")),  # (embed, heads)
        "o": (layer["self_attn"]["o_proj"]["kernel"], P("tensor", "fsdp")),  # (heads, embed)
        "down": (layer["mlp"]["down_proj"]["kernel"], P("tensor", "fsdp")),  # (mlp, embed)
        "head": (p["lm_head"]["kernel"], P("fsdp", "tensor")),  # (embed, vocab)
        "norm": (layer["input_layernorm"]["scale"], P()),
    }
    for name, (arr, spec) in expect.items():
        assert arr.sharding.spec == spec, name
    q = layer["self_attn"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.shape == (q.shape[0] // 2, q.shape[1] // 2)
    # Adam moments are sharded like their parameters
    mu = res.state.opt_state[1][0].mu["llm"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
    assert mu.sharding.spec == P("fsdp", "tensor")


def _resume_from_step3(src, dst):
    shutil.copytree(src, dst)
    for d in (dst / "checkpoints").iterdir():
        if d.name.isdigit() and int(d.name) > 3:
            shutil.rmtree(d)


def test_resume_same_mesh_is_exact(ref222, tmp_path):
    wd, _ = ref222
    dst = tmp_path / "run"
    _resume_from_step3(wd, dst)
    res = loop.run(_cfg(), dst, progress=False, stop_at=6)
    assert res.step == 6
    ref, got = _losses(wd), _losses(dst)
    assert [got[s] for s in (4, 5, 6)] == [ref[s] for s in (4, 5, 6)]  # bit-exact


@pytest.mark.parametrize("mesh", [(8, 1, 1), (1, 1, 1)])
def test_checkpoint_moves_between_meshes(ref222, tmp_path, mesh):
    wd, _ = ref222
    dst = tmp_path / "run"
    _resume_from_step3(wd, dst)
    res = loop.run(_cfg(mesh=mesh), dst, progress=False, stop_at=6)
    assert res.step == 6
    ref, got = _losses(wd), _losses(dst)
    for s in (4, 5, 6):
        assert got[s] == pytest.approx(ref[s], rel=MESH_TOL), f"step {s}"
    q = res.state.params["llm"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
    assert len(q.sharding.device_set) == int(np.prod(mesh))


def test_unreadable_checkpoint_is_set_aside(ref222, tmp_path):
    """A step directory that fails to restore (files lost after the commit) is moved aside with a
    message and the run resumes from the previous one, exactly."""
    wd, _ = ref222
    dst = tmp_path / "run"
    shutil.copytree(wd, dst)
    for f in (dst / "checkpoints" / "6" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"")
    res = loop.run(_cfg(), dst, progress=False, stop_at=6)
    assert res.step == 6
    names = sorted(d.name for d in (dst / "checkpoints").iterdir())
    assert "6" in names and any(n.startswith("6.unreadable-") for n in names)
    ref, got = _losses(wd), _losses(dst)
    assert [got[s] for s in (4, 5, 6)] == [ref[s] for s in (4, 5, 6)]


def test_checkpoint_of_another_model_is_refused_untouched(ref222, tmp_path):
    from seed_story_jax.checkpoint import CheckpointError

    dst = tmp_path / "run"
    _resume_from_step3(ref222[0], dst)
    with pytest.raises(CheckpointError, match="no checkpoint restores with this config"):
        loop.run(_cfg("llm.intermediate_size=160"), dst, progress=False, stop_at=6)
    assert sorted(d.name for d in (dst / "checkpoints").iterdir()) == ["3"]


def test_init_from_a_checkpoint_and_frozen_params_survive_resume(tmp_path):
    """train.init loads pretrained params (here: a tiny Llama built from another seed) into the
    trainable and frozen trees; only lm_head trains; a resume rebuilds the frozen params from init."""
    from flax import nnx

    from seed_story_jax.checkpoint import save_checkpoint
    from seed_story_jax.models import llama

    base = _cfg(mesh=(1, 1, 1))
    with nnx.use_eager_sharding(False):
        pre = nnx.state(llama.build(base.llm, nnx.Rngs(7)), nnx.Param).to_pure_dict()
    save_checkpoint(tmp_path / "pre", base, {"llm": jax.tree.map(np.asarray, pre)})
    over = ("train.trainable_regex=lm_head", f"train.init={tmp_path / 'pre'}")
    first = loop.run(_cfg(*over, mesh=(1, 1, 1)), tmp_path / "a", progress=False, stop_at=2)
    assert list(first.state.params["llm"]) == ["lm_head"]
    np.testing.assert_array_equal(np.asarray(first.frozen["llm"]["embed_tokens"]["embedding"]),
                                  pre["embed_tokens"]["embedding"])
    resumed = loop.run(_cfg(*over, mesh=(1, 1, 1)), tmp_path / "a", progress=False, stop_at=4)
    np.testing.assert_array_equal(np.asarray(resumed.frozen["llm"]["layers"][1]["mlp"]["up_proj"]["kernel"]),
                                  pre["layers"][1]["mlp"]["up_proj"]["kernel"])
    straight = loop.run(_cfg(*over, mesh=(1, 1, 1)), tmp_path / "b", progress=False, stop_at=4)
    assert straight.step == resumed.step == 4
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)]


def test_init_reads_covered_components_and_randomises_only_the_rest(tmp_path, monkeypatch):
    """train.init covering every component: no random initialiser is traced at all and the initial
    state holds the checkpoint's values (trainable fp32, frozen) with fresh Adam moments and init's
    rng. Covering one of two components: the other gets exactly the values of a full random init."""
    import dataclasses

    from flax import nnx

    from seed_story_jax.checkpoint import save_checkpoint
    from seed_story_jax.models import llama
    from seed_story_jax.train import state as S
    from seed_story_jax.train.stages import make_task
    from seed_story_jax.train.task import Bundle

    traced, inits = [], []
    real_setup = S.abstract_setup

    def spy_setup(*a, **k):
        init, *rest = real_setup(*a, **k)
        inits.append(init)

        def counted():
            traced.append(1)
            return init()

        return (counted, *rest)

    monkeypatch.setattr(S, "abstract_setup", spy_setup)
    base = _cfg(mesh=(1, 1, 1))
    with nnx.use_eager_sharding(False):
        pre = jax.tree.map(np.asarray, nnx.state(llama.build(base.llm, nnx.Rngs(7)), nnx.Param).to_pure_dict())
    save_checkpoint(tmp_path / "pre", base, {"llm": pre})
    cfg = _cfg("train.trainable_regex=lm_head|norm", f"train.init={tmp_path / 'pre'}", "train.seed=3", mesh=(2, 2, 2))

    res = loop.run(cfg, tmp_path / "all", progress=False, stop_at=0)
    assert traced == [] and res.step == 0
    p, f = res.state.params["llm"], res.frozen["llm"]
    np.testing.assert_array_equal(np.asarray(p["lm_head"]["kernel"]), pre["lm_head"]["kernel"])
    np.testing.assert_array_equal(np.asarray(p["norm"]["scale"]), pre["norm"]["scale"])
    np.testing.assert_array_equal(np.asarray(f["layers"][1]["self_attn"]["k_proj"]["kernel"]),
                                  pre["layers"][1]["self_attn"]["k_proj"]["kernel"])
    assert p["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
    adam = res.state.opt_state[1][0]
    assert not np.any(np.asarray(adam.mu["llm"]["lm_head"]["kernel"])) and int(res.state.step) == 0
    np.testing.assert_array_equal(np.asarray(res.state.rng), np.asarray(jax.random.key_data(jax.random.key(4))))

    # two components, the checkpoint has one: `extra` (not a config section) is initialised randomly
    task = make_task(cfg)
    task = dataclasses.replace(task, key=None, build=lambda rngs: Bundle(llm=llama.build(cfg.llm, rngs),
                                                                         extra=llama.build(cfg.llm, rngs)))
    part = loop.run(cfg, tmp_path / "part", task=task, progress=False, stop_at=0)
    assert traced == [1]  # one trace: the random part's
    full_state, full_frozen = jax.jit(inits[-1])()  # the whole model at random
    np.testing.assert_array_equal(np.asarray(part.frozen["llm"]["embed_tokens"]["embedding"]),
                                  pre["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(np.asarray(part.state.params["llm"]["lm_head"]["kernel"]), pre["lm_head"]["kernel"])
    for name, got, want in (("frozen", part.frozen["extra"], full_frozen["extra"]),
                            ("params", part.state.params["extra"], full_state.params["extra"])):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    assert not np.array_equal(np.asarray(full_frozen["llm"]["embed_tokens"]["embedding"]),
                              pre["embed_tokens"]["embedding"])  # the checkpoint really replaced something


def test_grad_accumulation_matches_one_batch(one_device, tmp_path):
    b = loop.run(_cfg("train.grad_accum=2", mesh=(1, 1, 1)), tmp_path, progress=False, stop_at=3)
    assert b.step == 3
    la, lb = _losses(one_device), _losses(tmp_path)
    for s in (1, 2, 3):
        assert lb[s] == pytest.approx(la[s], rel=MESH_TOL)


class _Poisoned:
    """SyntheticLM examples plus a `poison` flag set on the examples of one step's batch."""

    def __init__(self, base, bad):
        self.base, self.bad = base, frozenset(bad)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return {**self.base[i], "poison": np.float32(i in self.bad)}

    def __repr__(self):
        return f"_Poisoned({self.base!r}, {sorted(self.bad)})"


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    from seed_story_jax.train.lm import lm_loss
    from seed_story_jax.train.stages import make_task

    cfg = _cfg("train.checkpoint_every=2", "train.log_every=3", mesh=(1, 1, 1))
    task = make_task(cfg)
    t = cfg.train
    order = grain.MapDataset.range(len(task.examples)).shuffle(seed=t.seed)
    bad_step = 4  # the 4th update sees NaN; checkpoint 2 is the last good one, 4 must never be written
    bad = [order[(bad_step - 1) * t.batch_size + r] for r in range(t.batch_size)]
    task.examples = _Poisoned(task.examples, bad)

    def loss_fn(model, batch, rng):
        loss, metrics = lm_loss(model, batch, rng)
        return loss + jnp.where(batch["poison"].sum() > 0, jnp.nan, 0.0), metrics

    task.loss_fn = loss_fn
    with pytest.raises(loop.TrainingDiverged, match="Last good checkpoint: 2"):
        loop.run(cfg, tmp_path, task=task, progress=False, stop_at=6)
    steps = sorted(int(d.name) for d in (tmp_path / "checkpoints").iterdir() if d.name.isdigit())
    assert steps == [2]
    logged = read_jsonl(tmp_path / "metrics.jsonl")
    assert logged[0]["step"] == 3 and logged[0]["finite"] == 1.0  # step 3 was fine


# ------------------------------------------------------------------------------ real processes


def _train_cli(workdir, *args, devices=8, fault="", cache=None, mesh=(2, 2, 2), env=None):
    """`seed-story train` in a fresh process on `devices` virtual CPU devices (same numerics flags as
    conftest.py; a shared persistent compilation cache so only the first launch compiles)."""
    env = {**os.environ, **(env or {})}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="highest", SEED_STORY_FAULT=fault)
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    cmd = [sys.executable, "-m", "seed_story_jax.cli", "train", TINY, *BASE, *_mesh(mesh),
           "--workdir", str(workdir), "--no-progress", *args]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=420):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _assert_only_complete_checkpoints(workdir):
    """Every directory that looks like a checkpoint (a step number) was committed by orbax."""
    for d in (workdir / "checkpoints").iterdir():
        if d.name.isdigit():
            assert (d / "commit_success.txt").is_file(), f"uncommitted checkpoint {d}"


def test_sigkill_and_sigterm_resume_exactly(ref222, tmp_path):
    """Killed mid-save (SIGKILL while the async save of step 3 is in flight), preempted (SIGTERM at
    step 4: saves and exits 0), killed mid-training (SIGKILL after step 5); each relaunch resumes from
    the newest complete checkpoint and the losses of steps 1-6 equal the uninterrupted run's exactly."""
    wd, cache = tmp_path / "run", tmp_path / "cache"
    rc, out = _finish(_train_cli(wd, "--stop-at", "6", fault="kill_in_save:3", cache=cache))
    assert rc == -signal.SIGKILL, out
    _assert_only_complete_checkpoints(wd)
    rc, out = _finish(_train_cli(wd, "--stop-at", "6", fault="term_at:4", cache=cache))
    assert rc == 0 and "SIGTERM: saved step 4" in out, out
    _assert_only_complete_checkpoints(wd)
    rc, out = _finish(_train_cli(wd, "--stop-at", "6", fault="kill_at:5", cache=cache))
    assert rc == -signal.SIGKILL and "resumed from" in out, out
    _assert_only_complete_checkpoints(wd)
    rc, out = _finish(_train_cli(wd, "--stop-at", "6", cache=cache))
    assert rc == 0 and "checkpoints/4" in out and "stopped at step 6" in out, out
    ref, got = _losses(ref222[0]), _losses(wd)
    assert [got[s] for s in range(1, 7)] == [ref[s] for s in range(1, 7)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~80 s on 2 busy cores: two fresh processes each compile the step
def test_two_processes_match_one(ref222, tmp_path):
    """2 processes × 4 CPU devices (jax.distributed on 127.0.0.1, gloo collectives) on mesh (2, 2, 2)
    give the losses of 1 process × 8 devices (MESH_TOL), write one checkpoint together, and a single
    process resumes from it."""
    wd, port = tmp_path / "run", _free_port()
    # process 0 is told by flags, process 1 by the environment
    procs = [_train_cli(wd, "--stop-at", "4", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                        "--process-id", "0", devices=4),
             _train_cli(wd, "--stop-at", "4", devices=4, env={"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                                              "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"})]
    results = [_finish(p) for p in procs]
    for rc, out in results:
        assert rc == 0, out
    ref, got = _losses(ref222[0]), _losses(wd)
    assert sorted(got) == [1, 2, 3, 4]
    for s in range(1, 5):
        assert got[s] == pytest.approx(ref[s], rel=MESH_TOL), f"step {s}"
    _assert_only_complete_checkpoints(wd)
    assert (wd / "checkpoints" / "4" / "commit_success.txt").is_file()
    # the two-process checkpoint resumes in one process (here, with the 8 local devices)
    res = loop.run(_cfg(), wd, progress=False, stop_at=6)
    assert res.step == 6
    got = _losses(wd)
    for s in (5, 6):
        assert got[s] == pytest.approx(ref[s], rel=MESH_TOL), f"step {s}"


@pytest.mark.slow
@pytest.mark.parametrize("faults", [
    ("kill_in_save:3", "kill_in_save:6", "kill_in_save:9"),
    ("kill_at:1", "kill_at:4", "kill_in_save:6", "kill_at:8"),
    ("external:2", "external:5", "external:7"),
])
def test_sigkill_at_many_points_resumes_exactly(tmp_path, faults):
    """SIGKILL from inside (mid-save, mid-training) and from outside (as soon as step k is logged),
    relaunching after each; the losses of steps 1-9 equal an uninterrupted run's exactly."""
    ref_wd = tmp_path / "ref"
    loop.run(_cfg(), ref_wd, progress=False, stop_at=9)
    wd, cache = tmp_path / "run", tmp_path / "cache"
    for fault in faults:
        kind, _, k = fault.partition(":")
        if kind == "external":
            proc = _train_cli(wd, "--stop-at", "9", cache=cache)
            while proc.poll() is None and max(_losses(wd), default=0) < int(k):
                time.sleep(0.01)
            proc.kill()
            _finish(proc)
        else:
            rc, out = _finish(_train_cli(wd, "--stop-at", "9", fault=fault, cache=cache))
            assert rc == -signal.SIGKILL, out
        _assert_only_complete_checkpoints(wd)
    rc, out = _finish(_train_cli(wd, "--stop-at", "9", cache=cache))
    assert rc == 0, out
    ref, got = _losses(ref_wd), _losses(wd)
    assert [got[s] for s in range(1, 10)] == [ref[s] for s in range(1, 10)]


def test_compile_step_ahead_in_a_thread_leaves_nothing_to_compile(one_device, tmp_path, compile_counter):
    """`compile_step` (what the demo runs in a thread for later stages) compiles the very step a
    later `run` of the config uses: that run compiles nothing (its initial state is cached from
    the earlier runs of this mesh), while a config not compiled ahead compiles its step."""
    import threading

    cfg = _cfg("train.lr=0.0021", mesh=(1, 1, 1))
    th = threading.Thread(target=loop.compile_step, args=(cfg,))
    th.start()
    th.join()
    with compile_counter() as c:
        res = loop.run(cfg, tmp_path / "ahead", progress=False, stop_at=2)
    assert res.step == 2 and c.count == 0, c.count
    with compile_counter() as c:
        loop.run(_cfg("train.lr=0.0022", mesh=(1, 1, 1)), tmp_path / "not_ahead", progress=False, stop_at=2)
    assert c.count >= 1
