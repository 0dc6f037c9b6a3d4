"""`seed-story encode --ckpt DIR IMAGE... --out FEATURES.npy`: ViT features of images."""

from __future__ import annotations

from collections.abc import Sequence

HELP = "ViT features (N, 256, 4096) of images, saved as one .npy"


def add_arguments(p) -> None:
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--ckpt", required=True, help="checkpoint directory with a `vit` component")
    p.add_argument("--out", required=True, help="output .npy, float32 (N, n_queries, output_dim)")
    p.add_argument("--batch-size", type=int, default=8, help="images per jitted call (the last batch is padded)")
    p.add_argument("--transform", choices=["squash", "keep_ratio"], default="squash",
                   help="squash: Resize((448, 448)) as in inference and stage 2; keep_ratio: short side + centre crop (stage 3)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="compute dtype (default: the checkpoint config's)")


def run(args) -> int:
    import numpy as np

    from seed_story_jax import transforms
    from seed_story_jax.atomic import atomic_path
    from seed_story_jax.errors import DataError
    from seed_story_jax.models import vit

    if args.batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {args.batch_size}")
    from seed_story_jax.atomic import refuse_existing

    out = refuse_existing(args.out)
    model = vit.load(args.ckpt, dtype=args.dtype)
    size = model.cfg.image_size
    fn = transforms.TRANSFORMS[args.transform]
    images = _Transformed(args.images, lambda p: fn(transforms.load_image(p), size))
    feats = vit.encode_batches(vit.make_encoder(model), images, args.batch_size, progress=True)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:  # np.save(path) would append ".npy" to the temporary name
            np.save(f, feats)
    print(f"{out}: {feats.shape[0]} images → features {tuple(feats.shape[1:])} float32")
    return 0


class _Transformed(Sequence):
    """Images loaded and transformed when a batch asks for them (memory holds one batch)."""

    def __init__(self, paths, fn):
        self._paths, self._fn = list(paths), fn

    def __len__(self):
        return len(self._paths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._fn(p) for p in self._paths[i]]
        return self._fn(self._paths[i])
