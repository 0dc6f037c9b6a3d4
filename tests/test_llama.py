"""Flax Llama vs transformers.LlamaForCausalLM (tiny random configs, fp32), layer layouts, LoRA, sizes.

Relative error everywhere: max|ours - ref| / max|ref|.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from convert import llama as conv
from seed_story_jax.config import LlamaConfig, LoRAConfig, load_config, resolve_config_path
from seed_story_jax.models import llama as L
from seed_story_jax.nn.params import count_params

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=4)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def hf_llama(cfg: LlamaConfig, seed: int = 0) -> transformers.LlamaForCausalLM:
    hf = {k: v for k, v in conv.config_to_hf(cfg, "float32").items() if k not in ("architectures", "torch_dtype", "dtype")}
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf)).eval()


def converted(ref, cfg: LlamaConfig) -> L.Llama:
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    return L.from_params(cfg, conv.from_torch(sd, cfg))


@jax.jit
def _forward(graphdef, state, ids, kw):
    return nnx.merge(graphdef, state)(ids, **kw)[:2]


_forward = jax.jit(_forward.__wrapped__, static_argnums=0)


def forward(model, ids=None, **kw):
    """(logits, hidden) of a jitted forward (cached per model structure); keyword arrays are traced."""
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, None if ids is None else jnp.asarray(ids), kw)


def random_params(cfg: LlamaConfig, seed: int = 0) -> dict:
    """numpy random params (no XLA compile of RNG code): N(0, 0.02) weights, norm scales near 1,
    LoRA A ~ N(0, 0.1), LoRA B zero (peft's init)."""
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = path[-1].key
        if name == "scale":
            return (1.0 + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
        if name == "lora_b":
            return np.zeros(x.shape, np.float32)
        return (rng.standard_normal(x.shape) * (0.1 if name == "lora_a" else 0.02)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, nnx.state(L.abstract_model(cfg), nnx.Param).to_pure_dict())


def build(cfg, seed=0):
    return L.from_params(cfg, random_params(cfg, seed))


@pytest.mark.parametrize("variant", [
    dict(),                                         # multi-head, untied
    dict(num_kv_heads=2),                           # grouped-query
    dict(tie_word_embeddings=True),                 # tied embeddings
    dict(num_kv_heads=1, rope_theta=500000.0),      # multi-query, non-default theta
])
def test_logits_match_transformers(variant):
    """Tolerance: max relative error 1e-5 on fp32 logits (measured ~3e-7)."""
    cfg = LlamaConfig(**{**TINY, **variant})
    ref = hf_llama(cfg)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        want = ref(torch.from_numpy(ids), output_hidden_states=True)
    logits, hidden = forward(converted(ref, cfg), ids)
    assert rel_err(logits, want.logits.numpy()) <= 1e-5
    # hidden_states[-1] of HF is the output of the final RMSNorm: the features SEED-Story regresses.
    assert rel_err(hidden, want.hidden_states[-1].numpy()) <= 1e-5


def test_rmsnorm_bf16_matches_hf():
    """bf16 RMSNorm: variance in fp32, cast back, weight multiply in bf16 — bit-equal to HF's."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from seed_story_jax.nn.layers import RMSNorm

    x = np.random.default_rng(0).standard_normal((3, 5, 64)).astype(np.float32) * 3
    w = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    ref = LlamaRMSNorm(64, eps=1e-5).to(torch.bfloat16)
    ref.weight.data = torch.from_numpy(w).to(torch.bfloat16)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).to(torch.bfloat16)).float().numpy()
    with nnx.use_eager_sharding(False):
        norm = RMSNorm(64, eps=1e-5, rngs=nnx.Rngs(0), param_dtype="bfloat16", dtype="bfloat16")
    norm.scale[...] = jnp.asarray(w, jnp.bfloat16)
    got = np.asarray(norm(jnp.asarray(x, jnp.bfloat16)).astype(jnp.float32))
    np.testing.assert_array_equal(got, want)


def test_inputs_embeds_entry_and_positions():
    cfg = LlamaConfig(**TINY)
    model = build(cfg)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 8)))
    pos = jnp.arange(8)[None].repeat(2, 0)
    a = forward(model, ids, positions=pos)[0]
    b = forward(model, inputs_embeds=jnp.take(model.embed_tokens["embedding"][...], ids, axis=0), positions=pos)[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # positions shift: RoPE is relative, so a constant offset leaves attention logits unchanged.
    c = forward(model, ids, positions=pos + 100)[0]
    assert rel_err(c, a) <= 1e-4
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_scan_equals_unrolled_and_remat_gradients():
    """Stacked (lax.scan) layers and remat give the unrolled model's logits (1e-6 rel) and
    gradients (1e-5 rel)."""
    cfg = LlamaConfig(**{**TINY, "num_kv_heads": 2})
    params = nnx.state(build(cfg), nnx.Param).to_pure_dict()
    ids = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 12)))
    unrolled = L.from_params(cfg, params)
    scanned_cfg = dataclasses.replace(cfg, scan_layers=True, remat="minimal")
    scanned = L.from_params(scanned_cfg, params)
    assert L.is_stacked(nnx.state(scanned, nnx.Param).to_pure_dict())
    spec = nnx.get_partition_spec(nnx.state(scanned, nnx.Param))
    assert tuple(spec["layers"]["self_attn"]["q_proj"]["kernel"].value) == ("layers", "embed", "heads")
    assert rel_err(forward(scanned, ids)[0], forward(unrolled, ids)[0]) <= 1e-6

    def loss(model):
        logits = model(ids)[0]
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, ids[..., None], -1)[..., 0])

    def grads(model):
        g = jax.jit(nnx.grad(loss))(model)
        return L.unstack_layers(nnx.state(g, nnx.Param).to_pure_dict())

    g_ref, g_scan = grads(unrolled), grads(scanned)
    for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_ref)):
        assert rel_err(a, b) <= 1e-5
    # the relayout helpers round-trip exactly
    back = L.unstack_layers(L.stack_layers(params))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_every_param_has_logical_names_and_lora_is_selectable():
    cfg = LlamaConfig(**TINY, lora=LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj")))
    for scan in (False, True):
        model = L.abstract_model(dataclasses.replace(cfg, scan_layers=scan))
        state = nnx.state(model, nnx.Param)
        for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
            names = var.get_metadata().get("out_sharding")
            assert names is not None and len(names) == len(var.get_value().shape), (path, names)
        lora = nnx.state(model, nnx.LoRAParam).to_pure_dict()
        layer = lora["layers"] if scan else lora["layers"][0]
        assert sorted(layer["self_attn"]) == ["q_proj", "v_proj"] and list(layer["mlp"]) == ["down_proj"]
        a = layer["self_attn"]["q_proj"]["lora_a"]
        assert a.shape[-2:] == (64, 4)
        names = nnx.get_partition_spec(nnx.state(model, nnx.LoRAParam))
        sub = names["layers"] if scan else names["layers"][0]
        assert "lora_rank" in tuple(sub["self_attn"]["q_proj"]["lora_b"].value)


def test_lora_zero_b_is_base_and_equals_merged_weights():
    """Tolerance: 1e-6 rel (zero B is exact up to summation order; merged W + s·A·B ~1e-7)."""
    base_cfg = LlamaConfig(**TINY)
    lora_cfg = dataclasses.replace(base_cfg, lora=LoRAConfig(rank=4, alpha=8.0, dropout=0.5))
    base = build(base_cfg)
    lora = build(lora_cfg, seed=1)
    nnx.update(lora, nnx.state(base, nnx.Param))  # same base weights; A random, B zero
    ids = jnp.asarray(np.random.default_rng(4).integers(0, base_cfg.vocab_size, (2, 10)))
    want = forward(base, ids)[0]
    assert rel_err(forward(lora, ids)[0], want) <= 1e-6
    # zero B also hides LoRA dropout (it acts on the LoRA branch only)
    assert rel_err(forward(lora, ids, dropout_key=jax.random.key(0))[0], want) <= 1e-6

    # random B: LoRA forward == base model with W + scaling·A·B
    rng = np.random.default_rng(5)
    merged = nnx.state(base, nnx.Param).to_pure_dict()
    for i in range(lora_cfg.num_layers):
        layer = lora.layers[i]
        for group, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                             ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                mod = getattr(getattr(layer, group), name)
                mod.lora_b[...] = jnp.asarray(rng.standard_normal(mod.lora_b.shape) * 0.05, jnp.float32)
                merged["layers"][i][group][name]["kernel"] = (
                    np.asarray(mod.kernel[...]) + lora_cfg.lora.scaling * np.asarray(mod.lora_a[...]) @ np.asarray(mod.lora_b[...]))
    got = forward(lora, ids)[0]
    assert rel_err(got, forward(L.from_params(base_cfg, merged), ids)[0]) <= 1e-5
    assert rel_err(got, want) > 1e-3  # the adapters did change the output
    d1, d2 = (forward(lora, ids, dropout_key=jax.random.key(0))[0] for _ in range(2))
    np.testing.assert_array_equal(np.asarray(d1), np.asarray(d2))
    assert rel_err(d1, got) > 1e-4  # dropout active when a key is given


def test_llama2_7b_config_param_count():
    """transformers' count for Llama-2-7B with the vocabulary resized to 32066."""
    from seed_story_jax.models import abstract_params

    cfg = load_config(resolve_config_path("llama2-7b")).llm
    shapes = abstract_params("llm", cfg)
    assert count_params(shapes) == 6_738_956_288
    assert shapes["layers"]["self_attn"]["q_proj"]["kernel"].shape == (32, 4096, 4096)
    assert shapes["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    assert sum(int(np.prod(s)) for s in conv.hf_shapes(cfg).values()) == 6_738_956_288
    with_lora = dataclasses.replace(cfg, lora=LoRAConfig())
    lora = jax.eval_shape(lambda: nnx.state(L.abstract_model(with_lora), nnx.LoRAParam).to_pure_dict())
    assert count_params(lora) == 39_976_960  # spec §2.4: trainable LoRA params of stage 2
