"""Evaluation metrics (seed_story_jax/evaluate.py) on constructed inputs, the teacher-forced
aggregation against the stage-2 loss of models/mllm.py, and `seed-story eval`.

Tolerances: cosines of constructed vectors exact to 1e-12 (float64); the teacher-forced CE and
feature cosine equal mllm.loss_fn's lm_loss and 1 − rec_loss on the same samples to 1e-5 relative
(fp32, batches padded differently)."""

import json
import math

import numpy as np
import pytest

from data_pipeline import synth
from seed_story_jax import evaluate as E

# ---------------------------------------------------------------------------------------------- pure


def test_perplexity_and_cosine():
    assert E.perplexity(0.0) == 1.0
    assert E.perplexity(math.log(37.0)) == pytest.approx(37.0, rel=1e-12)
    assert E.perplexity(1e4) == math.inf
    a = np.array([[1.0, 2.0, 3.0]])
    assert E.cosine(a, 5 * a)[0] == pytest.approx(1.0, abs=1e-12)
    assert E.cosine(a, -a)[0] == pytest.approx(-1.0, abs=1e-12)
    assert E.cosine([1.0, 0.0], [0.0, 2.0]) == pytest.approx(0.0, abs=1e-12)


def test_feature_cosine():
    rng = np.random.default_rng(0)
    t = rng.standard_normal((3, 16, 64))
    assert E.feature_cosine(t * rng.uniform(0.5, 2.0, (3, 16, 1)), t) == pytest.approx(1.0, abs=1e-12)
    assert E.feature_cosine(-t, t) == pytest.approx(-1.0, abs=1e-12)
    assert abs(E.feature_cosine(rng.standard_normal((3, 16, 64)), t)) < 0.1  # unrelated ≈ 0
    # one token flipped out of 16 in one of 3 images: mean cosine (47·1 − 1)/48
    half = t.copy()
    half[1, 5] *= -1
    assert E.feature_cosine(half, t) == pytest.approx(46 / 48, abs=1e-12)
    with pytest.raises(ValueError, match="shapes differ"):
        E.feature_cosine(t[:, :8], t)


def test_centred_cosine_sees_through_the_average():
    rng = np.random.default_rng(2)
    common = 5.0 * rng.standard_normal((1, 16, 64))  # what every frame shares (a random ViT's bias)
    target = common + rng.standard_normal((40, 16, 64))
    perfect = E._cosines(list(2.0 * target), list(target))
    assert perfect["feature_cosine"] == pytest.approx(1.0) and perfect["feature_cosine_centred"] == pytest.approx(1.0)
    average = E._cosines([target.mean(0)] * 40, list(target))  # regress the mean, ignore the frame
    assert average["feature_cosine"] > 0.9 and abs(average["feature_cosine_centred"]) < 1e-9
    noisy = E._cosines(list(target + rng.standard_normal(target.shape)), list(target))
    assert 0.5 < noisy["feature_cosine_centred"] < noisy["feature_cosine"] < 1.0
    assert math.isnan(E._cosines([], [])["feature_cosine"])


def test_consistency_rewards_groups_not_sameness():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((4, 32))
    groups = [g for g in range(4) for _ in range(5)]
    clustered = centres[groups] + 0.1 * rng.standard_normal((20, 32))
    c = E.consistency(clustered, groups)
    assert c["within"] > 0.95 and c["margin"] > 0.5
    assert c["pairs_within"] == 4 * 10 and c["pairs_across"] == 190 - 40
    # the same vectors under shuffled labels: no structure left
    shuffled = E.consistency(clustered, list(rng.permutation(groups)))
    assert abs(shuffled["margin"]) < 0.25 < c["margin"]
    # a painter that paints every frame alike is perfectly "similar" but has a zero margin
    same = E.consistency(np.tile(centres[:1], (20, 1)), groups)
    assert same["within"] == pytest.approx(1.0) and same["margin"] == pytest.approx(0.0, abs=1e-12)
    # tuple labels (story, character) and groups of one
    one = E.consistency(centres[:3], [("s", "Pip"), ("s", "Bo"), ("t", "Pip")])
    assert one["pairs_within"] == 0 and math.isnan(one["within"]) and math.isnan(one["margin"])
    with pytest.raises(ValueError):
        E.consistency(centres, [0, 1])


def test_character_consistency_separates_painters():
    """Crops at the characters' true boxes of the true frames and of frames that ignore the story
    (each story's first frame painted again and again). Over all pairs the story-blind painter gets
    a large margin (the same region cut twice; its story's scene on every crop); counted only
    between crops at different places, across pairs inside one story, it gets none, and the true
    frames keep a clear margin. Vectors: a stand-in judge (4x4 colour layout), centred."""
    from PIL import Image

    def crops_of(frames, truths, key):
        crops, groups, pos = E._character_crops(frames, truths, key)
        # a stand-in judge: the crop's mean colour and a coarse 4x4 colour layout
        vecs = [np.asarray(Image.fromarray(np.asarray(c)).resize((4, 4))).reshape(-1) / 255.0 for c in crops]
        return vecs, groups, pos

    true_v, blind_v, groups, pos = [], [], [], []
    o = synth.SynthOptions(size_scale=1.5, faces=False)
    for i in range(6):
        images, _, truths = synth.make_story(11, i, 10, 64, o)
        v, g, p = crops_of(images, truths, i)
        b, _, _ = crops_of([images[0]] * len(images), truths, i)
        true_v += v
        blind_v += b
        groups += g
        pos += p
    true_v, blind_v = np.array(true_v), np.array(blind_v)
    true_v, blind_v = true_v - true_v.mean(0), blind_v - blind_v.mean(0)
    stories = [g[0] for g in groups]
    good = E.consistency(true_v, groups, pos, E.CHAR_MIN_DISTANCE, strata=stories)
    blind = E.consistency(blind_v, groups, pos, E.CHAR_MIN_DISTANCE, strata=stories)
    blind_all = E.consistency(blind_v, groups)
    assert good["pairs_within"] >= 100 and good["pairs_across"] >= 100
    assert good["pairs_within"] == blind["pairs_within"] < blind_all["pairs_within"]
    assert blind_all["margin"] > 0.3  # the bias: a painter that ignores the story "wins"
    assert good["margin"] > 0.1 and abs(blind["margin"]) < 0.25 * good["margin"]
    with pytest.raises(ValueError, match="positions"):
        E.consistency(true_v, groups, pos[:-1], 0.1)
    with pytest.raises(ValueError, match="strata"):
        E.consistency(true_v, groups, strata=stories[:-1])


def test_chance_accuracy_is_the_prior():
    """Frames scored against other frames' truth: the true frames of a story world score low, a
    painter that paints the same picture everywhere scores its accuracy there as well."""
    images, truths = [], []
    for i in range(4):
        im, _, tr = synth.make_story(4, i, 5, 64, synth.SynthOptions(size_scale=1.5, faces=False))
        images += im
        truths += tr
    assert E.character_scores(images, truths)["character_accuracy"] == 1.0
    assert E.chance_accuracy(images, truths) < 0.5
    same = [images[0]] * len(images)
    assert E.chance_accuracy(same, truths) == pytest.approx(E.character_scores(same, truths)["character_accuracy"],
                                                            abs=0.15)
    assert math.isnan(E.chance_accuracy(images[:1], truths[:1]))


class Judge4:
    """A judge for constructed tests: each frame's 4×4 thumbnail, 16 RGB tokens in [0, 1]."""

    def features(self, images):
        return np.stack([np.asarray(im.resize((4, 4)), np.float64).reshape(16, 3) / 255.0 for im in images])


def test_return_frames_and_the_paired_table():
    """return_frames finds the frames where someone is back; table2 reports return-frame cosines per
    policy as mean ± stderr over stories and the paired difference from the reference policy."""
    def tr(*names):
        return {"characters": [{"name": n} for n in names]}

    assert E.return_frames([tr("A", "B"), tr("A"), tr("A"), tr("A", "B"), tr("A", "B", "C"), tr("C")]) == [3]
    assert E.return_frames([tr("A"), tr("B"), tr("A", "B")]) == [2]
    assert E.returning([tr("A", "B"), tr("A"), tr("B", "A"), tr("C")]) == {2: ["B"]}

    class FakeModels:
        judge = Judge4()
        cfg = None

    rng = np.random.default_rng(0)

    synth_opts = {"away": [3, 4], "min_chars": 3, "size_scale": 1.5}

    def runner(stories, policy, frames, *, render=False):
        outs = []
        for i, st in enumerate(stories):
            true = Judge4().features(st.images[1:frames])
            if policy == "forgets":  # the truth, but every returning character in the wrong colour
                back = E.returning(st.truths)
                rc = synth.recoloured_frames(3, i, frames, 32, synth.SynthOptions(**synth_opts), back)
                true = true.copy()
                for t, im in rc.items():
                    true[t - 1] = Judge4().features([im])[0]
            noise = {"good": 0.05, "bad": 0.5, "forgets": 0.05}[policy] * rng.standard_normal(true.shape)
            outs.append(E.GeneratedStory(frames=None, features=true + noise, seconds=1.0, peak_bytes=1.0))
        return outs

    opts = E.EvalOptions(table_frames=(30,), table_stories=6, policies=("bad", "good", "forgets"), seed=3,
                         table_synth=synth_opts, reference_policy="good")
    rows = E.table2(FakeModels(), runner, opts, size=32)
    bad, good, forgets = rows
    # the look margin: recalled looks score near the truth's own margin, forgotten ones below zero
    truth = good["return_frames_look_margin_of_truth"]
    assert truth > 0.05 and good["return_frames_look_margin"] > 0.5 * truth
    assert forgets["return_frames_look_margin"] < -0.5 * truth
    assert forgets["return_frames_look_margin_good_minus_this"] > 3 * forgets["return_frames_look_margin_good_minus_this_stderr"]
    assert good["return_frames_feature_cosine_n"] >= 4 and bad["return_frames"] == good["return_frames"] > 0
    assert good["return_frames_feature_cosine"] > bad["return_frames_feature_cosine"]
    d = bad["return_frames_feature_cosine_centred_good_minus_this"]
    se = bad["return_frames_feature_cosine_centred_good_minus_this_stderr"]
    assert d > 3 * se > 0
    assert not any(k.endswith("_minus_this") for k in good)
    assert any("return frames" in line for line in E.summary_lines({"table2": rows}))
    assert any(line.startswith("(look:") for line in E.summary_lines({"table2": rows}))


def test_look_margins_score_carried_and_lost_looks():
    """looks.look_margins on synthetic stories with the 4×4 judge: the truth scores its own margin,
    a prediction that carries the looks scores near it, one that draws the characters in other
    colours scores below zero; repeating the previous frame carries a staying character's look and
    not a returning one's (it was away)."""
    from seed_story_jax import looks

    judge = Judge4().features
    opts = {"away": [2, 3], "min_chars": 3, "size_scale": 1.5}
    stories = E.long_synthetic_stories(8, 12, 32, 5, opts)
    features = [judge(st.images) for st in stories]
    recoloured = {kind: [] for kind in looks.KINDS}
    for kind, pick in looks.KINDS.items():
        for i, st in enumerate(stories):
            drawn = synth.recoloured_frames(5, i, 12, 32, synth.SynthOptions(**opts), pick(st.truths))
            recoloured[kind].append({t: judge([im])[0] for t, im in drawn.items()})
    rng = np.random.default_rng(0)
    noisy = lambda x: x + 0.03 * rng.standard_normal(x.shape)  # noqa: E731

    def score(predict):
        targets = [{t: (predict(i, t), features[i][t]) for t in range(1, 12)} for i in range(len(stories))]
        return looks.look_margins(stories, targets, features, recoloured)

    keeps = score(lambda i, t: noisy(features[i][t]))
    loses = score(lambda i, t: noisy(recoloured["staying"][i].get(t, features[i][t])))
    for kind in looks.KINDS:
        truth = keeps[kind]["truth"]
        assert keeps[kind]["frames"] > 0 and truth > 0.05
        assert keeps[kind]["model"] > 0.7 * truth, (kind, keeps[kind])
    assert loses["staying"]["model"] < -0.5 * loses["staying"]["truth"]
    assert keeps["staying"]["repeat_previous"] > 0.5 * keeps["staying"]["truth"]
    assert keeps["returning"]["repeat_previous"] < 0.5 * keeps["returning"]["truth"]
    assert keeps["feature_cosine_centred"]["truth"] == pytest.approx(1.0)
    assert keeps["feature_cosine_centred"]["model"] > keeps["feature_cosine_centred"]["repeat_previous"]
    lines = looks.summary_lines({"stories": 8, "frames": 12, "synth": opts, **keeps})
    assert any(line.startswith("look margin, returning") for line in lines)
    empty = looks.look_margins(stories, [{} for _ in stories], features, recoloured)  # no sample fitted
    assert empty["staying"]["frames"] == 0 and math.isnan(empty["staying"]["model"])
    assert math.isnan(empty["feature_cosine_centred"]["model"])


def test_staying():
    def tr(*names):
        return {"characters": [{"name": n} for n in names]}

    assert E.staying([tr("A", "B"), tr("A"), tr("B", "A"), tr("C")]) == {1: ["A"], 2: ["A"]}
    assert E.staying([tr("A")]) == {}


def _frames(seed=3, frames=6, size=64):
    images, captions, truths = synth.make_story(seed, 0, frames, size)
    return images, captions, truths


def test_character_scores_on_true_and_broken_frames():
    images, _, truths = _frames()
    ok = E.character_scores(images, truths)
    assert ok["character_accuracy"] == 1.0 and ok["frame_exact"] == 1.0 and ok["background_ok"] == 1.0
    assert ok["frames"] == 6 and ok["characters"] == sum(len(t["characters"]) for t in truths)

    # a blank sky-coloured picture: no character, so nothing right
    blank = [np.full((64, 64, 3), t["sky"], np.uint8) for t in truths]
    none = E.character_scores(blank, truths)
    assert none["character_accuracy"] == 0.0 and none["frame_exact"] == 0.0 and none["recall"] == 0.0

    # every frame shifted right by a third of the width: characters found, but in the wrong place
    shifted = [np.roll(np.asarray(im), 21, axis=1) for im in images]
    moved = E.character_scores(shifted, truths, centre_tol=0.15)
    assert moved["recall"] > 0.5 and moved["character_accuracy"] < 0.5
    assert E.character_scores(shifted, truths, centre_tol=0.6)["character_accuracy"] > moved["character_accuracy"]

    # one character painted in a colour nobody in the frame has: wrong, and the frame is not exact
    t0 = truths[0]
    c = t0["characters"][0]
    other = next(n for n in synth.COLOURS if n not in {x["colour"] for x in t0["characters"]})
    arr = np.asarray(images[0]).copy()
    mask = np.sqrt(((arr.astype(float) - c["rgb"]) ** 2).sum(-1)) <= 60
    arr[mask] = synth.COLOURS[other]
    s = E.character_scores([arr], [t0])
    assert s["frame_exact"] == 0.0
    assert s["character_accuracy"] == pytest.approx((len(t0["characters"]) - 1) / len(t0["characters"]))
    with pytest.raises(ValueError):
        E.character_scores(images[:2], truths)


def test_crop_box():
    img = np.zeros((40, 80, 3), np.uint8)
    assert E.crop_box(img, (0.25, 0.25, 0.75, 0.75), pad=0.0).size == (40, 20)
    assert E.crop_box(img, (0.25, 0.25, 0.75, 0.75), pad=0.5).size == (80, 40)  # clamped to the image
    assert E.crop_box(img, (0.99, 0.99, 1.0, 1.0), pad=0.0).size == (2, 2)  # at least 2 px, inside
    img[10:20, 20:40] = 255
    crop = np.asarray(E.crop_box(img, (0.25, 0.25, 0.5, 0.5), pad=0.0))
    assert crop.shape == (10, 20, 3) and crop.min() == 255


# ---------------------------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny checkpoint with llm/mllm/vit params drawn with numpy (no XLA init compile), a tokenizer
    trained on synthetic captions, and a synthetic data set with a val split."""
    import jax
    from flax import nnx

    from seed_story_jax.checkpoint import save_checkpoint
    from seed_story_jax.config import load_config, resolve_config_path
    from seed_story_jax.models import build
    from seed_story_jax.tokenizer import train_tiny_tokenizer

    root = tmp_path_factory.mktemp("eval")
    synth.write_synthetic(root / "data", stories=2, val_stories=3, frames=6, size=32, seed=0, progress=False)
    caps = [c for line in (root / "data" / "train.jsonl").read_text().splitlines() for c in json.loads(line)["captions"]]
    tok = train_tiny_tokenizer(root / "tok", caps * 4, vocab_size=320)
    cfg = load_config(resolve_config_path("tiny"), [f"llm.vocab_size={tok.vocab_size}"])
    rng = np.random.default_rng(0)
    comps = {}
    for name in ("llm", "mllm", "vit"):
        abstract = jax.eval_shape(lambda: nnx.state(build(name, getattr(cfg, name), nnx.Rngs(0)), nnx.Param)
                                  .to_pure_dict())
        comps[name] = jax.tree.map(lambda s: (0.08 * rng.standard_normal(s.shape)).astype(s.dtype), abstract)
    save_checkpoint(root / "ckpt", cfg, comps, tokenizer_dir=root / "tok")
    return root


def test_load_stories(tiny, tmp_path):
    from seed_story_jax.errors import DataError

    st = E.load_stories(tiny / "data", "val")
    assert len(st) == 3 and all(len(s.images) == 6 == len(s.captions) == len(s.truths) for s in st)
    assert E.load_stories(tiny / "data", "val", limit=2)[1].key == st[1].key
    with pytest.raises(DataError, match="neither"):
        E.load_stories(tmp_path, "val")
    with pytest.raises(FileNotFoundError):
        E.load_stories(tmp_path / "nope", "val")


def test_teacher_forced_matches_the_stage2_loss(tiny):
    """Per-row sums over padded batches give exactly the token-weighted CE and per-image cosine
    that mllm.loss_fn computes over all samples at once."""
    import jax.numpy as jnp

    from seed_story_jax.models import mllm as M

    models = E.Models.load(tiny / "ckpt")
    stories = E.load_stories(tiny / "data", "val")
    got = E.teacher_forced(models, stories, batch_size=4)  # the last batch is padded
    samples = []
    for st in stories:
        samples += E.story_samples(st, models.judge.features(st.images), models.tokenizer, models.cfg)
    assert got["samples"] == len(samples) and len(samples) % 4 and len(samples) >= 6  # (≤ 5 per story)
    batch = {k: jnp.asarray(np.stack([s[k] for s in samples])) for k in samples[0] if k != "feats"}
    feats = jnp.asarray(np.stack([s["feats"] for s in samples]))
    _, m = M.loss_fn(models.llm, models.mllm, batch, feats, max_gen=1)
    assert got["tokens"] == int(m["lm_tokens"])
    assert got["text_ce"] == pytest.approx(float(m["lm_loss"]), rel=1e-5)
    assert got["feature_cosine"] == pytest.approx(1.0 - float(m["rec_loss"]), rel=1e-5, abs=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(got["text_ce"]), rel=1e-9)
    # random weights know nothing: CE near ln(vocab)
    assert abs(got["text_ce"] - math.log(models.cfg.llm.vocab_size)) < 1.0


def test_second_checkpoint_reuses_the_compilations(tiny, compile_counter):
    """The demo evaluates the trained and the random-init model, same configs: the second one's
    teacher-forced program and judge compile nothing, and its numbers are the first's exactly."""
    stories = E.load_stories(tiny / "data", "val", limit=2)
    first = E.teacher_forced(E.Models.load(tiny / "ckpt"), stories, batch_size=4)
    models = E.Models.load(tiny / "ckpt")
    _ = (models.llm, models.mllm, models.vit)  # build the modules outside the counted block
    with compile_counter() as c:
        again = E.teacher_forced(models, stories, batch_size=4)
    assert c.count == 0, c.count
    assert again == first


def test_eval_cli_teacher_forced(tiny, tmp_path, capsys):
    from seed_story_jax.cli import main

    out = tmp_path / "report.json"
    rc = main(["eval", "--ckpt", str(tiny / "ckpt"), "--data", str(tiny / "data"), "--out", str(out),
               "--teacher-forced-only", "--stories", "2", "--no-progress"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["stories"] == 2 and 0 < report["teacher_forced"]["samples"] <= 2 * 5
    looks = report["looks"]  # teacher forced too; the default 16 stories
    assert looks["stories"] == 16 and looks["staying"]["frames"] > 0 and looks["targets"] > 16
    assert abs(looks["feature_cosine_centred"]["truth"] - 1.0) < 1e-9
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "looks, teacher forced" in printed
    rc = main(["eval", "--ckpt", str(tiny / "ckpt"), "--data", str(tiny / "data"), "--policies", "bogus"])
    assert rc == 2 and "bogus" in capsys.readouterr().err
    rc = main(["eval", "--ckpt", str(tmp_path / "missing"), "--data", str(tiny / "data")])
    assert rc == 2
