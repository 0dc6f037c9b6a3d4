"""`seed-story eval --ckpt DIR --data DIR [--out FILE.json]`: metrics of a checkpoint on held-out stories."""

from __future__ import annotations

HELP = "evaluate a checkpoint on held-out stories (text CE, feature cosine, consistency, characters, cache policies)"
DESCRIPTION = """Evaluate a complete checkpoint (llm, mllm, vit, de-tokenizer) on held-out stories: caption
cross-entropy and perplexity and the cosine of regressed to true ViT features (teacher forced, as
stage 2 trains); stories told from each held-out first frame and its captions: feature cosine,
style and character consistency (ViT-feature similarity within vs across stories / characters),
and on synthetic stories exact character accuracy against the generator's ground truth; and the
cache policies (dense, sink, window, multimodal-sink) on long synthetic stories at 10, 25 and 50
frames: quality, seconds, peak memory; and, teacher forced on short synthetic stories, whether the
model carries a staying or returning character's look (look margins against repeating the previous
frame and the true features). --data is a `seed-story data synth` directory (its
val.jsonl by default) or a built dataset."""


def add_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint directory")
    p.add_argument("--data", required=True, help="held-out stories: a synth/StoryStream directory or a built dataset")
    p.add_argument("--out", default=None, help="write the full report as JSON here")
    p.add_argument("--split", default="val", help="split / jsonl name (default val)")
    p.add_argument("--stories", type=int, default=8, help="held-out stories to use (default 8)")
    p.add_argument("--frames", type=int, default=10, help="frames per generated held-out story (default 10)")
    p.add_argument("--policy", default="multimodal-sink", help="cache policy of the generated held-out stories")
    p.add_argument("--table-frames", default="10,25,50",
                   help="story lengths of the cache-policy table, comma-separated ('' skips the table)")
    p.add_argument("--policies", default="dense,sink,window,multimodal-sink", help="cache policies of the table")
    p.add_argument("--table-stories", type=int, default=2, help="long synthetic stories per table cell")
    p.add_argument("--table-render", action="store_true", help="paint the table's frames (adds character accuracy)")
    p.add_argument("--look-stories", type=int, default=16,
                   help="synthetic stories of the teacher-forced look margins (0 skips them; default 16)")
    p.add_argument("--look-frames", type=int, default=12, help="frames per look story (default 12)")
    p.add_argument("--teacher-forced-only", action="store_true", help="only the teacher-forced metrics")
    p.add_argument("--seed", type=int, default=1234, help="seed of the long synthetic stories")
    p.add_argument("--no-progress", action="store_true")


def _ints(s: str) -> tuple[int, ...]:
    from seed_story_jax.config import ConfigError

    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--table-frames: expected comma-separated integers, got {s!r}") from None


def run(args) -> int:
    from seed_story_jax import evaluate as E
    from seed_story_jax.config import ConfigError

    policies = tuple(x.strip() for x in args.policies.split(",") if x.strip())
    bad = [x for x in policies + (args.policy,) if x not in E.POLICIES]
    if bad:
        raise ConfigError(f"unknown cache policy {bad[0]!r}; known: {', '.join(E.POLICIES)}")
    if args.stories < 1 or args.frames < 2 or args.table_stories < 1:
        raise ConfigError("--stories and --table-stories must be >= 1 and --frames >= 2")
    if args.look_stories < 0 or args.look_frames < 3:
        raise ConfigError("--look-stories must be >= 0 and --look-frames >= 3")
    opts = E.EvalOptions(split=args.split, stories=args.stories, story_frames=args.frames,
                         table_stories=args.table_stories, table_frames=_ints(args.table_frames), policies=policies,
                         table_render=args.table_render, policy=args.policy, seed=args.seed,
                         skip_generation=args.teacher_forced_only, look_stories=args.look_stories,
                         look_frames=args.look_frames)
    report = E.evaluate(args.ckpt, args.data, opts, progress=not args.no_progress)
    print("\n".join(E.summary_lines(report)))
    if args.out:
        print(f"wrote {E.write_report(report, args.out)}")
    return 0
