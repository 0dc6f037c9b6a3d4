"""`seed-story demo`: its config handling and checkpoint plumbing (fast), and the whole demo shrunk
to a few steps and frames, end to end, twice — the second run must reuse the trained model (slow:
it compiles every program of the pipeline, minutes on 2 cores)."""

import json
import time
from pathlib import Path

import numpy as np
import pytest

from seed_story_jax import demo as D

# Everything at its smallest: 6 training stories of 4 frames, a few optimizer steps per stage, a
# 4-frame story, 2 held-out stories, a 6-frame cache-policy table with two policies.
SMALL = [
    "demo.stories=6", "demo.val_stories=2", "demo.frames=4", "demo.tokenizer_vocab=320",
    "demo.vae.steps=4", "demo.vae.batch_size=4", "demo.stages.1.steps=3", "demo.stages.2.steps=3",
    "demo.stages.3.steps=3", "demo.story.frames=4", "demo.eval.stories=2", "demo.eval.frames=3",
    "demo.eval.table_frames=[6]", "demo.eval.table_stories=1", "demo.eval.policies=[sink,multimodal-sink]",
    "demo.eval.look_stories=2", "demo.eval.look_frames=5",
    "detokenizer.num_inference_steps=2", "train.batch_size=2", "train.log_every=1", "train.warmup_steps=0",
    "data.batch_size=2",
]


def small_demo(out: Path, extra=()) -> Path:
    """Run the shrunk demo into `out` through the CLI (as `make demo` does); returns `out`."""
    from seed_story_jax.cli import main

    rc = main(["demo", "--out", str(out), "--no-progress", *SMALL, *extra])
    assert rc == 0, f"seed-story demo exited {rc}"
    return out


# ------------------------------------------------------------------------------------------ fast


def test_demo_config_and_overrides():
    dc = D.load_demo_config()
    s = dc.settings
    assert s.story.frames == 30 and s.story.policy == "multimodal-sink"
    assert s.story.temperature > 0 and s.story.max_text_tokens < 100  # sampled captions (greedy loops)
    assert set(s.stages) == {1, 2, 3} and all(s.stages[k]["steps"] >= 1 for k in s.stages)
    assert "demo" not in dc.tree and dc.config().train is not None
    small = D.load_demo_config(overrides=SMALL)
    assert small.settings.stages[2]["steps"] == 3 and small.settings.eval.table_frames == (6,)
    assert small.settings.eval.policies == ("sink", "multimodal-sink")
    assert small.fingerprint != dc.fingerprint  # a different config never reuses the cached model
    assert D.load_demo_config(overrides=SMALL).fingerprint == small.fingerprint
    # the demo draws its own story world (bigger faceless characters, timed returns); the long-story
    # table's absences reach past the window, and training stories hold absences as long, seen
    # through the story cache in a share of the samples
    from data_pipeline.synth import SynthOptions

    o = SynthOptions.from_dict(s.synth)
    assert o != SynthOptions() and o.away is not None
    long = SynthOptions.from_dict({**s.synth, **s.eval.table_synth})
    cfg = dc.config()
    assert long.away[0] > cfg.cache.window_images and o.away[1] >= long.away[0]
    assert s.frames > o.away[1] and 0 < cfg.data.cache_views <= 1


def test_demo_config_errors():
    from seed_story_jax.config import ConfigError

    with pytest.raises(ConfigError, match="demo.stages"):
        D.load_demo_config(overrides=["demo.stages.4.steps=1"])
    with pytest.raises(ConfigError, match="bogus"):
        D.load_demo_config(overrides=["demo.bogus=1"])
    with pytest.raises(ConfigError, match="bogus"):
        D.load_demo_config(overrides=["demo.story.policy=bogus"])
    with pytest.raises(ConfigError, match="demo.story: need"):
        D.load_demo_config(overrides=["demo.story.top_p=0"])
    with pytest.raises(ConfigError, match="demo.vae"):
        D.load_demo_config(overrides=["demo.vae.stepz=1"])
    with pytest.raises(ConfigError, match="llm"):
        D.load_demo_config(overrides=["llm.num_layers=zero"])
    with pytest.raises(ConfigError, match="demo.synth"):
        D.load_demo_config(overrides=["demo.synth.size_scale=9.0"])
    with pytest.raises(ConfigError, match="demo.eval.table_synth"):
        D.load_demo_config(overrides=["demo.eval.table_synth.away=[3,1]"])
    with pytest.raises(ConfigError, match="demo.eval.look_synth"):
        D.load_demo_config(overrides=["demo.eval.look_synth.away=[3,1]"])
    with pytest.raises(ConfigError, match="look_frames"):
        D.load_demo_config(overrides=["demo.eval.look_frames=2"])
    with pytest.raises(ConfigError, match="demo.vae.loss"):
        D.load_demo_config(overrides=["demo.vae.loss=l3"])


def test_merge_params_lays_a_subtree_over_a_checkpoint_tree():
    base = {"layers": {"0": {"to_k": np.zeros(3, np.float32), "to_q": np.ones(3, np.float32)}},
            "norm": np.ones(2, np.float32)}
    out = D.merge_params(base, {"layers": {0: {"to_k": np.full(3, 7.0)}}})  # int keys as nnx gives them
    assert out["layers"]["0"]["to_k"].tolist() == [7.0] * 3 and out["layers"]["0"]["to_k"].dtype == np.float32
    assert out["layers"]["0"]["to_q"] is base["layers"]["0"]["to_q"] and out["norm"] is base["norm"]
    assert base["layers"]["0"]["to_k"].tolist() == [0.0] * 3  # the input is not modified
    with pytest.raises(KeyError, match="to_v"):
        D.merge_params(base, {"layers": {"0": {"to_v": np.zeros(3)}}})


def test_export_checkpoint(tmp_path):
    from seed_story_jax.checkpoint import load_checkpoint, save_checkpoint
    from seed_story_jax.config import load_config, resolve_config_path

    cfg = load_config(resolve_config_path("tiny"))
    src = save_checkpoint(tmp_path / "src", cfg, {"a": {"w": np.zeros((2, 2), np.float32), "b": np.ones(2, np.float32)},
                                                  "c": {"x": np.arange(3, dtype=np.float32)}})
    D.export_checkpoint(src, tmp_path / "dst", {"a": {"w": np.full((2, 2), 5.0, np.float32)}}, cfg, stamp="abc")
    ck = load_checkpoint(tmp_path / "dst")
    assert np.asarray(ck.params["a"]["w"]).tolist() == [[5.0, 5.0], [5.0, 5.0]]
    assert np.asarray(ck.params["a"]["b"]).tolist() == [1.0, 1.0] and np.asarray(ck.params["c"]["x"]).tolist() == [0, 1, 2]
    assert ck.config.train is None and D._stamp(tmp_path / "dst") == "abc"
    with pytest.raises(KeyError):
        D.export_checkpoint(src, tmp_path / "bad", {"zzz": {}}, cfg)
    assert not (tmp_path / "bad").exists()


def test_publish_replaces_an_older_story(tmp_path):
    old, new = tmp_path / "out", tmp_path / "new"
    (old / "frames").mkdir(parents=True)
    (old / "frames" / "99.png").write_bytes(b"old")
    (old / "story.html").write_text("old")
    (old / "keep.txt").write_text("mine")
    (new / "frames").mkdir(parents=True)
    (new / "frames" / "00.png").write_bytes(b"new")
    (new / "story.html").write_text("new")
    (new / "story.json").write_text("{}")
    D.publish(new, old)
    assert sorted(p.name for p in (old / "frames").iterdir()) == ["00.png"]
    assert (old / "story.html").read_text() == "new" and (old / "story.json").is_file()
    assert (old / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_small_demo_end_to_end_and_cached(tmp_path):
    out = tmp_path / "demo"
    t = time.perf_counter()
    small_demo(out)
    first = time.perf_counter() - t
    story = json.loads((out / "story.json").read_text())
    frames = story["frames"]
    assert isinstance(frames, list) and len(frames) == 4
    for f in frames:
        assert f["image"] and (out / f["image"]).is_file() and isinstance(f["text"], str)
    assert (out / "storyboard.png").is_file() and (out / "story.html").is_file()
    report = json.loads((out / "eval.json").read_text())
    for name in ("trained", "random_init"):
        r = report[name]
        assert r["teacher_forced"]["samples"] > 0 and r["teacher_forced"]["text_ce"] > 0
        # the cache-policy table is the trained model's (the random one only needs the metrics)
        assert ({row["policy"] for row in r["table2"]} == {"sink", "multimodal-sink"}) if name == "trained" \
            else "table2" not in r
        assert (r["looks"]["stories"] == 2 and r["looks"]["targets"] > 0) if name == "trained" else "looks" not in r
        assert r["generated"]["frames"] == 3
    last = json.loads((out / "work" / "last_run.json").read_text())
    assert not last["cached_model"] and {"stage1", "stage2", "stage3", "vae"} <= set(last["timings_s"])

    # the second run goes straight to the story (no training step runs)
    t = time.perf_counter()
    small_demo(out, ["--no-eval"])
    second = time.perf_counter() - t
    last = json.loads((out / "work" / "last_run.json").read_text())
    assert last["cached_model"] and not {"stage1", "stage2", "stage3", "vae"} & set(last["timings_s"])
    assert second < first
