"""StoryStream ingestion: synthetic stories, the ArrayRecord build, bad-data accounting, path safety."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline import builder, storystream as ss, synth
from seed_story_jax.errors import DataError

LIMITS = ss.ImageLimits(min_resolution=32, min_aspect=0.2)  # synthetic frames are small


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "set"
    synth.write_synthetic(out, stories=40, frames=10, size=48, seed=3, progress=False)
    return out


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def test_synth_is_deterministic_per_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, seed in ((a, 7), (b, 7), (c, 8)):
        synth.write_synthetic(d, stories=4, frames=6, size=32, seed=seed, progress=False)
    assert _tree_digest(a) == _tree_digest(b)
    assert _tree_digest(a) != _tree_digest(c)
    # Story i does not depend on how many stories are written.
    imgs, caps, _ = synth.make_story(7, 2, 6, 32)
    line = json.loads((a / "train.jsonl").read_text().splitlines()[2])
    assert line["captions"] == caps
    assert np.array_equal(np.asarray(Image.open(a / "images" / line["images"][3])), np.asarray(imgs[3]))


def test_synth_story_content(stories):
    lines = [json.loads(x) for x in (stories / "train.jsonl").read_text().splitlines()]
    assert len(lines) == 40 and all(len(x["images"]) == len(x["captions"]) == 10 for x in lines)
    truth = synth.load_truth(stories)
    # Characters recur: every name seen after frame 0 was introduced (with its look) earlier.
    for rec in lines:
        frames = [truth[r] for r in rec["images"]]
        looks = {}
        for fr in frames:
            for c in fr["characters"]:
                looks.setdefault(c["name"], (c["shape"], c["colour"]))
                assert looks[c["name"]] == (c["shape"], c["colour"]), "a character changed its look"
        first = rec["captions"][0]
        for c in frames[0]["characters"]:
            assert f"{c['name']}, a {c['mood']} {c['size']} {c['colour']} {c['shape']}" in first
        for cap, fr in zip(rec["captions"][1:], frames[1:]):  # who is there is said
            for c in fr["characters"]:
                assert c["name"] in cap.split("Now ")[-1]
    # Scenes and sizes change somewhere, and consecutive frames usually differ.
    scenes = {(rec["id"], truth[r]["scene"]) for rec in lines for r in rec["images"]}
    assert len(scenes) > len(lines)
    changed = sum(truth[a] != truth[b] for rec in lines for a, b in zip(rec["images"], rec["images"][1:]))
    assert changed > 0.8 * 9 * len(lines)


def test_score_frame(stories):
    truth = synth.load_truth(stories)
    rels = sorted(truth)[:60]
    for rel in rels:  # the ground-truth frames score perfectly
        s = synth.score_frame(Image.open(stories / "images" / rel), truth[rel])
        assert s["recall"] == 1.0 and s["precision"] == 1.0 and s["background_ok"], (rel, s)
        assert s["mean_centre_error"] < 0.03 and s["mean_iou"] > 0.5, (rel, s)
    # At another size (a generated frame need not be 48 px) the score still holds.
    rel = rels[5]
    big = Image.open(stories / "images" / rel).resize((256, 256), Image.NEAREST)
    s = synth.score_frame(big, truth[rel])
    assert s["recall"] == 1.0 and s["mean_centre_error"] < 0.03
    # A blank frame finds nobody; a frame from another story is scored as wrong.
    blank = np.full((64, 64, 3), 128, np.uint8)
    s = synth.score_frame(blank, truth[rel])
    assert s["recall"] == 0.0 and not s["background_ok"]
    other = next(r for r in rels if truth[r]["characters"] and
                 {c["colour"] for c in truth[r]["characters"]} != {c["colour"] for c in truth[rel]["characters"]})
    s = synth.score_frame(Image.open(stories / "images" / other), truth[rel])
    assert s["recall"] < 1.0 or s["extra_colours"]


def test_build_and_read_back(stories, tmp_path):
    out = tmp_path / "ds"
    report = builder.build(stories / "train.jsonl", stories / "images", out, limits=LIMITS, progress=False)
    assert report.chunks_kept == 40 and report.chunks_dropped == 0 and report.images_kept == 400
    src = builder.StorySource(out)
    assert len(src) == 40
    lines = {json.loads(x)["id"]: json.loads(x) for x in (stories / "train.jsonl").read_text().splitlines()}
    seen = set()
    for i in range(len(src)):
        r = src[i]
        line = lines[r["id"]]
        assert r["captions"] == line["captions"] and r["image_paths"] == line["images"]
        assert r["images"][4] == (stories / "images" / line["images"][4]).read_bytes()
        assert r["sizes"].tolist() == [[48, 48]] * 10
        seen.add(r["id"])
    assert seen == set(lines)
    info = json.loads((out / "build_report.json").read_text())
    assert info["report"]["chunks_kept"] == 40 and len(info["fingerprint"]) == 16
    assert repr(src) == f"StorySource(name=story_stream, version=1.0.0, split='train', num_records=40, fingerprint={info['fingerprint']})"
    # chunks of 4: two records per story, a tail of 2 frames dropped
    out5 = tmp_path / "ds5"
    r5 = builder.build(stories / "train.jsonl", stories / "images", out5, chunk=4, limits=LIMITS, progress=False)
    assert r5.chunks_kept == 80 and r5.tail_frames == 80  # 10 = 4 + 4 + 2 dropped
    src5 = builder.StorySource(out5)
    rec = {r["key"]: r for r in (src5[i] for i in range(80))}
    r = rec["train/1/1"]
    assert r["captions"] == lines[0]["captions"][4:8] and r["chunk"] == 1


def _write_lines(path: Path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_corrupt_data_counts_exact(stories, tmp_path):
    """5% corrupt images and two malformed lines: counts exact, every good record kept."""
    images = tmp_path / "images"
    import shutil

    shutil.copytree(stories / "images", images)
    lines = [json.loads(x) for x in (stories / "train.jsonl").read_text().splitlines()]
    rng = np.random.default_rng(0)
    all_imgs = [(i, rel) for i, rec in enumerate(lines) for rel in rec["images"]]
    bad = rng.choice(len(all_imgs), size=len(all_imgs) // 20, replace=False)  # 5%: 20 of 400
    kinds = ["truncate", "garbage", "empty", "missing"]
    bad_stories = set()
    for k, j in enumerate(bad):
        i, rel = all_imgs[j]
        bad_stories.add(i)
        p = images / rel
        kind = kinds[k % 4]
        if kind == "truncate":
            p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
        elif kind == "garbage":
            p.write_bytes(b"not an image at all" * 10)
        elif kind == "empty":
            p.write_bytes(b"")
        else:
            p.unlink()
    records = list(lines)
    records.insert(7, '{"id": 999, "images": ["a.png"], "captions": ')  # cut off
    records.insert(21, "this is not json")
    _write_lines(tmp_path / "train.jsonl", records)
    out = tmp_path / "ds"
    rep = builder.build(tmp_path / "train.jsonl", images, out, limits=LIMITS, progress=False)
    assert rep.lines == 42 and rep.stories == 40
    assert dict(rep.dropped_lines) == {"malformed_line": 2}
    assert sum(rep.dropped_images.values()) == 20
    assert rep.dropped_images["missing_image"] == 5 and rep.dropped_images["undecodable_image"] == 15
    assert rep.chunks_dropped == len(bad_stories) and rep.chunks_kept == 40 - len(bad_stories)
    assert rep.images_kept == 10 * (40 - len(bad_stories))
    assert rep.images_in_dropped_chunks == 10 * len(bad_stories) - 20
    src = builder.StorySource(out)
    kept_ids = {src[i]["id"] for i in range(len(src))}
    assert kept_ids == {rec["id"] for i, rec in enumerate(lines) if i not in bad_stories}
    probs = [json.loads(x) for x in (out / "problems.jsonl").read_text().splitlines()]
    assert len(probs) == 22
    assert {(p["reason"], p["line"]) for p in probs if p["reason"] == "malformed_line"} == {
        ("malformed_line", 8), ("malformed_line", 22)}
    assert all(p["file"].endswith("train.jsonl") for p in probs)
    saved = json.loads((out / "build_report.json").read_text())["report"]
    assert saved["images_dropped"] == 20 and saved["stories_dropped"] == 2


def _png(path: Path, w: int, h: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (10, 200, 30)).save(path)


def test_every_reason_and_path_escape(tmp_path):
    root = tmp_path / "images"
    for i in range(6):
        _png(root / f"s/{i}.png", 40, 40)
    _png(root / "small.png", 20, 40)
    _png(root / "wide.png", 200, 36)  # h/w = 0.18 < 0.2
    _png(tmp_path / "outside.png", 40, 40)
    (root / "link_out.png").symlink_to(tmp_path / "outside.png")
    (root / "link_in.png").symlink_to(root / "s/0.png")
    good = [f"s/{i}.png" for i in range(4)]
    caps = ["one", "two", "three", "four"]
    cases = {
        "ok": good,
        "dotdot": good[:3] + ["../outside.png"],
        "dotdot_inside": good[:3] + ["s/../s/5.png"],  # stays inside the root: fine
        "absolute": good[:3] + [str(tmp_path / "outside.png")],
        "symlink_out": good[:3] + ["link_out.png"],
        "symlink_in": good[:3] + ["link_in.png"],
        "small": good[:3] + ["small.png"],
        "wide": good[:3] + ["wide.png"],
        "missing": good[:3] + ["s/nope.png"],
        "dir": good[:3] + ["s"],
    }
    recs = [{"id": i, "images": imgs, "captions": caps} for i, imgs in enumerate(cases.values())]
    recs.append({"id": 50, "images": good, "captions": caps[:3]})  # length mismatch
    recs.append({"id": 51, "images": good[:3], "captions": caps[:3]})  # shorter than a chunk
    recs.append({"id": 52, "captions": caps})  # no images
    recs.append({"id": 53, "images": good, "captions": caps[:3] + ["see <img> here"]})
    recs.append({"id": "x", "images": good, "captions": caps})
    _write_lines(tmp_path / "s.jsonl", recs)
    rep = builder.build(tmp_path / "s.jsonl", root, tmp_path / "ds", chunk=4, limits=LIMITS, progress=False)
    assert dict(rep.dropped_images) == {"path_escape": 3, "too_small": 1, "bad_aspect": 1, "missing_image": 2}
    assert dict(rep.dropped_lines) == {"length_mismatch": 1, "too_short": 1, "missing_field": 1,
                                       "reserved_token": 1, "malformed_line": 1}
    src = builder.StorySource(tmp_path / "ds")
    kept = sorted(src[i]["id"] for i in range(len(src)))
    names = list(cases)
    assert [names[i] for i in kept] == ["ok", "dotdot_inside", "symlink_in"]

    # The resolver on its own.
    for rel in ("../outside.png", "/etc/passwd", "link_out.png", "s/../../outside.png", ""):
        with pytest.raises(ss.BadData) as e:
            ss.resolve_image(root, rel)
        assert e.value.reason == "path_escape"
    assert ss.resolve_image(root, "s/../s/1.png") == (root / "s/1.png").resolve()
    with pytest.raises(ss.BadData) as e:
        ss.resolve_image(root, "s/\0.png")
    assert e.value.reason == "missing_image"


def test_on_error_fail_names_file_and_line_and_writes_nothing(stories, tmp_path):
    lines = (stories / "train.jsonl").read_text().splitlines()
    lines.insert(3, "{broken")
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "ds"
    with pytest.raises(DataError, match=r"t\.jsonl:4: malformed_line"):
        builder.build(tmp_path / "t.jsonl", stories / "images", out, limits=LIMITS, on_error="fail", progress=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".ds")]
    # Everything dropped → an error, not an empty dataset.
    with pytest.raises(DataError, match="no usable records"):
        builder.build(stories / "train.jsonl", stories / "images", out, progress=False)  # 48px < 128
    assert not out.exists()


def test_cli_synth_and_build(tmp_path, capsys):
    from seed_story_jax.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--stories", "3", "--frames", "10",
                 "--size", "32", "--seed", "1", "--val-stories", "1"]) == 0
    assert len((tmp_path / "s" / "val.jsonl").read_text().splitlines()) == 1
    assert main(["data", "build", "--jsonl", str(tmp_path / "s"), "--images", str(tmp_path / "s" / "images"),
                 "--out", str(tmp_path / "ds"), "--min-resolution", "32", "--workers", "2", "--json"]) == 0
    out = capsys.readouterr().out
    rep = json.loads(out[out.index("{"):])
    assert rep["chunks_kept"] == 4 and rep["lines"] == 4  # a directory: train.jsonl + val.jsonl
    # Refuses to overwrite; a bad flag value is a one-line error with exit 2.
    assert main(["data", "build", "--jsonl", str(tmp_path / "s"), "--images", str(tmp_path / "s" / "images"),
                 "--out", str(tmp_path / "ds")]) == 2
    assert main(["data", "build", "--jsonl", str(tmp_path / "nope.jsonl"), "--images", str(tmp_path),
                 "--out", str(tmp_path / "ds2")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
