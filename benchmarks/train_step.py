"""Stage-2 training step, seconds and MFU: ours (the jitted step of `seed-story train`, sharded by the
config's mesh) against the same model and recipe in PyTorch, same config, same batch, same run.

    python benchmarks/train_step.py        # CPU, fp32: configs/tiny-stage2.yaml with a 4-layer, d 256
                                           # Llama (SMALL below), 384 tokens, batch 8
    python benchmarks/train_step.py --gpu  # GPU: configs/stage2.yaml — Llama-2-7B + LoRA r 16, ViT-G/14 at
                                           # 448 px, 10 images, 1280 tokens — random weights, bf16 compute,
                                           # bf16 frozen weights, fp32 trainables, full remat, batch 8
    python benchmarks/train_step.py --gpu --config tiny-stage2   # smoke test of the GPU path (CPU if no GPU)

A step is what stage 2 trains (spec §5.3): the frozen ViT on every image, the input resampler, the LoRA
Llama, the output resampler on the target image's hidden states, CE + cosine, backward, clip, AdamW.
PyTorch side: transformers' LlamaForCausalLM (sdpa attention) in the peft-0.4 LoRA layout with LoRA
dropout (tests/torch_ref/agent.py), the Qwen ViT and resamplers of the references, torch.optim.AdamW
over the same trainables (the counts are checked equal), autocast and per-layer gradient checkpointing
where the config asks for bf16 and remat.

Both sides take the same batch: the first `batch` synthetic stage-2 samples whose images fill all
data.max_images slots (ours runs the ViT on every slot, the original only on the images present, so
full samples make the work equal; a hash checks both sides saw the same arrays). Weights are
independent random draws: the math is tested equal in tests/test_mllm.py and tests/test_vit.py. Each
side runs in its own process (on a GPU, one at a time holds the memory).

Ratio = ours s/step ÷ torch s/step (< 1: ours is faster). MFU = the task's model FLOPs
(seed_story_jax/train/stage2.py: 6·|w| trained, 4·|w| frozen, causal attention, resamplers, ViT
forward) × batch ÷ step time ÷ the chip's peak dense bf16 FLOP/s (train/metrics.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The CPU default: tiny-stage2's recipe on a Llama big enough that the step is matmuls, not overhead.
# The ViT's feature width is the Llama's (both resamplers are embed_dim = LLM width wide, as George's 4096).
SMALL = ["llm.hidden_size=256", "llm.intermediate_size=688", "llm.num_layers=4", "vit.output_dim=256"] + [
    f"mllm.{r}.{k}=256" for r in ("input_resampler", "output_resampler") for k in ("embed_dim", "kv_dim")]


def main(argv=None) -> int:
    p = common.parser("train_step", __doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="configs/stage2.yaml (7B agent + ViT-G) in bf16, batch 8")
    p.add_argument("--config", default=None, help="config name or path (default tiny-stage2 + SMALL on CPU, "
                                                  "stage2 with --gpu)")
    p.add_argument("--set", nargs="*", default=None, metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--batch", type=int, default=None, help="examples per step (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) one")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU: threads for both sides (1 by default: on a shared 2-core box a 2-thread pool "
                        "spins and times several times worse)")
    p.add_argument("--child", choices=["jax", "torch"], help=argparse.SUPPRESS)  # one side, in its own process
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.config is None:
        args.config = "stage2" if args.gpu else "tiny-stage2"
        if args.set is None and not args.gpu:
            args.set = SMALL
    args.set = list(args.set or [])
    args.batch = args.batch or 8
    overrides = args.set + [f"train.batch_size={args.batch}", "train.grad_accum=1"]
    if args.child:
        record = (jax_side if args.child == "jax" else torch_side)(args, overrides)
        common.write_json(args.child_out, record)
        return 0
    return parent(args, overrides)


# ------------------------------------------------------------------------------ the parent


def parent(args, overrides) -> int:
    sides = {}
    for side in ("jax", "torch"):
        env = dict(os.environ)
        if side == "torch":
            env["JAX_PLATFORMS"] = "cpu"  # the torch process only builds the batch with jax
        elif args.gpu:  # the GPU is ours alone while this side runs (`seed-story plan` puts stage 2 at ~69 GiB)
            env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
        if not args.gpu and args.threads == 1:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                                " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / f"{side}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--child-out", str(out),
                   "--config", args.config, "--batch", str(args.batch), "--repeats", str(args.repeats),
                   "--warmup", str(args.warmup), "--threads", str(args.threads), "--set", *args.set]
            if args.gpu:
                cmd.append("--gpu")
            print(f"--- {side}", flush=True)
            rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
            if rc != 0:
                print(f"train_step: the {side} side failed (exit {rc})", file=sys.stderr)
                return 1
            sides[side] = json.loads(out.read_text())
    jax_rec, torch_rec = sides["jax"], sides["torch"]
    if jax_rec["batch_hash"] != torch_rec["batch_hash"]:
        print("train_step: the two sides built different batches", file=sys.stderr)
        return 1
    if jax_rec["trainable_params"] != torch_rec["trainable_params"]:
        print(f"train_step: trainable parameter counts differ: ours {jax_rec['trainable_params']:,}, "
              f"torch {torch_rec['trainable_params']:,}", file=sys.stderr)
        return 1
    flops = jax_rec["flops_per_example"] * args.batch
    peak = jax_rec["peak_flops"]
    rows = []
    for name, rec in (("jax (flax, jit)", jax_rec), ("torch reference", torch_rec)):
        s = rec["step_s"]["median"]
        rec["examples_per_s"] = args.batch / s
        rec["tokens_per_s"] = args.batch * jax_rec["tokens_per_example"] / s
        rec["model_tflops_per_s"] = flops / s / 1e12
        rec["mfu"] = flops / s / peak if peak else None
        rows.append({"impl": name, "s/step": s, "first step s": rec["first_step_s"],
                     "examples/s": rec["examples_per_s"], "tokens/s": rec["tokens_per_s"],
                     "model TFLOP/s": rec["model_tflops_per_s"], "MFU": rec["mfu"] if peak else "n/a",
                     "peak mem GiB": rec["peak_memory_bytes"] / 2**30, "loss": rec["losses"][-1]})
    ratio = jax_rec["step_s"]["median"] / torch_rec["step_s"]["median"]
    print(common.table(rows, list(rows[0])))
    print(f"ratio (ours s/step ÷ torch s/step): {ratio:.3g}   model FLOPs/step {flops:.4g}   "
          f"image slots filled {jax_rec['slots_filled']:.0%}   trainable {jax_rec['trainable_params']:,}")
    record = {
        "benchmark": "train_step", "mode": "gpu" if args.gpu else "cpu", "config": args.config,
        "overrides": overrides, "batch": args.batch, "dtype": jax_rec["dtype"],
        "tokens_per_example": jax_rec["tokens_per_example"], "flops_per_example": jax_rec["flops_per_example"],
        "flops_note": jax_rec["flops_note"], "peak_flops": peak, "jax": jax_rec, "torch": torch_rec,
        "ratio": ratio, "higher_is_better": False, "goal": 1.0, "machine": common.machine(),
    }
    if args.gpu:
        record["mfu_anchor"] = "MaxText Llama2-7B on 8xH100: ~50% MFU (anchors.md, old accounting)"
    out = common.write_json(args.out, record)
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------------------ the shared batch


def _config(args, overrides):
    from seed_story_jax.config import load_config, resolve_config_path
    from seed_story_jax.train.stages import apply_train_overrides

    return apply_train_overrides(load_config(resolve_config_path(args.config), overrides))


def full_batch(examples, max_images: int, n: int) -> tuple[dict, float]:
    """The first `n` stage-2 examples that fill every image slot (the fullest if too few do), stacked;
    and the fraction of slots filled."""
    import numpy as np

    from seed_story_jax.train.stage2 import STAGE2_KEYS

    seen, full = [], 0
    for i in range(min(len(examples), 32 * n)):
        ex = examples[i]
        k = int((ex["embeds_cmp_mask"] | ex["embeds_gen_mask"]).sum())
        seen.append((k, i, ex))
        full += k == max_images
        if full == n:
            break
    chosen = sorted(seen, key=lambda s: (-s[0], s[1]))[:n]
    if len(chosen) < n:
        raise SystemExit(f"train_step: only {len(chosen)} samples in the data; --batch {n}")
    batch = {k: np.stack([ex[k] for _, _, ex in chosen]) for k in STAGE2_KEYS}
    return batch, sum(k for k, _, _ in chosen) / (n * max_images)


def batch_hash(batch: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(batch):
        h.update(k.encode() + batch[k].tobytes())
    return h.hexdigest()[:16]


def _summary(times: list, first: float, losses: list, peak_memory: int, **extra) -> dict:
    return {"step_s": {"median": statistics.median(times), "min": min(times), "runs": times},
            "first_step_s": first, "losses": losses, "peak_memory_bytes": peak_memory, **extra}


def _rss_peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------ ours


def jax_side(args, overrides) -> dict:
    import jax

    from seed_story_jax.profiling import compile_count
    from seed_story_jax.nn.sharding import activation_rules
    from seed_story_jax.train.loop import prepare
    from seed_story_jax.train.metrics import peak_flops
    from seed_story_jax.train.stages import make_task

    cfg = _config(args, overrides)
    task = make_task(cfg)
    batch_np, filled = full_batch(task.examples, cfg.data.max_images, args.batch)
    p = prepare(cfg, task=task)
    state, frozen = p.initial_state()
    batch = jax.device_put({k: batch_np[k] for k in p.batch_sh}, p.batch_sh)
    times, losses = [], []
    with activation_rules(p.mesh, p.rules):
        t = time.perf_counter()
        state, metrics = p.step_fn(state, frozen, batch)
        losses.append(float(metrics["loss"]))
        first = time.perf_counter() - t
        compiles = compile_count()
        for i in range(args.warmup + args.repeats):
            t = time.perf_counter()
            state, metrics = p.step_fn(state, frozen, batch)
            jax.block_until_ready((state, metrics))
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
            losses.append(float(metrics["loss"]))
        compiles = compile_count() - compiles
    dev = p.mesh.devices.flat[0]
    stats = dev.memory_stats() if dev.platform == "gpu" else None
    trainable = sum(x.size for x in jax.tree.leaves(p.state_abs.params))
    return _summary(times, first, losses, stats["peak_bytes_in_use"] if stats else _rss_peak(),
                    compiles_after_first=compiles, device=str(dev), devices=int(p.mesh.devices.size),
                    peak_flops=peak_flops(dev), flops_per_example=task.flops_per_example,
                    flops_note=task.flops_note, tokens_per_example=task.tokens_per_example,
                    trainable_params=int(trainable), batch_hash=batch_hash(batch_np), slots_filled=filled,
                    dtype=cfg.llm.dtype)


# ------------------------------------------------------------------------------ the reference


def torch_model(cfg, device):
    """(agent, vit, trainable params) of the PyTorch reference for `cfg`, random weights: frozen
    weights in train.frozen_dtype, trainables in float32 (as ours: an fp32 master copy)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from convert.torch_ref import qwen_vit
    from tests.torch_ref import agent as ref
    from convert.torch_ref.resamplers import Resampler

    c, t = cfg.llm, cfg.train
    if t.trainable not in ("lora", "full") or t.trainable_regex:
        raise SystemExit(f"train_step: the reference trains train.trainable=lora or full, not {t.trainable!r}")
    lc = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                     num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                     num_key_value_heads=c.num_kv_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
                     max_position_embeddings=max(c.max_position_embeddings, cfg.data.max_length),
                     tie_word_embeddings=c.tie_word_embeddings, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlamaForCausalLM(lc)
        # as ours: a config with llm.lora builds the adapters, which train.trainable=full trains too
        llm = hf if c.lora is None else ref.PeftModelForCausalLM(hf, c.lora.rank, c.lora.alpha, c.lora.dropout,
                                                                 tuple(c.lora.targets))
        res = [Resampler(rc.grid_size, rc.embed_dim, rc.num_heads, rc.kv_dim, eps=rc.eps)
               for rc in (cfg.mllm.input_resampler, cfg.mllm.output_resampler)]
        agent = ref.ContinuousLVLM(llm, *res, cfg.mllm.lm_loss_scale, cfg.mllm.rec_loss_scale)
        vit = qwen_vit.from_config(cfg.vit)
    frozen_dtype = getattr(torch, t.frozen_dtype or c.param_dtype)

    def trained(name: str) -> bool:
        if "pos_embed" in name or "original_module" in name:  # sin-cos tables; peft's unused norm copies
            return False
        if name.startswith(("input_resampler.", "output_resampler.")) or t.trainable == "full":
            return True
        return "lora_" in name or "modules_to_save" in name or "embed_tokens" in name or "lm_head" in name

    params = []
    for name, prm in agent.named_parameters():
        keep = trained(name)
        prm.requires_grad_(keep)
        prm.data = prm.data.float() if keep else prm.data.to(frozen_dtype)
        if keep:
            params.append(prm)
    for prm in vit.parameters():
        prm.requires_grad_(False)
        prm.data = prm.data.to(frozen_dtype)
    if c.remat != "none":
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    agent.train()  # LoRA dropout on, gradient checkpointing active
    return agent, vit.eval(), params


def torch_side(args, overrides) -> dict:
    import torch

    from seed_story_jax.train.stage1 import story_examples
    from seed_story_jax.train.stage2 import STAGE2_KEYS, story_tokenizer

    cfg = _config(args, overrides)
    # what make_task(cfg) reads on the other side, without building the task (its FLOP counts compile)
    examples = story_examples(cfg, 2, STAGE2_KEYS, story_tokenizer(cfg))
    batch_np, filled = full_batch(examples, cfg.data.max_images, args.batch)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(args.threads)
    agent, vit, params = torch_model(cfg, device)
    t = cfg.train
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay,
                            **({"fused": True} if device == "cuda" else {}))
    from seed_story_jax.train.optim import lr_factor

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda count: float(lr_factor(count, t)))  # ours: warmup, cosine
    bf16 = cfg.llm.dtype == "bfloat16"
    vit_dtype = next(vit.parameters()).dtype
    valid = batch_np["embeds_cmp_mask"] | batch_np["embeds_gen_mask"]

    def tensor(x, dtype=None):
        return torch.from_numpy(x).to(device=device, dtype=dtype)

    images = tensor(batch_np["images"][valid]).permute(0, 3, 1, 2).contiguous()
    inputs = dict(input_ids=tensor(batch_np["input_ids"], torch.long), labels=tensor(batch_np["labels"], torch.long),
                  embeds_gen_mask=tensor(batch_np["embeds_gen_mask"][valid]),
                  embeds_cmp_mask=tensor(batch_np["embeds_cmp_mask"][valid]),
                  ids_gen_mask=tensor(batch_np["ids_gen_mask"]), ids_cmp_mask=tensor(batch_np["ids_cmp_mask"]))

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def step() -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                feats = vit(images if bf16 else images.to(vit_dtype))  # autocast casts for itself
            out = agent(image_embeds=feats.float(), **inputs)
        out["total_loss"].backward()
        if t.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, t.clip_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return out["total_loss"].detach()

    times, losses = [], []
    t0 = time.perf_counter()
    losses.append(float(step()))
    sync()
    first = time.perf_counter() - t0
    for i in range(args.warmup + args.repeats):
        t0 = time.perf_counter()
        loss = step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss_peak()
    return _summary(times, first, losses, peak, device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                    threads=torch.get_num_threads(), trainable_params=int(sum(x.numel() for x in params)),
                    batch_hash=batch_hash(batch_np), slots_filled=filled,
                    checkpointing=cfg.llm.remat != "none", autocast_bf16=bf16)


if __name__ == "__main__":
    sys.exit(main())
