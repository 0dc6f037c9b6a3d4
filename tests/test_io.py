"""convert/io.py: safetensors and torch-pickle readers/writers against torch and the safetensors
library (bit-exact: compared as raw bytes), shards, and every kind of bad input."""

import collections
import collections.abc
import json
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from convert import io as cio
from seed_story_jax.errors import ConversionError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _np(t: torch.Tensor) -> np.ndarray:
    """torch → numpy keeping the bits (bf16 through its uint16 pattern)."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _random_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for dt in DTYPES:
        name = str(dt).split(".")[1]
        out[f"w.{name}"] = torch.randn(5, 7, generator=g).to(dt)
        out[f"b.{name}"] = torch.randn(3, generator=g).to(dt)
    out["w.float32"][0, 0] = float("nan")  # bits, not values, must survive
    out["ids"] = torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4)
    out["mask"] = torch.tensor([True, False, True])
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 4)
    return out


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------


def test_safetensors_roundtrip_and_library_compat(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = _random_tensors()
    arrays = {k: _np(v) for k, v in tensors.items()}
    ours = cio.write_safetensors(arrays, tmp_path / "ours.safetensors", metadata={"note": "x"})
    lib = load_file(ours)  # the safetensors library reads our file
    assert set(lib) == set(tensors)
    for k, t in tensors.items():
        assert _same_bits(_np(lib[k]), arrays[k]), k
    sd = cio.open_state_dict(ours)
    assert sd.metadata == {"format": "pt", "note": "x"}
    for k in tensors:
        assert _same_bits(sd[k], arrays[k]), k
        assert sd.shape(k) == arrays[k].shape and sd.dtype(k) == arrays[k].dtype and sd.source(k) == ours
    assert sd.dtype("w.bfloat16") == np.dtype(ml_dtypes.bfloat16)

    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "lib.safetensors")
    theirs = cio.read_state_dict(tmp_path / "lib.safetensors")  # we read the library's file
    for k in tensors:
        assert _same_bits(theirs[k], arrays[k]), k


def test_lazy_values_are_readonly_memory_maps_and_open_reads_no_data(tmp_path, monkeypatch):
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float16)}
    path = cio.write_safetensors(arrays, tmp_path / "m.safetensors")
    calls = []
    real = cio._map_bytes
    monkeypatch.setattr(cio, "_map_bytes", lambda ref: calls.append(ref) or real(ref))
    sd = cio.open_state_dict(path)
    assert len(sd) == 2 and "a" in sd and "zzz" not in sd and sd.shape("a") == (3, 4)
    assert calls == []  # opening and asking shapes never touches tensor data
    a = sd["a"]
    assert len(calls) == 1 and not a.flags.writeable and a.flags.c_contiguous
    assert np.array_equal(a, arrays["a"])
    with pytest.raises(KeyError):
        sd["zzz"]
    assert cio.read_state_dict(path)["a"].flags.writeable


@pytest.mark.parametrize("dirname", [True, False])
def test_sharded_safetensors_roundtrip(tmp_path, dirname):
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME

    rng = np.random.default_rng(0)
    arrays = {f"layers.{i}.w": rng.standard_normal((16, 16)).astype(np.float32) for i in range(5)}
    arrays["bf"] = rng.standard_normal(40).astype(ml_dtypes.bfloat16)
    target = tmp_path if dirname else tmp_path / "model.safetensors"
    index = cio.write_safetensors(arrays, target, max_shard_bytes=2 * 16 * 16 * 4)
    assert index == tmp_path / SAFE_WEIGHTS_INDEX_NAME
    names = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    data = json.loads(index.read_text())
    assert data["metadata"]["total_size"] == sum(a.nbytes for a in arrays.values())
    assert set(data["weight_map"]) == set(arrays)
    for src in (tmp_path, index):
        sd = cio.open_state_dict(src)
        assert list(sd) == list(arrays)
        for k, a in arrays.items():
            assert _same_bits(sd[k], a)
            assert sd.source(k).name == data["weight_map"][k]
    # a model that fits in one shard is written unsharded, as transformers does
    small = tmp_path / "small"
    assert cio.write_safetensors({"x": np.ones(3, np.float32)}, small, max_shard_bytes=1 << 20).name == "model.safetensors"


def test_sharded_safetensors_loads_in_transformers(tmp_path):
    """The sharded layout is the one transformers' own loader reads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(cfg)
    sd = {k: _np(v) for k, v in ref.state_dict().items()}
    cio.write_safetensors(sd, tmp_path, max_shard_bytes=4000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    cfg.save_pretrained(tmp_path)
    back = LlamaForCausalLM.from_pretrained(tmp_path)
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k


# ---------------------------------------------------------------------------------------------
# torch pickles
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mmap", [False, True])
def test_write_torch_pickle_loads_bit_exact_in_torch(tmp_path, mmap):
    tensors = _random_tensors()
    path = cio.write_torch_pickle({k: _np(v) for k, v in tensors.items()}, tmp_path / "pytorch_model.bin")
    back = torch.load(path, weights_only=True, mmap=mmap)
    assert isinstance(back, collections.OrderedDict) and list(back) == list(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape, k
        assert _same_bits(_np(back[k]), _np(t)), k
    with zipfile.ZipFile(path) as zf:  # tensor data 64-byte aligned, like torch.save
        with open(path, "rb") as f:
            for info in zf.infolist():
                if "/data/" in info.filename and info.file_size:
                    assert cio._zip_data_offset(f, info, path) % 64 == 0
    again = cio.open_state_dict(path)
    for k, t in tensors.items():
        assert _same_bits(again[k], _np(t)), k


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reader_matches_torch_save_with_views_and_shared_storage(tmp_path, legacy):
    base = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    half = torch.randn(4, 5).half()
    sd = collections.OrderedDict(
        base=base,
        rows=base[2:4],  # storage offset into a shared storage
        cols=base[:, 3:6],  # non-contiguous view
        transposed=base.t(),
        corner=base[1:, 2:].t(),
        strided=base[::2, ::3],
        expanded=torch.ones(1, 3).expand(4, 3),  # zero stride
        half=half,
        half_view=half[1:, 1:],
        bf=torch.randn(3, 4).bfloat16(),
        param=torch.nn.Parameter(torch.randn(3, 3)),
        scalar=torch.tensor(7, dtype=torch.int64),
        empty=torch.zeros(0, 3),
    )
    path = tmp_path / ("legacy.bin" if legacy else "model.bin")
    torch.save(sd, path, _use_new_zipfile_serialization=not legacy)
    got = cio.open_state_dict(path)
    assert list(got) == list(sd)
    for k, t in sd.items():
        assert got.shape(k) == tuple(t.shape) and got[k].flags.c_contiguous, k
        assert _same_bits(got[k], _np(t)), k


def test_torch_save_in_a_renamed_archive_folder(tmp_path):
    """torch names the zip's top folder after the file; any folder name must work."""
    a = tmp_path / "some_name.pt"
    torch.save({"x": torch.arange(4.0)}, a)
    with zipfile.ZipFile(a) as zf:
        assert zf.namelist()[0].startswith("some_name/")
    assert np.array_equal(cio.read_state_dict(a)["x"], np.arange(4.0, dtype=np.float32))


@pytest.mark.parametrize("wrap", ["state_dict", "module", "model", "model_state_dict"])
def test_nested_wrappers_are_unwrapped_and_nesting_flattened(tmp_path, wrap):
    inner = {"enc": {"w": torch.ones(2), "layers": [torch.zeros(1), torch.full((1,), 2.0)]}, "b": torch.ones(3)}
    torch.save({wrap: inner, "epoch": 3, "name": "run"}, tmp_path / "x.pt")
    got = cio.read_state_dict(tmp_path / "x.pt")
    assert sorted(got) == ["b", "enc.layers.0", "enc.layers.1", "enc.w"]
    assert got["enc.layers.1"][0] == 2.0
    # a dict that holds tensors itself is never unwrapped
    torch.save({"module": {"w": torch.ones(1)}, "head": torch.ones(2)}, tmp_path / "y.pt")
    assert sorted(cio.read_state_dict(tmp_path / "y.pt")) == ["head", "module.w"]


def test_sharded_torch_bin_with_index(tmp_path):
    t = _random_tensors()
    keys = list(t)
    shards = {"pytorch_model-00001-of-00002.bin": keys[:4], "pytorch_model-00002-of-00002.bin": keys[4:]}
    for name, ks in shards.items():
        torch.save({k: t[k] for k in ks}, tmp_path / name)
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    got = cio.open_state_dict(tmp_path)
    assert set(got) == set(t)
    for k in t:
        assert _same_bits(got[k], _np(t[k])) and got.source(k).name == weight_map[k]


def test_directory_prefers_safetensors_over_bin(tmp_path):
    torch.save({"x": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    cio.write_safetensors({"x": np.ones(2, np.float32)}, tmp_path)
    (tmp_path / "training_args.bin").write_bytes(b"not a checkpoint")
    assert cio.read_state_dict(tmp_path)["x"][0] == 1.0


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


class _Evil:
    """Unpickling this runs os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil_files(tmp_path, marker):
    # 1) torch.save of a dict holding a tensor and the payload (the realistic case)
    a = tmp_path / "evil_zip.bin"
    torch.save({"w": torch.ones(2), "payload": _Evil(marker)}, a)
    # 2) a legacy-format torch file whose object is the payload
    b = tmp_path / "evil_legacy.bin"
    with open(b, "wb") as f:
        for x in (cio._TORCH_LEGACY_MAGIC, 1001, {"little_endian": True}):
            pickle.dump(x, f, protocol=2)
        pickle.dump({"w": _Evil(marker)}, f, protocol=2)
    # 3) a hand-made zip archive with only the payload as data.pkl
    c = tmp_path / "evil_hand.pt"
    with zipfile.ZipFile(c, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(_Evil(marker), protocol=2))
        zf.writestr("archive/version", "3\n")
    return [a, b, c]


def test_pickle_that_would_run_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "PWNED"
    for path in _evil_files(tmp_path, marker):
        with pytest.raises(ConversionError) as e:
            cio.open_state_dict(path)
        msg = str(e.value)
        assert str(path) in msg and "posix.system" in msg, msg
        assert e.value.file == path
        assert not marker.exists(), f"payload ran while reading {path}"
    # sanity: the payload really does run under an unrestricted unpickler
    with open(tmp_path / "evil_legacy.bin", "rb") as f:
        for _ in range(4):
            pickle.load(f)
    assert marker.exists()


def test_other_globals_are_refused(tmp_path):
    import argparse

    torch.save({"w": torch.ones(1), "args": argparse.Namespace(lr=1.0)}, tmp_path / "ckpt.pt")
    with pytest.raises(ConversionError, match=r"argparse\.Namespace"):
        cio.open_state_dict(tmp_path / "ckpt.pt")
    torch.save({"w": np.ones(3)}, tmp_path / "np.pt")  # numpy arrays pickle through numpy globals
    with pytest.raises(ConversionError, match=r"numpy"):
        cio.open_state_dict(tmp_path / "np.pt")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_missing_shard_names_the_shard_and_a_key(tmp_path, fmt):
    arrays = {f"k{i}": np.full((64,), i, np.float32) for i in range(4)}
    if fmt == "safetensors":
        index = cio.write_safetensors(arrays, tmp_path, max_shard_bytes=256)
        shard = "model-00002-of-00004.safetensors"
    else:
        for i, k in enumerate(arrays):
            cio.write_torch_pickle({k: arrays[k]}, tmp_path / f"pytorch_model-{i + 1:05d}-of-00004.bin")
        index = tmp_path / "pytorch_model.bin.index.json"
        index.write_text(json.dumps({"weight_map": {k: f"pytorch_model-{i + 1:05d}-of-00004.bin"
                                                    for i, k in enumerate(arrays)}}))
        shard = "pytorch_model-00002-of-00004.bin"
    (tmp_path / shard).unlink()
    with pytest.raises(ConversionError) as e:
        cio.open_state_dict(tmp_path)
    msg = str(e.value)
    assert shard in msg and "'k1'" in msg and e.value.key == "k1", msg


def test_index_naming_a_key_its_shard_lacks(tmp_path):
    index = cio.write_safetensors({"a": np.ones(64, np.float32), "b": np.ones(64, np.float32)}, tmp_path,
                                  max_shard_bytes=256)
    data = json.loads(index.read_text())
    data["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(ConversionError, match="ghost"):
        cio.open_state_dict(tmp_path)


@pytest.mark.parametrize("cut", [4, 30, "header", "data"])
def test_truncated_safetensors(tmp_path, cut):
    path = cio.write_safetensors({"a": np.ones((32, 32), np.float32), "b": np.ones(8, np.float16)},
                                 tmp_path / "m.safetensors")
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    keep = {"header": 8 + n // 2, "data": 8 + n + 100}.get(cut, cut)
    path.write_bytes(raw[:keep])
    with pytest.raises(ConversionError, match="truncated|corrupt") as e:
        cio.open_state_dict(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("frac", [0.1, 0.5, 0.97])
def test_truncated_torch_bin(tmp_path, legacy, frac):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"a": torch.ones(64, 64), "b": torch.ones(10)}, path, _use_new_zipfile_serialization=not legacy)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * frac)])
    with pytest.raises(ConversionError, match="truncated|corrupt") as e:
        cio.open_state_dict(path)
    assert str(path) in str(e.value)


def test_not_a_checkpoint_and_missing_path(tmp_path):
    with pytest.raises(ConversionError, match="no such file") as e:
        cio.open_state_dict(tmp_path / "nope.bin")
    assert str(tmp_path / "nope.bin") in str(e.value)
    (tmp_path / "junk.bin").write_bytes(b"hello world")
    with pytest.raises(ConversionError, match="not a torch checkpoint"):
        cio.open_state_dict(tmp_path / "junk.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no safetensors"):
        cio.open_state_dict(tmp_path / "empty")


def test_check_keys_names_missing_unexpected_and_misshapen(tmp_path):
    path = cio.write_safetensors({"a": np.ones((2, 3), np.float32), "b": np.ones(4, np.float32),
                                  "extra": np.ones(1, np.float32)}, tmp_path / "m.safetensors")
    sd = cio.open_state_dict(path)
    cio.check_keys({"a": (2, 3), "b": None, "extra": (1,)}, sd, path)  # exact match passes
    with pytest.raises(ConversionError) as e:
        cio.check_keys({"a": (3, 2), "b": (4,), "gone": (1,)}, sd, path)
    msg = str(e.value)
    assert "1 missing key(s): gone" in msg and "1 unexpected key(s): extra" in msg
    assert "a expected (3, 2) got (2, 3)" in msg and str(path) in msg and e.value.key == "gone"
    with pytest.raises(ConversionError, match="wrong shape: b expected"):
        cio.check_keys({"b": (5,)}, {"b": np.ones(4)}, None)


def test_writers_are_atomic_and_refuse_to_overwrite(tmp_path):
    from seed_story_jax.atomic import OutputExistsError

    class Boom(dict):
        """Fails on the second read of "b", i.e. while the file is half written."""

        reads = 0

        def __getitem__(self, k):
            if k == "b":
                self.reads += 1
                if self.reads == 2:
                    raise RuntimeError("disk on fire")
            return dict.__getitem__(self, k)

    for write in (cio.write_torch_pickle, cio.write_safetensors):
        with pytest.raises(RuntimeError, match="disk on fire"):
            write(Boom(a=np.ones(2, np.float32), b=np.ones(2, np.float32)), tmp_path / "x.safetensors")
        assert list(tmp_path.iterdir()) == []
    cio.write_torch_pickle({"a": np.ones(2, np.float32)}, tmp_path / "x.bin")
    with pytest.raises(OutputExistsError):
        cio.write_torch_pickle({"a": np.ones(2, np.float32)}, tmp_path / "x.bin")
    with pytest.raises(ConversionError, match="uint16"):
        cio.write_torch_pickle({"u": np.ones(2, np.uint16)}, tmp_path / "y.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_lazy_mapping_with_specs_is_read_once_per_key(tmp_path):
    """A converter's lazy mapping that knows shapes/dtypes produces each tensor exactly once."""

    class Lazy(collections.abc.Mapping):
        def __init__(self):
            self.reads = collections.Counter()

        def __getitem__(self, k):
            self.reads[k] += 1
            return np.full((8, 8), int(k[1:]), np.float32)

        def __iter__(self):
            return iter(f"k{i}" for i in range(5))

        def __len__(self):
            return 5

        def shape(self, k):
            return (8, 8)

        def dtype(self, k):
            return np.float32

    m = Lazy()
    index = cio.write_safetensors(m, tmp_path / "st", max_shard_bytes=600)
    assert set(m.reads.values()) == {1} and len(m.reads) == 5
    assert cio.read_state_dict(index)["k3"][0, 0] == 3
    m.reads.clear()
    cio.write_torch_pickle(m, tmp_path / "x.bin")
    assert set(m.reads.values()) == {1}
    m.reads.clear()
    cio.check_keys({f"k{i}": (8, 8) for i in range(5)}, m, "lazy")
    assert not m.reads
