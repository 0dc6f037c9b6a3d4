"""`seed-story demo`: the whole pipeline at tiny size on this machine (issue 9)."""

from __future__ import annotations

import sys

HELP = "synthesise stories, train stages 1-3 on the tiny config, tell a 30-frame story, evaluate"
DESCRIPTION = """Synthesise a small set of stories, train the tiny model's autoencoder and SEED-Story's stages 1,
2 and 3 on them, tell a 30-frame story with the multimodal attention sink from a held-out first
frame and caption, and evaluate the trained model against its randomly initialised self. Writes
OUT/story.html, OUT/storyboard.png, OUT/eval.json; the trained model is cached in OUT/model, so a
second run goes straight to the story. Settings: configs/demo.yaml (its `demo:` block), with
key.path=value overrides as for any config."""


def add_arguments(p) -> None:
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. demo.stages.2.steps=600")
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    p.add_argument("--config", default="demo", help="demo config (default configs/demo.yaml)")
    p.add_argument("--retrain", action="store_true", help="ignore the cached model and train again")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    from pathlib import Path

    from seed_story_jax import demo as D

    dc = D.load_demo_config(args.config, args.overrides)
    demo = D.Demo(Path(args.out), dc, progress=not args.no_progress,
                  log=lambda m: print(m, file=sys.stderr, flush=True))
    try:
        summary = demo.run(retrain=args.retrain, evaluate=not args.no_eval)
    except D.Blocked as e:
        print(f"seed-story demo: cannot finish yet: {e}", file=sys.stderr)
        return 3
    print(D.summary_text(demo, summary))
    return 0
