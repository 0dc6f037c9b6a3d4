"""Hugging Face Llama directory ⇄ JAX checkpoint (component `llm`).

HF → params (kernels are stored (in, out), so every projection and lm_head is transposed):

    model.embed_tokens.weight                   embed_tokens/embedding
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight   layers/{i}/self_attn/{q,k,v,o}_proj/kernel  (.T)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight    layers/{i}/mlp/{gate,up,down}_proj/kernel   (.T)
    model.layers.{i}.input_layernorm.weight     layers/{i}/input_layernorm/scale
    model.layers.{i}.post_attention_layernorm.weight   layers/{i}/post_attention_layernorm/scale
    model.norm.weight                           norm/scale
    lm_head.weight                              lm_head/kernel (.T; absent when embeddings are tied)

HF's rotate_half RoPE is what the model implements, so q/k need no permutation. Ignored on import:
`*.rotary_emb.inv_freq` (a persistent buffer in some Llama-2 checkpoints; recomputed from
rope_theta) and, for tied embeddings, a saved `lm_head.weight`. With `scan_layers` the layer params
are stacked along a leading axis, filled in place from one source tensor at a time.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from seed_story_jax.config import LlamaConfig, SeedStoryConfig
from seed_story_jax.errors import ConversionError

KIND = "llama"
COMPONENT = "llm"
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "*.pt")
TOLERANCE = 1e-4  # verify: max|jax - torch| / max|torch| on fp32 logits
MAX_SHARD_BYTES = 5 * 1024**3


# ---------------------------------------------------------------------------------------- config


def _np_dtype(name: str):
    import ml_dtypes

    return {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[name]


def _dtype_name(dt) -> str:
    name = np.dtype(dt).name
    if name not in ("float32", "float16", "bfloat16"):
        raise ConversionError(f"unsupported parameter dtype {name}")
    return name


def config_from_hf(hf: dict, *, file=None, param_dtype: str = "float32", dtype: Optional[str] = None) -> LlamaConfig:
    """LlamaConfig from a HF config.json dict (transformers 4.x or 5.x spelling)."""
    def bad(msg, key):
        raise ConversionError(f"config.json: {msg}", file=file, key=key)

    if hf.get("model_type") != "llama":
        bad(f"model_type is {hf.get('model_type')!r}, expected 'llama'", "model_type")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            bad("biases are not supported", key)
    if hf.get("hidden_act", "silu") != "silu":
        bad(f"hidden_act {hf.get('hidden_act')!r} is not supported (silu only)", "hidden_act")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = rope.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if rope_type != "default":
        bad(f"rope scaling {rope_type!r} is not supported", "rope_scaling")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    try:
        heads = int(hf["num_attention_heads"])
        cfg = LlamaConfig(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf["head_dim"]) if hf.get("head_dim") else None,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            bos_token_id=_first(hf.get("bos_token_id"), 1),
            eos_token_id=_first(hf.get("eos_token_id"), 2),
            pad_token_id=_first(hf.get("pad_token_id"), 0),
            param_dtype=param_dtype,
            dtype=dtype or param_dtype,
        )
    except KeyError as e:
        bad("missing field", e.args[0])
    if cfg.head_dim == cfg.hidden_size // cfg.num_heads:
        import dataclasses

        cfg = dataclasses.replace(cfg, head_dim=None)
    cfg.validate("llm")
    return cfg


def _first(v, default):
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    return default if v is None else int(v)


def config_to_hf(cfg: LlamaConfig, torch_dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }


# ---------------------------------------------------------------------------------------- names


def hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name this config needs, with its torch shape."""
    e, hd = cfg.hidden_size, cfg.resolved_head_dim
    q, kv, m = cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.intermediate_size
    proj = {"q_proj": (q, e), "k_proj": (kv, e), "v_proj": (kv, e), "o_proj": (e, q),
            "gate_proj": (m, e), "up_proj": (m, e), "down_proj": (e, m)}
    out = {"model.embed_tokens.weight": (cfg.vocab_size, e)}
    for i in range(cfg.num_layers):
        for name in ATTN:
            out[f"model.layers.{i}.self_attn.{name}.weight"] = proj[name]
        for name in MLP:
            out[f"model.layers.{i}.mlp.{name}.weight"] = proj[name]
        for name in NORMS:
            out[f"model.layers.{i}.{name}.weight"] = (e,)
    out["model.norm.weight"] = (e,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, e)
    return out


def _ignored(name: str, cfg: LlamaConfig) -> bool:
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight")


def _mapping(cfg: LlamaConfig) -> Iterator[tuple[str, tuple, Optional[int], bool]]:
    """(hf name, params path without layer index, layer index or None, transpose?)."""
    yield "model.embed_tokens.weight", ("embed_tokens", "embedding"), None, False
    for i in range(cfg.num_layers):
        for name in ATTN:
            yield f"model.layers.{i}.self_attn.{name}.weight", ("self_attn", name, "kernel"), i, True
        for name in MLP:
            yield f"model.layers.{i}.mlp.{name}.weight", ("mlp", name, "kernel"), i, True
        for name in NORMS:
            yield f"model.layers.{i}.{name}.weight", (name, "scale"), i, False
    yield "model.norm.weight", ("norm", "scale"), None, False
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", ("lm_head", "kernel"), None, True


def _set(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple):
    for p in path:
        tree = tree[p] if p in tree else tree[str(p)]
    return tree


# ---------------------------------------------------------------------------------------- pure


def from_torch(state_dict: Mapping, cfg: LlamaConfig, *, dtype=None, progress: bool = False) -> dict:
    """HF Llama state dict (name → array, possibly lazy) → params tree in cfg's layer layout.

    Reads one tensor at a time; each is cast (`dtype`, default: keep) and transposed straight into
    its destination, so peak memory is the output plus one source tensor."""
    check_state_dict(state_dict, cfg)
    target = None if dtype is None else _np_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    params: dict = {}
    items = list(_mapping(cfg))
    for name, path, layer, transpose in _progress(items, progress, "llama from_torch"):
        src = np.asarray(state_dict[name])
        src = src.T if transpose else src
        dt = target or src.dtype
        if layer is None:
            out = np.empty(src.shape, dt)
            out[...] = src
            _set(params, path, out)
        elif cfg.scan_layers:
            try:
                buf = _get(params["layers"], path)
            except KeyError:
                buf = np.empty((cfg.num_layers,) + src.shape, dt)
                _set(params.setdefault("layers", {}), path, buf)
            buf[layer] = src
        else:
            out = np.empty(src.shape, dt)
            out[...] = src
            _set(params.setdefault("layers", {}).setdefault(layer, {}), path, out)
        del src
    return params


def to_torch(params: dict, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """params tree (either layer layout) → HF state dict. Values are views (transposes, layer slices)
    of the params: no copy of the model is made here."""
    layers = params["layers"]
    stacked = "self_attn" in layers
    out = {}
    for name, path, layer, transpose in _mapping(cfg):
        if layer is None:
            x = _get(params, path)
        elif stacked:
            x = _get(layers, path)[layer]
        else:
            x = _get(layers, (layer,) + path)
        x = np.asarray(x)
        out[name] = x.T if transpose else x
    return out


def check_state_dict(state_dict: Mapping, cfg: LlamaConfig, file=None) -> None:
    """Missing, unexpected or misshapen tensors → ConversionError naming file and key."""
    from convert.io import KeySubset, check_keys

    kept = KeySubset(state_dict, [k for k in state_dict.keys() if not _ignored(k, cfg)])
    check_keys(hf_shapes(cfg), kept, file or getattr(state_dict, "path", None))



def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="tensor", leave=False)


# ---------------------------------------------------------------------------------------- edges


def _read_hf_config(src: Path) -> dict:
    f = src / "config.json"
    if not f.is_file():
        raise ConversionError(f"{src}: no config.json (expected a Hugging Face Llama directory)", file=f)
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"invalid JSON: {e}", file=f) from None


def _has_weights(src: Path) -> bool:
    return any(any(src.glob(g)) for g in WEIGHT_GLOBS)


def detect(src: Path) -> bool:
    """A HF directory whose config.json says llama (an agent .bin is a file, detected by its converter)."""
    src = Path(src)
    if not src.is_dir() or not (src / "config.json").is_file():
        return False
    try:
        hf = json.loads((src / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return hf.get("model_type") == "llama" and _has_weights(src)


def _source_dtype(sd: Mapping) -> str:
    key = "model.embed_tokens.weight"
    dt = sd.dtype(key) if hasattr(sd, "dtype") and key in sd else np.asarray(sd[key]).dtype
    return _dtype_name(dt)


def _tokenizer_source(src: Path, options) -> Optional[Path]:
    given = getattr(options, "tokenizer", None) if options is not None else None
    if given:
        p = Path(given)
        if not p.is_dir():
            raise ConversionError(f"{p}: tokenizer directory not found", file=p)
        return p
    return src if any((src / f).is_file() for f in TOKENIZER_FILES) else None


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, dst / f)


def import_checkpoint(src, dst, *, dtype=None, options=None) -> dict:
    from convert.io import open_state_dict
    from seed_story_jax.checkpoint import checkpoint_writer

    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise ConversionError(f"{src}: no such file or directory", file=src)
    if dst.exists():
        raise ConversionError(f"{dst}: already exists (refusing to overwrite)", file=dst)
    hf = _read_hf_config(src)
    sd = open_state_dict(src)
    out_dtype = dtype or _source_dtype(sd)
    cfg = config_from_hf(hf, file=src / "config.json", param_dtype=out_dtype)
    check_state_dict(sd, cfg)
    tok = _tokenizer_source(src, options)
    with tempfile.TemporaryDirectory(prefix="seed-story-tok-") as tmp:
        tok_dir = None
        if tok is not None:
            tok_dir = Path(tmp) / "tokenizer"
            _copy_tokenizer_files(tok, tok_dir) if tok == src else shutil.copytree(tok, tok_dir)
        with checkpoint_writer(dst, SeedStoryConfig(llm=cfg, name=src.name), kinds={COMPONENT: KIND},
                               tokenizer_dir=tok_dir, extra={"convert_kind": KIND, "source": str(src)}) as ck:
            with ck.component(COMPONENT) as w:
                for path, array in _stream_params(sd, cfg, _np_dtype(out_dtype), progress=True):
                    w.add(path, array)
                    del array
    n = sum(int(np.prod(s)) for s in hf_shapes(cfg).values())
    return {"src": str(src), "dst": str(dst), "params": n, "dtype": out_dtype,
            "layers": "stacked" if cfg.scan_layers else "unrolled", "tokenizer": str(tok) if tok else None}


def _stream_params(sd: Mapping, cfg: LlamaConfig, dt, *, progress: bool = False) -> Iterator[tuple[tuple, np.ndarray]]:
    """(params path, converted array) one leaf at a time, as `from_torch` would place them, so the
    import holds one output tensor (and one source tensor) instead of the whole tree. With
    `scan_layers` the mapping is walked path-major: each stacked (layers, ...) array is filled one
    source layer at a time and handed over as soon as it is complete."""
    items = list(_mapping(cfg))
    if cfg.scan_layers:
        items = [x for x in items if x[2] is None] + sorted((x for x in items if x[2] is not None),
                                                            key=lambda x: (x[1], x[2]))
    buf, buf_path = None, None
    for name, path, layer, transpose in _progress(items, progress, "llama import"):
        src = np.asarray(sd[name])
        src = src.T if transpose else src
        if layer is None or not cfg.scan_layers:
            out = np.empty(src.shape, dt)
            out[...] = src
            del src
            yield (path if layer is None else ("layers", layer) + path), out
            del out
            continue
        if layer == 0:
            buf, buf_path = np.empty((cfg.num_layers,) + src.shape, dt), ("layers",) + path
        buf[layer] = src
        del src
        if layer == cfg.num_layers - 1:
            out, buf = buf, None
            yield buf_path, out
            del out


class _Cast(Mapping):
    """Casts each tensor when the writer asks for it, so a dtype change never holds two models."""

    def __init__(self, sd: dict, dtype):
        self._sd, self._dtype = sd, dtype

    def __getitem__(self, k):
        return np.ascontiguousarray(self._sd[k]).astype(self._dtype, copy=False)

    def __iter__(self):
        return iter(self._sd)

    def __len__(self):
        return len(self._sd)

    def shape(self, k):
        return self._sd[k].shape

    def dtype(self, k):
        return self._dtype


def export_checkpoint(ckpt_dir, dst, *, options=None) -> dict:
    from convert.io import write_safetensors
    from seed_story_jax.atomic import atomic_path
    from seed_story_jax.checkpoint import load_component, read_config, read_manifest

    ckpt_dir, dst = Path(ckpt_dir), Path(dst)
    read_manifest(ckpt_dir)
    cfg = read_config(ckpt_dir).llm
    if cfg is None:
        raise ConversionError(f"{ckpt_dir}: checkpoint has no llm section", file=ckpt_dir / "config.yaml")
    params = load_component(ckpt_dir, COMPONENT)
    sd = to_torch(params, cfg)
    dtype = getattr(options, "dtype", None) if options is not None else None
    out_dtype = dtype or _dtype_name(next(iter(sd.values())).dtype)
    tensors = _Cast(sd, _np_dtype(out_dtype)) if dtype else sd
    with atomic_path(dst, directory=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg, out_dtype), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id},
            indent=2))
        write_safetensors(tensors, tmp, max_shard_bytes=MAX_SHARD_BYTES, metadata={"format": "pt"})
        tok = ckpt_dir / "tokenizer"
        if tok.is_dir():
            for f in tok.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
    return {"src": str(ckpt_dir), "dst": str(dst), "dtype": out_dtype, "tensors": len(sd)}


def verify(src, ckpt_dir, *, options=None, batch: int = 2, length: int = 16, seed: int = 0) -> dict[str, Any]:
    """transformers LlamaForCausalLM (HF dir `src`) vs the Flax model (checkpoint), fp32, same random ids.

    When the two sides are stored in different dtypes (a `--dtype` conversion), both sides' weights
    are rounded through the narrower dtype(s) first, so the check measures the conversion, not the
    cast."""
    import dataclasses

    import jax
    import torch
    import transformers

    from convert.io import open_state_dict
    from seed_story_jax.checkpoint import load_component, read_config
    from seed_story_jax.models.llama import from_params

    cfg = read_config(ckpt_dir).llm
    cfg = dataclasses.replace(cfg, param_dtype="float32", dtype="float32", lora=None)
    params = load_component(ckpt_dir, COMPONENT)
    narrow = {_dtype_name(jax.tree.leaves(params)[0].dtype), _source_dtype(open_state_dict(src))} - {"float32"}
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length))
    ref_model = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
    ref_model.eval()
    with torch.no_grad():
        for p in ref_model.parameters():
            for name in sorted(narrow):
                p.data = p.data.to(getattr(torch, name)).float()
        ref = ref_model(torch.from_numpy(ids)).logits.float().numpy()
    del ref_model

    def round_trip(x):
        x = np.asarray(x)
        for name in sorted(narrow):
            x = x.astype(_np_dtype(name))
        return x.astype(np.float32)

    params = jax.tree.map(round_trip, params)
    with jax.default_matmul_precision("highest"):
        model = from_params(cfg, params, where=str(ckpt_dir))
        ours = np.asarray(model(jax.numpy.asarray(ids))[0], np.float32)
    max_abs = float(np.abs(ours - ref).max())
    max_rel = max_abs / float(np.abs(ref).max())
    return {"max_abs": max_abs, "max_rel": max_rel, "tolerance": TOLERANCE, "ok": bool(max_rel <= TOLERANCE),
            "inputs": f"{batch}x{length} random ids, seed {seed}, float32"
                      + (f" (weights rounded through {', '.join(sorted(narrow))})" if narrow else "")}
