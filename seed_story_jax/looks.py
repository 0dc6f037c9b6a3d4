"""Does the MLLM carry its characters' looks? Teacher-forced look margins on synthetic stories.

The long-story table asks whether a cache policy lets the model recall a returning character's
look; this asks first whether the model carries looks at all, with nothing evicted. On synthetic
stories (short absences, so a return lies within the model's context) the model sees the true
frames before each target, as stage 2 trains, and regresses the target's features. On the frames
where some characters stay on stage (in the frame before too), and on those where some come back
after being away, each target is drawn again with those characters recoloured
(`data_pipeline/synth.recoloured_frames`); the look margin is the centred cosine of the prediction
to the true frame minus that to the recoloured one (evaluate.look_margin).

Two references bound it: the true features (the most any prediction scores) and *repeat the
previous frame* (the frame before the target, as the prediction): a model that reads the frame
before should carry a staying character's look at least as well as that copy. On a returning
character the copy knows nothing (it was away); only a model that remembers it can score."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from seed_story_jax.evaluate import (EvalStory, Models, _cosines, _mean_stderr, long_synthetic_stories, look_margin,
                                     recoloured_features, returning, staying, teacher_forced_predictions)

KINDS = {"staying": staying, "returning": returning}
SOURCES = ("model", "repeat_previous", "truth")
# Absences of 2-3 frames, so that a return falls within the frames a stage-2 sample holds; 3
# characters, so that someone can leave while others stay.
DEFAULT_SYNTH = {"away": [2, 3], "min_chars": 3}


def look_margins(stories: Sequence[EvalStory], targets: Sequence[dict], features: Sequence[np.ndarray],
                 recoloured: dict[str, Sequence[dict]]) -> dict:
    """Per kind (staying / returning) and source (model, repeat_previous, truth): mean ± stderr over
    stories of the look margin on that kind's frames. `targets[i]`: frame t → (regressed, true
    features) of story i; `features[i]`: its frames' true features; `recoloured[kind][i]`: frame t →
    features of frame t with that kind's characters recoloured. Centring uses each source's mean
    over every target (the truth's for the true side), as the table does."""
    keys = [(i, t) for i, per in enumerate(targets) for t in sorted(per)]
    preds = {"model": {k: targets[k[0]][k[1]][0] for k in keys},
             "repeat_previous": {k: features[k[0]][k[1] - 1] for k in keys},
             "truth": {k: features[k[0]][k[1]] for k in keys}}
    if not keys:  # every sample longer than the model's context: nothing to score
        return {"feature_cosine_centred": {src: float("nan") for src in SOURCES},
                **{kind: {"frames": 0, **{k: v for src in SOURCES for k, v in _mean_stderr(src, []).items()}}
                   for kind in KINDS}}
    means = {src: np.mean(np.stack(list(v.values())), axis=0).astype(np.float64) for src, v in preds.items()}
    out = {"feature_cosine_centred": {}}
    for src in SOURCES:
        got = _cosines([preds[src][k] for k in keys], [preds["truth"][k] for k in keys],
                       means=(means[src], means["truth"]))
        out["feature_cosine_centred"][src] = got["feature_cosine_centred"]
    for kind in KINDS:
        out[kind] = {"frames": 0}
        per_src = {src: [] for src in SOURCES}
        for i, st in enumerate(stories):
            frames = [t for t in sorted(recoloured[kind][i]) if t in targets[i]]
            if not frames:
                continue
            out[kind]["frames"] += len(frames)
            true = np.stack([features[i][t] for t in frames])
            rc = np.stack([recoloured[kind][i][t] for t in frames])
            for src in SOURCES:
                pred = np.stack([preds[src][(i, t)] for t in frames])
                per_src[src].append(look_margin(pred, true, rc, means[src], means["truth"]))
        for src, vals in per_src.items():
            out[kind].update(_mean_stderr(src, vals))
    return out


def teacher_forced_looks(models: Models, *, stories: int, frames: int, size: int, seed: int,
                         synth: Optional[dict] = None, batch_size: int = 8, progress: bool = False) -> dict:
    """The look margins of `models` on `stories` synthetic stories of `frames` frames drawn with the
    generator options `synth` (those of the held-out set with short absences laid over)."""
    from data_pipeline.synth import SynthOptions

    drawn = long_synthetic_stories(stories, frames, size, seed, synth)
    tf = teacher_forced_predictions(models, drawn, batch_size=batch_size, progress=progress)
    opts = SynthOptions.from_dict(synth)
    recoloured = {kind: [recoloured_features(models.judge, seed, i, frames, size, opts,
                                             {t: v for t, v in pick(st.truths).items() if t in tf["targets"][i]})
                         for i, st in enumerate(drawn)]
                  for kind, pick in KINDS.items()}
    out = {"stories": stories, "frames": frames, "seed": seed, "synth": dict(synth or {}),
           "targets": sum(len(t) for t in tf["targets"])}
    out.update(look_margins(drawn, tf["targets"], tf["features"], recoloured))
    return out


def summary_lines(looks: dict) -> list[str]:
    """The block `seed-story eval` and the demo print."""
    from seed_story_jax.evaluate import _f, _pm

    away = looks.get("synth", {}).get("away")
    lines = ["", f"looks, teacher forced ({looks['stories']} synthetic stories of {looks['frames']} frames"
             + (f", away {away[0]}-{away[1]} frames" if away else "") + "; the model sees the true frames before):",
             f"{'':<26} {'model':>15} {'repeat previous':>15} {'true features':>15}",
             f"{'feature cosine, centred':<26} " + " ".join(
                 f"{_f(looks['feature_cosine_centred'][s]):>15}" for s in SOURCES)]
    for kind in KINDS:
        row = looks[kind]
        lines.append(f"{'look margin, ' + kind:<26} " + " ".join(f"{_pm(row, s):>15}" for s in SOURCES)
                     + f"  ({row['frames']} frames)")
    lines.append("(look margin: centred cosine to the true frame − to it with those characters recoloured; "
                 "staying: on stage in the frame before too; returning: back after being away)")
    return lines
