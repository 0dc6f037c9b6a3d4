"""`seed-story text --ckpt DIR --prompt "..."`: text completion with a checkpoint's Llama, to check a
converted model by eye. The prompt gets BOS; generation stops at EOS or --max-new-tokens."""

from __future__ import annotations

import json
from pathlib import Path

HELP = "complete a text prompt with a checkpoint's language model (greedy or sampled)"


def add_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, help="JAX checkpoint directory with an llm component and a tokenizer")
    p.add_argument("--prompt", required=True, help="text to complete (BOS is prepended)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: the checkpoint config's)")
    p.add_argument("--out", default=None, help="also write {prompt, completion, ids} as JSON here")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def complete(ckpt: str | Path, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, dtype: str | None = None) -> dict:
    """The library call behind the command: {"prompt", "completion", "ids", "num_generated"}."""
    import dataclasses

    from seed_story_jax.checkpoint import load_component, read_config, read_manifest
    from seed_story_jax.errors import ConversionError
    from seed_story_jax.generate import Generator, GenerateOptions
    from seed_story_jax.models.llama import from_params
    from seed_story_jax.tokenizer import Tokenizer

    ckpt = Path(ckpt)
    read_manifest(ckpt)
    cfg = read_config(ckpt).llm
    if cfg is None:
        raise ConversionError(f"{ckpt}: checkpoint has no llm section", file=ckpt / "config.yaml")
    if not (ckpt / "tokenizer").is_dir():
        raise ConversionError(f"{ckpt}: checkpoint has no tokenizer/ (convert with --tokenizer DIR)",
                              file=ckpt / "tokenizer")
    if dtype:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    tok = Tokenizer.load(ckpt / "tokenizer")
    model = from_params(cfg, load_component(ckpt, "llm"), where=str(ckpt))
    ids = tok.encode(prompt, bos=True)
    opts = GenerateOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, seed=seed)
    out = Generator(model).generate([ids], opts)
    n = int(out.num_generated[0])
    new = [int(t) for t in out.tokens[0, :n]]
    text_ids = new[:-1] if new and new[-1] == tok.eos_id else new
    # decode prompt + continuation together so the first piece keeps its leading space
    head, full = tok.decode(ids[1:]), tok.decode(ids[1:] + text_ids)
    completion = full[len(head):] if full.startswith(head) else tok.decode(text_ids)
    return {"prompt": prompt, "completion": completion, "ids": new, "num_generated": n}


def run(args) -> int:
    result = complete(args.ckpt, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed, dtype=args.dtype)
    if args.out:
        from seed_story_jax.atomic import atomic_path

        with atomic_path(args.out, overwrite=True) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(result["prompt"] + result["completion"])
    return 0
