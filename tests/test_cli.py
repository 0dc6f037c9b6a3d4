"""`seed-story --help` (fast, no jax) and `seed-story inspect` on every kind of PATH."""

import json
import re
import math
import subprocess
import sys
import time

import numpy as np
import torch

from seed_story_jax import cli


def _inspect_json(capsys, *argv) -> dict:
    assert cli.main(["inspect", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_help_lists_commands_fast_without_jax():
    code = ("import sys, time, io, contextlib, json\n"
            "t = time.perf_counter()\n"
            "from seed_story_jax import cli\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    try:\n"
            "        cli.main(['--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print(json.dumps({'s': time.perf_counter() - t, 'jax': 'jax' in sys.modules,\n"
            "                  'torch': 'torch' in sys.modules, 'help': out.getvalue()}))\n")
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert not info["jax"] and not info["torch"], "importing the CLI must not import jax or torch"
    assert wall < 3.0, f"seed-story --help took {wall:.2f} s"
    names = [name for name, _ in cli._available()]
    assert "inspect" in names and "convert" in names
    for name in names:  # argparse puts a long name's help on the next line
        assert re.search(rf"^    {name}\b", info["help"], re.M), name


def _tiny_hf_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=40, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


def test_inspect_safetensors_dir(tmp_path, capsys):
    model = _tiny_hf_llama()
    model.save_pretrained(tmp_path / "hf")  # config.json + model.safetensors
    rep = _inspect_json(capsys, tmp_path / "hf")
    sd = model.state_dict()
    assert rep["format"] == "torch"
    assert rep["total_params"] == sum(v.numel() for v in sd.values()) == model.num_parameters()
    assert rep["components"] == {"model": model.model.num_parameters(), "lm_head": 96 * 16}
    t = rep["tensors"]["model"]["model.layers.2.self_attn.k_proj.weight"]
    assert t == {"shape": [8, 16], "dtype": "bfloat16"}
    assert cli.main(["inspect", str(tmp_path / "hf" / "model.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "model.layers.*.self_attn.k_proj.weight" in text and "x3" in text
    assert f"total: {model.num_parameters():,} params" in text


def test_inspect_torch_bin(tmp_path, capsys):
    sd = {"enc.w": torch.randn(4, 5), "enc.b": torch.randn(5).half(), "head": torch.randn(2, 2, 3)}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    rep = _inspect_json(capsys, tmp_path / "pytorch_model.bin")
    assert rep["total_params"] == 20 + 5 + 12 and rep["components"] == {"enc": 25, "head": 12}
    assert rep["tensors"]["enc"]["enc.b"] == {"shape": [5], "dtype": "float16"}


def test_inspect_jax_checkpoint(tmp_path, capsys):
    from seed_story_jax.checkpoint import save_checkpoint
    from seed_story_jax.config import SeedStoryConfig
    from seed_story_jax.tokenizer import train_tiny_tokenizer

    tok = train_tiny_tokenizer(tmp_path / "tok")
    rng = np.random.default_rng(0)
    llm = {"embed_tokens": {"embedding": rng.standard_normal((tok.vocab_size, 8)).astype(np.float32)},
           "layers": {0: {"w": np.zeros((8, 8), np.float16)}, 1: {"w": np.zeros((8, 8), np.float16)}}}
    vit = {"proj": np.ones((3, 4), np.float32)}
    ckpt = save_checkpoint(tmp_path / "ckpt", SeedStoryConfig(name="unit"), {"llm": llm, "vit": vit},
                           kinds={"llm": "llama"}, tokenizer_dir=tok.path)
    rep = _inspect_json(capsys, ckpt)
    assert rep["format"] == "jax-checkpoint" and rep["config_name"] == "unit"
    assert rep["components"] == {"llm": tok.vocab_size * 8 + 128, "vit": 12}
    assert rep["total_params"] == tok.vocab_size * 8 + 140
    assert rep["tensors"]["llm"]["layers.1.w"] == {"shape": [8, 8], "dtype": "float16"}
    assert rep["tokenizer"]["vocab_size"] == tok.vocab_size and rep["tokenizer"]["image_tokens"]
    assert cli.main(["inspect", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "llm [llama]" in text and "layers.*.w" in text and "image tokens: yes" in text


def test_inspect_config_matches_transformers_count(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    (tmp_path / "c.yaml").write_text(
        "name: small\nllm:\n  vocab_size: 300\n  hidden_size: 32\n  intermediate_size: 48\n  num_layers: 2\n"
        "  num_heads: 4\n  num_kv_heads: 2\n  tie_word_embeddings: false\n")
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    rep = _inspect_json(capsys, tmp_path / "c.yaml")
    assert rep["format"] == "config" and rep["components"] == {"llm": ref.num_parameters()}
    # overrides work and change the count
    rep2 = _inspect_json(capsys, tmp_path / "c.yaml", "llm.num_layers=3")
    per_layer = sum(p.numel() for p in ref.model.layers[0].parameters())
    assert rep2["total_params"] == ref.num_parameters() + per_layer


def test_inspect_full_size_llm_config(capsys):
    """configs/llama2-7b.yaml by name: 6,738,956,288 = transformers' count for Llama-2-7B at vocab 32066."""
    rep = _inspect_json(capsys, "llama2-7b")
    assert rep["components"]["llm"] == 6_738_956_288
    shapes = rep["tensors"]["llm"]
    assert math.prod(shapes["embed_tokens.embedding"]["shape"]) == 32066 * 4096


def test_inspect_bad_input_exits_nonzero(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "nope")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err

    class Evil:
        def __reduce__(self):
            import os

            return os.system, (f"touch {tmp_path / 'PWNED'}",)

    torch.save({"w": torch.ones(1), "x": Evil()}, tmp_path / "evil.bin")
    assert cli.main(["inspect", str(tmp_path / "evil.bin")]) == 2
    err = capsys.readouterr().err
    assert "posix.system" in err and "evil.bin" in err and not (tmp_path / "PWNED").exists()


def test_commands_refuse_an_existing_output_before_any_work(tmp_path, capsys):
    """encode / reconstruct / generate check --out first: the (missing) checkpoint is never read and
    the existing file is left as it was."""
    existing = tmp_path / "out"
    existing.write_text("keep me")
    missing_ckpt, image = str(tmp_path / "no-ckpt"), str(tmp_path / "no-image.png")
    for argv in (["encode", "--ckpt", missing_ckpt, image, "--out", str(existing)],
                 ["reconstruct", image, "--ckpt", missing_ckpt, "--out", str(existing)],
                 ["generate", "--ckpt", missing_ckpt, "--image", image, "--text", "hi", "--out", str(existing)]):
        assert cli.main(argv) == 2, argv[0]
        err = capsys.readouterr().err
        assert f"{existing}: already exists" in err and "no-ckpt" not in err, (argv[0], err)
        assert existing.read_text() == "keep me"
