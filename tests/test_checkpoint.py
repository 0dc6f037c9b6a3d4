"""The checkpoint directory: streamed parts layout, the older single-pytree layout, sharded restore,
atomic failure, and the llama import's tensor-by-tensor stream (same tree as `from_torch`)."""

from __future__ import annotations

import json

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from seed_story_jax import checkpoint as C
from seed_story_jax.config import LlamaConfig, SeedStoryConfig


def _tree():
    rng = np.random.default_rng(0)
    return {
        "embed": {"embedding": rng.standard_normal((16, 8)).astype(ml_dtypes.bfloat16)},
        "layers": {i: {"attn": {"kernel": rng.standard_normal((8, 8)).astype(np.float32)},
                       "norm": {"scale": rng.standard_normal(8).astype(ml_dtypes.bfloat16)}} for i in range(3)},
        "steps": np.arange(6, dtype=np.int32).reshape(2, 3),
        "empty": {},
    }


def _assert_same(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        g = np.asarray(g)
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8))  # bit-exact, bf16 included


def test_round_trip_across_parts_keeps_int_keys_and_dtypes(tmp_path):
    tree = _tree()
    with C.checkpoint_writer(tmp_path / "ck", SeedStoryConfig(), part_bytes=300) as ck:
        ck.write("llm", tree)
    index = json.loads((tmp_path / "ck/params/llm/parts.json").read_text())
    assert len(index["parts"]) >= 4  # 300-byte parts: the 256-byte bf16 embedding alone, kernels alone
    assert all(p["bytes"] <= 300 or len(p["paths"]) == 1 for p in index["parts"])
    got = C.load_component(tmp_path / "ck", "llm")
    assert sorted(got["layers"]) == [0, 1, 2]
    meta = C.component_metadata(tmp_path / "ck", "llm")  # shapes without reading arrays, all parts merged
    assert tuple(meta["layers"]["2"]["attn"]["kernel"].shape) == (8, 8) and tuple(meta["steps"].shape) == (2, 3)
    _assert_same(got, tree)
    ck = C.load_checkpoint(tmp_path / "ck")
    assert ck.manifest["components"] == {"llm": {"kind": "llm"}} and C.components_of(tmp_path / "ck") == ["llm"]


def test_save_checkpoint_uses_parts_and_loads(tmp_path):
    tree = _tree()
    C.save_checkpoint(tmp_path / "ck", SeedStoryConfig(), {"vit": tree, "vae": {"w": np.ones(3, np.float32)}},
                      kinds={"vit": "qwen"})
    assert (tmp_path / "ck/params/vit/parts.json").is_file() and C.is_checkpoint(tmp_path / "ck")
    assert C.read_manifest(tmp_path / "ck")["components"]["vit"] == {"kind": "qwen"}
    _assert_same(C.load_component(tmp_path / "ck", "vit"), tree)


def test_old_single_pytree_layout_still_loads(tmp_path):
    import orbax.checkpoint as ocp

    tree = {k: v for k, v in _tree().items() if k != "empty"}
    root = tmp_path / "old"
    C.save_checkpoint(root, SeedStoryConfig(), {})  # manifest + config; then the old params layout by hand
    ocp.PyTreeCheckpointer().save((root / "params" / "llm").resolve(), jax.tree.map(jax.device_put, tree))
    assert not (root / "params/llm/parts.json").exists()
    assert tuple(C.component_metadata(root, "llm")["embed"]["embedding"].shape) == (16, 8)
    _assert_same(C.load_component(root, "llm"), tree)
    mesh = jax.make_mesh((8,), ("d",))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())), tree)
    got = C.load_component(root, "llm", target)
    assert isinstance(got["layers"][1]["attn"]["kernel"], jax.Array)
    _assert_same(got, tree)


def test_sharded_restore_with_target_across_parts(tmp_path):
    tree = {k: v for k, v in _tree().items() if k != "empty"}
    C.save_checkpoint(tmp_path / "ck", SeedStoryConfig(), {"llm": tree})
    with C.checkpoint_writer(tmp_path / "ck2", SeedStoryConfig(), part_bytes=300) as ck:
        ck.write("llm", tree)
    mesh = jax.make_mesh((8,), ("d",))

    def spec(x):
        s = P("d") if x.shape[0] % 8 == 0 else P()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s))

    target = jax.tree.map(spec, tree)  # int layer keys, as nnx gives them
    got = C.load_component(tmp_path / "ck2", "llm", target)
    _assert_same(got, tree)
    k = got["embed"]["embedding"]
    assert isinstance(k, jax.Array) and k.sharding.spec == P("d") and len(k.addressable_shards) == 8
    assert k.addressable_shards[0].data.shape == (2, 8)
    bad = dict(target, extra=jax.ShapeDtypeStruct((2,), np.float32, sharding=NamedSharding(mesh, P())))
    with pytest.raises(C.CheckpointError, match="extra"):
        C.load_component(tmp_path / "ck2", "llm", bad)


def test_failed_write_leaves_nothing(tmp_path):
    dst = tmp_path / "ck"

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with C.checkpoint_writer(dst, SeedStoryConfig(), part_bytes=300) as ck, ck.component("llm") as w:
            for path, leaf in C._leaves(_tree()):
                w.add(path, leaf)
            assert any((dst.parent).glob(".ck.tmp-*/params/llm/part-00000"))  # parts were already on disk
            raise Boom
    with pytest.raises(C.CheckpointError, match="lists are not supported"):
        C.save_checkpoint(dst, SeedStoryConfig(), {"llm": {"a": np.ones(2), "b": [np.ones(2)]}})
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_duplicate_paths(tmp_path):
    with pytest.raises(C.CheckpointError, match="duplicate path 'layers/0/w'"):
        with C.ComponentWriter(tmp_path, "llm") as w:
            w.add(("layers", 0, "w"), np.ones(2))
            w.add(("layers", "0", "w"), np.ones(2))
    assert not (tmp_path / "params/llm").exists()


@pytest.mark.parametrize("scan", [False, True])
def test_llama_import_stream_matches_from_torch(scan):
    from convert import llama as conv

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=2,
                      num_kv_heads=1, scan_layers=scan)
    rng = np.random.default_rng(0)
    sd = {k: rng.standard_normal(s).astype(np.float32) for k, s in conv.hf_shapes(cfg).items()}
    want = conv.from_torch(sd, cfg, dtype="bfloat16")
    got: dict = {}
    for path, x in conv._stream_params(sd, cfg, ml_dtypes.bfloat16):
        C._set_path(got, path, x)
    _assert_same(got, want)
