"""Config machinery, atomic outputs, position tables and the compile counter."""

import numpy as np
import pytest

from seed_story_jax import config as C
from seed_story_jax.atomic import OutputExistsError, atomic_path


def test_yaml_base_merge_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("llm:\n  num_layers: 4\n  hidden_size: 64\n  num_heads: 4\n  num_kv_heads: 4\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nllm:\n  num_layers: 2\n")
    cfg = C.load_config(tmp_path / "b.yaml", ["llm.rope_theta=500000", "llm.lora.rank=4"])
    assert cfg.llm.num_layers == 2 and cfg.llm.hidden_size == 64
    assert cfg.llm.rope_theta == 500000.0 and cfg.llm.lora.rank == 4 and cfg.llm.lora.scaling == 8.0


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML's safe_load) reads `5e-4` as a string; files and overrides mean the number."""
    (tmp_path / "a.yaml").write_text("train:\n  lr: 5e-4\n  weight_decay: 1E-2\n  eps: 1.0e-6\n")
    cfg = C.load_config(tmp_path / "a.yaml", ["train.min_lr_ratio=1e-1", "train.warmup_steps=10"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.eps) == (5e-4, 1e-2, 1e-6)
    assert cfg.train.min_lr_ratio == 0.1 and cfg.train.warmup_steps == 10
    assert C.read_yaml("a: 1e3x\nb: e5\nc: 1_0\n") == {"a": "1e3x", "b": "e5", "c": 10}


@pytest.mark.parametrize("override, needle", [
    (["llm.nonsense=1"], "nonsense"),
    (["llm.num_layers=two"], "llm.num_layers"),
    (["llm.num_kv_heads=3"], "num_kv_heads"),
    (["llm.dtype=float8"], "llm.dtype"),
])
def test_config_errors_name_the_key(tmp_path, override, needle):
    (tmp_path / "a.yaml").write_text("llm:\n  hidden_size: 64\n  num_heads: 4\n  num_kv_heads: 4\n")
    with pytest.raises(C.ConfigError, match=needle):
        C.load_config(tmp_path / "a.yaml", override)


def test_every_shipped_config_loads():
    """Every config in configs/ validates; demo.yaml's extra `demo:` block goes through its loader."""
    from seed_story_jax.demo import load_demo_config

    paths = sorted(C.CONFIG_DIR.glob("*.yaml"))
    assert paths
    for p in paths:
        if "demo" in C.load_yaml_tree(p):
            load_demo_config(p)
        else:
            C.load_config(p)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_path(dst, directory=True) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(dst, directory=True) as tmp:
        (tmp / "done").write_text("x")
    assert (dst / "done").is_file()
    with pytest.raises(OutputExistsError):
        with atomic_path(dst, directory=True):
            pass


@pytest.mark.parametrize("g,o", [(16, 32), (8, 16), (16, 8), (5, 7)])
def test_bicubic_table_matches_torch(g, o):
    """Tolerance 1e-5 abs on N(0,1) values (float32 rounding of torch's own arithmetic)."""
    import torch
    import torch.nn.functional as F

    from seed_story_jax.nn.posemb import torch_bicubic_resize

    x = np.random.default_rng(0).standard_normal((g * g, 12)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x).reshape(1, g, g, 12).permute(0, 3, 1, 2), size=(o, o),
                        mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(o * o, 12).numpy()
    np.testing.assert_allclose(torch_bicubic_resize(x, o), ref, atol=1e-5, rtol=0)


def test_bicubic_is_not_jax_image_resize():
    import jax

    from seed_story_jax.nn.posemb import torch_bicubic_resize

    x = np.random.default_rng(1).standard_normal((16 * 16, 4)).astype(np.float32)
    jx = np.asarray(jax.image.resize(x.reshape(16, 16, 4), (8, 8, 4), "bicubic")).reshape(64, 4)
    assert np.abs(jx - torch_bicubic_resize(x, 8)).max() > 1e-2


def test_sincos_2d_layout():
    from seed_story_jax.nn.posemb import sincos_2d

    t = sincos_2d(8, 3).reshape(3, 3, 8)
    # first half varies with the column (w), second half with the row (h)
    np.testing.assert_array_equal(t[0, :, :4], t[2, :, :4])
    np.testing.assert_array_equal(t[:, 0, 4:], t[:, 2, 4:])
    np.testing.assert_allclose(t[1, 2, :4], [np.sin(2), np.sin(2 * 1e-2), np.cos(2), np.cos(2 * 1e-2)], rtol=1e-6)


def test_compile_counter_counts_new_shapes_only():
    import jax
    import jax.numpy as jnp

    from seed_story_jax.profiling import CompileCounter

    f = jax.jit(lambda x: x * 2 + 1)
    a, b = jnp.ones(3), jnp.ones(4)  # eager ops compile too: build inputs outside the count
    with CompileCounter() as c:
        f(a); f(a); f(b)
    assert c.count == 2


def test_sincos_2d_equals_qwen_float32_recipe():
    """Bit-exact against Qwen-VL's recipe restated here (float32 grid/omega, in-place divide)."""
    from seed_story_jax.nn.posemb import sincos_2d

    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float32)
        omega /= d / 2.
        omega = 1. / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g, d = 16, 64
    grid = np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32))
    ref = np.concatenate([one_d(d // 2, grid[0]), one_d(d // 2, grid[1])], axis=1)
    out = sincos_2d(d, g)
    assert out.dtype == np.float32 and np.array_equal(out, ref)
