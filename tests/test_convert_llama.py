"""HF Llama directory ⇄ JAX checkpoint: bit-exact round trip, the CLI both ways, --verify, --dtype,
bad input, and `seed-story text` on a converted tiny checkpoint."""

import json
import pickle
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from convert import llama as conv
from convert.io import open_state_dict, read_state_dict, write_safetensors, write_torch_pickle
from seed_story_jax.checkpoint import load_component, read_config
from seed_story_jax.cli import main
from seed_story_jax.config import LlamaConfig
from tests.test_llama import hf_llama

CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  max_position_embeddings=128)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "tiny-llama"
    ref = hf_llama(CFG, seed=1)
    with torch.no_grad():  # an inv_freq-style buffer in the file must be ignored on import
        ref.save_pretrained(d)
    sd = read_state_dict(d)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    (d / "model.safetensors").unlink()
    write_safetensors(sd, d)
    return d


def logits_of(model_dir, ids):
    m = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.from_numpy(ids)).logits.numpy()


def test_round_trip_is_bit_exact_and_loads_in_transformers(hf_dir, tmp_path, capsys):
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert main(["convert", str(hf_dir), str(ckpt)]) == 0
    assert read_config(ckpt).llm == conv.config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    params = load_component(ckpt, "llm")
    assert _layer(params, 0)["self_attn"]["q_proj"]["kernel"].shape == (64, 64)
    assert main(["convert", str(ckpt), str(back)]) == 0
    src, out = read_state_dict(hf_dir), read_state_dict(back)
    assert set(out) == set(src) - {"model.layers.0.self_attn.rotary_emb.inv_freq"}
    for k in out:
        assert out[k].dtype == src[k].dtype and np.array_equal(out[k], src[k]), k
    ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12))
    np.testing.assert_array_equal(logits_of(back, ids), logits_of(hf_dir, ids))


def test_stacked_layout_and_pure_functions_round_trip(hf_dir):
    import dataclasses

    sd = read_state_dict(hf_dir)
    del sd["model.layers.0.self_attn.rotary_emb.inv_freq"]
    cfg = dataclasses.replace(CFG, scan_layers=True)
    params = conv.from_torch(sd, cfg)
    assert params["layers"]["mlp"]["down_proj"]["kernel"].shape == (2, 96, 64)
    back = conv.to_torch(params, CFG)  # to_torch reads either layout
    assert set(back) == set(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)


def test_cli_verify_both_directions_and_bf16(hf_dir, tmp_path, capsys):
    ckpt, back, bf = tmp_path / "ckpt", tmp_path / "back", tmp_path / "bf16"
    assert main(["convert", str(hf_dir), str(ckpt), "--verify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verify"]["ok"] and report["verify"]["max_rel"] <= 1e-4, report
    assert main(["convert", str(ckpt), str(back), "--kind", "llama", "--verify"]) == 0
    assert "max_rel" in capsys.readouterr().out
    assert main(["convert", str(hf_dir), str(bf), "--dtype", "bfloat16", "--verify"]) == 0
    params = load_component(bf, "llm")
    kernel = _layer(params, 1)["mlp"]["gate_proj"]["kernel"]
    assert kernel.dtype == ml_dtypes.bfloat16
    want = open_state_dict(hf_dir)["model.layers.1.mlp.gate_proj.weight"].T.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(kernel), want)
    assert read_config(bf).llm.param_dtype == "bfloat16"


def test_sharded_and_pickle_sources(hf_dir, tmp_path):
    sd = read_state_dict(hf_dir)
    sharded, pick = tmp_path / "sharded", tmp_path / "pickle"
    for d in (sharded, pick):
        d.mkdir()
        shutil.copy(hf_dir / "config.json", d)
    write_safetensors(sd, sharded, max_shard_bytes=40_000)
    assert (sharded / "model.safetensors.index.json").is_file()
    write_torch_pickle(sd, pick / "pytorch_model.bin")
    ref = load_component(_convert(hf_dir, tmp_path / "a"), "llm")
    for d in (sharded, pick):
        got = load_component(_convert(d, tmp_path / f"{d.name}-ckpt"), "llm")
        assert _flat(got).keys() == _flat(ref).keys()
        assert all(np.array_equal(v, _flat(ref)[k]) for k, v in _flat(got).items())


def _layer(params, i):
    layers = params["layers"]
    return layers[i] if i in layers else layers[str(i)]


def _convert(src, dst):
    assert main(["convert", str(src), str(dst)]) == 0
    return dst


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out


# ------------------------------------------------------------------------------ bad input


def _broken(hf_dir, tmp_path, how):
    d = tmp_path / "src"
    d.mkdir()
    shutil.copy(hf_dir / "config.json", d)
    sd = read_state_dict(hf_dir)
    if how == "missing shard":
        write_safetensors(sd, d, max_shard_bytes=40_000)
        victim = sorted(d.glob("model-*.safetensors"))[1]
        victim.unlink()
        return d, victim.name, None
    if how == "truncated":
        f = write_safetensors(sd, d)
        data = f.read_bytes()
        f.write_bytes(data[: len(data) - 1000])
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8: 8 + n])
        cut = {k for k, v in header.items() if k != "__metadata__" and 8 + n + v["data_offsets"][1] > len(data) - 1000}
        return d, "model.safetensors", cut  # tensors whose bytes were cut: one of them must be named
    if how == "missing key":
        del sd["model.layers.1.mlp.up_proj.weight"]
        key = "model.layers.1.mlp.up_proj.weight"
    elif how == "unexpected key":
        sd["model.layers.7.mlp.up_proj.weight"] = np.zeros((96, 64), np.float32)
        key = "model.layers.7.mlp.up_proj.weight"
    elif how == "wrong shape":
        sd["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
        key = "model.layers.0.self_attn.k_proj.weight"
    write_safetensors(sd, d)
    return d, "model.safetensors", key


@pytest.mark.parametrize("how", ["missing shard", "truncated", "missing key", "unexpected key", "wrong shape"])
def test_bad_input_names_file_and_key(hf_dir, tmp_path, capsys, how):
    src, fname, key = _broken(hf_dir, tmp_path, how)
    dst = tmp_path / "dst"
    assert main(["convert", str(src), str(dst)]) != 0
    err = capsys.readouterr().err
    keys = {key} if isinstance(key, str) else key or set()
    assert fname in err and (not keys or any(k in err for k in keys)), err
    assert not dst.exists() and not any(p.name.startswith(".dst") for p in tmp_path.iterdir())


def test_nonexistent_path_and_malicious_pickle(hf_dir, tmp_path, capsys):
    dst = tmp_path / "dst"
    assert main(["convert", str(tmp_path / "nope"), str(dst)]) != 0
    assert "nope" in capsys.readouterr().err and not dst.exists()

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    src = tmp_path / "evil"
    src.mkdir()
    shutil.copy(hf_dir / "config.json", src)
    import zipfile

    with zipfile.ZipFile(src / "pytorch_model.bin", "w") as z:  # torch.save's zip layout
        z.writestr("archive/data.pkl", pickle.dumps({"model.embed_tokens.weight": Evil()}, protocol=2))
        z.writestr("archive/version", "3\n")
    assert main(["convert", str(src), str(dst), "--kind", "llama"]) != 0
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "system" in err, err
    assert not (tmp_path / "pwned").exists() and not dst.exists()


# ------------------------------------------------------------------------------ text command


def test_text_command_on_converted_tiny_checkpoint(tmp_path, capsys):
    from seed_story_jax.tokenizer import train_tiny_tokenizer

    tok = train_tiny_tokenizer(tmp_path / "tok", vocab_size=400)
    cfg = LlamaConfig(**{**CFG.__dict__, "vocab_size": len(tok)})
    ref = hf_llama(cfg, seed=2)
    hf = tmp_path / "hf"
    ref.save_pretrained(hf)
    ckpt = tmp_path / "ckpt"
    assert main(["convert", str(hf), str(ckpt), "--tokenizer", str(tmp_path / "tok")]) == 0
    capsys.readouterr()
    out = tmp_path / "out.json"
    assert main(["text", "--ckpt", str(ckpt), "--prompt", "George looks at the", "--max-new-tokens", "12",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert printed.strip().startswith("George looks at the")
    assert printed.strip() == (result["prompt"] + result["completion"]).strip()
    ids = tok.encode("George looks at the", bos=True)
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_id,
                            pad_token_id=tok.pad_id)[0, len(ids):].tolist()
    assert result["ids"] == want[: len(result["ids"])] and len(result["ids"]) == len(want)
