"""One classifier-free-guidance denoising step of the SDXL-style UNet: ours (Flax, jitted, warm) against
diffusers' UNet2DConditionModel + EulerDiscreteScheduler in torch, same weights, same config, same run.

    python benchmarks/unet.py          # CPU, fp32: a small SDXL-like UNet (channels 64/128/256, head dim 64,
                                       # transformer depths 1/2/2, 32×32 latents, 64 context tokens), batch 2
    python benchmarks/unet.py --gpu    # GPU: SDXL base config (random weights), 1024² (128² latents),
                                       # 50 Euler steps with CFG 7.5; ours bf16 vs diffusers fp16

A step = scale the latents, run the UNet on [uncond, cond] (batch 2), combine with guidance 7.5, Euler
update. Ours is one jitted function (the GPU loop is one lax.fori_loop); diffusers runs its own
scheduler. Ratio = ours seconds ÷ diffusers seconds (< 1: ours is faster; goal ≤ 0.8).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

SMALL = dict(block_out_channels=(64, 128, 256), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
             transformer_layers_per_block=(1, 2, 2), attention_head_dim=(1, 2, 4), cross_attention_dim=256,
             use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=32,
             projection_class_embeddings_input_dim=6 * 32 + 64, norm_num_groups=32, sample_size=32)
SDXL = dict(block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32, sample_size=128)
GUIDANCE = 7.5


def main(argv=None) -> int:
    p = common.parser("unet", __doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="SDXL base at 1024², 50 steps, bf16 (ours) vs fp16 (diffusers)")
    p.add_argument("--steps", type=int, default=50, help="--gpu: denoising steps")
    p.add_argument("--size", type=int, default=None, help="latent side (default 32 CPU, 128 GPU)")
    p.add_argument("--tokens", type=int, default=64, help="context tokens (SEED-Story: 64)")
    p.add_argument("--config", choices=["small", "sdxl"], default=None,
                   help="UNet size (default: small on CPU, sdxl with --gpu; `--gpu --config small` smoke-tests "
                        "the GPU path, on CPU too when no GPU is present)")
    p.add_argument("--attention", choices=["xla", "cudnn"], default="cudnn",
                   help="--gpu: our attention implementation for bf16 (cudnn: flash attention)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU: threads for both sides (torch.set_num_threads; XLA's Eigen pool). 1 by default: "
                        "on a shared, oversubscribed box torch's 2-thread pool spins and times 10x worse")
    args = p.parse_args(argv)
    if not args.gpu and args.threads == 1:
        # must be set before jax initialises its CPU backend
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    if args.gpu:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")  # leave room for torch on the same GPU
    return gpu(args) if args.gpu else cpu(args)


def _setup(kwargs, size, tokens, device, torch_dtype, seed=0):
    """diffusers model + scheduler, our config/params (from the same torch weights), and the inputs."""
    import numpy as np
    import torch
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    from convert import unet as CU

    torch.manual_seed(seed)
    with torch.device(device):
        ref = UNet2DConditionModel(**kwargs).eval()
    cfg = CU.config_from_diffusers(dict(ref.config))
    params = CU.from_torch({k: v.detach().float().cpu().numpy() for k, v in ref.state_dict().items()}, cfg)
    ref = ref.to(torch_dtype)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                   timestep_spacing="leading")
    rng = np.random.default_rng(seed)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    px = size * 8
    inputs = {
        "latents": rng.standard_normal((1, cfg.in_channels, size, size)).astype(np.float32),
        "context": rng.standard_normal((2, tokens, cfg.cross_attention_dim)).astype(np.float32),
        "pooled": rng.standard_normal((2, pooled)).astype(np.float32),
        "time_ids": np.tile(np.array([[px, px, 0, 0, px, px]], np.float32), (2, 1)),
    }
    return ref, sched, cfg, params, inputs


def _jax_sampler(cfg, params, dtype, steps):
    """(init_state, run(state, latents, context, pooled, time_ids, n) → latents): `n` Euler CFG steps."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from seed_story_jax import schedulers as S
    from seed_story_jax.config import SchedulerConfig
    from seed_story_jax.models.unet import abstract_model

    cfg = dataclasses.replace(cfg, param_dtype=dtype, dtype=dtype)
    graphdef, _ = nnx.split(abstract_model(cfg))
    state = jax.device_put(jax.tree.map(lambda x: jnp.asarray(x, cfg.param_dtype), params))
    sched = S.euler_schedule(SchedulerConfig(), steps)

    @jax.jit
    def run(state, x, context, pooled, time_ids, start, stop):
        model = nnx.merge(graphdef, state)

        sigmas, timesteps = jnp.asarray(sched.sigmas), jnp.asarray(sched.timesteps)

        def body(i, x):
            xin = S.scale_model_input(x, sigmas[i])
            xin = jnp.concatenate([xin, xin]).astype(model.dtype)
            eps = model(xin, timesteps[i], context, pooled, time_ids).astype(jnp.float32)
            eps_u, eps_c = jnp.split(eps, 2)
            return S.euler_step(sched, i, x, eps_u + GUIDANCE * (eps_c - eps_u))

        return jax.lax.fori_loop(start, stop, body, x)

    return state, run, sched


def _torch_step(ref, sched, torch_dtype, lat, ctx, pooled, time_ids, i):
    import torch

    t = sched.timesteps[i]
    xin = sched.scale_model_input(lat, t)
    xin = torch.cat([xin, xin]).to(torch_dtype)
    with torch.no_grad():
        eps = ref(xin, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample.float()
    eps_u, eps_c = eps.chunk(2)
    return sched.step(eps_u + GUIDANCE * (eps_c - eps_u), t, lat).prev_sample


def _timeit_cpu(fn, repeats: int) -> dict:
    """common.timeit plus the process CPU seconds per call (all threads): on a loaded machine wall time
    depends on the neighbours, CPU time much less."""
    import statistics
    import time

    fn()
    cpu = []
    for _ in range(repeats):
        c = time.process_time()
        fn()
        cpu.append(time.process_time() - c)
    return {**common.timeit(fn, repeats, warmup=0), "cpu_median": statistics.median(cpu), "cpu_runs": cpu}


def cpu(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    size = args.size or 32
    steps = 50
    torch.set_num_threads(args.threads)
    ref, sched, cfg, params, inp = _setup(SMALL, size, args.tokens, "cpu", torch.float32)
    state, run, js = _jax_sampler(cfg, params, "float32", steps)
    sched.set_timesteps(steps)
    i = 10  # a mid-trajectory step: both sides take the same sigma/timestep from the same tables
    lat = torch.from_numpy(inp["latents"]) * sched.sigmas[i]
    ctx, pooled, tid = (torch.from_numpy(inp[k]) for k in ("context", "pooled", "time_ids"))
    x = jnp.asarray(inp["latents"].transpose(0, 2, 3, 1)) * js.sigmas[i]
    jctx, jpool, jtid = (jnp.asarray(inp[k]) for k in ("context", "pooled", "time_ids"))

    def run_jax():
        return run(state, x, jctx, jpool, jtid, i, i + 1).block_until_ready()

    def run_torch():
        sched._step_index = i  # diffusers advances its own step counter on every step()
        return _torch_step(ref, sched, torch.float32, lat, ctx, pooled, tid, i)

    ours = np.asarray(run_jax(), np.float64).transpose(0, 3, 1, 2)
    theirs = run_torch().double().numpy()
    rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    t_jax = _timeit_cpu(run_jax, args.repeats)
    t_torch = _timeit_cpu(run_torch, args.repeats)
    rows = [{"impl": "jax (flax, jit, fp32)", "s/step": t_jax["median"], "cpu s/step": t_jax["cpu_median"]},
            {"impl": "diffusers (torch, fp32)", "s/step": t_torch["median"], "cpu s/step": t_torch["cpu_median"]}]
    ratio = t_jax["median"] / t_torch["median"]
    print(common.table(rows, ["impl", "s/step", "cpu s/step"]))
    print(f"threads: {args.threads}   cpu-time ratio: {t_jax['cpu_median'] / t_torch['cpu_median']:.3g}")
    print(f"ratio (jax / diffusers s/step): {ratio:.3g} (goal <= 0.8)   max relative difference: {rel:.2e}")
    record = {"benchmark": "unet", "mode": "cpu", "config": SMALL, "latent_size": size, "tokens": args.tokens,
              "batch": 2, "threads": args.threads, "dtype": "float32", "jax": t_jax, "torch": t_torch, "ratio": ratio,
              "cpu_ratio": t_jax["cpu_median"] / t_torch["cpu_median"], "goal": 0.8,
              "higher_is_better": False, "max_rel_diff": rel, "machine": common.machine(),
              "jax_params": sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(params))}
    print(f"wrote {common.write_json(args.out, record)}")
    return 0


def gpu(args) -> int:
    import jax.numpy as jnp
    import numpy as np
    import torch

    size = args.size or 128
    steps = args.steps
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda":
        from seed_story_jax.nn.attention import set_implementation

        set_implementation(args.attention)
    kwargs = SMALL if args.config == "small" else SDXL
    ref, sched, cfg, params, inp = _setup(kwargs, size, args.tokens, dev, torch.float16)
    state, run, js = _jax_sampler(cfg, params, "bfloat16", steps)
    del params
    ctx, pooled, tid = (torch.from_numpy(inp[k]).to(dev, torch.float16) for k in ("context", "pooled", "time_ids"))
    x0 = jnp.asarray(inp["latents"].transpose(0, 2, 3, 1)) * js.init_noise_sigma
    jctx, jpool, jtid = (jnp.asarray(inp[k], jnp.bfloat16) for k in ("context", "pooled", "time_ids"))

    def run_jax():
        return run(state, x0, jctx, jpool, jtid, 0, steps).block_until_ready()

    def run_torch():
        sched.set_timesteps(steps, device=dev)
        lat = torch.from_numpy(inp["latents"]).to(dev) * sched.init_noise_sigma
        for i in range(steps):
            lat = _torch_step(ref, sched, torch.float16, lat, ctx, pooled, tid, i)
        if dev == "cuda":
            torch.cuda.synchronize()
        return lat

    ours = np.asarray(run_jax(), np.float64).transpose(0, 3, 1, 2)
    theirs = run_torch().double().cpu().numpy()
    rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    t_jax = common.timeit(run_jax, args.repeats)
    t_torch = common.timeit(run_torch, args.repeats)
    rows = [{"impl": "jax (flax, jit, bf16, fori_loop)", "s/sample": t_jax["median"], "s/step": t_jax["median"] / steps},
            {"impl": "diffusers (torch, fp16)", "s/sample": t_torch["median"], "s/step": t_torch["median"] / steps}]
    ratio = t_jax["median"] / t_torch["median"]
    print(common.table(rows, ["impl", "s/sample", "s/step"]))
    print(f"ratio (jax / diffusers s): {ratio:.3g} (goal <= 0.8)   max relative difference of final latents "
          f"(bf16 vs fp16, {steps} steps): {rel:.2e}")
    record = {"benchmark": "unet", "mode": "gpu", "config": "sdxl-base (random weights)" if kwargs is SDXL else kwargs,
              "device": dev, "attention": args.attention if dev == "cuda" else "xla", "latent_size": size,
              "image_size": size * 8, "steps": steps, "guidance": GUIDANCE, "tokens": args.tokens, "batch": 2,
              "dtype": {"jax": "bfloat16", "torch": "float16"}, "jax": t_jax, "torch": t_torch, "ratio": ratio,
              "goal": 0.8, "higher_is_better": False, "max_rel_diff": rel, "machine": common.machine(),
              "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else None}
    print(f"wrote {common.write_json(args.out, record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
