"""Image transforms vs torchvision's PIL path (spec §1.3).

torchvision is not installable here, so `_tv_*` below restate what its functional API does for PIL
inputs (transforms/functional.py: `_compute_resized_output_size`, `resize` → `PIL.Image.resize`,
`center_crop` → `crop`, `to_tensor`, `normalize`), with torch doing the tensor arithmetic as
torchvision does. Our numpy outputs must equal those bit for bit (HWC vs CHW aside).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from seed_story_jax import transforms as T
from seed_story_jax.errors import DataError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _tv_resize(img, size, interpolation):
    w, h = img.size
    if isinstance(size, int):
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        out = [new_h, new_w]
    else:
        out = list(size)
    if [h, w] == out:
        return img
    return img.resize(tuple(out[::-1]), interpolation)


def _tv_center_crop(img, size):
    w, h = img.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _tv_to_tensor(img):
    t = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(img.size[1], img.size[0], 3)
    return t.permute(2, 0, 1).contiguous().to(dtype=torch.float32).div(255)


def _tv_normalize(t, mean, std):
    mean = torch.as_tensor(mean, dtype=t.dtype)[:, None, None]
    std = torch.as_tensor(std, dtype=t.dtype)[:, None, None]
    return t.sub(mean).div(std)


def _hwc(t):
    return t.permute(1, 2, 0).numpy()


def _random_image(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


SIZES = [(300, 200), (200, 300), (333, 500), (448, 451), (451, 448), (97, 61), (448, 448)]


@pytest.mark.parametrize("w,h", SIZES)
def test_squash_matches_torchvision_pil_path(w, h):
    img = _random_image(w, h)
    ref = _hwc(_tv_normalize(_tv_to_tensor(_tv_resize(img, (448, 448), Image.BILINEAR)), CLIP_MEAN, CLIP_STD))
    out = T.vit_squash_448(img)
    assert out.shape == (448, 448, 3) and out.dtype == np.float32
    assert np.array_equal(out, ref)


@pytest.mark.parametrize("w,h", SIZES)
def test_keep_ratio_matches_torchvision_pil_path(w, h):
    img = _random_image(w, h, seed=1)
    ref = _tv_normalize(_tv_to_tensor(_tv_center_crop(_tv_resize(img, 448, Image.BILINEAR), 448)), CLIP_MEAN, CLIP_STD)
    out = T.vit_keep_ratio_448(img)
    assert out.shape == (448, 448, 3)
    assert np.array_equal(out, _hwc(ref))


@pytest.mark.parametrize("w,h", [(97, 61), (61, 97), (80, 64), (64, 64), (131, 67)])
def test_sdxl_crop_matches_torchvision_pil_path(w, h):
    img = _random_image(w, h, seed=2)
    ref = _tv_normalize(_tv_to_tensor(_tv_center_crop(_tv_resize(img, 64, Image.BICUBIC), 64)), (0.5,) * 3, (0.5,) * 3)
    out, ids = T.sdxl_crop_1024(img, 64)
    assert np.array_equal(out, _hwc(ref))
    assert out.min() >= -1.0 and out.max() <= 1.0
    new_w, new_h = T.short_side_size(w, h, 64)
    assert ids == (h, w, int(round((new_h - 64) / 2.0)), int(round((new_w - 64) / 2.0)), 64, 64)


def test_size_and_crop_rules_pinned():
    # int() truncation of the long side; Python rounding (halves to even) of the crop offset.
    assert T.short_side_size(300, 200, 448) == (672, 448)
    assert T.short_side_size(333, 500, 448) == (448, 672)  # 672.67 → 672
    assert T.short_side_size(1920, 1080, 1024) == (1820, 1024)
    assert T.center_crop_offsets(448, 451, 448) == (2, 0)  # 1.5 → 2 (floor would give 1)
    assert T.center_crop_offsets(448, 449, 448) == (0, 0)  # 0.5 → 0
    assert T.center_crop_offsets(1820, 1024, 1024) == (0, 398)


def test_pinned_pixel_values():
    # A flat colour survives any resize; ToTensor + CLIP Normalize in float32.
    out = T.vit_squash_448(Image.new("RGB", (300, 200), (255, 0, 128)))
    assert np.array_equal(out[17, 301], np.array([1.9303361, -1.7520971, 0.33994877], np.float32))
    sd, _ = T.sdxl_crop_1024(Image.new("RGB", (80, 64), (255, 0, 128)), 64)
    assert np.array_equal(sd[5, 9], np.array([1.0, -1.0, 0.003921628], np.float32))
    # Antialiasing: one lit column in four, shrunk 4× horizontally. PIL's bilinear filter widens
    # with the scale (64 = 255/4; 73 and 46 at the clamped borders); point sampling would give 0.
    a = np.zeros((64, 1792, 3), np.uint8)
    a[:, ::4] = 255
    x = T.vit_squash_448(Image.fromarray(a))
    levels = np.round((x[..., 0] * CLIP_STD[0] + CLIP_MEAN[0]) * 255).astype(int)
    assert (levels[:, 0] == 73).all() and (levels[:, -1] == 46).all() and (levels[:, 1:-1] == 64).all()


def test_sdxl_time_ids_and_the_original_quirk():
    img = Image.new("RGB", (1920, 1080), (10, 20, 30))
    x, ids = T.sdxl_crop_1024(img)
    assert x.shape == (1024, 1024, 3) and ids == (1080, 1920, 0, 398, 1024, 1024)
    _, quirky = T.sdxl_crop_1024(img, quirky_time_ids=True)
    assert quirky == (1080, 1920, 398, 0, 1024, 1024)  # spec §5.4's example


def test_modes_are_converted_to_rgb():
    rgba = Image.new("RGBA", (50, 40), (200, 100, 50, 7))
    gray = Image.new("L", (50, 40), 200)
    assert np.array_equal(T.vit_squash_448(rgba, 28), T.vit_squash_448(Image.new("RGB", (50, 40), (200, 100, 50)), 28))
    g = T.vit_squash_448(gray, 28)
    assert np.array_equal(g, T.vit_squash_448(Image.new("RGB", (50, 40), (200, 200, 200)), 28))


def test_load_image_names_a_bad_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png"):
        T.load_image(bad)
    good = tmp_path / "ok.png"
    Image.new("RGBA", (5, 4), (1, 2, 3, 4)).save(good)
    assert T.load_image(good).mode == "RGB"


def test_lookup_table_normalisation_is_bit_identical():
    """The per-value lookup table must give exactly the two-step float32 ToTensor + Normalize result."""
    import numpy as np
    from PIL import Image

    import seed_story_jax.transforms as T

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 90, 3), dtype=np.uint8))
    two_step = T._normalize(T._to_float(T._resize(img, (28, 28), Image.BILINEAR)), T.CLIP_MEAN, T.CLIP_STD)
    assert np.array_equal(T.vit_squash_448(img, size=28), two_step)
