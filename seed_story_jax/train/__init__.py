"""Training: the generic machinery every stage plugs into.

    mesh.py     the (data, fsdp, tensor) mesh from MeshConfig; jax.distributed start-up
    rules.py    NamedShardings for states and batches (specs and activation constraints: nn/sharding.py)
    state.py    TrainState (step, fp32 trainable params, optimizer state, rng) + frozen params;
                trainable/frozen split by a path predicate; sharded initialisation
    optim.py    AdamW, warmup + cosine-to-min_lr_ratio schedule (the original's formula), clipping
    step.py     the jitted, donated train step: microbatch scan, NaN/inf guard
    data.py     examples → per-step global batches, each process reading its own rows
    loop.py     resume, step, log (JSONL + TensorBoard), checkpoint (orbax), SIGTERM, NaN stop
    metrics.py  JSONL and hand-encoded tfevents writers; peak FLOP/s per chip for MFU
    plan.py     AOT compilation for TPU slices / GPU counts: per-chip bytes, fits or not
    task.py     what a stage provides: Bundle of components, trainable predicate, loss_fn, examples
    stages.py   train.stage → Task;  lm.py: stage 0, the causal-LM objective
"""
