"""`seed-story generate --ckpt DIR --image START --text "..." --frames 25 --out OUT`: a long story.

Free generation (the original's gen_george.py: the model writes each frame's text, "[INST]"
separated, then its picture) or, with `--captions FILE`, story visualisation (vis_george_sink.py:
one caption per line for frames 1..F−1, only pictures are generated). `--frames` counts the start
image (the original's story_len 25 = 1 given + 24 generated). OUT gets story.json, frames/NN.png,
storyboard.png and story.html, all at once (written to a temporary directory, then renamed).
"""

from __future__ import annotations

import json
from pathlib import Path

HELP = "tell a long multimodal story from a start image and text (KV cache with attention sinks)"


def add_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint directory (llm, mllm, vit, detokenizer, unet, vae, tokenizer)")
    p.add_argument("--image", required=True, help="start image file")
    p.add_argument("--text", required=True, help="the start image's caption")
    p.add_argument("--frames", type=int, default=25, help="images in the story, the start image included (default 25)")
    p.add_argument("--policy", choices=("multimodal-sink", "sink", "dense", "window"), default=None,
                   help="KV cache policy (default: the checkpoint config's cache.policy)")
    p.add_argument("--positions", choices=("shifted", "original"), default=None,
                   help="sink policies: keys re-positioned in the cache (shifted) or kept at their original positions")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--captions", help="story visualisation: a text file with one caption per line (or a JSON list) "
                                      "for frames 1..F-1")
    p.add_argument("--seed", type=int, default=None, help="seed of sampling and of the de-tokenizer's noise")
    p.add_argument("--max-text-tokens", type=int, default=100, help="text tokens per frame before <img> is forced")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy, as the original")
    p.add_argument("--steps", type=int, default=None, help="de-tokenizer Euler steps (default: the config's)")
    p.add_argument("--render", choices=("each", "end"), default="each",
                   help="paint each picture as its frame is told, or all at the end in batches")


def read_captions(path) -> list[str]:
    from seed_story_jax.errors import DataError

    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: invalid JSON ({e})") from None
        data = data.get("captions") if isinstance(data, dict) else data
        if not isinstance(data, list) or not all(isinstance(c, str) for c in data):
            raise DataError(f"{p}: expected a JSON list of caption strings (or {{\"captions\": [...]}})")
        return data
    return [line.strip() for line in text.splitlines() if line.strip()]


def run(args) -> int:
    from seed_story_jax.atomic import refuse_existing
    from seed_story_jax.errors import DataError
    from seed_story_jax.transforms import load_image

    out = refuse_existing(args.out)
    if args.frames < 2:
        raise DataError(f"--frames must be >= 2 (the start image and one more), got {args.frames}")
    if args.max_text_tokens < 1:
        raise DataError(f"--max-text-tokens must be >= 1, got {args.max_text_tokens}")
    captions = None
    if args.captions:
        captions = read_captions(args.captions)
        if len(captions) < args.frames - 1:
            raise DataError(f"{args.captions}: {len(captions)} captions for {args.frames - 1} generated frames")
    start = load_image(args.image)  # a bad image fails before any weights load

    from seed_story_jax.story import StoryOptions, StoryTeller, load_story_model, write_story

    teller = StoryTeller(load_story_model(args.ckpt))
    opts = StoryOptions(frames=args.frames, policy=args.policy, positions=args.positions,
                        max_text_tokens=args.max_text_tokens, temperature=args.temperature,
                        seed=0 if args.seed is None else args.seed, render_seed=args.seed, render_steps=args.steps,
                        render=args.render)
    story = teller.tell([start], [args.text], opts, captions=None if captions is None else [captions])[0]
    write_story(story, out, start)
    m = story.meta
    print(f"{out}: {len(story.frames)} frames ({m['policy']}, {m['mode']}) in {m['total_s']:.1f} s; "
          f"story.json, frames/, storyboard.png, story.html")
    return 0
