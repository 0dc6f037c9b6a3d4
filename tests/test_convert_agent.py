"""convert/agent.py on a tiny synthetic agent checkpoint in the exact peft 0.4 layout, written with
torch.save from the torch reference (tests/torch_ref/agent.py), and a tiny HF Llama base directory
(save_pretrained) whose vocabulary is 66 rows short, like Llama-2-7b-hf vs the agent.

Exactness: keep-LoRA tensors and the round trip are bit-exact; merged kernels equal W + 2·B·A
computed in torch fp32 to 1e-6 absolute (summation order may differ by an ulp); the merged model's
logits equal the torch peft reference's to 1e-5 relative."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import convert
from convert import agent as conv
from convert.resamplers import qwen_resampler_from_torch
from seed_story_jax import cli
from seed_story_jax.checkpoint import load_component, read_config, read_manifest
from seed_story_jax.config import load_config, resolve_config_path
from seed_story_jax.models import llama as llama_model
from tests.torch_ref import agent as ref
from convert.torch_ref.resamplers import Resampler

P = conv.PREFIX


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """full.bin (trained + frozen base + original_module), trained.bin (trained only), base/ (HF)."""
    root = tmp_path_factory.mktemp("agent")
    cfg = load_config(resolve_config_path("tiny"))
    c, m = cfg.llm, cfg.mllm
    base_vocab = c.vocab_size - 66
    hf = ref.tiny_llama(base_vocab, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads,
                        eps=c.rms_norm_eps, seed=7)
    hf.save_pretrained(root / "base")
    hf.resize_token_embeddings(c.vocab_size)  # as the original: resize, then wrap with peft
    llm = ref.PeftModelForCausalLM(hf, r=16, alpha=32.0)
    ref.randomize_adapters(llm, seed=7)
    res = [Resampler(r.grid_size, r.embed_dim, r.num_heads, r.kv_dim) for r in (m.input_resampler, m.output_resampler)]
    agent = ref.ContinuousLVLM(llm, *res).eval()
    full = {k: v.detach().clone() for k, v in agent.state_dict().items()}
    torch.save(full, root / "full.bin")
    trained = {k: v for k, v in full.items() if not (
        k.endswith("original_module.weight") or (k.endswith("_proj.weight") and k.startswith(P + "model.layers.")))}
    torch.save(trained, root / "trained.bin")
    return {"root": root, "full": full, "trained": trained, "agent": agent, "cfg": cfg}


@nnx.jit
def _run(model, ids):
    return model(ids)[0]


def _logits(model, ids):
    return np.asarray(_run(model, jnp.asarray(ids)))


def _convert(*argv) -> int:
    return cli.main(["convert", "--kind", "agent", *map(str, argv)])


def _np(t):
    return t.detach().numpy()


def test_detect(src):
    assert convert.detect_kind(src["root"] / "full.bin") == "agent"
    assert not conv.detect(src["root"] / "base")


def test_merged_import_with_base_from_trained_only(src, tmp_path, capsys):
    dst = tmp_path / "merged"
    assert _convert(src["root"] / "trained.bin", dst, "--base", src["root"] / "base", "--config", "tiny",
                    "--verify", "--json") == 0
    out = capsys.readouterr().out
    # 7 projections × 2 layers came from --base, every trained tensor from the .bin
    assert '"base_from_base": 14' in out and '"base_from_agent": 0' in out and '"ok": true' in out
    cfg = read_config(dst)
    assert cfg.llm.lora is None and cfg.llm.vocab_size == 1024
    assert read_manifest(dst)["lora"] == "merged"
    llm = load_component(dst, "llm")
    full = src["full"]
    for i in range(cfg.llm.num_layers):
        for t in conv.TARGETS:
            name = f"{P}model.layers.{i}.{'self_attn' if t in conv.hf.ATTN else 'mlp'}.{t}"
            w, a, b = (full[name + s] for s in (".weight", ".lora_A.default.weight", ".lora_B.default.weight"))
            want = (w + 2.0 * (b @ a)).numpy().T
            group = "self_attn" if t in conv.hf.ATTN else "mlp"
            layer = llm["layers"][str(i)] if str(i) in llm["layers"] else llm["layers"][i]
            np.testing.assert_allclose(np.asarray(layer[group][t]["kernel"]), want, rtol=0, atol=1e-6)
            assert not np.allclose(want, _np(w).T)  # the adapters matter
    np.testing.assert_array_equal(np.asarray(llm["norm"]["scale"]),
                                  _np(full[P + "model.norm.modules_to_save.default.weight"]))
    np.testing.assert_array_equal(np.asarray(llm["embed_tokens"]["embedding"]),
                                  _np(full[P + "model.embed_tokens.weight"]))
    mllm = load_component(dst, "mllm")
    want = qwen_resampler_from_torch({k: _np(v) for k, v in full.items()}, "output_resampler.", input_tokens=4)
    np.testing.assert_array_equal(np.asarray(mllm["output_resampler"]["key_pos_embed"]), want["key_pos_embed"])
    np.testing.assert_array_equal(np.asarray(mllm["input_resampler"]["q_proj"]["kernel"]),
                                  _np(full["input_resampler.attn.in_proj_weight"])[:64].T)

    # End to end: the merged JAX Llama = the torch peft model (eval), fp32, 1e-5 relative.
    ids = np.random.default_rng(0).integers(0, cfg.llm.vocab_size, (2, 12))
    with torch.no_grad():
        want_logits = src["agent"].llm(input_ids=torch.from_numpy(ids)).logits.numpy()
    got = _logits(llama_model.from_params(cfg.llm, llm), ids)
    assert np.abs(got - want_logits).max() / np.abs(want_logits).max() <= 1e-5

    # Export: HF Llama directory (transformers reads it) + the resampler file.
    hf_dir = tmp_path / "hf"
    assert _convert(dst, hf_dir) == 0
    import transformers
    from safetensors.numpy import load_file

    back = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        again = back(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(again - want_logits).max() / np.abs(want_logits).max() <= 1e-5
    res = load_file(hf_dir / conv.RESAMPLER_FILE)
    want_res = {k: _np(v) for k, v in full.items() if k.split(".")[0] in conv.RESAMPLERS}
    assert set(res) == set(want_res)
    for k in want_res:
        np.testing.assert_array_equal(res[k], want_res[k])


def test_keep_lora_round_trip_is_bit_exact(src, tmp_path, capsys):
    """full.bin without --base → keep-LoRA checkpoint → peft .bin: every tensor as it was (the
    unused original_module copies are not kept); importing the export gives identical params."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert _convert(src["root"] / "full.bin", a, "--keep-lora", "--config", "tiny", "--json") == 0
    assert '"base_from_base": 0' in capsys.readouterr().out
    cfg = read_config(a)
    assert cfg.llm.lora is not None and cfg.llm.lora.rank == 16 and cfg.llm.lora.scaling == 2.0
    assert _convert(a, tmp_path / "out.bin") == 0
    back = torch.load(tmp_path / "out.bin", weights_only=True)
    full = src["full"]
    assert set(back) == {k for k in full if not k.endswith("original_module.weight")}
    for k, v in back.items():
        assert v.dtype == full[k].dtype and torch.equal(v, full[k]), k
    assert _convert(tmp_path / "out.bin", b, "--keep-lora", "--config", "tiny") == 0
    for comp in ("llm", "mllm"):
        pa, pb = load_component(a, comp), load_component(b, comp)
        flat_a, flat_b = _flatten(pa), _flatten(pb)
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            np.testing.assert_array_equal(flat_a[k], flat_b[k])
    # LoRA kept: the JAX model with adapters = the torch peft model.
    ids = np.random.default_rng(1).integers(0, cfg.llm.vocab_size, (1, 10))
    with torch.no_grad():
        want = src["agent"].llm(input_ids=torch.from_numpy(ids)).logits.numpy()
    got = _logits(llama_model.from_params(cfg.llm, load_component(a, "llm")), ids)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[prefix + str(k)] = np.asarray(v)
    return out


def _bad(src, tmp_path, edit):
    sd = dict(src["trained"])
    edit(sd)
    path = tmp_path / "bad.bin"
    torch.save(sd, path)
    return path


@pytest.mark.parametrize("case", ["missing", "unexpected", "misshapen", "no_base"])
def test_bad_inputs_are_refused_naming_the_key(src, tmp_path, capsys, case):
    key = P + "model.layers.1.mlp.down_proj.lora_B.default.weight"
    base = ["--base", src["root"] / "base"]
    if case == "missing":
        path, want = _bad(src, tmp_path, lambda sd: sd.pop(key)), key
    elif case == "unexpected":
        extra = P + "model.layers.0.self_attn.q_proj.lora_C.default.weight"
        path, want = _bad(src, tmp_path, lambda sd: sd.__setitem__(extra, torch.zeros(2))), extra
    elif case == "misshapen":
        path, want = _bad(src, tmp_path, lambda sd: sd.__setitem__(key, torch.zeros(64, 8))), key
    else:
        path, want, base = src["root"] / "trained.bin", "_proj.weight", []
    dst = tmp_path / "out"
    assert _convert(path, dst, *base, "--config", "tiny") != 0
    err = capsys.readouterr().err
    assert want in err, err
    assert not dst.exists()
