"""`seed-story convert SRC DST`: torch-format source → JAX checkpoint, or a JAX checkpoint back."""

from __future__ import annotations

import json
import sys
from pathlib import Path

HELP = "convert a checkpoint between the original (torch) format and JAX; direction follows SRC"


def add_arguments(p) -> None:
    p.add_argument("src", help="source: a torch-format checkpoint (file or directory) or a JAX checkpoint")
    p.add_argument("dst", help="destination (must not exist)")
    p.add_argument("--kind", default=None, help="llama|vit|unet|vae|sdxl|detokenizer|agent (detected when omitted)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="parameter dtype of the output (default: keep the source's)")
    p.add_argument("--verify", action="store_true",
                   help="run the torch reference and the port on the same random inputs (fp32); exit non-zero beyond tolerance")
    p.add_argument("--base", default=None, help="base model directory (agent: the Llama-2-7b-hf directory; detokenizer: SDXL base)")
    p.add_argument("--keep-lora", action="store_true", help="agent: keep LoRA factors instead of merging them")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory to store with the checkpoint")
    p.add_argument("--config", default=None,
                   help="seed-story config (name or YAML) giving sizes the source cannot tell (vit: head counts, image size)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    import convert
    from seed_story_jax.checkpoint import is_checkpoint, read_manifest

    src, dst = Path(args.src), Path(args.dst)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or directory")
    if is_checkpoint(src):
        kind = args.kind or _kind_of_checkpoint(read_manifest(src))
        report = convert.converter(kind).export_checkpoint(src, dst, options=args)
        report.setdefault("direction", "jax->torch")
    else:
        kind = args.kind or convert.detect_kind(src)
        report = convert.converter(kind).import_checkpoint(src, dst, dtype=args.dtype, options=args)
        report.setdefault("direction", "torch->jax")
    report.setdefault("kind", kind)
    code = 0
    if args.verify:
        ckpt, ref = (dst, src) if report["direction"] == "torch->jax" else (src, dst)
        result = convert.converter(kind).verify(ref, ckpt, options=args)
        report["verify"] = result
        code = 0 if result["ok"] else 1
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        for k, v in report.items():
            print(f"{k}: {v}")
    if code:
        print(f"seed-story convert: verification failed: max_rel {report['verify']['max_rel']:.3g} "
              f"> tolerance {report['verify']['tolerance']:.3g}", file=sys.stderr)
    return code


def _kind_of_checkpoint(manifest: dict) -> str:
    kind = manifest.get("convert_kind")
    if kind:
        return kind
    kinds = {c["kind"] for c in manifest["components"].values()}
    if len(kinds) == 1:
        return kinds.pop()
    from seed_story_jax.errors import ConversionError

    raise ConversionError(f"checkpoint holds several components ({sorted(kinds)}); pass --kind")
