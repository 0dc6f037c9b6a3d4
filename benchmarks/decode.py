"""Per-token decode latency: our Flax Llama (jitted prefill + compiled decode loop over the static KV
cache) against transformers' LlamaForCausalLM in torch, same weights, same machine, same run.

    python benchmarks/decode.py                  # CPU: 8 layers, d 512, 8 heads, vocab 32066,
                                                 # batch 1, 256-token prompt, 128 new tokens (greedy)
    python benchmarks/decode.py --gpu-7b         # accelerator: full Llama-2-7B config, bf16 random
                                                 # weights, batch-1 tokens/s vs the bandwidth bound

Per-token latency = time of the decode phase / (new tokens - 1): the first new token comes from the
prefill's logits in both implementations, so prefill is timed separately. torch is measured two
ways: a hand-written loop over `model(tok, past_key_values=...)` (the fair baseline; its time is the
ratio's denominator; at its best of 1 or all intra-op threads) and `model.generate` (what a user
calls). The goal is ratio ≤ 0.5.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402


def cpu_config(args):
    from seed_story_jax.config import LlamaConfig

    return LlamaConfig(vocab_size=32066, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.heads,
                       max_position_embeddings=4096, param_dtype="float32", dtype="float32",
                       scan_layers=args.scan)


def run_cpu(args) -> dict:
    import jax
    import numpy as np
    import torch
    import transformers

    from convert.llama import config_to_hf, from_torch
    from seed_story_jax.generate import Generator, GenerateOptions, cache_capacity
    from seed_story_jax.models.llama import from_params

    cfg = cpu_config(args)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(cfg, "float32").items()
                                         if k not in ("architectures", "torch_dtype", "dtype")})
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(hf_cfg).eval()
    params = from_torch({k: v.numpy() for k, v in ref.state_dict().items()}, cfg)
    model = from_params(cfg, params)
    prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.prompt)).astype(np.int32)
    n = args.new_tokens
    opts = GenerateOptions(max_new_tokens=n, eos_token_id=None)

    # ---- JAX
    gen = Generator(model)
    tokens, lengths = gen.pad_prompts(prompt.tolist())
    cap = cache_capacity(tokens.shape[1], n)

    def jax_prefill():
        logits, _, cache = gen.prefill(tokens, lengths, gen.new_cache(args.batch, cap))
        jax.block_until_ready((logits, cache))
        return logits, cache

    state = {}

    def jax_decode():
        out, _, _ = gen.decode(state["logits"], prompt[:, -1], state["cache"], opts)
        out.block_until_ready()
        state["out"] = np.asarray(out)

    def jax_decode_timed():
        state["logits"], state["cache"] = jax_prefill()  # fresh cache (the loop donates it), not timed
        t = time.perf_counter()
        jax_decode()
        return time.perf_counter() - t

    t_compile = time.perf_counter()
    jax_decode_timed()
    t_compile = time.perf_counter() - t_compile
    jax_pre = common.timeit(jax_prefill, args.repeats)
    jax_runs = sorted(jax_decode_timed() for _ in range(args.repeats))
    jax_tok = jax_runs[len(jax_runs) // 2] / (n - 1)

    # ---- torch: hand-written cached loop
    ids = torch.from_numpy(prompt.astype(np.int64))

    def torch_prefill():
        with torch.inference_mode():
            return ref(ids, use_cache=True)

    def torch_decode_timed():
        with torch.inference_mode():
            out = ref(ids, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            toks = [tok]
            t = time.perf_counter()
            for _ in range(n - 1):
                out = ref(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                toks.append(tok)
            dt = time.perf_counter() - t
        state["torch_out"] = torch.cat(toks, 1).numpy()
        return dt

    by_threads = {}

    def torch_median():
        torch_decode_timed()
        runs = by_threads.setdefault(torch.get_num_threads(), sorted(torch_decode_timed() for _ in range(args.repeats)))
        return runs[len(runs) // 2]

    torch_threads, _ = common.torch_at_best_threads(torch_median)
    torch_runs = by_threads[torch_threads]
    torch_pre = common.timeit(torch_prefill, args.repeats)
    torch_tok = torch_runs[len(torch_runs) // 2] / (n - 1)

    # ---- torch: generate (for context)
    ref.generation_config.eos_token_id = None

    def hf_generate(k):
        with torch.inference_mode():
            ref.generate(ids, max_new_tokens=k, do_sample=False, pad_token_id=0, min_new_tokens=k)

    g_full = common.timeit(lambda: hf_generate(n), args.repeats)["median"]
    g_one = common.timeit(lambda: hf_generate(1), args.repeats)["median"]
    gen_tok = (g_full - g_one) / (n - 1)

    agree = float((state["out"] == state["torch_out"]).mean())
    rows = [
        {"impl": "jax (while_loop, static cache)", "prefill_ms": jax_pre["median"] * 1e3, "ms_per_token": jax_tok * 1e3,
         "tokens_per_s": 1 / jax_tok, "ratio_vs_torch_loop": jax_tok / torch_tok},
        {"impl": "torch loop (DynamicCache)", "prefill_ms": torch_pre["median"] * 1e3, "ms_per_token": torch_tok * 1e3,
         "tokens_per_s": 1 / torch_tok, "ratio_vs_torch_loop": 1.0},
        {"impl": "torch generate()", "prefill_ms": g_one * 1e3, "ms_per_token": gen_tok * 1e3,
         "tokens_per_s": 1 / gen_tok, "ratio_vs_torch_loop": gen_tok / torch_tok},
    ]
    print(common.table(rows, ["impl", "prefill_ms", "ms_per_token", "tokens_per_s", "ratio_vs_torch_loop"]))
    ratio = jax_tok / torch_tok
    print(f"\nratio jax/torch per-token = {ratio:.3f} (goal <= 0.5; vs generate(): {jax_tok / gen_tok:.3f}); "
          f"greedy tokens identical: {agree:.1%}; jax first-call compile+run {t_compile:.1f} s")
    return {
        "benchmark": "decode", "mode": "cpu",
        "config": {"layers": cfg.num_layers, "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
                   "heads": cfg.num_heads, "vocab": cfg.vocab_size, "batch": args.batch, "prompt": args.prompt,
                   "new_tokens": n, "dtype": "float32", "scan_layers": cfg.scan_layers, "cache_capacity": cap},
        "rows": rows, "ratio": ratio, "ratio_vs_generate": jax_tok / gen_tok, "goal": 0.5,
        "token_agreement": agree, "jax_decode_runs_s": jax_runs, "torch_decode_runs_s": torch_runs,
        "torch_threads": torch_threads, "torch_decode_runs_s_by_threads": by_threads,
        "jax_first_call_s": t_compile, "machine": common.machine(),
    }


def copy_bandwidth(nbytes: int = 2 << 30, repeats: int = 10) -> float:
    """Device memory bandwidth (bytes/s) from timing a large on-device copy (read + write)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a * jnp.bfloat16(1.0001))
    f(x).block_until_ready()
    t = time.perf_counter()
    for _ in range(repeats):
        y = f(x)
    y.block_until_ready()
    return 2 * nbytes * repeats / (time.perf_counter() - t)


def run_gpu_7b(args) -> dict:
    import dataclasses

    import jax
    import numpy as np
    from flax import nnx

    from seed_story_jax.config import load_config, resolve_config_path
    from seed_story_jax.generate import Generator, GenerateOptions, cache_capacity
    from seed_story_jax.models.llama import Llama

    cfg = load_config(resolve_config_path(args.model_config)).llm
    cfg = dataclasses.replace(cfg, param_dtype="bfloat16", dtype="bfloat16", remat="none", scan_layers=args.scan)

    @jax.jit
    def init():  # random weights made on the device (no 13 GB host copy)
        with nnx.use_eager_sharding(False):
            return nnx.split(Llama(cfg, rngs=nnx.Rngs(0)))[1]

    with nnx.use_eager_sharding(False):
        graphdef = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))[0]
    model = nnx.merge(graphdef, init())
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    bw = copy_bandwidth(2 << 30 if jax.default_backend() != "cpu" else 256 << 20)
    n = args.new_tokens
    prompt = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, args.prompt)).astype(np.int32)
    gen = Generator(model)
    tokens, lengths = gen.pad_prompts(prompt.tolist())
    cap = cache_capacity(tokens.shape[1], n)
    opts = GenerateOptions(max_new_tokens=n, eos_token_id=None)
    kv_bytes = 2 * cfg.num_layers * cap * cfg.num_kv_heads * cfg.resolved_head_dim * 2

    def timed():
        logits, _, cache = gen.prefill(tokens, lengths, gen.new_cache(1, cap))
        jax.block_until_ready((logits, cache))
        t = time.perf_counter()
        out, _, _ = gen.decode(logits, prompt[:, -1], cache, opts)
        out.block_until_ready()
        return time.perf_counter() - t

    timed()
    runs = sorted(timed() for _ in range(args.repeats))
    per_tok = runs[len(runs) // 2] / (n - 1)
    bound = bw / (weight_bytes + kv_bytes)
    rows = [{"impl": "jax bf16 batch 1", "ms_per_token": per_tok * 1e3, "tokens_per_s": 1 / per_tok,
             "bound_tokens_per_s": bound, "fraction_of_bound": (1 / per_tok) / bound}]
    print(common.table(rows, ["impl", "ms_per_token", "tokens_per_s", "bound_tokens_per_s", "fraction_of_bound"]))
    print(f"\nweights {weight_bytes / 1e9:.2f} GB + KV cache {kv_bytes / 1e9:.3f} GB; copy bandwidth {bw / 1e12:.2f} TB/s")
    return {"benchmark": "decode", "mode": "gpu-7b", "model_config": args.model_config, "rows": rows, "weight_bytes": weight_bytes,
            "kv_cache_bytes": kv_bytes, "copy_bandwidth_Bps": bw, "decode_runs_s": runs,
            "config": {"prompt": args.prompt, "new_tokens": n, "cache_capacity": cap, "scan_layers": cfg.scan_layers},
            "machine": common.machine()}


def main(argv=None) -> int:
    p = common.parser("decode", __doc__.splitlines()[0])
    p.add_argument("--gpu-7b", action="store_true", help="full-size bf16 decode vs the memory-bandwidth bound")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--scan", action="store_true", help="scan over layers (default: unrolled)")
    p.add_argument("--model-config", default="llama2-7b", help="--gpu-7b: the config whose llm is timed (tiny: smoke test)")
    args = p.parse_args(argv)
    if args.gpu_7b:
        if args.out == str(common.RESULTS / "decode.json"):
            args.out = str(common.RESULTS / "decode_gpu_7b.json")
        record = run_gpu_7b(args)
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        record = run_cpu(args)
    print(f"wrote {common.write_json(args.out, record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
