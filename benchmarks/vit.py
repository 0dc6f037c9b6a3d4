"""ViT encoding throughput: our Flax Qwen ViT (jitted, compiled once per batch shape) against the
plain-PyTorch reference (convert/torch_ref/qwen_vit.py, the original's module tree and math), same
weights, same config, same machine, same run, float32 on CPU.

    python benchmarks/vit.py        # width 384, 6 layers, 6 heads, mlp 1536, 224 px / patch 14
                                    # (256 tokens), pool 64 queries × 512, batch 4

Images/s = batch / median wall time of one batch (after a warm-up call that compiles). The two
outputs are compared too (relative max error). The ratio is ours / torch (> 1: ours is faster).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402


def main(argv=None) -> int:
    p = common.parser("vit", __doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from convert import vit as CV
    from convert.torch_ref import qwen_vit as R
    from seed_story_jax.config import ViTConfig
    from seed_story_jax.models import vit as V

    cfg = ViTConfig(image_size=args.image_size, patch_size=14, width=args.width, layers=args.layers,
                    heads=args.heads, mlp_width=4 * args.width, output_dim=512, n_queries=64, pool_heads=4,
                    pos_grid=8)
    torch.manual_seed(0)
    ref = R.from_config(cfg)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    model = V.from_params(cfg, CV.from_torch(sd, cfg))
    encode = V.make_encoder(model)
    x = np.random.default_rng(0).standard_normal((args.batch, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()

    def run_jax():
        return encode(x).block_until_ready()

    def run_torch():
        with torch.no_grad():
            return ref(xt)

    ours = np.asarray(run_jax(), np.float64)
    theirs = run_torch().double().numpy()
    rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    t_jax = common.timeit(run_jax, args.repeats)
    by_threads = {}
    threads, _ = common.torch_at_best_threads(
        lambda: by_threads.setdefault(torch.get_num_threads(), common.timeit(run_torch, args.repeats))["median"])
    t_torch = by_threads[threads]
    rows = [
        {"impl": "jax (flax, jit)", "sec/batch": t_jax["median"], "images/s": args.batch / t_jax["median"]},
        {"impl": "torch reference", "sec/batch": t_torch["median"], "images/s": args.batch / t_torch["median"]},
    ]
    ratio = rows[0]["images/s"] / rows[1]["images/s"]
    print(common.table(rows, ["impl", "sec/batch", "images/s"]))
    print(f"ratio (jax / torch images/s): {ratio:.3g}   max relative difference: {rel:.2e}")
    record = {
        "benchmark": "vit", "config": {**cfg.__dict__}, "batch": args.batch, "dtype": "float32",
        "jax": {**t_jax, "images_per_s": rows[0]["images/s"]},
        "torch": {**t_torch, "images_per_s": rows[1]["images/s"], "threads": threads,
                  "median_s_by_threads": {k: v["median"] for k, v in by_threads.items()}},
        "ratio": ratio, "max_rel_diff": rel, "machine": common.machine(),
    }
    out = common.write_json(args.out, record)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
