"""The training loop on the tiny Llama (stage 0, causal LM on structured random tokens), in process on
the 8 virtual CPU devices: loss falls, meshes agree, params are sharded by the rules, checkpoints move
between meshes, resume is exact, the NaN guard keeps the last good checkpoint.

Tolerance between different meshes: 1e-5 relative on the loss (fp32; sharded reductions sum in a
different order). Same mesh after a resume: bit-exact."""

import shutil

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

# Every run has steps=40 (the schedule is part of the compiled step) so runs of one mesh share one
# compilation; short runs stop early with max_steps_this_run.
BASE = [
    "train.steps=40", "train.batch_size=8", "train.seq_len=16", "train.log_every=1", "train.checkpoint_every=3",
    "train.lr=0.003", "train.warmup_steps=1", "train.min_lr_ratio=1.0", "train.keep=5",
    "train.synthetic_examples=512", "train.seed=0",
]


def _cfg(*over, mesh=(2, 2, 2)):
    d, f, t = mesh
    return load_config("configs/tiny.yaml", BASE + [f"mesh.data={d}", f"mesh.fsdp={f}", f"mesh.tensor={t}", *over])


def _losses(workdir):
    """step → loss, the last line for a step winning (a resumed run rewrites the steps it redoes)."""
    return {m["step"]: m["loss"] for m in read_jsonl(workdir / "metrics.jsonl")}


@pytest.fixture(scope="module")
def ref222(tmp_path_factory):
    """6 steps on mesh (2, 2, 2), checkpoints at 3 and 6."""
    wd = tmp_path_factory.mktemp("ref222")
    res = loop.run(_cfg(), wd, progress=False, max_steps_this_run=6)
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
    res = loop.run(_cfg(), dst, progress=False, max_steps_this_run=3)
    assert res.step == 6
    ref, got = _losses(wd), _losses(dst)
    assert [got[s] for s in (4, 5, 6)] == [ref[s] for s in (4, 5, 6)]  # bit-exact


@pytest.mark.parametrize("mesh", [(8, 1, 1), (1, 1, 1)])
def test_checkpoint_moves_between_meshes(ref222, tmp_path, mesh):
    wd, _ = ref222
    dst = tmp_path / "run"
    _resume_from_step3(wd, dst)
    res = loop.run(_cfg(mesh=mesh), dst, progress=False, max_steps_this_run=3)
    assert res.step == 6
    ref, got = _losses(wd), _losses(dst)
    for s in (4, 5, 6):
        assert got[s] == pytest.approx(ref[s], rel=MESH_TOL), f"step {s}"
    q = res.state.params["llm"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
    assert len(q.sharding.device_set) == int(np.prod(mesh))


def test_grad_accumulation_matches_one_batch(one_device, tmp_path):
    b = loop.run(_cfg("train.grad_accum=2", mesh=(1, 1, 1)), tmp_path, progress=False, max_steps_this_run=3)
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
        loop.run(cfg, tmp_path, task=task, progress=False, max_steps_this_run=6)
    steps = sorted(int(d.name) for d in (tmp_path / "checkpoints").iterdir() if d.name.isdigit())
    assert steps == [2]
    logged = read_jsonl(tmp_path / "metrics.jsonl")
    assert logged[0]["step"] == 3 and logged[0]["finite"] == 1.0  # step 3 was fine
