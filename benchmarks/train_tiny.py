"""Tiny stage-2 run: train configs/tiny-stage2.yaml on synthetic stories through the real loop, then
report teacher-forced CE and cosine loss on HELD-OUT synthetic stories.

    python benchmarks/train_tiny.py                       # LoRA preset, the config's 300 steps
    python benchmarks/train_tiny.py --trainable full      # full fine-tuning of the tiny Llama

Held-out stories are synthetic stories the run never saw (indices after its training stories; same
generator, new characters, shapes, colours and events); each gives --draws samples with g drawn
afresh (spec §5.2). CE is token-weighted over the supervised tokens, cosine image-weighted over the
targets, no dropout. There is no PyTorch reference for a learning curve; the ratio is against
trivial predictors computed on the training stories in the same run: CE of the unigram distribution
of the supervised training tokens, and 1 − cos of the best constant feature (per token, the mean of
the normalised training-target ViT features) — ratio < 1 means the model learned more than token
frequencies / the average picture.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _batches(examples, batch: int):
    import numpy as np

    n = len(examples) // batch * batch
    for s in range(0, n, batch):
        items = [examples[i] for i in range(s, s + batch)]
        yield {k: np.stack([x[k] for x in items]) for k in items[0]}


def _baselines(task, params, frozen, train_batches, heldout_batches, vocab: int) -> dict:
    """Unigram CE and mean-feature cosine (fit on training batches, scored on held-out ones)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from seed_story_jax.models import mllm as M
    from seed_story_jax.train.stage2 import agent_features
    from seed_story_jax.train.state import trainable_filter

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: task.build(nnx.Rngs(0)))
    graphdef = nnx.split(abstract, trainable_filter(task.trainable), ...)[0]

    @jax.jit
    def targets(params, frozen, batch):
        feats = agent_features(nnx.merge(graphdef, params, frozen), batch)
        _, slots, valid = M.gen_groups(batch["ids_gen_mask"], batch["embeds_gen_mask"], 1, 1)
        rows = jnp.arange(feats.shape[0])
        # the target and the frame before it (the last input image: samples are consecutive frames)
        return feats[rows, slots[:, 0]], feats[rows, jnp.maximum(slots[:, 0] - 1, 0)], valid[:, 0]

    counts = np.ones(vocab)  # add-one smoothing
    feat_sum, n_feat = 0.0, 0
    for b in train_batches:
        lab = b["labels"][:, 1:]
        np.add.at(counts, lab[lab != -100], 1)
        f, _, v = jax.device_get(targets(params, frozen, {k: jnp.asarray(x) for k, x in b.items()}))
        feat_sum = feat_sum + (f[v] / np.linalg.norm(f[v], axis=-1, keepdims=True)).sum(axis=0)
        n_feat += int(v.sum())
    logp = np.log(counts / counts.sum())
    mean = feat_sum / max(n_feat, 1)
    mean = mean / np.linalg.norm(mean, axis=-1, keepdims=True)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    nll, tok, cos, prev_cos, img = 0.0, 0, 0.0, 0.0, 0
    for b in heldout_batches:
        lab = b["labels"][:, 1:]
        nll -= logp[lab[lab != -100]].sum()
        tok += int((lab != -100).sum())
        f, prev, v = jax.device_get(targets(params, frozen, {k: jnp.asarray(x) for k, x in b.items()}))
        f, prev = unit(f[v]), unit(prev[v])
        cos += float((1.0 - (f * mean[None]).sum(-1)).mean(axis=-1).sum())
        prev_cos += float((1.0 - (f * prev).sum(-1)).mean(axis=-1).sum())
        img += int(v.sum())
    return {"unigram_ce": nll / max(tok, 1), "mean_feature_cosine": cos / max(img, 1),
            "previous_frame_cosine": prev_cos / max(img, 1)}


def main(argv=None) -> int:
    p = common.parser("train_tiny", __doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny-stage2.yaml"))
    p.add_argument("--steps", type=int, default=None, help="train steps (default: the config's)")
    p.add_argument("--trainable", default=None, help="lora | full (default: the config's)")
    p.add_argument("--heldout", type=int, default=64, help="held-out stories")
    p.add_argument("--draws", type=int, default=2, help="samples (g draws) per held-out story")
    p.add_argument("--workdir", default=None, help="run directory (default: a temporary one)")
    p.add_argument("overrides", nargs="*", help="config overrides a.b=c")
    args = p.parse_args(argv)

    import absl.flags

    absl.flags.FLAGS.mark_as_parsed()
    import jax
    import numpy as np

    from seed_story_jax.config import load_config
    from seed_story_jax.train import loop
    from seed_story_jax.train.metrics import read_jsonl
    from seed_story_jax.train.stage1 import SyntheticStories, story_examples, synthetic_frame_size
    from seed_story_jax.train.stage2 import STAGE2_KEYS, eval_batches, story_tokenizer
    from seed_story_jax.train.stages import make_task

    over = list(args.overrides) + ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"]
    if args.steps:
        over.append(f"train.steps={args.steps}")
    if args.trainable:
        over.append(f"train.trainable={args.trainable}")
    cfg = load_config(args.config, over)
    t, d = cfg.train, cfg.data
    if t.stage != 2:
        raise SystemExit(f"{args.config}: not a stage-2 config")
    tok = story_tokenizer(cfg)
    task = make_task(cfg)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="train_tiny_"))
    t0 = time.perf_counter()
    res = loop.run(cfg, workdir, task=task, devices=jax.devices()[:1])
    train_s = time.perf_counter() - t0
    lines = read_jsonl(workdir / "metrics.jsonl")
    tail = lines[-max(1, len(lines) // 10):]

    heldout_src = SyntheticStories(args.heldout, frames=d.chunk, size=synthetic_frame_size(d), seed=t.seed,
                                   offset=t.synthetic_examples)
    heldout = story_examples(cfg, 2, STAGE2_KEYS, tok, source=heldout_src, epochs=args.draws, seed=1234)
    train_ex = story_examples(cfg, 2, STAGE2_KEYS, tok, epochs=1, seed=1234)
    b = t.batch_size
    params, frozen = res.state.params, res.frozen
    ev = eval_batches(task, params, frozen, _batches(heldout, b))
    ev_train = eval_batches(task, params, frozen, _batches(train_ex, b))
    base = _baselines(task, params, frozen, _batches(train_ex, b), _batches(heldout, b), cfg.llm.vocab_size)

    rows = [
        {"split": f"held-out ({args.heldout} stories × {args.draws})", "ce": ev["lm_loss"], "cosine": ev["rec_loss"],
         "tokens": int(ev["tokens"]), "images": int(ev["images"])},
        {"split": f"train ({len(train_ex)} stories)", "ce": ev_train["lm_loss"], "cosine": ev_train["rec_loss"],
         "tokens": int(ev_train["tokens"]), "images": int(ev_train["images"])},
        {"split": "baseline on held-out (unigram / mean feature)", "ce": base["unigram_ce"],
         "cosine": base["mean_feature_cosine"]},
        {"split": "baseline on held-out (copy the previous frame)", "cosine": base["previous_frame_cosine"]},
    ]
    print(common.table(rows, ["split", "ce", "cosine", "tokens", "images"]))
    record = {
        "benchmark": "train_tiny",
        "config": str(args.config), "overrides": over, "trainable": t.trainable, "steps": res.step,
        "batch_size": b, "max_length": d.max_length, "train_stories": t.synthetic_examples,
        "tokenizer_vocab": tok.vocab_size,
        "heldout": {"ce": ev["lm_loss"], "cosine": ev["rec_loss"], "stories": args.heldout,
                    "samples": ev["batches"] * b, "tokens": ev["tokens"], "images": ev["images"]},
        "train_eval": {"ce": ev_train["lm_loss"], "cosine": ev_train["rec_loss"]},
        "baseline": base,
        "train_last_10pct": {k: float(np.mean([m[k] for m in tail])) for k in ("lm_loss", "rec_loss", "loss")},
        "train_first_step": {k: lines[0][k] for k in ("lm_loss", "rec_loss", "loss")},
        "train_seconds": train_s,
        "examples_per_s": float(np.mean([m["examples_per_s"] for m in tail])),
        "tokens_per_s": float(np.mean([m.get("tokens_per_s", 0.0) for m in tail])),
        "ratio": ev["lm_loss"] / base["unigram_ce"],
        "ratio_cosine": ev["rec_loss"] / base["previous_frame_cosine"],
        "ratio_means": "held-out CE ÷ unigram CE (ratio_cosine: held-out cosine ÷ copy-the-previous-frame cosine)",
        "higher_is_better": False,
        "machine": common.machine(),
    }
    print(f"wrote {common.write_json(args.out, record)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
