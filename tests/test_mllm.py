"""The agent (models/mllm.py) against the torch reference tests/torch_ref/agent.py (transformers'
LlamaForCausalLM in the peft 0.4 layout + spec resamplers), on a tiny config with the 66 image tokens
of a tiny SentencePiece tokenizer. Weights go torch → JAX through convert/agent.py (LoRA kept).

Tolerances (fp32, CPU, matmul precision "highest"): logits and the three losses ≤ 1e-5 relative
(logits: to the max |logit|); regressed features ≤ 1e-4 relative; generated tokens identical."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert import agent as conv
from data_pipeline.samples import build_sample, image_string
from seed_story_jax.config import LoRAConfig, load_config, resolve_config_path
from seed_story_jax.generate import GenerateOptions
from seed_story_jax.models import llama as llama_model
from seed_story_jax.models import mllm
from seed_story_jax.tokenizer import train_tiny_tokenizer
from tests.torch_ref import agent as ref

RTOL = 1e-5
FEAT_RTOL = 1e-4
LORA = LoRAConfig(rank=8, alpha=16.0, dropout=0.05)


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-12))


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # The tiny reference is latency-bound: more threads only contend with XLA's (8x slower here).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=400)


def _config(tok, n: int):
    """tiny.yaml with the tokenizer's vocabulary; n = 4 (as tiny.yaml) or 64 (the real image length)."""
    over = [f"llm.vocab_size={tok.vocab_size}"]
    if n != 4:
        g = int(round(n ** 0.5))
        over += [f"mllm.num_img_tokens={n}", f"mllm.input_resampler.grid_size={g}",
                 f"mllm.output_resampler.input_tokens={n}"]
    cfg = load_config(resolve_config_path("tiny"), over)
    return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, lora=LORA))


def _torch_agent(cfg, seed=0):
    return ref.tiny_agent(cfg, seed)


def _jax_agent(cfg, torch_agent):
    sd = {k: v.detach().numpy().copy() for k, v in torch_agent.state_dict().items()}
    params = conv.from_torch(sd, cfg, keep_lora=True)
    llm = llama_model.from_params(cfg.llm, params["llm"])
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: mllm.build(cfg.mllm, nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params["mllm"]))
    return llm, nnx.merge(graphdef, state)


CAPTIONS = ["George sees a big red kite in the park.", "He runs after it!", "The man with the yellow hat laughs.",
            "They go home together.", "Then the moon comes out."]


def _batch(tok, cfg, rng):
    """Row 0: three input images + one target (g = 2); row 1: one input + one target (g = 0)."""
    n, m = cfg.mllm.num_img_tokens, cfg.mllm.max_images
    rc = cfg.mllm.input_resampler
    samples = [build_sample(CAPTIONS, 2, tok, num_img_tokens=n, max_length=400),
               build_sample(CAPTIONS[2:], 0, tok, num_img_tokens=n, max_length=400)]
    b = {k: np.stack([getattr(s, k) for s in samples]) for k in
         ("input_ids", "labels", "ids_cmp_mask", "ids_gen_mask", "attention_mask")}
    feats = np.zeros((2, m, rc.input_tokens, rc.kv_dim), np.float32)
    cmp, gen = np.zeros((2, m), bool), np.zeros((2, m), bool)
    for r, s in enumerate(samples):
        k = len(s.embeds_cmp_mask)
        feats[r, :k] = rng.standard_normal((k, rc.input_tokens, rc.kv_dim)).astype(np.float32)
        cmp[r, :k], gen[r, :k] = s.embeds_cmp_mask, s.embeds_gen_mask
    b.update(embeds_cmp_mask=cmp, embeds_gen_mask=gen)
    return b, feats


@nnx.jit
def _loss(llm, res, batch, feats):
    out = mllm.forward(llm, res, batch["input_ids"], feats, batch["ids_cmp_mask"], batch["embeds_cmp_mask"],
                       batch["ids_gen_mask"], batch["embeds_gen_mask"], max_gen=res.cfg.max_gen_images)
    total, metrics = mllm.losses(out, batch["labels"], res.cfg)  # loss_fn = forward + losses
    return out.logits, out.rec, total, metrics


@pytest.mark.parametrize("n", [4, 64])
def test_forward_and_losses_match_reference(tok, n):
    cfg = _config(tok, n)
    t_agent = _torch_agent(cfg)
    llm, res = _jax_agent(cfg, t_agent)
    batch, feats = _batch(tok, cfg, np.random.default_rng(0))
    mllm.check_image_masks(batch, n)
    assert batch["embeds_cmp_mask"][0].sum() == 3 and batch["embeds_gen_mask"][0].sum() == 1

    # The original's concatenated layout: valid slots row-major.
    valid = batch["embeds_cmp_mask"] | batch["embeds_gen_mask"]
    with torch.no_grad():
        want = t_agent(
            input_ids=torch.from_numpy(batch["input_ids"]).long(), labels=torch.from_numpy(batch["labels"]).long(),
            image_embeds=torch.from_numpy(feats[valid]),
            embeds_gen_mask=torch.from_numpy(batch["embeds_gen_mask"][valid]),
            embeds_cmp_mask=torch.from_numpy(batch["embeds_cmp_mask"][valid]),
            ids_gen_mask=torch.from_numpy(batch["ids_gen_mask"]), ids_cmp_mask=torch.from_numpy(batch["ids_cmp_mask"]))
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    logits, rec, total, metrics = _loss(llm, res, jb, jnp.asarray(feats))
    assert _rel(logits, want["logits"]) <= RTOL
    assert _rel(rec[:, 0], want["recon_image_embeds"]) <= RTOL
    for name in ("lm_loss", "rec_loss", "total_loss"):
        assert abs(float(metrics[name]) - float(want[name])) <= RTOL * abs(float(want[name])), name
    assert float(total) == float(metrics["total_loss"])
    assert int(metrics["gen_images"]) == 2 and int(metrics["lm_tokens"]) == int((batch["labels"][:, 1:] != -100).sum())
    # The merge is data, not decoration: swapping two input images changes the loss.
    swapped = feats.copy()
    swapped[0, [0, 1]] = feats[0, [1, 0]]
    _, _, total2, _ = _loss(llm, res, jb, jnp.asarray(swapped))
    assert abs(float(total2) - float(total)) > 1e-6


def test_merge_matches_boolean_scatter():
    """Static-shape merge == the original's `E[ids_cmp_mask] = lm[embeds_cmp_mask].view(-1, D)` on
    rows with different image counts, empty slots between used ones, and padding."""
    rng = np.random.default_rng(1)
    b, length, m, n, d = 3, 23, 4, 3, 5
    ids = np.zeros((b, length), bool)
    ids[0, 2:5] = ids[0, 7:10] = True  # two groups
    ids[2, 1:4] = ids[2, 10:13] = ids[2, 15:18] = True  # three groups; row 1 none
    slots = np.array([[True, False, True, False], [False] * 4, [True, True, False, True]])
    emb = rng.standard_normal((b, length, d)).astype(np.float32)
    lm = rng.standard_normal((b, m, n, d)).astype(np.float32)
    want = emb.copy()
    want[ids] = lm[slots].reshape(-1, d)  # row-major over the batch, as torch's boolean scatter
    got = jax.jit(mllm.merge_image_embeds)(jnp.asarray(emb), jnp.asarray(lm), jnp.asarray(ids), jnp.asarray(slots))
    np.testing.assert_array_equal(np.asarray(got), want)
    pos, slot, ok = jax.jit(mllm.gen_groups, static_argnums=(2, 3))(jnp.asarray(ids), jnp.asarray(slots), n, 3)
    np.testing.assert_array_equal(np.asarray(ok), [[True, True, False], [False] * 3, [True, True, True]])
    np.testing.assert_array_equal(np.asarray(pos)[2], [[1, 2, 3], [10, 11, 12], [15, 16, 17]])
    np.testing.assert_array_equal(np.asarray(slot)[0, :2], [0, 2])
    bad = {"ids_cmp_mask": ids, "embeds_cmp_mask": slots[:, ::-1] & [True, True, True, False],
           "ids_gen_mask": np.zeros_like(ids), "embeds_gen_mask": np.zeros_like(slots)}
    with pytest.raises(Exception, match="row 0"):
        mllm.check_image_masks(bad, n)


@pytest.mark.parametrize("mode", ["zero", "neg_inf"])
def test_forcing_processor_matches_reference(tok, mode):
    ids = mllm.ImageTokens.from_tokenizer(tok, 64)
    assert ids.boi == tok.boi_id and ids.eoi == tok.eoi_id and ids.img == tuple(tok.img_ids)
    proc = mllm.ImageTokenForcing(ids, mode)
    rng = np.random.default_rng(2)
    last = np.array([ids.boi, ids.img[0], ids.img[17], ids.img[63], ids.eoi, 5, 1, ids.img[40]])
    logits = rng.standard_normal((len(last), tok.vocab_size)).astype(np.float32) - 10.0
    seq = list(ids.sequence)
    want = ref.AutoImageTokenGenerationProcessor(seq, 0.0 if mode == "zero" else -float("inf"))(
        torch.from_numpy(last)[:, None], torch.from_numpy(logits.copy())).numpy()
    got = np.asarray(jax.jit(proc)(jnp.asarray(logits), jnp.asarray(last)))
    np.testing.assert_array_equal(got, want)
    assert got[3].argmax() == ids.eoi and got[0].argmax() == ids.img[0]
    if mode == "zero":  # the original's rule is no ban: with negative logits a suppressed id wins
        assert got[5].argmax() in seq[1:]
    else:
        assert got[5].argmax() not in seq[1:]


def _prompts(tok, n):
    """Row 0 leads into an image (ends with <img>, one input image); row 1 is text only."""
    img = image_string(n)
    a = [tok.bos_id] + tok.encode(CAPTIONS[0] + img + "[INST]" + CAPTIONS[1] + "<img>")
    b = [tok.bos_id] + tok.encode(CAPTIONS[3])
    return [a, b]


@pytest.mark.parametrize("mode", ["zero", "neg_inf"])
def test_generation_matches_reference(tok, mode, compile_counter):
    n = 64
    cfg = _config(tok, n)
    cfg = dataclasses.replace(cfg, mllm=dataclasses.replace(cfg.mllm, suppress_mode=mode))
    t_agent = _torch_agent(cfg, seed=3)
    llm, res = _jax_agent(cfg, t_agent)
    ids = mllm.ImageTokens.from_tokenizer(tok, n)
    rc = cfg.mllm.input_resampler
    image = np.random.default_rng(4).standard_normal((1, rc.input_tokens, rc.kv_dim)).astype(np.float32)
    prompts = _prompts(tok, n)
    max_new = n + 2 + 20
    opts = GenerateOptions(max_new_tokens=max_new, eos_token_id=tok.eos_id, pad_token_id=0)
    gen = mllm.AgentGenerator(llm, res, ids)

    # Warm-up: the same static shapes (prompt bucket, batch, max_new), text only, no image decoded.
    text = [tok.bos_id] + tok.encode(" ".join(CAPTIONS * 4))[: len(prompts[0]) - 1]
    warm = gen.generate([text, prompts[1]], None, opts)
    assert not warm.has_image.any()
    with compile_counter() as cc:
        out = gen.generate(prompts, [image, None], opts)
    assert cc.count == 0, f"{cc.count} compilations while decoding through an image"
    assert warm.tokens.shape == out.tokens.shape

    suppress = 0.0 if mode == "zero" else -float("inf")
    for r, (prompt, imgs) in enumerate(zip(prompts, [image, None])):
        p = torch.tensor([prompt])
        kw = {}
        if imgs is not None:
            cmp = torch.from_numpy(ids.cmp_mask(np.array([prompt])))
            kw = dict(image_embeds=torch.from_numpy(imgs), embeds_cmp_mask=torch.tensor([True]), ids_cmp_mask=cmp)
        want = t_agent.generate(list(ids.sequence), p, num_img_gen_tokens=n, max_new_tokens=max_new,
                                eos_token_id=tok.eos_id, suppress_value=suppress, **kw)
        w_ids = want["generate_ids"].numpy()
        k = int(out.num_generated[r])
        np.testing.assert_array_equal(out.tokens[r, :k], w_ids)
        assert bool(out.has_image[r]) == want["has_img_output"]
        if want["has_img_output"]:
            assert _rel(out.features[r], want["img_gen_feat"][0]) <= FEAT_RTOL
        else:
            assert not out.features[r].any()
    # Row 0 went through the forced image and on beyond it.
    t0 = list(out.tokens[0, : out.num_generated[0]])
    assert t0[: n + 1] == list(ids.img) + [ids.eoi] and len(t0) > n + 1 and out.has_image[0]


def test_george_7b_instantiates_abstractly_with_spec_counts():
    """configs/george-7b.yaml: spec §2.4 counts — LoRA 39,976,960; resamplers 67,403,776 + 68,190,208
    trainable; Llama-2-7b at 32066 tokens 6,738,956,288; stage-2 trainable total 438,521,856."""
    from seed_story_jax.models.resamplers import TRAINABLE
    from seed_story_jax.nn.params import count_params

    cfg = load_config(resolve_config_path("george-7b"))

    def make():
        llm = llama_model.build(cfg.llm, nnx.Rngs(0))
        res = mllm.build(cfg.mllm, nnx.Rngs(1))
        return (nnx.state(llm, nnx.LoRAParam).to_pure_dict(), nnx.state(llm, nnx.Param).to_pure_dict(),
                nnx.state(res.input_resampler, TRAINABLE).to_pure_dict(),
                nnx.state(res.output_resampler, TRAINABLE).to_pure_dict())

    with nnx.use_eager_sharding(False):
        lora, llm_all, res_in, res_out = jax.eval_shape(make)
    assert count_params(lora) == 39_976_960
    assert count_params(llm_all) - count_params(lora) == 6_738_956_288
    assert count_params(res_in) == 67_403_776 and count_params(res_out) == 68_190_208
    norms = count_params({k: v for k, v in llm_all["layers"].items() if "layernorm" in k})
    norms += count_params(llm_all["norm"])
    embeds = count_params(llm_all["embed_tokens"]) + count_params(llm_all["lm_head"])
    assert norms == 266_240 and embeds == 2 * 131_342_336
    assert count_params(lora) + norms + embeds + count_params(res_in) + count_params(res_out) == 438_521_856


def test_cosine_loss_masks_empty_targets_without_nan():
    """Invalid groups (empty slots: all-zero targets) neither count nor poison the gradient."""
    rng = np.random.default_rng(7)
    rec = jnp.asarray(rng.standard_normal((2, 2, 3, 8)), jnp.float32)
    target = np.asarray(rng.standard_normal((2, 2, 3, 8)), np.float32)
    target[1] = 0.0
    valid = jnp.asarray([[True, False], [False, False]])
    loss, n = jax.jit(mllm.cosine_loss)(rec, jnp.asarray(target), valid)
    r, t = np.asarray(rec[0, 0]), target[0, 0]
    want = np.mean(1 - (r * t).sum(-1) / np.linalg.norm(r, axis=-1) / np.linalg.norm(t, axis=-1))
    assert int(n) == 1 and abs(float(loss) - want) <= 1e-6
    g = jax.jit(jax.grad(lambda x: mllm.cosine_loss(x, jnp.asarray(target), valid)[0]))(rec)
    assert np.isfinite(np.asarray(g)).all() and not np.asarray(g)[1].any() and np.asarray(g)[0, 0].any()


@pytest.mark.slow
def test_gradients_reach_every_trained_part_and_stay_finite(tok):
    """Stage-2 gradients through loss_fn: LoRA, both resamplers and the embeddings get nonzero,
    finite gradients, also when a row has no target image (its masked cosine terms must not
    produce NaN through the all-zero empty slots)."""
    cfg = _config(tok, 4)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, num_layers=1))  # a cheaper backward
    llm, res = _jax_agent(cfg, _torch_agent(cfg, seed=5))
    batch, feats = _batch(tok, cfg, np.random.default_rng(6))
    batch["ids_gen_mask"][1] = False  # row 1: no target image
    batch["embeds_gen_mask"][1] = False
    jb = {k: jnp.asarray(v) for k, v in batch.items()}

    @nnx.jit
    def grads(llm, res):
        def f(llm, res):
            return mllm.loss_fn(llm, res, jb, jnp.asarray(feats), dropout_key=jax.random.key(0))[0]
        return nnx.grad(f, argnums=(0, 1))(llm, res)

    g_llm, g_res = grads(llm, res)
    g_llm, g_res = nnx.to_pure_dict(g_llm), nnx.to_pure_dict(g_res)
    leaves = jax.tree.leaves((g_llm, g_res))
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    for part in (g_res["input_resampler"]["query"], g_res["output_resampler"]["out_proj"]["kernel"],
                 g_llm["layers"][0]["self_attn"]["q_proj"]["lora_b"], g_llm["embed_tokens"]["embedding"]):
        assert np.abs(np.asarray(part)).max() > 0
