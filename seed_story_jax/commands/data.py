"""`seed-story data build|synth`: StoryStream jsonl + images → ArrayRecord; synthetic stories."""

from __future__ import annotations

import json

HELP = "build the training dataset (StoryStream jsonl + images → ArrayRecord) or synthesise stories"
DESCRIPTION = """\
build: read StoryStream jsonl (a file, or every *.jsonl below a directory) and the image root, chunk
stories into records of --chunk frames, check every image, and write a tfds ArrayRecord dataset.
Bad lines and images are skipped and counted by reason (--on-error skip) or stop the build
(--on-error fail); OUT/build_report.json and OUT/problems.jsonl record what was dropped and why.

synth: draw synthetic stories (recurring characters, changing scenes, captions, per-frame ground
truth in truth.json) in the StoryStream layout: OUT/train.jsonl, OUT/images/, OUT/truth.json.
"""


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="jsonl + images → ArrayRecord dataset")
    b.add_argument("--jsonl", required=True, help="a StoryStream .jsonl file or a directory of them")
    b.add_argument("--images", required=True, help="image root the jsonl paths are relative to")
    b.add_argument("--out", required=True, help="output directory (must not exist)")
    b.add_argument("--split", default="train", help="split name (default train)")
    b.add_argument("--chunk", type=int, default=10, help="frames per record; tails are dropped (default 10)")
    b.add_argument("--workers", type=int, default=0, help="processes checking images (default 0: in this one)")
    b.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                   help="skip: count and log bad lines/images; fail: stop at the first (default skip)")
    b.add_argument("--min-resolution", type=int, default=128,
                   help="drop images whose height or width is below this (default 128, the original's)")
    b.add_argument("--min-aspect", type=float, default=0.2,
                   help="drop images with h/w outside [a, 1/a] (default 0.2, the original's)")
    b.add_argument("--json", action="store_true", help="print the report as JSON")
    s = sub.add_parser("synth", help="write synthetic stories in the StoryStream layout")
    s.add_argument("--out", required=True, help="output directory (must not exist)")
    s.add_argument("--stories", type=int, required=True, help="number of training stories")
    s.add_argument("--val-stories", type=int, default=0, help="extra stories written to val.jsonl")
    s.add_argument("--frames", type=int, default=10, help="frames per story (default 10)")
    s.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    s.add_argument("--seed", type=int, default=0, help="seed; same seed, same bytes (default 0)")


def run(args) -> int:
    if args.data_command == "synth":
        from data_pipeline.synth import write_synthetic

        summary = write_synthetic(args.out, stories=args.stories, frames=args.frames, size=args.size,
                                  seed=args.seed, val_stories=args.val_stories)
        print(f"wrote {summary['stories']} stories (+{summary['val_stories']} val) of {summary['frames']} "
              f"frames at {summary['size']}px to {args.out}")
        print(f"build with: seed-story data build --jsonl {args.out}/train.jsonl --images {args.out}/images "
              f"--out DATASET --min-resolution {min(128, args.size)}")
        return 0

    from data_pipeline.builder import build
    from data_pipeline.storystream import ImageLimits
    from seed_story_jax.errors import DataError

    if args.min_aspect <= 0 or args.min_aspect > 1:
        raise DataError(f"--min-aspect must be in (0, 1], got {args.min_aspect}")
    report = build(args.jsonl, args.images, args.out, split=args.split, chunk=args.chunk,
                   limits=ImageLimits(args.min_resolution, args.min_aspect), workers=args.workers,
                   on_error=args.on_error)
    if args.json:
        d = report.to_dict()
        d.pop("examples")
        print(json.dumps(d, indent=2))
    else:
        print(report.summary())
        print(f"wrote {args.out} (details: {args.out}/build_report.json, {args.out}/problems.jsonl)")
    return 0
