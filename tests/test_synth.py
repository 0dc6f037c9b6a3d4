"""data_pipeline/synth.py generator options (the demo's bigger, faceless characters and the timed
returns of its long-story table); the default generator is what every other test draws."""

import json
import re

import numpy as np
import pytest

from data_pipeline import synth as S


def _story(seed, index, frames, size, options=None):
    images, captions, truths = S.make_story(seed, index, frames, size, options)
    return [np.asarray(im) for im in images], captions, truths


def test_default_options_are_the_default_generator():
    for i in range(6):
        a, b = _story(3, i, 8, 32), _story(3, i, 8, 32, S.SynthOptions())
        assert a[1] == b[1] and a[2] == b[2] and all((x == y).all() for x, y in zip(a[0], b[0]))


def test_size_scale_and_faces():
    o = S.SynthOptions(size_scale=1.5, faces=False)
    for i in range(4):
        base, big = _story(0, i, 4, 64), _story(0, i, 4, 64, o)
        assert base[1] == big[1]  # same story, drawn differently
        for tb, tg, img in zip(base[2], big[2], big[0]):
            for cb, cg in zip(tb["characters"], tg["characters"]):
                assert cg["radius"] == pytest.approx(1.5 * cb["radius"], abs=1e-3)
            assert not (img == 0).all(axis=-1).any()  # no black face pixels
        assert any((img == 0).all(axis=-1).any() for img in base[0])  # the default draws faces
    with pytest.raises(ValueError, match="size_scale"):
        S.SynthOptions(size_scale=10)
    with pytest.raises(ValueError, match="unknown"):
        S.SynthOptions.from_dict({"sizes": 2})


def test_chars_and_scenes():
    o = S.SynthOptions(min_chars=1, max_chars=1, scenes=["park"])
    for i in range(8):
        _, caps, truths = _story(1, i, 12, 32, o)
        assert all(t["scene"] == "park" and len(t["characters"]) == 1 for t in truths)
        assert not any("Everyone goes" in c for c in caps)
    with pytest.raises(ValueError, match="scenes"):
        S.SynthOptions(scenes=["moon"])


def test_timed_returns_do_not_restate_the_look():
    """With `away`, a character who leaves comes back after min..max frames, named only; its
    first entrance (or the intro) is the only caption that tells its colour and shape."""
    o = S.SynthOptions(min_chars=3, away=(4, 6))
    returns = 0
    for i in range(30):
        _, caps, truths = _story(2, i, 40, 32, o)
        present = [{c["name"]: c for c in t["characters"]} for t in truths]
        gone_at = {}
        for t in range(1, len(truths)):
            for name in present[t - 1].keys() - present[t].keys():
                gone_at[name] = t
                assert f"{name} says goodbye and leaves." in caps[t]
            for name in present[t].keys() - present[t - 1].keys():
                c = present[t][name]
                if name in gone_at:  # a return: gap within `away`, look not told
                    returns += 1
                    assert 4 <= t - gone_at[name] <= 6
                    assert f"{name} comes back from the" in caps[t]
                    assert not re.search(rf"{name}, a \w+ \w+,", caps[t])
                else:  # a first entrance tells the look
                    assert f"{name}, a {c['colour']} {c['shape']}, arrives" in caps[t]
    assert returns >= 10
    with pytest.raises(ValueError, match="away"):
        S.SynthOptions(away=(3, 2))


def test_recoloured_frames_change_only_the_named_characters():
    """recoloured_frames redraws frame t with the named characters in colours the story does not
    use: their pixels change, the background and everyone else stay, the story goes on unchanged."""
    o = S.SynthOptions(min_chars=3, away=(3, 4), size_scale=1.5, faces=False)
    images, _, truths = S.make_story(5, 1, 20, 64, o)
    t = next(k for k, tr in enumerate(truths) if k > 2 and len(tr["characters"]) >= 2)
    who = truths[t]["characters"][0]
    rc = S.recoloured_frames(5, 1, 20, 64, o, {t: [who["name"]]})
    assert set(rc) == {t}
    a, b = np.asarray(images[t]).astype(int), np.asarray(rc[t]).astype(int)
    changed = np.abs(a - b).sum(-1) > 0
    x0, y0, x1, y1 = (min(64, max(0, int(round(v * 64)))) for v in who["bbox"])
    inside = np.zeros_like(changed)
    inside[max(0, y0 - 1):y1 + 2, max(0, x0 - 1):x1 + 2] = True
    assert changed.sum() >= 0.2 * (x1 - x0) * (y1 - y0) and not (changed & ~inside).any()
    used = {tuple(S.COLOURS[c]) for c in {c["colour"] for tr in truths for c in tr["characters"]}}
    assert tuple(b[changed].reshape(-1, 3)[0]) not in used
    again, _, _ = S.make_story(5, 1, 20, 64, o)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(images, again))


def test_write_synthetic_records_options(tmp_path):
    o = S.SynthOptions(size_scale=1.5, faces=False)
    S.write_synthetic(tmp_path / "a", stories=2, frames=3, size=32, options=o, progress=False)
    meta = json.loads((tmp_path / "a" / "synth.json").read_text())
    assert S.SynthOptions.from_dict(meta["options"]) == o
    S.write_synthetic(tmp_path / "b", stories=2, frames=3, size=32, progress=False)
    assert "options" not in json.loads((tmp_path / "b" / "synth.json").read_text())
