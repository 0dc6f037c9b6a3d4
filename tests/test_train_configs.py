"""The stage recipes: configs load with the spec's hyper-parameters, and the trainable presets select
the original's parameter sets at full size (abstractly, nothing allocated)."""

from pathlib import Path

import jax
import pytest
from flax import nnx

from seed_story_jax.config import load_config
from seed_story_jax.train.task import Bundle, trainable_predicate

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_stage_config_loads_and_says_how_to_run(stage):
    path = CONFIGS / f"stage{stage}.yaml"
    cfg = load_config(path)
    assert cfg.train.stage == stage
    header = path.read_text().split("\nbase:")[0]
    assert f"# Command: seed-story train configs/stage{stage}.yaml" in header
    assert f"# Plan:    seed-story plan configs/stage{stage}.yaml" in header


def test_stage2_recipe_is_the_originals():
    t = load_config(CONFIGS / "stage2.yaml").train  # spec §5.3
    assert (t.lr, t.betas, t.eps, t.weight_decay) == (1e-4, (0.9, 0.98), 1e-6, 0.05)
    assert (t.warmup_steps, t.min_lr_ratio, t.steps, t.clip_norm, t.grad_accum) == (100, 0.05, 6000, 1.0, 1)
    assert t.batch_size == 240 and t.trainable == "lora"


def test_stage3_recipe_is_the_originals():
    t = load_config(CONFIGS / "stage3.yaml").train  # spec §5.4
    assert (t.lr, t.betas, t.eps, t.weight_decay) == (1e-4, (0.9, 0.999), 1e-8, 0.03)
    assert (t.warmup_steps, t.min_lr_ratio, t.steps, t.clip_norm) == (500, 0.01, 1600, 1.0)
    assert t.batch_size == 128 and t.grad_accum == 4 and t.trainable == "kv"


def _count(model, predicate):
    from seed_story_jax.train.state import trainable_filter

    flat = nnx.state(model, trainable_filter(predicate)).flat_state()
    return sum(v.value.size for _, v in flat)


def test_stage2_lora_preset_selects_the_spec_count():
    """Spec §2.4: LoRA 39,976,960 + embed_tokens 131,342,336 + lm_head 131,342,336 + 65 RMSNorms 266,240
    + resamplers 135,593,984 = 438,521,856 trainable."""
    from seed_story_jax.models import llama, mllm

    cfg = load_config(CONFIGS / "stage2.yaml")
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Bundle(llm=llama.build(cfg.llm, nnx.Rngs(0)),
                                              mllm=mllm.build(cfg.mllm, nnx.Rngs(0))))
    pred = trainable_predicate("lora", ("llm", "mllm"))
    assert _count(model, pred) == 438_521_856
    lora_only = trainable_predicate("full", ("llm",), regex=r"lora_[ab]$")
    assert _count(model, lora_only) == 39_976_960
    base = _count(model, lambda p: p[0] == "llm" and not pred(p))
    assert base == 6_738_956_288 - 131_342_336 * 2 - 266_240  # the Llama's base projections stay frozen
    assert jax.tree.leaves(nnx.state(model, nnx.Param))  # abstract, nothing allocated
