"""Safe readers and writers for torch-format checkpoints: safetensors and torch pickles, without torch.

Reading
    open_state_dict(path) -> LazyStateDict      name -> numpy array, one tensor at a time
    read_state_dict(path) -> dict               every tensor, as writable in-memory copies

`path` may be a `.safetensors` file, a `*.safetensors.index.json` (sharded), a torch pickle
(`pytorch_model.bin`, `*.pt`, `*.pth`, `*.ckpt`; the zip format of torch >= 1.6 and the legacy
non-zip format), a `pytorch_model.bin.index.json`, or a directory holding one of these (safetensors
preferred; `model.*` / `pytorch_model.*` / `diffusion_pytorch_model.*` names first).

Tensors are memory-mapped: a LazyStateDict value is a read-only, C-contiguous array backed by the
file (non-contiguous torch views are copied), so a converter that walks the keys holds one source
tensor at a time. bf16 comes back as `ml_dtypes.bfloat16`.

Torch pickles go through a restricted unpickler that never imports torch and resolves only the
globals needed to rebuild tensors (`torch._utils._rebuild_tensor{,_v2,_v3}`,
`torch._utils._rebuild_parameter{,_with_state}`, `collections.OrderedDict`, the storage classes
`torch.*Storage` / `torch.UntypedStorage`, and `torch.<dtype>`). Any other global (a class, a
function, `os.system`, ...) stops loading with a ConversionError naming the file and the global
before anything is called.

What a pickle holds becomes a flat state dict as follows: if the top-level object is a dict with no
tensors of its own but an entry `state_dict`, `module`, `model` or `model_state_dict` (checked in
that order) holding tensors, that entry is used alone (DeepSpeed / Lightning / training-script
wrappers); nested dicts, lists and tuples are then flattened with `.` (`{"a": {"b": t}}` -> `a.b`,
`[t0, t1]` -> `0`, `1`) and non-tensor leaves (step counters, strings, None) are dropped.

Writing (atomic: temporary file, then rename)
    write_safetensors(tensors, path_or_dir, max_shard_bytes=None, metadata=None)
    write_torch_pickle(tensors, path)            a file torch.load(weights_only=True) reads
    check_keys(expected, got, file)              ConversionError on missing/unexpected/misshapen
"""

from __future__ import annotations

import collections
import io
import json
import math
import mmap
import os
import pickle
import struct
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import ml_dtypes
import numpy as np

from seed_story_jax.atomic import atomic_path
from seed_story_jax.errors import ConversionError

# --------------------------------------------------------------------------------------------
# dtype tables
# --------------------------------------------------------------------------------------------

_ST_TO_NP = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}

# torch's legacy storage classes (what torch.save writes for every tensor), name -> element dtype
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64), "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32), "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8), "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
    "ComplexDoubleStorage": np.dtype(np.complex128), "ComplexFloatStorage": np.dtype(np.complex64),
    "UntypedStorage": np.dtype(np.uint8),
}
_NP_TO_STORAGE = {v: k for k, v in _STORAGE_DTYPES.items() if k != "UntypedStorage"}

# `torch.<name>` dtype globals (they appear as arguments of _rebuild_tensor_v3)
_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64, "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16,
    "short": np.int16, "int8": np.int8, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32,
    "uint64": np.uint64, "bool": np.bool_, "complex64": np.complex64, "cfloat": np.complex64,
    "complex128": np.complex128, "cdouble": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
}

_WRAPPER_KEYS = ("state_dict", "module", "model", "model_state_dict")
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_ALIGN = 64  # data alignment of both writers (torch uses 64 too)


# --------------------------------------------------------------------------------------------
# Tensor references and the lazy mapping
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ref:
    """Where one tensor's bytes live: a storage region of a file, viewed as dtype/shape/strides."""

    file: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int  # byte offset of the storage in the file
    nbytes: int  # bytes of the storage
    elem_offset: int = 0  # tensor's storage offset, in elements of `dtype`
    strides: Optional[tuple[int, ...]] = None  # in elements; None: C-contiguous
    swap: bool = False  # stored big-endian
    member: Optional[str] = None  # compressed zip member: read through zipfile instead of mmap


def _contiguous_strides(shape) -> tuple[int, ...]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(out))


def _map_bytes(ref: _Ref) -> np.ndarray:
    """The storage's bytes as a read-only uint8 array (memory-mapped; unmapped when dropped)."""
    if ref.nbytes == 0:
        return np.zeros(0, np.uint8)
    if ref.member is not None:
        with zipfile.ZipFile(ref.file) as zf:
            buf = zf.read(ref.member)
        a = np.frombuffer(buf, np.uint8, count=ref.nbytes)
        return a
    start = ref.offset - ref.offset % mmap.ALLOCATIONGRANULARITY
    with open(ref.file, "rb") as f:
        mm = mmap.mmap(f.fileno(), ref.offset + ref.nbytes - start, access=mmap.ACCESS_READ, offset=start)
    return np.frombuffer(mm, np.uint8, count=ref.nbytes, offset=ref.offset - start)


def _materialize(ref: _Ref, key: str) -> np.ndarray:
    shape, dtype = ref.shape, ref.dtype
    numel = math.prod(shape)
    if numel == 0:
        return np.zeros(shape, dtype)
    strides = ref.strides if ref.strides is not None else _contiguous_strides(shape)
    last = ref.elem_offset + sum((s - 1) * st for s, st in zip(shape, strides))
    if ref.elem_offset < 0 or min(strides, default=0) < 0 or (last + 1) * dtype.itemsize > ref.nbytes:
        raise ConversionError(f"tensor {shape} (storage offset {ref.elem_offset}, strides {strides}) "
                              f"reaches past its storage of {ref.nbytes} bytes", file=ref.file, key=key)
    try:
        raw = _map_bytes(ref)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ConversionError(f"cannot read tensor data: {e}", file=ref.file, key=key) from None
    flat = raw[: ref.nbytes // dtype.itemsize * dtype.itemsize].view(dtype)
    if strides == _contiguous_strides(shape):
        out = flat[ref.elem_offset: ref.elem_offset + numel].reshape(shape)
    else:
        view = np.lib.stride_tricks.as_strided(
            flat[ref.elem_offset:], shape, tuple(st * dtype.itemsize for st in strides), writeable=False)
        out = np.ascontiguousarray(view)
    if ref.swap and dtype.itemsize > 1:
        if dtype.itemsize not in (2, 4, 8):
            raise ConversionError(f"big-endian {dtype} is not supported", file=ref.file, key=key)
        out = out.view(f"u{dtype.itemsize}").byteswap().view(dtype)
    return out


class LazyStateDict(Mapping):
    """name -> np.ndarray, read from the file(s) on access. Arrays are read-only views of a memory
    map where the layout allows (copy before mutating). `.shape(k)`, `.dtype(k)`, `.source(k)` (the
    file holding k) never touch tensor data."""

    def __init__(self, refs: dict[str, _Ref], path: Path, metadata: Optional[dict] = None):
        self._refs = refs
        self.path = Path(path)
        self.metadata = dict(metadata or {})

    def __getitem__(self, key: str) -> np.ndarray:
        ref = self._refs.get(key)
        if ref is None:
            raise KeyError(key)
        return _materialize(ref, key)

    def __contains__(self, key) -> bool:
        return key in self._refs

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def _ref(self, key: str) -> _Ref:
        try:
            return self._refs[key]
        except KeyError:
            raise ConversionError("no such tensor", file=self.path, key=key) from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self._ref(key).shape

    def dtype(self, key: str) -> np.dtype:
        return self._ref(key).dtype

    def source(self, key: str) -> Path:
        return self._ref(key).file

    def nbytes(self, key: str) -> int:
        r = self._ref(key)
        return math.prod(r.shape) * r.dtype.itemsize

    @property
    def files(self) -> list[Path]:
        return sorted({r.file for r in self._refs.values()})

    def __repr__(self) -> str:
        return f"LazyStateDict({self.path}, {len(self)} tensors)"


# --------------------------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------------------------

_DIR_CANDIDATES = (
    "model.safetensors.index.json", "model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors",
    "pytorch_model.bin.index.json", "pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json", "diffusion_pytorch_model.bin",
)


def _resolve(path: Path) -> Path:
    if not path.exists():
        raise ConversionError(f"{path}: no such file or directory", file=path)
    if not path.is_dir():
        return path
    for name in _DIR_CANDIDATES:
        if (path / name).is_file():
            return path / name
    for pattern in ("*.safetensors.index.json", "*.safetensors", "*.bin.index.json", "*.bin", "*.pt", "*.pth"):
        hits = sorted(p for p in path.glob(pattern) if p.is_file() and "-of-" not in p.name)
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ConversionError(f"{path}: several checkpoints ({', '.join(h.name for h in hits)}); "
                                  "name the file", file=path)
    raise ConversionError(f"{path}: no safetensors or pytorch_model*.bin checkpoint in this directory", file=path)


def open_state_dict(path: str | os.PathLike) -> LazyStateDict:
    """Open a checkpoint (file, index or directory) without loading tensor data."""
    p = _resolve(Path(path))
    name = p.name
    if name.endswith(".index.json"):
        return _open_index(p)
    if name.endswith(".safetensors"):
        refs, meta = _safetensors_refs(p)
        return LazyStateDict(refs, p, meta)
    return LazyStateDict(_torch_refs(p), p)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor as a writable in-memory array (for small checkpoints and tests)."""
    sd = open_state_dict(path)
    return {k: np.array(sd[k]) for k in sd}


def _open_index(index: Path) -> LazyStateDict:
    try:
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
        assert isinstance(weight_map, dict)
    except (OSError, ValueError, KeyError, AssertionError, TypeError):
        raise ConversionError(f"{index}: not a valid shard index (needs a JSON object with 'weight_map')",
                              file=index) from None
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(key)
    shard_refs: dict[str, dict[str, _Ref]] = {}
    for shard, keys in by_shard.items():
        f = index.parent / shard
        if not f.is_file():
            raise ConversionError(f"{index}: shard {shard} is missing (it should hold {keys[0]!r} and "
                                  f"{len(keys) - 1} more tensors)", file=f, key=keys[0])
        shard_refs[shard] = _safetensors_refs(f)[0] if shard.endswith(".safetensors") else _torch_refs(f)
    refs: dict[str, _Ref] = {}
    for key, shard in weight_map.items():
        if key not in shard_refs[shard]:
            raise ConversionError(f"{index} maps this tensor to {shard}, which does not hold it",
                                  file=index.parent / shard, key=key)
        refs[key] = shard_refs[shard][key]
    # tensors a shard holds beyond the index still belong to the model (transformers loads them too)
    for shard, srefs in shard_refs.items():
        for key, ref in srefs.items():
            refs.setdefault(key, ref)
    return LazyStateDict(refs, index, data.get("metadata"))


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------


def _safetensors_refs(path: Path) -> tuple[dict[str, _Ref], dict]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size or n > 1 << 30:
            raise ConversionError(f"{path}: truncated or not a safetensors file "
                                  f"(header length {n}, file size {size})", file=path)
        try:
            header = json.loads(f.read(n))
            assert isinstance(header, dict)
        except (ValueError, AssertionError):
            raise ConversionError(f"{path}: corrupt safetensors header (not a JSON object)", file=path) from None
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    refs: dict[str, _Ref] = {}
    for key, info in header.items():
        try:
            dtype = _ST_TO_NP[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except KeyError as e:
            raise ConversionError(f"{path}: bad header entry ({e} unknown or missing)", file=path, key=key) from None
        except (TypeError, ValueError):
            raise ConversionError(f"{path}: bad header entry {info!r}", file=path, key=key) from None
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise ConversionError(f"{path}: data_offsets [{begin}, {end}) do not fit shape {shape} {dtype}",
                                  file=path, key=key)
        if base + end > size:
            raise ConversionError(f"{path}: truncated: tensor data ends at byte {base + end}, file has {size}",
                                  file=path, key=key)
        refs[key] = _Ref(path, shape, dtype, base + begin, end - begin)
    return refs, meta


def _has_specs(m: Mapping) -> bool:
    """A mapping that can tell shapes and dtypes without producing tensors (LazyStateDict, or any
    lazy mapping with `shape(key)` and `dtype(key)` methods)."""
    return callable(getattr(m, "shape", None)) and callable(getattr(m, "dtype", None))


def _spec(tensors: Mapping, key: str) -> tuple[tuple[int, ...], np.dtype]:
    if _has_specs(tensors):
        return tuple(tensors.shape(key)), np.dtype(tensors.dtype(key))
    a = tensors[key]
    return tuple(np.shape(a)), np.dtype(getattr(a, "dtype", np.asarray(a).dtype))


def _as_array(tensors: Mapping, key: str, shape, dtype) -> np.ndarray:
    a = np.asarray(tensors[key])
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    if tuple(a.shape) != tuple(shape) or a.dtype != dtype:
        raise ConversionError(f"tensor changed between planning and writing: {shape} {dtype} -> "
                              f"{a.shape} {a.dtype}", key=key)
    return np.ascontiguousarray(a)


def _bytes_of(a: np.ndarray) -> memoryview:
    return memoryview(a.reshape(-1).view(np.uint8))


def write_safetensors(
    tensors: Mapping[str, Any],
    path_or_dir: str | os.PathLike,
    max_shard_bytes: Optional[int] = None,
    metadata: Optional[dict[str, str]] = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write `tensors` as safetensors; each file atomically. Returns the file, or the index when sharded.

    `path_or_dir`: a `*.safetensors` file name, or a directory (then `model.safetensors` inside it).
    With `max_shard_bytes`, tensors are packed greedily in order into shards named like transformers'
    (`model-00001-of-00003.safetensors`) beside an index `model.safetensors.index.json`; a model that
    fits in one shard is written unsharded. Values are read in order and dropped after writing, so
    a lazy mapping never holds more than one tensor; one with `shape(key)`/`dtype(key)` methods (like
    LazyStateDict) is read exactly once per key, others once more to plan the shards.
    """
    target = Path(path_or_dir)
    if target.suffix != ".safetensors":
        target = target / "model.safetensors"
    specs = {k: _spec(tensors, k) for k in tensors}
    for k, (_, dt) in specs.items():
        if dt not in _NP_TO_ST:
            raise ConversionError(f"dtype {dt} cannot be stored in safetensors", file=target, key=k)
    nbytes = {k: math.prod(s) * dt.itemsize for k, (s, dt) in specs.items()}
    shards: list[list[str]] = [[]]
    size = 0
    for k in specs:
        if max_shard_bytes is not None and shards[-1] and size + nbytes[k] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes[k]
    meta = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    if len(shards) == 1:
        _write_safetensors_file(target, shards[0], specs, tensors, meta, overwrite)
        return target
    stem = target.name[: -len(".safetensors")]
    n = len(shards)
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors"
        _write_safetensors_file(target.parent / name, keys, specs, tensors, meta, overwrite)
        weight_map.update({k: name for k in keys})
    index = target.parent / f"{target.name}.index.json"
    with atomic_path(index, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps({"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map},
                                  indent=2) + "\n")
    return index


def _write_safetensors_file(path: Path, keys, specs, tensors, meta, overwrite) -> None:
    header: dict[str, Any] = {"__metadata__": meta}
    off = 0
    for k in keys:
        shape, dt = specs[k]
        n = math.prod(shape) * dt.itemsize
        header[k] = {"dtype": _NP_TO_ST[dt], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # keeps every tensor 8-byte aligned
    with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in keys:
            shape, dt = specs[k]
            f.write(_bytes_of(_as_array(tensors, k, shape, dt)))


# --------------------------------------------------------------------------------------------
# torch pickles: restricted unpickler
# --------------------------------------------------------------------------------------------


class _Forbidden(Exception):
    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


@dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: np.dtype


@dataclass(frozen=True)
class _DType:
    dtype: np.dtype


@dataclass
class _Storage:
    key: str
    dtype: np.dtype
    numel: int
    byte_offset: int = 0  # legacy storage views: offset into the root storage


@dataclass
class _TensorStub:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: np.dtype


def _check_storage(storage) -> _Storage:
    if not isinstance(storage, _Storage):
        raise _Forbidden(f"a tensor rebuilt from {type(storage).__name__} instead of a storage")
    return storage


def _tuple_of_ints(x, what) -> tuple[int, ...]:
    if not isinstance(x, (tuple, list)) or not all(isinstance(i, int) for i in x):
        raise _Forbidden(f"a tensor with a non-integer {what} {x!r}")
    return tuple(x)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    s = _check_storage(storage)
    return _TensorStub(s, int(storage_offset), _tuple_of_ints(size, "size"), _tuple_of_ints(stride, "stride"), s.dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if metadata:  # conj / neg bits: the stored numbers are not the tensor's values
        raise _Forbidden(f"a tensor with lazy conj/neg metadata {metadata!r} (not supported)")
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    t = _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata)
    if not isinstance(dtype, _DType):
        raise _Forbidden(f"a tensor with dtype {dtype!r}")
    t.dtype = dtype.dtype
    return t


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", n): _StorageType(n, dt) for n, dt in _STORAGE_DTYPES.items()},
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.dtype(np.uint8)),
    **{("torch", n): _DType(np.dtype(dt)) for n, dt in _TORCH_DTYPES.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only _ALLOWED globals (to local stand-ins, not torch's functions); storages become
    _Storage records through persistent_load, so unpickling reads no tensor data."""

    def __init__(self, file, legacy: bool = False):
        super().__init__(file, encoding="utf-8")
        self.legacy = legacy
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise _Forbidden(f"global {module}.{name}")
        return obj

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise _Forbidden(f"persistent id {str(pid)[:80]!r}")
        if self.legacy and len(pid) == 6:
            _, stype, key, _loc, numel, view = pid
        elif len(pid) == 5:
            (_, stype, key, _loc, numel), view = pid, None
        else:
            raise _Forbidden(f"persistent id {str(pid)[:80]!r}")
        if not isinstance(stype, _StorageType) or not isinstance(numel, int):
            raise _Forbidden(f"storage {stype!r}")
        key = key.decode() if isinstance(key, bytes) else str(key)
        root = self.storages.setdefault(key, _Storage(key, stype.dtype, numel))
        if view is None:
            return root if root.dtype == stype.dtype else _Storage(key, stype.dtype, numel)
        _view_key, offset, size = view
        return _Storage(key, stype.dtype, int(size), int(offset) * stype.dtype.itemsize)


def _unpickle(f, path: Path, legacy: bool = False):
    u = _RestrictedUnpickler(f, legacy)
    try:
        return u.load(), u.storages
    except _Forbidden as e:
        raise ConversionError(f"{path}: refusing to unpickle {e.what}: only tensor-rebuild globals are "
                              "allowed (the file may contain code; it was not run)", file=path) from None
    except ConversionError:
        raise
    except Exception as e:  # anything a corrupt or truncated pickle stream raises
        raise ConversionError(f"{path}: truncated or corrupt pickle ({type(e).__name__}: {e})", file=path) from None


def _flatten(obj, path: Path) -> dict[str, _TensorStub]:
    def has_tensors(x) -> bool:
        if isinstance(x, _TensorStub):
            return True
        if isinstance(x, dict):
            return any(has_tensors(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return any(has_tensors(v) for v in x)
        return False

    if isinstance(obj, dict) and not any(isinstance(v, _TensorStub) for v in obj.values()):
        for k in _WRAPPER_KEYS:
            if isinstance(obj.get(k), dict) and has_tensors(obj[k]):
                obj = obj[k]
                break
    out: dict[str, _TensorStub] = {}

    def walk(x, prefix: str) -> None:
        if isinstance(x, _TensorStub):
            if prefix in out:
                raise ConversionError(f"{path}: two tensors flatten to the same name", file=path, key=prefix)
            out[prefix] = x
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{prefix}.{i}" if prefix else str(i))

    walk(obj, "")
    if not out and not isinstance(obj, dict):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors", file=path)
    return out


def _torch_refs(path: Path) -> dict[str, _Ref]:
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK":
        return _torch_zip_refs(path)
    if head[:2] == b"\x80\x02":
        return _torch_legacy_refs(path)
    raise ConversionError(f"{path}: not a torch checkpoint (neither a torch zip archive nor a legacy torch "
                          "pickle)", file=path)


def _zip_data_offset(f, info: zipfile.ZipInfo, path: Path) -> int:
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise ConversionError(f"{path}: corrupt zip entry {info.filename}", file=path)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _torch_zip_refs(path: Path) -> dict[str, _Ref]:
    size = path.stat().st_size
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ConversionError(f"{path}: truncated or corrupt torch zip archive ({e})", file=path) from None
    with zf, open(path, "rb") as f:
        pkls = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise ConversionError(f"{path}: zip archive without a single <archive>/data.pkl "
                                  "(not a torch.save file)", file=path)
        prefix = pkls[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in zf.namelist():
            byteorder = zf.read(f"{prefix}byteorder").decode(errors="replace").strip()
        try:
            pkl = zf.read(pkls[0])
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ConversionError(f"{path}: corrupt {pkls[0]} ({e})", file=path) from None
        obj, _ = _unpickle(io.BytesIO(pkl), path)
        stubs = _flatten(obj, path)
        located: dict[str, tuple[int, int, Optional[str]]] = {}
        refs = {}
        for name, t in stubs.items():
            s = t.storage
            if s.key not in located:
                member = f"{prefix}data/{s.key}"
                try:
                    info = zf.getinfo(member)
                except KeyError:
                    raise ConversionError(f"{path}: storage record {member} is missing", file=path, key=name) from None
                off = _zip_data_offset(f, info, path)
                stored = info.compress_type == zipfile.ZIP_STORED
                if stored and off + info.file_size > size:
                    raise ConversionError(f"{path}: truncated: {member} ends at byte {off + info.file_size}, "
                                          f"file has {size}", file=path, key=name)
                located[s.key] = (off, info.file_size, None if stored else member)
            off, avail, member = located[s.key]
            nbytes = s.numel * s.dtype.itemsize
            if s.byte_offset + nbytes > avail:
                raise ConversionError(f"{path}: storage {s.key} holds {avail} bytes, tensor needs "
                                      f"{s.byte_offset + nbytes}", file=path, key=name)
            refs[name] = _Ref(path, t.shape, t.dtype, off + s.byte_offset, nbytes, t.offset,
                              None if t.strides == _contiguous_strides(t.shape) else t.strides,
                              byteorder == "big", member)
        return refs


def _torch_legacy_refs(path: Path) -> dict[str, _Ref]:
    """torch.save(..., _use_new_zipfile_serialization=False): magic, protocol, sys_info, the object,
    the list of storage keys, then per storage an int64 element count and the raw bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic, _ = _unpickle(f, path)
        if magic != _TORCH_LEGACY_MAGIC:
            raise ConversionError(f"{path}: not a torch checkpoint (bad magic number)", file=path)
        _unpickle(f, path)  # protocol version
        sys_info, _ = _unpickle(f, path)
        little = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
        obj, storages = _unpickle(f, path, legacy=True)
        keys, _ = _unpickle(f, path)
        pos = f.tell()
        where: dict[str, int] = {}
        for key in keys:
            key = key.decode() if isinstance(key, bytes) else str(key)
            if key not in storages:
                raise ConversionError(f"{path}: storage {key} listed but never used", file=path)
            f.seek(pos)
            raw = f.read(8)
            if len(raw) != 8:
                raise ConversionError(f"{path}: truncated: storage {key} missing at byte {pos}", file=path)
            numel = struct.unpack("<q", raw)[0]
            where[key] = pos + 8
            pos += 8 + numel * storages[key].dtype.itemsize
            if pos > size:
                raise ConversionError(f"{path}: truncated: storage {key} ends at byte {pos}, file has {size}",
                                      file=path)
    refs = {}
    for name, t in _flatten(obj, path).items():
        s = t.storage
        if s.key not in where:
            raise ConversionError(f"{path}: tensor data missing (storage {s.key})", file=path, key=name)
        root = storages[s.key]
        avail = root.numel * root.dtype.itemsize - s.byte_offset
        refs[name] = _Ref(path, t.shape, t.dtype, where[s.key] + s.byte_offset, avail, t.offset,
                          None if t.strides == _contiguous_strides(t.shape) else t.strides, not little)
    return refs


# --------------------------------------------------------------------------------------------
# torch pickle writer (no torch needed)
# --------------------------------------------------------------------------------------------


def _p_int(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    if -(2 ** 31) <= v < 2 ** 31:
        return b"J" + struct.pack("<i", v)
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _p_str(s: str) -> bytes:
    raw = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _p_tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t" if items else b")"


def _p_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _torch_pickle_bytes(specs: dict[str, tuple[tuple[int, ...], np.dtype]]) -> bytes:
    """data.pkl of torch.save(OrderedDict(name -> contiguous tensor)), one storage per tensor, key = index."""
    out = [b"\x80\x02", _p_global("collections", "OrderedDict"), b")R("]
    for i, (name, (shape, dt)) in enumerate(specs.items()):
        pid = _p_tuple([_p_str("storage"), _p_global("torch", _NP_TO_STORAGE[dt]), _p_str(str(i)), _p_str("cpu"),
                        _p_int(math.prod(shape))])
        args = _p_tuple([
            pid + b"Q", _p_int(0), _p_tuple([_p_int(s) for s in shape]),
            _p_tuple([_p_int(s) for s in _contiguous_strides(shape)]), b"\x89",
            _p_global("collections", "OrderedDict") + b")R",
        ])
        out.append(_p_str(str(name)) + _p_global("torch._utils", "_rebuild_tensor_v2") + args + b"R")
    out.append(b"u.")
    return b"".join(out)


def write_torch_pickle(tensors: Mapping[str, Any], path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a torch.save-compatible zip (what `torch.save(state_dict, path)` writes for contiguous
    tensors) without torch; atomic. Values are read in order, one at a time (see write_safetensors)."""
    path = Path(path)
    specs = {str(k): _spec(tensors, k) for k in tensors}
    for k, (_, dt) in specs.items():
        if dt not in _NP_TO_STORAGE:
            raise ConversionError(f"dtype {dt} has no torch storage type", file=path, key=k)
    archive = "archive"
    with atomic_path(path, overwrite=overwrite) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            zf.writestr(_zinfo(f"{archive}/data.pkl"), _torch_pickle_bytes(specs))
            zf.writestr(_zinfo(f"{archive}/byteorder"), b"little")
            for i, (k, (shape, dt)) in enumerate(zip(tensors, specs.values())):
                name = f"{archive}/data/{i}"
                nbytes = math.prod(shape) * dt.itemsize
                info = _zinfo(name)
                info.file_size = nbytes
                zip64 = nbytes * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule for streamed members
                header = 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
                pad = -(zf.fp.tell() + header) % _ALIGN
                info.extra = b"FB" + struct.pack("<H", pad) + b"\0" * pad  # torch's own padding field
                with zf.open(info, "w", force_zip64=zip64) as w:
                    w.write(_bytes_of(_as_array(tensors, k, shape, dt)))
            zf.writestr(_zinfo(f"{archive}/version"), b"3\n")
    return path


def _zinfo(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    return info


# --------------------------------------------------------------------------------------------
# Key checks
# --------------------------------------------------------------------------------------------


def check_keys(expected: Mapping[str, Optional[tuple]], got: Mapping, file=None, *, limit: int = 8) -> None:
    """Raise ConversionError unless `got` has exactly the keys of `expected` with those shapes
    (an expected shape of None skips the shape check). The message lists up to `limit` names per kind."""
    def shape_of(k):
        return tuple(got.shape(k)) if _has_specs(got) else tuple(np.shape(got[k]))

    have = list(got)  # membership through the key list: a Mapping's `in` may load the tensor
    have_set = set(have)
    missing = [k for k in expected if k not in have_set]
    unexpected = [k for k in have if k not in expected]
    wrong = [(k, tuple(expected[k]), shape_of(k)) for k in expected
             if k in have_set and expected[k] is not None and shape_of(k) != tuple(expected[k])]
    if not (missing or unexpected or wrong):
        return

    def listing(items):
        more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {listing(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} key(s) with the wrong shape: "
                     + listing([f"{k} expected {e} got {g}" for k, e, g in wrong]))
    first = (missing or unexpected or [w[0] for w in wrong])[0]
    raise ConversionError("state dict does not match the model: " + "; ".join(parts), file=file, key=first)


# -------------------------------------------------------------------------------- views


def tensor_shape(sd: Mapping, key: str) -> tuple:
    """Shape of `sd[key]` without loading it when `sd` is lazy (has a `shape(key)` method)."""
    return tuple(sd.shape(key)) if callable(getattr(sd, "shape", None)) else tuple(np.shape(sd[key]))


def tensor_dtype(sd: Mapping, key: str) -> np.dtype:
    return np.dtype(sd.dtype(key)) if callable(getattr(sd, "dtype", None)) else np.asarray(sd[key]).dtype


class KeySubset(Mapping):
    """A state dict seen through a subset of its keys; tensors, shapes and dtypes come from `sd`
    lazily, so key checks and conversions over the view load nothing extra."""

    def __init__(self, sd: Mapping, keys):
        self._sd, self._keys = sd, list(keys)
        self._set = set(self._keys)

    def __getitem__(self, k):
        if k not in self._set:
            raise KeyError(k)
        return self._sd[k]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, k):
        return k in self._set

    def shape(self, k):
        return tensor_shape(self._sd, k)

    def dtype(self, k):
        return tensor_dtype(self._sd, k)

    def __getattr__(self, name):  # source(), path, ... of a lazy state dict
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._sd, name)
