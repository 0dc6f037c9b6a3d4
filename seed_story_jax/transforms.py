"""The original's image transforms (spec §1.3) with PIL and numpy, reproducing torchvision's PIL path.

torchvision hands PIL images to `PIL.Image.resize` (so bilinear/bicubic there are PIL's filters,
antialiased when shrinking), computes short-side sizes as `int(size * long / short)`, centre-crops at
`int(round((H - crop) / 2.0))` (Python rounding: halves go to even), and its ToTensor/Normalize are
float32 `x / 255`, `(x - mean) / std`. The same float32 operations in numpy give the same bits.

Layout: every transform returns one image as (H, W, 3) float32 — JAX's NHWC once stacked into a
batch — where torchvision would return (3, H, W).

    vit_squash_448(img)      stage-2 training and all inference: squash to 448², CLIP normalisation
    vit_keep_ratio_448(img)  stage-3 training: short side → 448, centre crop 448², CLIP normalisation
    sdxl_crop_1024(img)      stage-3 SDXL target: bicubic short side → 1024, centre crop, [-1, 1],
                             plus SDXL's size-conditioning time ids
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)


def to_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def short_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(new_w, new_h) of torchvision's `Resize(size)`: the short side becomes `size`, the long side
    `int(size * long / short)` (truncated)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def center_crop_offsets(width: int, height: int, crop: int) -> tuple[int, int]:
    """(top, left) of torchvision's `CenterCrop(crop)` (inputs at least `crop` on each side)."""
    if width < crop or height < crop:
        raise ValueError(f"image {width}x{height} is smaller than the {crop}² crop")
    return int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))


def _resize(img: Image.Image, size_wh: tuple[int, int], resample) -> Image.Image:
    return img if img.size == tuple(size_wh) else img.resize(tuple(size_wh), resample)


def _to_float(img: Image.Image) -> np.ndarray:
    """ToTensor without the transpose: uint8 HWC → float32 in [0, 1]."""
    return np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)


def _normalize(x: np.ndarray, mean, std) -> np.ndarray:
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


@functools.lru_cache(maxsize=8)
def _lut(mean: tuple, std: tuple) -> np.ndarray:
    """(3, 256) table of ToTensor + Normalize for every uint8 value: the same float32 arithmetic as
    `_normalize(_to_float(x))`, done once, so per-pixel work is a lookup (3x faster per image)."""
    levels = np.arange(256, dtype=np.float32) / np.float32(255)
    return np.stack([_normalize(levels, m, s) for m, s in zip(mean, std)]).astype(np.float32)


def _to_normalized(img: Image.Image, mean, std, top: int = 0, left: int = 0, size: int | None = None) -> np.ndarray:
    """uint8 HWC (optionally center-cropped) → normalised float32, bit-identical to the two-step path."""
    x = np.asarray(img, dtype=np.uint8)
    if size is not None:
        x = x[top:top + size, left:left + size]
    lut = _lut(tuple(float(m) for m in mean), tuple(float(s) for s in std))
    return np.stack([lut[c][x[..., c]] for c in range(3)], axis=-1)


def vit_squash_448(img: Image.Image, size: int = 448) -> np.ndarray:
    """`Resize((size, size))` (PIL bilinear, antialiased; aspect ratio squashed), ToTensor, CLIP
    Normalize → (size, size, 3) float32."""
    img = _resize(to_rgb(img), (size, size), Image.BILINEAR)
    return _to_normalized(img, CLIP_MEAN, CLIP_STD)


def vit_keep_ratio_448(img: Image.Image, size: int = 448) -> np.ndarray:
    """`Resize(size)` (short side, PIL bilinear) + `CenterCrop(size)`, ToTensor, CLIP Normalize."""
    img = to_rgb(img)
    img = _resize(img, short_side_size(*img.size, size), Image.BILINEAR)
    top, left = center_crop_offsets(*img.size, size)
    return _to_normalized(img, CLIP_MEAN, CLIP_STD, top, left, size)


def sdxl_crop_1024(img: Image.Image, size: int = 1024, *, quirky_time_ids: bool = False):
    """`Resize(size, BICUBIC)` (short side) + `CenterCrop(size)`, ToTensor, Normalize(0.5, 0.5).

    Returns (image (size, size, 3) float32 in [-1, 1], time_ids), time_ids = SDXL's size
    conditioning (orig_h, orig_w, crop_top, crop_left, size, size) with the crop offsets in the
    resized image. `quirky_time_ids=True` reproduces the original stage-3 code (spec §5.4), which
    swaps the two offsets (a landscape frame's horizontal offset lands in the crop_top slot).
    """
    img = to_rgb(img)
    orig_w, orig_h = img.size
    img = _resize(img, short_side_size(orig_w, orig_h, size), Image.BICUBIC)
    top, left = center_crop_offsets(*img.size, size)
    x = _to_normalized(img, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), top, left, size)
    if quirky_time_ids:
        top, left = left, top
    return x, (orig_h, orig_w, top, left, size, size)


TRANSFORMS = {"squash": vit_squash_448, "keep_ratio": vit_keep_ratio_448}


def load_image(path) -> Image.Image:
    """Open an image file as RGB, naming the file when it cannot be read."""
    from seed_story_jax.errors import DataError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")  # a loaded copy (also for RGB files), alpha dropped as the original
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None
