"""The grain pipeline: batch layout against the sample builder and transforms, determinism,
iterator state save/restore (also through orbax) with 2 workers, per-process sharding."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
from PIL import Image

from data_pipeline import builder, pipeline, storystream as ss, synth
from data_pipeline.samples import build_sample
from seed_story_jax import transforms as T
from seed_story_jax.config import DataConfig
from seed_story_jax.tokenizer import train_tiny_tokenizer

N_STORIES = 24


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    synth.write_synthetic(root / "s", stories=N_STORIES, frames=10, size=40, seed=5, progress=False)
    builder.build(root / "s" / "train.jsonl", root / "s" / "images", root / "ds",
                  limits=ss.ImageLimits(32, 0.2), progress=False)
    caps = [c for line in (root / "s" / "train.jsonl").read_text().splitlines() for c in json.loads(line)["captions"]]
    tok = train_tiny_tokenizer(root / "tok", caps, 400)
    cfg = DataConfig(path=str(root / "ds"), max_length=1024, num_img_tokens=4, max_images=10, image_size=28,
                     sd_size=32, batch_size=3, workers=0, shuffle_seed=11)
    return cfg, tok, builder.StorySource(root / "ds"), root


def _it(cfg, tok, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return pipeline.make_iterator(cfg, tok, **kw)


def _decode(b):
    return Image.open(io.BytesIO(b)).convert("RGB")


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_stage2_batches_are_the_sample_builder_and_transforms(data):
    cfg, tok, src, _ = data
    it = _it(cfg, tok)
    gs = []
    for _ in range(4):
        b = next(it)
        B, L, M = cfg.batch_size, cfg.max_length, cfg.max_images
        shapes = {k: v.shape for k, v in b.items()}
        assert shapes == {
            "input_ids": (B, L), "attention_mask": (B, L), "labels": (B, L), "ids_cmp_mask": (B, L),
            "ids_gen_mask": (B, L), "images": (B, M, 28, 28, 3), "image_valid": (B, M),
            "embeds_cmp_mask": (B, M), "embeds_gen_mask": (B, M), "num_images": (B,), "g": (B,),
            "record_index": (B,)}
        assert b["input_ids"].dtype == np.int32 and b["images"].dtype == np.float32 and b["ids_cmp_mask"].dtype == bool
        for i in range(B):
            rec = src[int(b["record_index"][i])]
            g = int(b["g"][i])
            gs.append(g)
            s = build_sample(rec["captions"], g, tok, num_img_tokens=4, max_length=L)
            for k in ("input_ids", "attention_mask", "labels", "ids_cmp_mask", "ids_gen_mask"):
                np.testing.assert_array_equal(b[k][i], getattr(s, k), err_msg=k)
            n = g + 2
            assert b["num_images"][i] == n
            assert b["image_valid"][i].tolist() == [True] * n + [False] * (M - n)
            assert b["embeds_cmp_mask"][i].tolist() == [True] * (n - 1) + [False] * (M - n + 1)
            assert b["embeds_gen_mask"][i].tolist() == [False] * (n - 1) + [True] + [False] * (M - n)
            for j in range(n):  # ViT squash of exactly the frames used, bit for bit
                np.testing.assert_array_equal(b["images"][i, j], T.vit_squash_448(_decode(rec["images"][j]), size=28))
            assert not b["images"][i, n:].any()
            # k-th input image ↔ k-th group of 4 cmp positions (row-major), as the original's scatter
            assert b["ids_cmp_mask"][i].sum() == 4 * b["embeds_cmp_mask"][i].sum()
    assert len(set(gs)) > 3  # g varies per record


def test_stage3_and_stage1(data):
    cfg, tok, src, _ = data
    b = next(_it(dataclasses.replace(cfg, stage=3), tok))
    assert b["sd_image"].shape == (3, 32, 32, 3) and b["time_ids"].shape == (3, 6)
    for i in range(3):
        rec = src[int(b["record_index"][i])]
        g = int(b["g"][i])
        target = _decode(rec["images"][g + 1])
        sd, tid = T.sdxl_crop_1024(target, size=32, quirky_time_ids=True)
        np.testing.assert_array_equal(b["sd_image"][i], sd)
        assert b["time_ids"][i].tolist() == [40, 40, 0, 0, 32, 32] == list(tid)
        np.testing.assert_array_equal(b["images"][i, 0], T.vit_keep_ratio_448(_decode(rec["images"][0]), size=28))
    b = next(_it(dataclasses.replace(cfg, stage=1), tok))
    assert sorted(b) == ["frame", "image", "record_index", "sd_image", "time_ids"]
    rec = src[int(b["record_index"][0])]
    img = _decode(rec["images"][int(b["frame"][0])])
    np.testing.assert_array_equal(b["image"][0], T.vit_keep_ratio_448(img, size=28))
    np.testing.assert_array_equal(b["sd_image"][0], T.sdxl_crop_1024(img, size=32)[0])


def test_too_long_samples_are_dropped(data):
    cfg, tok, src, _ = data
    short = dataclasses.replace(cfg, max_length=160, batch_size=1)
    lengths = [int(b["attention_mask"].sum()) for b in _it(short, tok, num_epochs=1)]
    assert 0 < len(lengths) < N_STORIES and max(lengths) < 160


def test_same_seed_same_batches(data):
    cfg, tok, _, _ = data
    a, b = _it(cfg, tok), _it(cfg, tok)
    for _ in range(3):
        _assert_same(next(a), next(b))
    c = _it(dataclasses.replace(cfg, shuffle_seed=12), tok)
    assert not np.array_equal(next(_it(cfg, tok))["record_index"], next(c)["record_index"])


def test_restore_with_two_workers_also_through_orbax(data, tmp_path):
    cfg, tok, _, _ = data
    cfg2 = dataclasses.replace(cfg, workers=2)
    a = _it(cfg2, tok)
    [next(a) for _ in range(3)]
    state = a.get_state()
    pipeline.save_iterator(a, tmp_path / "iter")
    rest = [next(a) for _ in range(5)]
    assert len({int(r) for b in rest for r in b["record_index"]}) > 5

    b = _it(cfg2, tok)
    b.set_state(state)
    for want in rest:
        _assert_same(next(b), want)

    c = _it(cfg2, tok)
    pipeline.restore_iterator(c, tmp_path / "iter")
    for want in rest:
        _assert_same(next(c), want)
    assert json.loads(c.get_state())["worker_count"] == 2
    for x in (a, b, c):
        pipeline.close_iterator(x)


def test_state_is_refused_by_another_loader(data):
    cfg, tok, _, root = data
    a = _it(cfg, tok)
    next(a)
    state = a.get_state()
    with pytest.raises(ValueError, match="Worker count"):
        _it(dataclasses.replace(cfg, workers=2), tok).set_state(state)
    with pytest.raises(ValueError, match="Sampler"):
        _it(dataclasses.replace(cfg, shuffle_seed=99), tok).set_state(state)
    # Same size, other content: the source's repr carries the dataset's fingerprint.
    lines = (root / "s" / "train.jsonl").read_text().splitlines()
    (root / "other.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    builder.build(root / "other.jsonl", root / "s" / "images", root / "ds_other", limits=ss.ImageLimits(32, 0.2),
                  progress=False)
    with pytest.raises(ValueError, match="DataSource"):
        _it(cfg, tok, path=root / "ds_other").set_state(state)


def test_processes_see_disjoint_records_that_cover_the_set(data):
    cfg, tok, _, _ = data
    one = dataclasses.replace(cfg, batch_size=1)

    def seen(pi, pc):
        return [(int(b["record_index"][0]), int(b["g"][0])) for b in _it(one, tok, process_index=pi,
                                                                         process_count=pc, num_epochs=1)]

    single = seen(0, 1)
    assert sorted(r for r, _ in single) == list(range(N_STORIES))
    p0, p1 = seen(0, 2), seen(1, 2)
    assert len(p0) == len(p1) == N_STORIES // 2
    assert not {r for r, _ in p0} & {r for r, _ in p1}
    assert {r for r, _ in p0} | {r for r, _ in p1} == set(range(N_STORIES))
    # The same (record, g) samples as one process: g does not depend on the process count.
    assert sorted(p0 + p1) == sorted(single)
    # Uneven split (24 records, 5 processes): equal shares, disjoint; the epoch's last 4 are left.
    parts = [{r for r, _ in seen(i, 5)} for i in range(5)]
    assert all(len(p) == 4 for p in parts) and len(set().union(*parts)) == 20


def test_sample_dataset_random_access(data):
    cfg, tok, src, _ = data
    ds = pipeline.sample_dataset(cfg, tok, epochs=2)
    assert len(ds) == 2 * N_STORIES
    again = pipeline.sample_dataset(cfg, tok, epochs=2)
    per_epoch = [[], []]
    for i in range(0, 2 * N_STORIES, 5):
        x = ds[i]
        _assert_same(x, again[i])
        rec = src[int(x["record_index"])]
        s = build_sample(rec["captions"], int(x["g"]), tok, num_img_tokens=4, max_length=cfg.max_length)
        np.testing.assert_array_equal(x["input_ids"], s.input_ids)
    for e in range(2):
        per_epoch[e] = [(int(ds[e * N_STORIES + i]["record_index"]), int(ds[e * N_STORIES + i]["g"]))
                        for i in range(N_STORIES)]
        assert sorted(r for r, _ in per_epoch[e]) == list(range(N_STORIES))
    assert per_epoch[0] != per_epoch[1]  # reshuffled, g redrawn
    short = pipeline.sample_dataset(dataclasses.replace(cfg, max_length=160), tok)
    lengths = [int(short[i]["attention_mask"].sum()) for i in range(N_STORIES)]
    assert max(lengths) < 160


def test_fewer_image_slots_than_frames(data):
    cfg, tok, src, _ = data
    small = dataclasses.replace(cfg, max_images=4, batch_size=8)
    b = next(_it(small, tok))
    assert b["images"].shape == (8, 4, 28, 28, 3) and b["image_valid"].shape == (8, 4)
    assert b["g"].max() <= 2 and (b["num_images"] == b["image_valid"].sum(1)).all()
    for i in range(8):  # only the first max_images frames of a record are used
        rec = src[int(b["record_index"][i])]
        s = build_sample(rec["captions"][:4], int(b["g"][i]), tok, num_img_tokens=4, max_length=cfg.max_length)
        np.testing.assert_array_equal(b["input_ids"][i], s.input_ids)


def test_cache_views_are_the_view_sample_and_its_frames(data):
    """data.cache_views = 1: every stage-2 sample is the record's cache view (build_view_sample of
    the drawn g), with the ViT squash of exactly the frames it keeps, in order, the target last."""
    from data_pipeline.samples import build_view_sample
    from seed_story_jax.cache import CachePolicy
    from seed_story_jax.config import CacheConfig

    cfg, tok, src, _ = data
    cc = CacheConfig(capacity=100, sink_capacity=34, window_images=8)
    vcfg = dataclasses.replace(cfg, cache_views=1.0, max_length=160)
    it = _it(vcfg, tok, cache=cc)
    evicted = 0
    for _ in range(3):
        b = next(it)
        for i in range(vcfg.batch_size):
            rec = src[int(b["record_index"][i])]
            g = int(b["g"][i])
            s = build_view_sample(rec["captions"], g, tok, CachePolicy.from_config(cc), 100, num_img_tokens=4,
                                  max_length=160, max_images=10)
            for k in ("input_ids", "attention_mask", "labels", "ids_cmp_mask", "ids_gen_mask"):
                np.testing.assert_array_equal(b[k][i], getattr(s, k), err_msg=k)
            n = len(s.image_ids)
            assert b["num_images"][i] == n and s.image_ids[-1] == g + 1
            assert b["embeds_gen_mask"][i].tolist() == [False] * (n - 1) + [True] + [False] * (10 - n)
            for j, frame in enumerate(s.image_ids):
                np.testing.assert_array_equal(b["images"][i, j], T.vit_squash_448(_decode(rec["images"][frame]), size=28))
            evicted += int(s.image_ids[0] > 0)
    assert evicted > 0  # some views start after the story's first frame
    with pytest.raises(ValueError, match="cache"):
        next(_it(vcfg, tok))  # no cache config to see through
