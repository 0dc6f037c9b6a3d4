"""Training stages 1–3 (train/stage1.py, stage2.py, stage3.py) on tiny models and synthetic stories.

Each stage trains a handful of steps through the real machinery (make_task → Task → the train step
of train/step.py with AdamW), on the tiny configs shrunk further so the three train steps compile
quickly (one UNet level block, one Llama/ViT layer, 5-frame stories). Parameters start from a numpy
init (same shapes as the models' own; LoRA B zero, norms one), because XLA:CPU needs over a minute
to compile the tiny UNet's random initialiser alone. Asserted:
  - the loss falls (mean of the last 5 steps vs the first 5, with a margin that can fail);
  - the parameters that change are exactly the spec's trainable set (weight decay off, so a change
    means a gradient reached the parameter), and every frozen one — ViT, VAE, the agent in stage 3,
    the Llama's base kernels in stage 2, the resamplers' derived tables — stays bit-identical;
  - the train step compiles once.
The full loop (real init, checkpoints, metrics) on the tiny stage-2 config: the slow test and
benchmarks/train_tiny.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from seed_story_jax.config import ConfigError, load_config
from seed_story_jax.train import data as D
from seed_story_jax.train import state as S
from seed_story_jax.train.optim import lr_schedule, make_optimizer
from seed_story_jax.train.stages import make_task
from seed_story_jax.train.step import make_train_step

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
STEPS = 24
SHRINK = [  # on top of the tiny stage configs: smaller programs, shorter samples
    "unet.layers_per_block=1", "unet.transformer_layers_per_block=[1,1]", "llm.num_layers=1", "vit.layers=1",
    "data.chunk=5", "data.max_images=5", "mllm.max_images=5", "data.max_length=192",
    f"train.steps={STEPS}", "train.batch_size=4", "train.grad_accum=1", "train.warmup_steps=2",
    "train.weight_decay=0.0", "train.synthetic_examples=64",
]


def _cfg(stage: int, *over):
    return load_config(CONFIGS / f"tiny-stage{stage}.yaml", SHRINK + list(over))


def _numpy_init(tree: dict, seed: int) -> dict:
    """Normal(0, 1/√fan_in) kernels and tables, zero biases and LoRA B, unit norm scales."""
    rng = np.random.default_rng(seed)

    def init(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(x.shape, x.dtype)
        if name in ("bias", "lora_b"):
            return np.zeros(x.shape, x.dtype)
        fan_in = int(np.prod(x.shape[:-1])) if len(x.shape) > 1 else int(x.shape[0])
        return (rng.standard_normal(x.shape) / np.sqrt(fan_in)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(init, tree)


def _flat(tree: dict) -> dict:
    return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def _train(cfg, counter):
    """STEPS steps of cfg's task; (task, per-step metrics, params before/after, frozen before/after),
    the trees flattened to {"component/path": array}."""
    task = make_task(cfg)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: task.build(nnx.Rngs(0)))
    graphdef, tr, fr = nnx.split(abstract, S.trainable_filter(task.trainable), ...)
    params, frozen = _numpy_init(tr.to_pure_dict(), 0), _numpy_init(fr.to_pure_dict(), 1)
    before = _flat(params), _flat(frozen)
    t = cfg.train
    tx = make_optimizer(t)
    state = S.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                         rng=jax.random.key_data(jax.random.key(t.seed)))
    step = jax.jit(make_train_step(graphdef, task.loss_fn, tx, grad_accum=t.grad_accum, lr_fn=lr_schedule(t)),
                   donate_argnums=0)
    batches = D.batch_iterator(task.examples, t.batch_size, range(t.batch_size), seed=t.seed)
    first = next(batches)
    state, m = step(state, frozen, first)
    metrics = [jax.device_get(m)]
    with counter() as compiles:
        for _ in range(STEPS - 1):
            state, m = step(state, frozen, next(batches))
            metrics.append(jax.device_get(m))
    assert compiles.count == 0, "the train step recompiled"
    assert all(float(x["finite"]) == 1.0 for x in metrics)
    return task, metrics, before, (_flat(state.params), _flat(frozen))


def _series(metrics, key):
    return np.array([float(m[key]) for m in metrics])


def _falls(values, margin):
    first, last = values[:5].mean(), values[-5:].mean()
    assert last < first - margin, (first, last, values.round(3).tolist())
    return first, last


def _changed(before: dict, after: dict) -> set:
    assert before.keys() == after.keys()
    return {k for k in before if not np.array_equal(before[k], after[k])}


def _is_kv(path: str) -> bool:
    return re.search(r"/attn[12]/to_[kv]/", path) is not None


# ------------------------------------------------------------------------------ stage 1


@pytest.fixture(scope="module")
def stage1(compile_counter_module):
    return _train(_cfg(1), compile_counter_module)


@pytest.fixture(scope="module")
def compile_counter_module():
    from seed_story_jax.profiling import CompileCounter

    return CompileCounter


def test_stage1_loss_falls(stage1):
    _, metrics, _, _ = stage1
    _falls(_series(metrics, "mse"), 0.1)
    np.testing.assert_array_equal(_series(metrics, "mse"), _series(metrics, "loss"))


def test_stage1_trains_exactly_the_resampler_and_unet_kv(stage1):
    """Spec §4.3 (set_trainable_v2): the resampler and every attn1/attn2 to_k/to_v of the UNet."""
    task, _, (p0, f0), (p1, f1) = stage1
    expected = {k for k in p0 if k.startswith("detokenizer/") or (k.startswith("unet/") and _is_kv(k))}
    assert set(p0) == expected  # the trainable tree is exactly that set...
    assert _changed(p0, p1) == expected  # ...and every one of them received a gradient
    assert not _changed(f0, f1)
    assert {k.split("/")[0] for k in f0} == {"vit", "vae", "unet"}
    from seed_story_jax.models.unet import is_kv_projection

    kv = {k for k in expected if k.startswith("unet/")}
    assert kv and all(is_kv_projection(tuple(k.split("/")[1:])) for k in kv)  # the model's own K/V helper agrees
    assert not any(is_kv_projection(tuple(k.split("/")[1:])) for k in f0 if k.startswith("unet/"))


def test_stage1_unet_preset_trains_the_whole_unet():
    cfg = _cfg(1, "train.trainable=unet")
    task = make_task(cfg)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: task.build(nnx.Rngs(0)))
    trained = {"/".join(map(str, p)) for p, _ in nnx.state(abstract, S.trainable_filter(task.trainable)).flat_state()}
    everything = {"/".join(map(str, p)) for p, _ in nnx.state(abstract, nnx.Param).flat_state()}
    assert trained == {k for k in everything if k.split("/")[0] in ("detokenizer", "unet")}
    kv = make_task(_cfg(1))
    assert task.flops_per_example > kv.flops_per_example  # weight gradients of the whole UNet


# ------------------------------------------------------------------------------ stage 2


@pytest.fixture(scope="module")
def stage2(compile_counter_module):
    return _train(_cfg(2), compile_counter_module)


def test_stage2_ce_and_cosine_fall(stage2):
    _, metrics, _, _ = stage2
    ce, cos, total = (_series(metrics, k) for k in ("lm_loss", "rec_loss", "loss"))
    _falls(ce, 1.0)
    _falls(cos, 0.2)
    np.testing.assert_allclose(total, ce + cos, rtol=1e-6)  # lm_loss_scale = rec_loss_scale = 1
    assert (_series(metrics, "gen_images") == 4).all()  # one target image per sample


def test_stage2_lora_trains_adapters_norms_embeddings_head_resamplers(stage2):
    """Spec §2.4/§5.3: LoRA A/B, every RMSNorm, embed_tokens, lm_head, both agent resamplers; the
    Llama's base kernels, the ViT and the resamplers' derived (FrozenParam) tables stay put."""
    _, _, (p0, f0), (p1, f1) = stage2
    llm_trained = re.compile(r"^llm/(.*/lora_[ab]$|.*norm/scale$|embed_tokens/|lm_head/)")
    tables = re.compile(r"^mllm/.*/(pos_embed|key_pos_embed)$")
    expected = {k for k in p0 | f0 if llm_trained.search(k) or (k.startswith("mllm/") and not tables.search(k))}
    assert set(p0) == expected and _changed(p0, p1) == expected
    assert not _changed(f0, f1)
    base = {k for k in f0 if k.startswith("llm/") and k.endswith("/kernel")}
    assert len(base) == 7  # q, k, v, o, gate, up, down of the one layer
    assert {k for k in f0 if tables.search(k)} and {k for k in f0 if k.startswith("vit/")}


def test_stage2_full_preset_trains_the_whole_agent_not_the_vit():
    task = make_task(_cfg(2, "train.trainable=full"))
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: task.build(nnx.Rngs(0)))
    trained = {p[0] for p, _ in nnx.state(abstract, S.trainable_filter(task.trainable)).flat_state()}
    frozen = {"/".join(map(str, p)) for p, _ in nnx.state(abstract, nnx.Not(S.trainable_filter(task.trainable)))
              .flat_state()}
    assert trained == {"llm", "mllm"}
    assert all(k.startswith("vit/") or re.search(r"pos_embed$", k) for k in frozen)
    lora = make_task(_cfg(2))
    assert task.flops_per_example > lora.flops_per_example  # 6N instead of 4N for the base kernels


def test_pinned_llama_on_8_devices_is_mllm_loss_fn():
    """Stage 2's loss = models/mllm.py's loss_fn; the activation pins (PinnedLlama) only choose
    shardings: on mesh (2, 2, 2) under the train step's rules, CE and cosine equal the plain
    single-device loss_fn within 1e-5 relative (fp32, sharded reductions reorder sums)."""
    from seed_story_jax.models import mllm as M
    from seed_story_jax.nn.sharding import activation_rules
    from seed_story_jax.train import rules as R
    from seed_story_jax.train.mesh import make_mesh
    from seed_story_jax.train.stage2 import agent_features, agent_loss

    cfg = _cfg(2, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    task = make_task(cfg)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: task.build(nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    params = _numpy_init(state.to_pure_dict(), 0)
    batch = next(D.batch_iterator(task.examples, 8, range(8), seed=0))

    def plain(p, b):
        m = nnx.merge(graphdef, p)
        return M.loss_fn(m.llm, m.mllm, b, agent_features(m, b))[1]

    want = jax.jit(plain)(params, batch)
    mesh = make_mesh(cfg.mesh, jax.devices()[:8])
    p_sh = R.state_shardings(state, mesh, cfg.mesh.rules)
    b_sh = {k: R.batch_sharding(mesh, v.shape, cfg.mesh.rules) for k, v in batch.items()}
    with activation_rules(mesh, cfg.mesh.rules):
        got = jax.jit(lambda p, b: agent_loss(nnx.merge(graphdef, p), b)[1], in_shardings=(p_sh, b_sh))(params, batch)
    for k in ("lm_loss", "rec_loss"):
        assert float(got[k]) == pytest.approx(float(want[k]), rel=1e-5), k


# ------------------------------------------------------------------------------ stage 3


@pytest.fixture(scope="module")
def stage3(compile_counter_module):
    return _train(_cfg(3), compile_counter_module)


def test_stage3_loss_falls(stage3):
    _, metrics, _, _ = stage3
    _falls(_series(metrics, "mse"), 0.1)
    agent = _series(metrics, "agent_rec_loss")
    assert np.isfinite(agent).all() and agent.std() < 0.1  # the frozen agent's cosine does not train


def test_stage3_only_resampler_and_unet_kv_change(stage3):
    """Spec §5.4: only the de-tokenizer resampler and the UNet K/V projections learn; the agent (Llama,
    its resamplers), the ViT and the VAE are frozen."""
    _, _, (p0, f0), (p1, f1) = stage3
    expected = {k for k in p0 | f0 if k.startswith("detokenizer/") or (k.startswith("unet/") and _is_kv(k))}
    assert set(p0) == expected and _changed(p0, p1) == expected
    assert not _changed(f0, f1)
    assert {k.split("/")[0] for k in f0} == {"vit", "llm", "mllm", "unet", "vae"}


# ------------------------------------------------------------------------------ examples, FLOPs, errors


def test_examples_have_the_stage_layouts():
    for stage, keys in ((1, {"image", "sd_image", "time_ids"}),
                        (2, {"input_ids", "labels", "ids_cmp_mask", "ids_gen_mask", "images", "embeds_cmp_mask",
                             "embeds_gen_mask"}),
                        (3, {"input_ids", "ids_cmp_mask", "ids_gen_mask", "images", "embeds_cmp_mask",
                             "embeds_gen_mask", "sd_image", "time_ids"})):
        task = make_task(_cfg(stage))
        a, b = task.examples[3], task.examples[3]
        assert set(a) == keys
        for k in keys:
            np.testing.assert_array_equal(a[k], b[k])  # random access is deterministic
        if "images" in a:
            assert a["images"].shape == (5, 28, 28, 3) and a["input_ids"].shape == (192,)
            assert a["embeds_gen_mask"].sum() == 1 and a["ids_gen_mask"].sum() == 4
        if "sd_image" in a:
            assert a["sd_image"].shape == (32, 32, 3) and -1.0 <= a["sd_image"].min() <= a["sd_image"].max() <= 1.0
            np.testing.assert_array_equal(a["time_ids"], [32, 32, 0, 0, 32, 32])  # square frames: no crop


def test_kv_weight_gradient_flops_by_hand():
    """Tiny UNet (latents 16², levels 0 and 1, transformers only at level 1 → 8² = 64 tokens; depth 2):
    down_blocks.1 has 2 attentions, the mid block 1, up_blocks.0 3 → 6 transformers × 2 blocks = 12.
    Per block attn1 K and V (64→64) on 64 tokens: 2 · (2·64·64·64); attn2 K and V (32→64) on the
    resampler's 16 queries: 2 · (2·16·32·64)."""
    from seed_story_jax.train.stage1 import kv_weight_grad_flops

    cfg = load_config(CONFIGS / "tiny-stage1.yaml")
    per_block = 2 * (2 * 64 * 64 * 64) + 2 * (2 * 16 * 32 * 64)
    assert kv_weight_grad_flops(cfg, 16) == 12 * per_block


def test_layer_stack_flops_extrapolate_exactly():
    """forward_flops counts a 3-layer ViT from 1- and 2-layer copies; equal to lowering all three."""
    from seed_story_jax.train import stage1 as S1

    vit = load_config(CONFIGS / "tiny.yaml", ["vit.layers=3"]).vit
    x = S1._f32(1, 28, 28, 3)
    direct = S1._forward_flops("vit", vit, (((1, 28, 28, 3), "float32"),), "")
    assert S1.forward_flops("vit", vit, x) == direct > 0


def test_stage2_llm_flops_follow_the_lora_accounting():
    """Per token: 4·|w| frozen base kernels + 6·|w| for LoRA A/B and lm_head + 6·L·T·H·D attention."""
    from seed_story_jax.train.stage2 import llm_flops_per_token

    cfg = _cfg(2)
    task = make_task(cfg)
    e, f, v, r, t = 64, 172, 1024, 16, 192
    base = 4 * e * e + 3 * e * f  # one layer's q, k, v, o, gate, up, down
    lora = 4 * (e * r + r * e) + 2 * (e * r + r * f) + (f * r + r * e)
    expected = 4 * base + 6 * lora + 6 * e * v + 6 * 1 * t * 4 * 16
    assert llm_flops_per_token(cfg, task.trainable, t) == expected
    fwd = 2 * base + 2 * lora + 2 * e * v + 2 * 1 * t * 4 * 16
    assert llm_flops_per_token(cfg, task.trainable, t, forward_only=True) == fwd


@pytest.mark.parametrize("stage,over,match", [
    (2, ["train.trainable=kv"], "stage 2 trains the agent"),
    (2, ["llm.lora=null"], "needs an llm.lora section"),
    (1, ["train.trainable=lora"], "stage 1 trains the de-tokenizer"),
    (1, ["data.image_size=56"], "data.image_size"),
    (3, ["data.num_img_tokens=9"], "data.num_img_tokens"),
    (1, ["train.data=dataset"], "needs data.path"),
    (2, ["data.path=/nonexistent"], "nonexistent"),
])
def test_config_errors_name_the_key(stage, over, match):
    with pytest.raises(Exception, match=match) as e:
        make_task(_cfg(stage, *over))
    assert isinstance(e.value, (ConfigError,)) or "DataError" in type(e.value).__name__


# ------------------------------------------------------------------------------ the whole loop (slow)


@pytest.mark.slow
def test_tiny_stage2_through_the_loop(tmp_path):
    """seed-story train configs/tiny-stage2.yaml for 30 steps: real init, metrics with CE and cosine
    apart, MFU, a checkpoint, no recompilation."""
    from seed_story_jax.train import loop
    from seed_story_jax.train.metrics import read_jsonl

    cfg = load_config(CONFIGS / "tiny-stage2.yaml", ["train.steps=30", "train.log_every=1", "mesh.fsdp=1"])
    res = loop.run(cfg, tmp_path, progress=False, devices=jax.devices()[:1])
    assert res.status == "done" and res.last_checkpoint == 30
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    ce = np.array([m["lm_loss"] for m in lines])
    assert ce[-5:].mean() < ce[:5].mean() - 0.5
    assert all(m["compiles"] == 0 for m in lines) and lines[-1]["tokens_per_s"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_mesh_222_matches_one_device(tmp_path, stage):
    """The first 3 losses on 8 virtual devices as (data, fsdp, tensor) = (2, 2, 2) equal one device's
    (1e-5 relative: sharded reductions sum in another order)."""
    from seed_story_jax.train import loop
    from seed_story_jax.train.metrics import read_jsonl

    over = SHRINK + ["train.steps=3", "train.log_every=1", "train.batch_size=8", "train.seed=3"]
    losses = []
    for mesh, devices in (((2, 2, 2), jax.devices()[:8]), ((1, 1, 1), jax.devices()[:1])):
        cfg = load_config(CONFIGS / f"tiny-stage{stage}.yaml",
                          over + [f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}", f"mesh.tensor={mesh[2]}"])
        wd = tmp_path / "x".join(map(str, mesh))
        loop.run(cfg, wd, progress=False, devices=devices)
        losses.append([m["loss"] for m in read_jsonl(wd / "metrics.jsonl")])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
