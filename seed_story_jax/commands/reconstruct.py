"""`seed-story reconstruct --ckpt DIR IMAGE --out OUT.png`: image → ViT features → de-tokenizer → image.

The stage-1 task, and the quickest way to see a de-tokenizer work: the picture is squashed to the
ViT's input size, encoded, and painted again from its features (50 Euler steps, CFG 7.5 against
the zero-image features, seed 42 by default, as the original). The checkpoint needs the `vit`,
`detokenizer`, `unet` and `vae` components.
"""

from __future__ import annotations


HELP = "re-paint an image from its ViT features with the de-tokenizer (stage-1 reconstruction)"


def add_arguments(p) -> None:
    p.add_argument("image", help="input image file")
    p.add_argument("--ckpt", required=True, help="checkpoint directory (vit, detokenizer, unet, vae)")
    p.add_argument("--out", required=True, help="output PNG (must not exist)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the config's, 50)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the config's, 7.5)")
    p.add_argument("--seed", type=int, default=None, help="initial-noise seed (default: the config's, 42)")


def run(args) -> int:
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from seed_story_jax import transforms
    from seed_story_jax.atomic import atomic_path, refuse_existing
    from seed_story_jax.errors import DataError
    from seed_story_jax.models import vit
    from seed_story_jax.models.detokenizer import Detokenizer

    out = refuse_existing(args.out)
    if args.steps is not None and args.steps < 1:
        raise DataError(f"--steps must be >= 1, got {args.steps}")
    img = transforms.load_image(args.image)  # fail on a bad image before loading any weights
    model = vit.load(args.ckpt)
    x = transforms.vit_squash_448(img, model.cfg.image_size)[None]
    encode = vit.make_encoder(model)
    feats = encode(x)
    uncond = encode(np.zeros_like(x))  # the all-zero normalised image (spec §4.4)
    det = Detokenizer.load(args.ckpt)
    steps = args.steps or det.dcfg.num_inference_steps
    with tqdm(total=steps, desc="denoising", unit="step") as bar:
        frames = det.sample(feats, uncond, num_steps=steps, guidance_scale=args.guidance, seed=args.seed,
                            on_step=lambda i: bar.update(1))
    with atomic_path(out) as tmp:
        Image.fromarray(np.asarray(frames[0])).save(tmp, format="PNG")
    print(f"{out}: {frames.shape[2]}×{frames.shape[1]} reconstruction of {args.image} ({steps} steps)")
    return 0
