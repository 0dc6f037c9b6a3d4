"""Peak memory of `seed-story convert` on a synthetic ~1B-parameter HF Llama (random fp32 safetensors,
written here directly), converted to bf16: the goal is peak RSS ≤ 1.3 × the output size.

    python benchmarks/convert_memory.py [--layers 18] [--hidden 2048] [--keep DIR]

The conversion runs in a fresh subprocess (`python -m seed_story_jax.cli convert SRC DST --dtype
bfloat16`) whose peak RSS is read with resource.getrusage(RUSAGE_CHILDREN) — the whole process,
imports of jax/orbax included. As the PyTorch reference, the same file is loaded the way
transformers users usually do it (`safetensors.torch.load_file` + `.to(bfloat16)`, in a subprocess);
the ratio is ours ÷ that reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def write_synthetic(d: Path, layers: int, hidden: int, inter: int, heads: int, vocab: int) -> int:
    """A HF Llama directory (config.json + sharded fp32 safetensors), one tensor in memory at a time."""
    import numpy as np

    from convert.io import write_safetensors
    from convert.llama import config_to_hf, hf_shapes
    from seed_story_jax.config import LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                      num_heads=heads, num_kv_heads=heads)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config_to_hf(cfg, "float32")))
    shapes = hf_shapes(cfg)
    rng = np.random.default_rng(0)

    class Lazy(dict):
        """Shapes known up front, values made when the writer asks (and dropped after)."""

        def __getitem__(self, k):
            return (rng.standard_normal(shapes[k], dtype=np.float32) * 0.02).astype(np.float32)

        def shape(self, k):
            return shapes[k]

        def dtype(self, k):
            return np.dtype(np.float32)

    lazy = Lazy.fromkeys(shapes)
    write_safetensors(lazy, d, max_shard_bytes=2 << 30)
    return sum(int(np.prod(s)) for s in shapes.values())


def measure(cmd: list[str]) -> tuple[int, float, int]:
    """(peak RSS bytes of the child, seconds, return code) — one child per call."""
    code = ("import resource, subprocess, sys, time, json\n"
            "t = time.perf_counter(); rc = subprocess.run(sys.argv[1:]).returncode\n"
            "dt = time.perf_counter() - t\n"
            "print(json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, dt, rc]))\n")
    out = subprocess.run([sys.executable, "-c", code, *cmd], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if out.returncode:
        raise RuntimeError(out.stderr)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main(argv=None) -> int:
    p = common.parser("convert_memory", __doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5504)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32066)
    p.add_argument("--keep", default=None, help="work directory to keep (default: a temporary one, removed)")
    args = p.parse_args(argv)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="convert-mem-"))
    try:
        src, dst = work / "hf", work / "ckpt"
        t = time.perf_counter()
        if dst.exists():
            import shutil

            shutil.rmtree(dst)
        if (src / "config.json").is_file():  # --keep DIR from an earlier run: reuse its source
            from convert.io import open_state_dict

            sd = open_state_dict(src)
            n = sum(int(np.prod(sd.shape(k))) for k in sd)
        else:
            n = write_synthetic(src, args.layers, args.hidden, args.intermediate, args.heads, args.vocab)
        print(f"source: {n / 1e9:.3f} B params ({dir_bytes(src) / 1e9:.2f} GB fp32), {time.perf_counter() - t:.0f} s")
        ours_rss, ours_s, rc = measure([sys.executable, "-m", "seed_story_jax.cli", "convert", str(src), str(dst),
                                        "--dtype", "bfloat16"])
        if rc:
            raise RuntimeError(f"convert exited {rc}")
        out_bytes = dir_bytes(dst / "params")
        ref_code = ("import sys, torch, glob; from safetensors.torch import load_file\n"
                    "sd = {}\n"
                    "for f in sorted(glob.glob(sys.argv[1] + '/*.safetensors')):\n"
                    "    sd.update({k: v.to(torch.bfloat16) for k, v in load_file(f).items()})\n")
        ref_rss, ref_s, _ = measure([sys.executable, "-c", ref_code, str(src)])
        param_bytes = 2 * n
        rows = [
            {"impl": "seed-story convert --dtype bfloat16", "peak_rss_gb": ours_rss / 1e9, "seconds": ours_s,
             "rss_over_output": ours_rss / param_bytes},
            {"impl": "torch load_file + .to(bf16)", "peak_rss_gb": ref_rss / 1e9, "seconds": ref_s,
             "rss_over_output": ref_rss / param_bytes},
        ]
        print(common.table(rows, ["impl", "peak_rss_gb", "seconds", "rss_over_output"]))
        ratio = ours_rss / param_bytes
        print(f"\npeak RSS / output size (bf16 params, {param_bytes / 1e9:.2f} GB; on disk {out_bytes / 1e9:.2f} GB)"
              f" = {ratio:.3f} (goal <= 1.3)")
        record = {"benchmark": "convert_memory", "params": n, "output_param_bytes": param_bytes,
                  "output_disk_bytes": out_bytes, "rows": rows, "ratio": ratio, "goal": 1.3, "higher_is_better": False,
                  "ratio_vs_torch": ours_rss / ref_rss, "machine": common.machine()}
        print(f"wrote {common.write_json(args.out, record)}")
        return 0 if ratio <= 1.3 else 1
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
