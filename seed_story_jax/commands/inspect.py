"""`seed-story inspect PATH [--json]`: names, shapes, dtypes and parameter counts of a checkpoint or config.

PATH may be a JAX checkpoint directory (shapes from orbax metadata; no array is read), a torch-format
checkpoint (safetensors, pytorch_model*.bin, .pt, sharded, or a directory holding one; headers only),
or a YAML config (every section with a model module is instantiated abstractly). Python users:
`describe(path)` returns the same report as a dict.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

HELP = "show the names, shapes, dtypes and parameter counts of a checkpoint or config"


def add_arguments(p) -> None:
    p.add_argument("path", help="JAX checkpoint dir, torch checkpoint (file or dir), or config (name or .yaml)")
    p.add_argument("overrides", nargs="*", help="config only: key.path=value overrides")
    p.add_argument("--json", action="store_true", help="print {total_params, components, ...} as JSON")
    p.add_argument("--full", action="store_true", help="list every tensor (default folds numbered layers)")


def run(args) -> int:
    report = describe(args.path, args.overrides)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report, full=args.full))
    return 0


# ------------------------------------------------------------------------------------------------
# reports
# ------------------------------------------------------------------------------------------------


def describe(path, overrides=()) -> dict:
    """{"path", "format", "total_params", "components": {name: count},
    "tensors": {component: {name: {"shape": [...], "dtype": str}}}, "skipped": {section: why}, ...}"""
    from seed_story_jax.checkpoint import is_checkpoint
    from seed_story_jax.config import resolve_config_path

    p = Path(path)
    if p.suffix in (".yaml", ".yml") or (not p.exists() and resolve_config_path(str(path)).is_file()):
        return _report(str(path), "config", *_config_tensors(resolve_config_path(str(path)), overrides))
    if overrides:
        from seed_story_jax.config import ConfigError

        raise ConfigError(f"{p}: overrides apply to configs only")
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if is_checkpoint(p):
        tensors, extra = _jax_tensors(p)
        return _report(str(p), "jax-checkpoint", tensors, {}, extra)
    return _report(str(p), "torch", _torch_tensors(p), {}, {})


def _report(path: str, fmt: str, tensors: dict, skipped: dict, extra: dict) -> dict:
    counts = {c: sum(math.prod(s) for s, _ in ts.values()) for c, ts in tensors.items()}
    return {
        "path": path,
        "format": fmt,
        "total_params": sum(counts.values()),
        "components": counts,
        "tensors": {c: {k: {"shape": list(s), "dtype": d} for k, (s, d) in ts.items()} for c, ts in tensors.items()},
        "skipped": skipped,
        **extra,
    }


def _flatten(tree, prefix: str = "") -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else None
    if items is None:
        import numpy as np

        return {prefix: (tuple(int(x) for x in tree.shape), str(np.dtype(tree.dtype)))}
    for k, v in items:
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _torch_tensors(p: Path) -> dict:
    from convert.io import open_state_dict

    sd = open_state_dict(p)
    groups: dict[str, dict] = defaultdict(dict)
    for k in sd:
        groups[k.split(".", 1)[0]][k] = (tuple(sd.shape(k)), str(sd.dtype(k)))
    return dict(groups)


def _jax_tensors(p: Path) -> tuple[dict, dict]:
    from seed_story_jax.checkpoint import CheckpointError, component_metadata, components_of, read_config, read_manifest

    manifest = read_manifest(p)
    names = list(manifest.get("components", {})) or components_of(p)
    tensors = {}
    for name in names:
        d = (p / "params" / name).resolve()
        if not d.is_dir():
            raise CheckpointError(f"{p}: manifest names component {name!r} but params/{name} is missing")
        tensors[name] = _flatten(component_metadata(p, name))
    extra = {"config_name": read_config(p).name,
             "kinds": {n: c.get("kind", n) for n, c in manifest.get("components", {}).items()}}
    tok_dir = p / "tokenizer"
    if tok_dir.is_dir():
        from seed_story_jax.tokenizer import Tokenizer

        tok = Tokenizer.load(tok_dir)
        extra["tokenizer"] = {"vocab_size": tok.vocab_size, "sentencepiece_size": tok.base_vocab_size,
                              "image_tokens": tok.has_image_tokens, "legacy": tok.legacy}
    return tensors, extra


def _config_tensors(path: Path, overrides) -> tuple[dict, dict, dict]:
    import importlib

    from seed_story_jax.config import load_config
    from seed_story_jax.models import COMPONENTS, abstract_params

    cfg = load_config(path, list(overrides))
    tensors, skipped = {}, {}
    for name, module in COMPONENTS.items():
        section = getattr(cfg, name, None)
        if section is None:
            continue
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            skipped[name] = f"no model module yet ({module})"
            continue
        tensors[name] = _flatten(abstract_params(name, section))
    return tensors, skipped, {"config_name": cfg.name}


# ------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------


def _fold(tensors: dict) -> list[tuple[str, list, str, int]]:
    """Rows (name, shape, dtype, count): names that differ only in numeric segments and share
    shape and dtype fold into one row with `*` for the numbers."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    order: list[tuple] = []
    for k, v in tensors.items():
        key = (re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", k), tuple(v["shape"]), v["dtype"])
        if key not in groups:
            order.append(key)
        groups[key].append(k)
    rows = []
    for key in order:
        names = groups[key]
        name = key[0] if len(names) > 1 else names[0]
        rows.append((name, list(key[1]), key[2], len(names)))
    return rows


def render(report: dict, *, full: bool = False) -> str:
    lines = [f"{report['path']}: {report['format']}"
             + (f" ({report['config_name']})" if report.get("config_name") else "")]
    for comp, ts in report["tensors"].items():
        kind = report.get("kinds", {}).get(comp)
        lines.append(f"\n{comp}" + (f" [{kind}]" if kind and kind != comp else "")
                     + f"  {report['components'][comp]:,} params, {len(ts)} tensors")
        rows = [(k, v["shape"], v["dtype"], 1) for k, v in ts.items()] if full else _fold(ts)
        width = min(max((len(r[0]) for r in rows), default=0), 80)
        for name, shape, dtype, n in rows:
            shape_s = "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
            lines.append((f"  {name:<{width}}  {shape_s:<22} {dtype:<9}" + (f" x{n}" if n > 1 else "")).rstrip())
    for comp, why in report.get("skipped", {}).items():
        lines.append(f"\n{comp}: skipped: {why}")
    if "tokenizer" in report:
        t = report["tokenizer"]
        lines.append(f"\ntokenizer: vocab {t['vocab_size']} (SentencePiece {t['sentencepiece_size']}), "
                     f"image tokens: {'yes' if t['image_tokens'] else 'no'}, legacy: {t['legacy']}")
    lines.append(f"\ntotal: {report['total_params']:,} params")
    return "\n".join(lines)
