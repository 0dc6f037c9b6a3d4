"""SEED-Story agent `pytorch_model.bin` (SEED-Story-George or SEED-X-pretrained, peft 0.4 key names,
spec §2.4–2.5) + a Llama-2-7b-hf base directory ⇄ a JAX checkpoint with components `llm` and `mllm`.

Source keys (prefix P = `llm.base_model.model.`, i = layer, t = one of the seven projections):

    P model.embed_tokens.weight, P lm_head.weight            (vocab 32066, trained)      agent
    P model.layers.i.{self_attn,mlp}.t.lora_{A,B}.default.weight                         agent
    P model.layers.i.{input,post_attention}_layernorm.modules_to_save.default.weight     agent
    P model.norm.modules_to_save.default.weight                                          agent
    input_resampler.*, output_resampler.*                                                 agent
    P model.layers.i.{self_attn,mlp}.t.weight      (frozen base)    agent if present, else --base
    P ….original_module.weight, ….rotary_emb.inv_freq                 ignored (unused in forward)

The original loads the .bin with `strict=False` over the base model; here every trained tensor must
be in the .bin and every base projection in the .bin or in `--base`, and any other key, or a
misshapen one, stops the conversion with the key named before anything is written.

Import, merged (default): kernel = (W + (alpha/r)·B·A)ᵀ computed in fp32 and cast; the checkpoint's
llm config has no `lora:`. With `--keep-lora`: kernel = Wᵀ, lora_a = Aᵀ (in, r), lora_b = Bᵀ (r, out),
and the llm config gets a `lora:` section (r from the tensors, alpha from --config or the spec's 32).
Sizes come from `--config` (default configs/george-7b.yaml); with `--base`, its config.json gives the
Llama's shape (vocab from the .bin's embeddings).

Export: a LoRA-kept checkpoint → the same peft key layout (`pytorch_model.bin`, torch pickle), the
tensors bit-exact (no `original_module` copies: they are not kept); a merged one → a Hugging Face
Llama directory plus `resamplers.safetensors` (`input_resampler.*`, `output_resampler.*`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np

from convert import llama as hf
from convert.io import KeySubset, tensor_dtype, tensor_shape
from convert.resamplers import qwen_resampler_from_torch, qwen_resampler_keys, qwen_resampler_to_torch
from seed_story_jax.config import LoRAConfig, SeedStoryConfig
from seed_story_jax.errors import ConversionError

KIND = "agent"
PREFIX = "llm.base_model.model."
RESAMPLERS = ("input_resampler", "output_resampler")
TARGETS = hf.ATTN + hf.MLP
DEFAULT_CONFIG = "george-7b"
RESAMPLER_FILE = "resamplers.safetensors"
TOLERANCE = 1e-4


# ---------------------------------------------------------------------------------------- names


def _proj(i: int, t: str) -> str:
    return f"model.layers.{i}.{'self_attn' if t in hf.ATTN else 'mlp'}.{t}"


def _norms(n_layers: int) -> list[str]:
    return [f"model.layers.{i}.{n}" for i in range(n_layers) for n in hf.NORMS] + ["model.norm"]


def _ignored(key: str) -> bool:
    return key.endswith(".original_module.weight") or key.endswith("rotary_emb.inv_freq")


@dataclasses.dataclass
class Layout:
    """Every agent key the model needs, split by where it may come from."""

    trained: dict[str, tuple]  # must be in the .bin
    base: dict[str, tuple]  # peft name → shape: in the .bin, else `--base` under the HF name
    lora: dict[tuple[int, str], tuple[str, str]]  # (layer, target) → (A key, B key)


def layout(cfg: SeedStoryConfig, rank: int, targets: tuple[str, ...]) -> Layout:
    llm, mllm = cfg.llm, cfg.mllm
    shapes = hf.hf_shapes(dataclasses.replace(llm, lora=None))
    trained: dict[str, tuple] = {}
    base: dict[str, tuple] = {}
    lora = {}
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        trained[PREFIX + name] = shapes[name]
    for i in range(llm.num_layers):
        for t in TARGETS:
            w = _proj(i, t) + ".weight"
            out_dim, in_dim = shapes[w]
            base[PREFIX + w] = (out_dim, in_dim)
            if t in targets:
                a, b = PREFIX + _proj(i, t) + ".lora_A.default.weight", PREFIX + _proj(i, t) + ".lora_B.default.weight"
                trained[a], trained[b] = (rank, in_dim), (out_dim, rank)
                lora[(i, t)] = (a, b)
    for n in _norms(llm.num_layers):
        trained[PREFIX + n + ".modules_to_save.default.weight"] = (llm.hidden_size,)
    for r in RESAMPLERS:
        rc = getattr(mllm, r)
        trained.update(qwen_resampler_keys(r + ".", rc.grid_size, rc.embed_dim, rc.kv_dim))
    return Layout(trained=trained, base=base, lora=lora)


# ---------------------------------------------------------------------------------------- config



def _start_config(options) -> SeedStoryConfig:
    from seed_story_jax.config import load_config, resolve_config_path

    name = getattr(options, "config", None) or DEFAULT_CONFIG
    cfg = load_config(resolve_config_path(name))
    if cfg.llm is None or cfg.mllm is None:
        raise ConversionError(f"config {name}: needs `llm` and `mllm` sections for an agent", file=name)
    return cfg


def resolve_config(agent: Mapping, options, base_dir: Optional[Path], dtype: str, keep_lora: bool) -> tuple:
    """(SeedStoryConfig with llm + mllm for the output, LoRA rank, alpha, targets found in the .bin)."""
    cfg = _start_config(options)
    llm = cfg.llm
    if base_dir is not None:
        base_llm = hf.config_from_hf(hf._read_hf_config(base_dir), file=base_dir / "config.json")
        llm = dataclasses.replace(base_llm, scan_layers=llm.scan_layers, remat=llm.remat, lora=llm.lora)
    embed = PREFIX + "model.embed_tokens.weight"
    if embed not in set(agent):
        raise ConversionError("missing key (the agent's resized embeddings)", file=_file(agent), key=embed)
    llm = dataclasses.replace(llm, vocab_size=tensor_shape(agent, embed)[0], param_dtype=dtype, dtype=dtype)
    keys = list(agent)
    targets = tuple(t for t in TARGETS if any(k.endswith(f".{t}.lora_A.default.weight") for k in keys))
    a0 = next((k for k in keys if k.endswith(".lora_A.default.weight")), None)
    rank = tensor_shape(agent, a0)[0] if a0 is not None else (llm.lora or LoRAConfig()).rank
    if llm.lora is not None and rank != llm.lora.rank:
        raise ConversionError(f"LoRA rank {rank} in the checkpoint, {llm.lora.rank} in the config "
                              "(alpha/r would change); pass a --config with the right rank", file=_file(agent), key=a0)
    lora_cfg = llm.lora or LoRAConfig(rank=rank)  # no lora section: the spec's alpha 32
    lora_cfg = dataclasses.replace(lora_cfg, targets=targets or lora_cfg.targets)
    llm = dataclasses.replace(llm, lora=lora_cfg if keep_lora and targets else None)
    mllm = cfg.mllm
    mllm = dataclasses.replace(
        mllm, input_resampler=dataclasses.replace(mllm.input_resampler, param_dtype=dtype, dtype=dtype),
        output_resampler=dataclasses.replace(mllm.output_resampler, param_dtype=dtype, dtype=dtype))
    out = dataclasses.replace(cfg, llm=llm, mllm=mllm)
    out.validate()
    return SeedStoryConfig(llm=llm, mllm=mllm, name=cfg.name), rank, lora_cfg.alpha, targets


def _file(sd: Mapping):
    return getattr(sd, "path", None)


# ---------------------------------------------------------------------------------------- check


def check_sources(agent: Mapping, base: Optional[Mapping], lay: Layout, base_file=None) -> dict:
    """Every needed key present with its shape; nothing unexpected in the .bin. Returns counts of
    what comes from where."""
    from convert.io import check_keys

    keys = list(agent)
    have = set(keys)
    needed = dict(lay.trained)
    needed.update({k: s for k, s in lay.base.items() if k in have})
    ignored = [k for k in keys if _ignored(k) and k not in needed]
    check_keys(needed, KeySubset(agent, [k for k in keys if k not in set(ignored)]), _file(agent))
    from_base = [k for k in lay.base if k not in have]
    if from_base:
        if base is None:
            raise ConversionError(f"{len(from_base)} frozen base weight(s) are not in the agent checkpoint; "
                                  "pass --base LLAMA_DIR", file=_file(agent), key=from_base[0])
        base_keys = set(base)
        for k in from_base:
            name = k[len(PREFIX):]
            if name not in base_keys:
                raise ConversionError("missing key in the base model", file=base_file or _file(base), key=name)
            if tensor_shape(base, name) != lay.base[k]:
                raise ConversionError(f"base tensor has shape {tensor_shape(base, name)}, expected {lay.base[k]}",
                                      file=base_file or _file(base), key=name)
    return {"trained_from_agent": len(lay.trained), "base_from_agent": len(lay.base) - len(from_base),
            "base_from_base": len(from_base),
            "ignored_original_module": sum(k.endswith(".original_module.weight") for k in ignored),
            "ignored_inv_freq": sum(k.endswith("inv_freq") for k in ignored)}



# ---------------------------------------------------------------------------------------- pure


def merge_weight(w: np.ndarray, a: np.ndarray, b: np.ndarray, scaling: float) -> np.ndarray:
    """torch layout: W (out, in) + scaling · B (out, r) @ A (r, in), in fp32."""
    return np.asarray(w, np.float32) + np.float32(scaling) * (np.asarray(b, np.float32) @ np.asarray(a, np.float32))


class HFView(Mapping):
    """The agent (+ base) seen as a plain HF Llama state dict: merged projections (or the base W
    when LoRA is kept), trained norms, resized embeddings. Tensors are produced on access, one at a
    time, so `convert.llama.from_torch` lays them out without holding a second model."""

    def __init__(self, agent: Mapping, base: Optional[Mapping], cfg: SeedStoryConfig, lay: Layout, *, merge: bool,
                 scaling: float):
        self._agent, self._base, self._lay, self._merge, self._scaling = agent, base, lay, merge, scaling
        self._agent_keys = set(agent)
        self._shapes = hf.hf_shapes(dataclasses.replace(cfg.llm, lora=None))
        self._lora_of = {_proj(i, t) + ".weight": ab for (i, t), ab in lay.lora.items()}

    def _source(self, name: str) -> tuple[Mapping, str]:
        if name.endswith("norm.weight"):
            return self._agent, PREFIX + name[: -len(".weight")] + ".modules_to_save.default.weight"
        if PREFIX + name in self._agent_keys or self._base is None:
            return self._agent, PREFIX + name
        return self._base, name

    def __getitem__(self, name: str) -> np.ndarray:
        sd, key = self._source(name)
        x = sd[key]
        if self._merge and name in self._lora_of:
            a, b = self._lora_of[name]
            x = merge_weight(x, self._agent[a], self._agent[b], self._scaling)
        return x

    def __iter__(self):
        return iter(self._shapes)

    def __len__(self):
        return len(self._shapes)

    def shape(self, name):
        return self._shapes[name]

    def dtype(self, name):
        if self._merge and name in self._lora_of:
            return np.dtype(np.float32)
        sd, key = self._source(name)
        return tensor_dtype(sd, key)


def from_torch(agent: Mapping, cfg: SeedStoryConfig, *, base: Optional[Mapping] = None, keep_lora: bool = False,
               alpha: Optional[float] = None, dtype=None, progress: bool = False) -> dict:
    """Agent state dict (+ base HF state dict) → {"llm": params, "mllm": params}.

    cfg.llm.lora set ⇔ LoRA kept (then `keep_lora` must be True); otherwise merged with
    scaling = alpha / r (alpha default: cfg's or the spec's 32)."""
    llm_cfg = cfg.llm
    lora_cfg = llm_cfg.lora or LoRAConfig()
    alpha = lora_cfg.alpha if alpha is None else alpha
    rank = lora_cfg.rank
    keys = list(agent)
    a0 = next((k for k in keys if k.endswith(".lora_A.default.weight")), None)
    if a0 is not None:
        rank = tensor_shape(agent, a0)[0]
    targets = lora_cfg.targets if llm_cfg.lora is not None else tuple(
        t for t in TARGETS if any(k.endswith(f".{t}.lora_A.default.weight") for k in keys))
    if keep_lora != (llm_cfg.lora is not None):
        raise ValueError("keep_lora must match whether cfg.llm has a lora section")
    lay = layout(cfg, rank, targets)
    target = None if dtype is None else hf._np_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    view = HFView(agent, base, cfg, lay, merge=not keep_lora, scaling=alpha / rank)
    llm = hf.from_torch(view, dataclasses.replace(llm_cfg, lora=None),
                        dtype=target or tensor_dtype(agent, PREFIX + "model.embed_tokens.weight"), progress=progress)
    if keep_lora:
        _add_lora(llm, agent, lay, llm_cfg, target)
    mllm = {}
    for r in RESAMPLERS:
        p = qwen_resampler_from_torch(agent, r + ".", input_tokens=getattr(cfg.mllm, r).input_tokens)
        mllm[r] = _cast(p, target)
    return {"llm": llm, "mllm": mllm}


def _cast(tree, dt):
    if isinstance(tree, dict):
        return {k: _cast(v, dt) for k, v in tree.items()}
    a = np.asarray(tree)
    return a if dt is None else a.astype(dt)


def _add_lora(params: dict, agent: Mapping, lay: Layout, llm_cfg, dt) -> None:
    layers = params["layers"]
    for (i, t), (a_key, b_key) in lay.lora.items():
        a, b = np.asarray(agent[a_key]), np.asarray(agent[b_key])
        la, lb = a.T, b.T  # (in, r), (r, out)
        if dt is not None:
            la, lb = la.astype(dt), lb.astype(dt)
        group = "self_attn" if t in hf.ATTN else "mlp"
        if llm_cfg.scan_layers:
            node = layers[group][t]
            for name, x in (("lora_a", la), ("lora_b", lb)):
                if name not in node:
                    node[name] = np.empty((llm_cfg.num_layers,) + x.shape, x.dtype)
                node[name][i] = x
        else:
            node = layers[i][group][t]
            node["lora_a"], node["lora_b"] = np.ascontiguousarray(la), np.ascontiguousarray(lb)


def to_torch(params: dict, cfg: SeedStoryConfig) -> dict[str, np.ndarray]:
    """LoRA-kept params {"llm", "mllm"} → the agent's peft 0.4 state dict (no original_module
    copies). Values are views of the params where the layout allows (transposes, layer slices)."""
    llm_cfg = cfg.llm
    if llm_cfg.lora is None:
        raise ConversionError("the peft layout needs LoRA factors; this checkpoint is merged "
                              "(export it to a Hugging Face directory instead)")
    plain = hf.to_torch(params["llm"], dataclasses.replace(llm_cfg, lora=None))
    out: dict[str, np.ndarray] = {}
    for name, x in plain.items():
        if name.endswith("norm.weight"):
            out[PREFIX + name[: -len(".weight")] + ".modules_to_save.default.weight"] = x
        else:
            out[PREFIX + name] = x
    layers = params["llm"]["layers"]
    stacked = "self_attn" in layers
    for i in range(llm_cfg.num_layers):
        for t in llm_cfg.lora.targets:
            group = "self_attn" if t in hf.ATTN else "mlp"
            node = layers[group][t] if stacked else (layers[i] if i in layers else layers[str(i)])[group][t]
            la, lb = np.asarray(node["lora_a"]), np.asarray(node["lora_b"])
            if stacked:
                la, lb = la[i], lb[i]
            out[PREFIX + _proj(i, t) + ".lora_A.default.weight"] = la.T
            out[PREFIX + _proj(i, t) + ".lora_B.default.weight"] = lb.T
    for r in RESAMPLERS:
        out.update(qwen_resampler_to_torch(params["mllm"][r], r + "."))
    return out


# ---------------------------------------------------------------------------------------- edges


def _agent_file(src: Path) -> Path:
    if src.is_dir():
        for name in ("pytorch_model.bin", "model.safetensors", "pytorch_model.bin.index.json"):
            if (src / name).is_file():
                return src / name
        raise ConversionError(f"{src}: no pytorch_model.bin in this directory", file=src)
    return src


def detect(src: Path) -> bool:
    """A file (or a directory without config.json) whose keys are the agent's."""
    from convert.io import open_state_dict

    src = Path(src)
    if src.is_dir() and (src / "config.json").is_file():
        return False
    try:
        keys = list(open_state_dict(_agent_file(src)))
    except (ConversionError, OSError):
        return False
    return any(k.startswith(PREFIX) for k in keys) and any(k.startswith("input_resampler.") for k in keys)


def _tokenizer_source(options, base_dir: Optional[Path]) -> Optional[Path]:
    given = getattr(options, "tokenizer", None) if options is not None else None
    if given:
        p = Path(given)
        if not p.is_dir():
            raise ConversionError(f"{p}: tokenizer directory not found", file=p)
        return p
    if base_dir is not None and any((base_dir / f).is_file() for f in hf.TOKENIZER_FILES):
        return base_dir
    return None


def _has_image_tokens(tok_dir: Path) -> bool:
    from seed_story_jax.tokenizer import Tokenizer

    try:
        return Tokenizer.load(tok_dir).has_image_tokens
    except Exception:  # an unreadable tokenizer is reported, not fatal for the weights
        return False


def import_checkpoint(src, dst, *, dtype=None, options=None) -> dict:
    from convert.io import open_state_dict
    from seed_story_jax.checkpoint import save_checkpoint

    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise ConversionError(f"{src}: no such file or directory", file=src)
    if dst.exists():
        raise ConversionError(f"{dst}: already exists (refusing to overwrite)", file=dst)
    keep_lora = bool(getattr(options, "keep_lora", False))
    base_dir = getattr(options, "base", None)
    base_dir = Path(base_dir) if base_dir else None
    if base_dir is not None and not base_dir.is_dir():
        raise ConversionError(f"{base_dir}: --base must be a Hugging Face Llama directory", file=base_dir)
    agent = open_state_dict(_agent_file(src))
    embed = PREFIX + "model.embed_tokens.weight"
    src_dtype = hf._dtype_name(tensor_dtype(agent, embed)) if embed in set(agent) else "float32"
    out_dtype = dtype or src_dtype
    cfg, rank, alpha, targets = resolve_config(agent, options, base_dir, out_dtype, keep_lora)
    if not targets:
        raise ConversionError("no LoRA factors (`*.lora_A.default.weight`) in the agent checkpoint", file=_file(agent))
    base = open_state_dict(base_dir) if base_dir is not None else None
    lay = layout(cfg, rank, targets)
    counts = check_sources(agent, base, lay, base_file=base_dir)
    params = from_torch(agent, cfg, base=base, keep_lora=keep_lora, alpha=alpha, dtype=out_dtype, progress=True)
    _check_params(params, cfg)
    tok = _tokenizer_source(options, base_dir)
    with tempfile.TemporaryDirectory(prefix="seed-story-tok-") as tmp:
        tok_dir = None
        if tok is not None:
            tok_dir = Path(tmp) / "tokenizer"
            tok_dir.mkdir()
            for f in tok.iterdir():
                if f.is_file() and (f.name in hf.TOKENIZER_FILES or tok != base_dir):
                    shutil.copy2(f, tok_dir / f.name)
        save_checkpoint(dst, cfg, params, kinds={"llm": KIND, "mllm": KIND}, tokenizer_dir=tok_dir,
                        extra={"convert_kind": KIND, "source": str(src), "base": str(base_dir) if base_dir else None,
                               "lora": "kept" if keep_lora else "merged", "lora_rank": rank, "lora_alpha": alpha,
                               "source_dtype": src_dtype})
        has_img = _has_image_tokens(tok_dir) if tok_dir is not None else None
    n_llm = sum(int(np.prod(np.shape(x))) for x in _leaves(params["llm"]))
    n_res = sum(int(np.prod(np.shape(x))) for x in _leaves(params["mllm"]))
    report = {"src": str(src), "dst": str(dst), "base": str(base_dir) if base_dir else None,
              "lora": f"kept (r {rank}, alpha {alpha:g})" if keep_lora else f"merged (W + {alpha / rank:g}·B·A, fp32)",
              "targets": ",".join(targets), "dtype": out_dtype, "source_dtype": src_dtype,
              "llm_params": n_llm, "mllm_params": n_res, **counts,
              "tokenizer": str(tok) if tok else None, "tokenizer_has_image_tokens": has_img}
    return report


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def _check_params(params: dict, cfg: SeedStoryConfig) -> None:
    """Names and shapes against the models' abstract params (catches a config/tensor mismatch)."""
    from seed_story_jax.models import abstract_params
    from seed_story_jax.models.llama import _check_tree

    _check_tree(abstract_params("llm", cfg.llm), params["llm"], "llm")
    _check_tree(abstract_params("mllm", cfg.mllm), params["mllm"], "mllm")


class _Cast(Mapping):
    def __init__(self, sd: Mapping, dt):
        self._sd, self._dt = sd, dt

    def __getitem__(self, k):
        x = np.ascontiguousarray(self._sd[k])
        return x if self._dt is None else x.astype(self._dt, copy=False)

    def __iter__(self):
        return iter(self._sd)

    def __len__(self):
        return len(self._sd)

    def shape(self, k):
        return tuple(np.shape(self._sd[k]))

    def dtype(self, k):
        return np.dtype(self._dt) if self._dt is not None else np.asarray(self._sd[k]).dtype


def export_checkpoint(ckpt_dir, dst, *, options=None) -> dict:
    """LoRA kept → DST (a `.bin` file, or a directory receiving `pytorch_model.bin`) in the peft
    layout; merged → DST directory: HF Llama files + resamplers.safetensors (+ tokenizer files)."""
    from convert.io import write_safetensors, write_torch_pickle
    from seed_story_jax.atomic import atomic_path
    from seed_story_jax.checkpoint import load_component, read_config, read_manifest

    ckpt_dir, dst = Path(ckpt_dir), Path(dst)
    read_manifest(ckpt_dir)
    cfg = read_config(ckpt_dir)
    if cfg.llm is None or cfg.mllm is None:
        raise ConversionError(f"{ckpt_dir}: an agent checkpoint needs llm and mllm sections",
                              file=ckpt_dir / "config.yaml")
    if dst.exists():
        raise ConversionError(f"{dst}: already exists (refusing to overwrite)", file=dst)
    params = {"llm": load_component(ckpt_dir, "llm"), "mllm": load_component(ckpt_dir, "mllm")}
    params = {k: _to_numpy(v) for k, v in params.items()}
    dtype = getattr(options, "dtype", None) if options is not None else None
    dt = hf._np_dtype(dtype) if dtype else None
    tok = ckpt_dir / "tokenizer"
    if cfg.llm.lora is not None:
        sd = to_torch(params, cfg)
        if dst.suffix in (".bin", ".pt", ".pth"):
            write_torch_pickle(_Cast(sd, dt), dst)
        else:
            with atomic_path(dst, directory=True) as tmp:
                write_torch_pickle(_Cast(sd, dt), tmp / "pytorch_model.bin")
                _copy_tokenizer(tok, tmp)
        return {"src": str(ckpt_dir), "dst": str(dst), "layout": "peft 0.4 (LoRA kept)", "tensors": len(sd),
                "dtype": dtype or cfg.llm.param_dtype}
    llm_sd = hf.to_torch(params["llm"], cfg.llm)
    res_sd = {}
    for r in RESAMPLERS:
        res_sd.update(qwen_resampler_to_torch(params["mllm"][r], r + "."))
    out_dtype = dtype or hf._dtype_name(next(iter(llm_sd.values())).dtype)
    with atomic_path(dst, directory=True) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf.config_to_hf(cfg.llm, out_dtype), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg.llm.bos_token_id, "eos_token_id": cfg.llm.eos_token_id,
             "pad_token_id": cfg.llm.pad_token_id}, indent=2))
        write_safetensors(_Cast(llm_sd, dt), tmp, max_shard_bytes=hf.MAX_SHARD_BYTES, metadata={"format": "pt"})
        write_safetensors(_Cast(res_sd, dt), tmp / RESAMPLER_FILE, metadata={"format": "pt"})
        _copy_tokenizer(tok, tmp)
    return {"src": str(ckpt_dir), "dst": str(dst), "layout": "Hugging Face Llama (merged) + " + RESAMPLER_FILE,
            "tensors": len(llm_sd) + len(res_sd), "dtype": out_dtype}


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)


def _copy_tokenizer(tok: Path, dst: Path) -> None:
    if tok.is_dir():
        for f in tok.iterdir():
            if f.is_file():
                shutil.copy2(f, dst / f.name)


# ---------------------------------------------------------------------------------------- verify


def verify(src, ckpt_dir, *, options=None, batch: int = 2, length: int = 16, seed: int = 0) -> dict[str, Any]:
    """torch vs JAX on the same random inputs, fp32: transformers' LlamaForCausalLM holding the
    source weights merged in torch (W + s·B@A) vs the checkpoint's llm (LoRA kept or merged), and the
    torch Resampler (convert/torch_ref) on the source tensors vs the checkpoint's resamplers."""
    import jax
    import torch
    import transformers
    from flax import nnx

    from convert.io import open_state_dict
    from convert.torch_ref.resamplers import Resampler
    from seed_story_jax.models import mllm as mllm_model
    from seed_story_jax.checkpoint import is_checkpoint, load_component, read_config, read_manifest
    from seed_story_jax.models import llama as llama_model

    if is_checkpoint(src):
        raise ConversionError(f"{src}: verify needs the torch-format source", file=src)
    cfg = read_config(ckpt_dir)
    f32 = dict(param_dtype="float32", dtype="float32")
    llm_cfg = dataclasses.replace(cfg.llm, **f32)
    agent = open_state_dict(_agent_file(Path(src)))
    base_dir = getattr(options, "base", None)
    base = open_state_dict(base_dir) if base_dir else None
    alpha = read_manifest(ckpt_dir).get("lora_alpha") or (cfg.llm.lora or LoRAConfig()).alpha
    rank = next(tensor_shape(agent, k)[0] for k in agent if k.endswith(".lora_A.default.weight"))
    scaling = alpha / rank

    def t32(x):
        return torch.from_numpy(np.asarray(x, np.float32).copy())

    sd = {}
    keys = set(agent)
    for name in hf.hf_shapes(dataclasses.replace(llm_cfg, lora=None)):
        if name.endswith("norm.weight"):
            sd[name] = t32(agent[PREFIX + name[:-len(".weight")] + ".modules_to_save.default.weight"])
            continue
        w = t32(agent[PREFIX + name]) if PREFIX + name in keys else t32(base[name])
        a_key = PREFIX + name[:-len(".weight")] + ".lora_A.default.weight"
        if a_key in keys:
            b_key = PREFIX + name[:-len(".weight")] + ".lora_B.default.weight"
            w = w + scaling * (t32(agent[b_key]) @ t32(agent[a_key]))
        sd[name] = w
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in hf.config_to_hf(llm_cfg, "float32").items()
                                         if k not in ("architectures", "torch_dtype", "dtype")})
    ref = transformers.LlamaForCausalLM(hf_cfg).eval()
    ref.load_state_dict(sd, strict=True)
    ids = np.random.default_rng(seed).integers(0, llm_cfg.vocab_size, (batch, length))
    with torch.no_grad():
        ref_logits = ref(torch.from_numpy(ids)).logits.numpy()
    del ref, sd
    rng = np.random.default_rng(seed + 1)
    results = [("llm logits", ref_logits)]
    ours = []
    with jax.default_matmul_precision("highest"):
        params = jax.tree.map(lambda x: np.asarray(x, np.float32), load_component(ckpt_dir, "llm"))
        model = llama_model.from_params(llm_cfg, params, where=str(ckpt_dir))
        ours.append(np.asarray(nnx.jit(lambda m, x: m(x)[0])(model, jax.numpy.asarray(ids))))
        del model, params
        mcfg = cfg.mllm
        mcfg = dataclasses.replace(mcfg, input_resampler=dataclasses.replace(mcfg.input_resampler, **f32),
                                   output_resampler=dataclasses.replace(mcfg.output_resampler, **f32))
        with nnx.use_eager_sharding(False):
            graphdef, state = nnx.split(nnx.eval_shape(lambda: mllm_model.build(mcfg, nnx.Rngs(0))))
        mparams = jax.tree.map(lambda x: np.asarray(x, np.float32), load_component(ckpt_dir, "mllm"))
        state.replace_by_pure_dict(mparams, replace_fn=lambda var, x: var.replace(jax.numpy.asarray(x)))
        res = nnx.merge(graphdef, state)
        for r in RESAMPLERS:
            rc = getattr(mcfg, r)
            tm = Resampler(rc.grid_size, rc.embed_dim, rc.num_heads, rc.kv_dim, eps=rc.eps).eval()
            tm.load_state_dict({k[len(r) + 1:]: t32(agent[k]) for k in agent if k.startswith(r + ".")}, strict=True)
            x = rng.standard_normal((batch, rc.input_tokens, rc.kv_dim)).astype(np.float32)
            with torch.no_grad():
                results.append((r, tm(torch.from_numpy(x)).numpy()))
            ours.append(np.asarray(nnx.jit(lambda m, x: m(x))(getattr(res, r), jax.numpy.asarray(x))))
    report = {"tolerance": TOLERANCE, "inputs": f"{batch}x{length} random ids, seed {seed}; random features"}
    worst_abs, worst_rel = 0.0, 0.0
    for (name, want), got in zip(results, ours):
        d = float(np.abs(got - want).max())
        rel = d / float(np.abs(want).max())
        report[f"{name} max_rel"] = rel
        worst_abs, worst_rel = max(worst_abs, d), max(worst_rel, rel)
    report.update(max_abs=worst_abs, max_rel=worst_rel, ok=bool(worst_rel <= TOLERANCE))
    return report
