"""Offline evaluation of a complete checkpoint on held-out stories (issue 9).

    report = evaluate(ckpt_dir, data_dir)            # what `seed-story eval` prints and writes

Metrics, each a plain function below so it can be tested on constructed inputs:

* text: next-token cross-entropy (and perplexity = exp CE) of every held-out caption, teacher
  forced exactly as stage 2 trains (spec §5.2 samples for g = 0 .. n−2, CE over the response);
* features: mean cosine between the regressed features of the target image and its true ViT
  features, teacher forced (the stage-2 regression target), and along generated stories;
* consistency, from ViT-feature similarity (the checkpoint's frozen ViT is the judge): *style* —
  whole frames of one story against frames of other stories; *character* — crops at each
  character's true box, one character across frames against other characters. Each is reported
  as within-group similarity, across-group similarity and their difference (the margin). The
  margin is the score: a model that paints every frame alike gets a high within-similarity but a
  zero margin, so consistency cannot be won by ignoring the story;
* characters (synthetic stories only): `data_pipeline.synth.score_frame` against the generator's
  ground truth — a character counts as right when its colour covers enough of its expected area
  and its colour centroid lies within `centre_tol` image widths of where the caption put it;
  a frame is exact when every character is right and no other character colour appears;
* looks (synthetic stories, teacher forced; seed_story_jax/looks.py): whether the regressed
  features carry a staying or a returning character's look, against repeating the previous frame;
* Table 2 in miniature (the paper's attention-mechanism comparison): dense, sink, window and
  multimodal-sink caches on long synthetic stories at 10, 25 and 50 frames — quality (feature
  cosine, character accuracy), seconds and peak memory.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

POLICIES = ("dense", "sink", "window", "multimodal-sink")
TABLE2_FRAMES = (10, 25, 50)
# Character crops count for consistency only in pairs whose true centres are this far apart (image
# widths; the generator's slots are 0.175 apart): see `consistency`.
CHAR_MIN_DISTANCE = 0.15


# ==============================================================================================
# metric functions (numpy; no model)
# ==============================================================================================


def perplexity(ce: float) -> float:
    """exp(CE) of a mean next-token cross-entropy in nats (inf when it overflows)."""
    return math.exp(ce) if ce < 700 else math.inf


def cosine(a, b, axis: int = -1, eps: float = 1e-8) -> np.ndarray:
    """Cosine similarity along `axis` (broadcasting), in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    num = (a * b).sum(axis)
    den = np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis)
    return num / np.maximum(den, eps)


def feature_cosine(pred, target) -> float:
    """Mean over every token (all leading axes) of cos(pred, target) along the channel axis: the
    stage-2 regression quality, 1 − the cosine loss."""
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"feature shapes differ: {pred.shape} vs {target.shape}")
    return float(cosine(pred, target).mean()) if pred.size else math.nan


def pooled(features) -> np.ndarray:
    """(N, T, D) token features → (N, D) mean over tokens (one vector per image)."""
    f = np.asarray(features, np.float64)
    return f.mean(axis=1) if f.ndim == 3 else f


def consistency(vectors, groups: Sequence, positions=None, min_distance: float = 0.0,
                strata: Optional[Sequence] = None) -> dict:
    """Mean pairwise cosine within groups and across groups, and their difference (the margin).

    vectors (N, D); groups: N hashable labels (a story, or a (story, character) pair). Pairs are
    unordered and never an item with itself. Character consistency needs two restrictions, or a
    painter that paints one picture for every frame of a story wins: with `positions` (N, 2) only
    pairs at least `min_distance` apart count (crops are cut at each character's true box and a
    character mostly stays put: the same region cut twice is trivially alike); with `strata` (N
    labels, e.g. the story) an across pair counts only inside one stratum (two characters of the
    same story: the story's scene is common to both sides, only the characters differ).
    A group of one contributes no within pair; with no pair of a kind its mean is NaN (and so is
    the margin)."""
    v = np.asarray(vectors, np.float64)
    if v.ndim != 2 or len(v) != len(groups):
        raise ValueError(f"need (N, D) vectors and N groups, got {v.shape} and {len(groups)}")
    n = len(v)
    unit = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    sim = unit @ unit.T
    ids: dict = {}
    labels = np.array([ids.setdefault(g, len(ids)) for g in groups])
    same = labels[:, None] == labels[None, :]
    upper = np.triu(np.ones((n, n), bool), k=1)
    if positions is not None:
        p = np.asarray(positions, np.float64)
        if p.shape != (n, 2):
            raise ValueError(f"positions must be ({n}, 2), got {p.shape}")
        upper &= np.linalg.norm(p[:, None] - p[None, :], axis=-1) >= min_distance
    across = ~same
    if strata is not None:
        if len(strata) != n:
            raise ValueError(f"need {n} strata, got {len(strata)}")
        sid: dict = {}
        st = np.array([sid.setdefault(x, len(sid)) for x in strata])
        across &= st[:, None] == st[None, :]
    w, a = sim[same & upper], sim[across & upper]
    within = float(w.mean()) if w.size else math.nan
    across = float(a.mean()) if a.size else math.nan
    return {"within": within, "across": across, "margin": within - across, "pairs_within": int(w.size),
            "pairs_across": int(a.size)}


def character_scores(images: Sequence, truths: Sequence[dict], *, centre_tol: float = 0.15, tol: float = 60.0,
                     min_fraction: float = 0.25) -> dict:
    """Exact character accuracy of frames against the synthetic generator's truth.

    A character is right when `score_frame` finds its colour over at least `min_fraction` of its
    expected area with the colour centroid within `centre_tol` image widths of its true centre.
    character_accuracy: right characters / all characters; frame_exact: frames where every
    character is right and no other palette colour appears; recall/precision/background as
    score_frame defines them, averaged over frames."""
    from data_pipeline.synth import score_frame

    if len(images) != len(truths):
        raise ValueError(f"{len(images)} images for {len(truths)} truth frames")
    right = total = exact = 0
    recall, precision, centre, background = [], [], [], []
    for img, truth in zip(images, truths):
        s = score_frame(img, truth, tol=tol, min_fraction=min_fraction)
        ok = [e["found"] and e["centre_error"] <= centre_tol for e in s["characters"].values()]
        right += sum(ok)
        total += len(ok)
        exact += int(all(ok) and not s["extra_colours"])
        recall.append(s["recall"])
        precision.append(s["precision"])
        background.append(s["background_ok"])
        centre += [e["centre_error"] for e in s["characters"].values() if e["found"]]
    n = len(truths)
    return {
        "character_accuracy": right / total if total else math.nan,
        "frame_exact": exact / n if n else math.nan,
        "recall": float(np.mean(recall)) if n else math.nan,
        "precision": float(np.mean(precision)) if n else math.nan,
        "background_ok": float(np.mean(background)) if n else math.nan,
        "mean_centre_error": float(np.mean(centre)) if centre else math.nan,
        "frames": n, "characters": total,
    }


def crop_box(image, bbox: Sequence[float], pad: float = 0.25, min_pixels: int = 2):
    """PIL crop of `image` around a [0, 1]-coordinate box (x0, y0, x1, y1), grown by `pad` of its
    size on each side and clamped to the image; never smaller than `min_pixels` a side."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    w, h = img.size
    x0, y0, x1, y1 = bbox
    dx, dy = (x1 - x0) * pad, (y1 - y0) * pad
    left, right = max(0, int(math.floor((x0 - dx) * w))), min(w, int(math.ceil((x1 + dx) * w)))
    top, bottom = max(0, int(math.floor((y0 - dy) * h))), min(h, int(math.ceil((y1 + dy) * h)))
    if right - left < min_pixels:
        left = max(0, min(left, w - min_pixels))
        right = min(w, left + min_pixels)
    if bottom - top < min_pixels:
        top = max(0, min(top, h - min_pixels))
        bottom = min(h, top + min_pixels)
    return img.crop((left, top, right, bottom))


def mean_or_nan(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else math.nan


# ==============================================================================================
# held-out stories
# ==============================================================================================


@dataclasses.dataclass
class EvalStory:
    key: str
    captions: list[str]
    images: list  # PIL RGB images
    truths: Optional[list[dict]] = None  # synthetic ground truth per frame


def load_stories(data, split: str = "val", limit: Optional[int] = None) -> list[EvalStory]:
    """Held-out stories from a StoryStream directory (`seed-story data synth` output: SPLIT.jsonl,
    images/, truth.json when synthetic) or a built ArrayRecord dataset (`seed-story data build`;
    the truth of a synthetic source is picked up from a truth.json beside or above it)."""
    from seed_story_jax.errors import DataError

    root = Path(data)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such data directory")
    jsonl = root / f"{split}.jsonl"
    if jsonl.is_file():
        return _stories_from_jsonl(root, jsonl, limit)
    try:
        from data_pipeline.builder import StorySource, dataset_dir

        dataset_dir(root)
    except DataError:
        raise DataError(f"{root}: neither {split}.jsonl (a StoryStream / synth directory) nor a built dataset "
                        f"with a {split!r} split") from None
    return _stories_from_dataset(root, StorySource(root, split), limit)


def _truth_table(*dirs: Path) -> dict:
    from data_pipeline.synth import load_truth

    for d in dirs:
        if (d / "truth.json").is_file():
            return load_truth(d)
    return {}


def _stories_from_jsonl(root: Path, jsonl: Path, limit) -> list[EvalStory]:
    from data_pipeline.storystream import resolve_image
    from seed_story_jax.errors import DataError
    from seed_story_jax.transforms import load_image

    truth = _truth_table(root)
    out = []
    for line_no, line in enumerate(jsonl.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rels, captions = list(rec["images"]), list(rec["captions"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{jsonl}:{line_no}: not a StoryStream line ({e})") from None
        if len(rels) != len(captions) or len(rels) < 2:
            raise DataError(f"{jsonl}:{line_no}: need >= 2 frames with one caption each")
        images = [load_image(resolve_image(root / "images", r)) for r in rels]
        truths = [truth[r] for r in rels] if truth and all(r in truth for r in rels) else None
        out.append(EvalStory(f"{jsonl.stem}/{rec.get('id', line_no)}", captions, images, truths))
        if limit and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{jsonl}: no stories")
    return out


def _stories_from_dataset(root: Path, source, limit) -> list[EvalStory]:
    from data_pipeline.pipeline import decode_image

    truth = _truth_table(root, root.parent, root.parent.parent)
    out = []
    for i in range(len(source) if not limit else min(limit, len(source))):
        r = source[i]
        truths = [truth[p] for p in r["image_paths"]] if truth and all(p in truth for p in r["image_paths"]) else None
        out.append(EvalStory(r["key"], r["captions"], [decode_image(b) for b in r["images"]], truths))
    return out


def synth_options(data) -> Optional[dict]:
    """The generator options a synthetic set was drawn with (its synth.json), or None."""
    for d in (Path(data), Path(data).parent, Path(data).parent.parent):
        if (d / "synth.json").is_file():
            p = d / "synth.json"
            break
    else:
        return None
    return json.loads(p.read_text()).get("options", {})


def long_synthetic_stories(n: int, frames: int, size: int, seed: int, options: Optional[dict] = None) -> list[EvalStory]:
    """`n` synthetic stories of `frames` frames drawn in memory (for the long-story table): same
    generator (and options) as `seed-story data synth`, a seed the training set did not use."""
    from data_pipeline.synth import SynthOptions, make_story

    opts = SynthOptions.from_dict(options)
    out = []
    for i in range(n):
        images, captions, truths = make_story(seed, i, frames, size, opts)
        out.append(EvalStory(f"long/{seed}/{i}", captions, images, truths))
    return out


# ==============================================================================================
# the model side
# ==============================================================================================


def _int_keys(tree):
    if isinstance(tree, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}
    return tree


def module_from_params(component: str, section_cfg, params: dict):
    """A registry component holding `params` (built abstractly: no random init runs)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, abstract = _abstract_module(component, section_cfg)
    state = jax.tree.map(lambda v: v, abstract, is_leaf=lambda v: isinstance(v, nnx.Variable))  # a fresh tree
    state.replace_by_pure_dict(_int_keys(params), replace_fn=lambda var, x: var.replace(jnp.asarray(x)))
    return nnx.merge(graphdef, state)


@functools.lru_cache(maxsize=16)
def _abstract_module(component: str, section_cfg):
    """(graphdef, abstract state) of a component: tracing a model's construction costs seconds
    (nnx's rng bookkeeping under eval_shape grows with the trace), and the demo loads two
    checkpoints of one config."""
    from flax import nnx

    from seed_story_jax.models import module_for

    mod = module_for(component)
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: mod.build(section_cfg, nnx.Rngs(0)))
    return nnx.split(model)


@dataclasses.dataclass
class Models:
    """The pieces of a checkpoint evaluation needs (built once)."""

    cfg: Any
    params: dict  # component → params tree
    tokenizer: Any
    path: Optional[Path] = None
    _cache: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, ckpt_dir) -> "Models":
        from seed_story_jax.checkpoint import CheckpointError, load_checkpoint
        from seed_story_jax.tokenizer import Tokenizer

        ck = load_checkpoint(ckpt_dir)
        need = [n for n in ("llm", "mllm", "vit") if n not in ck.params]
        if need:
            raise CheckpointError(f"{ckpt_dir}: evaluation needs components {need} (have {sorted(ck.params)})")
        if ck.tokenizer_dir is None:
            raise CheckpointError(f"{ckpt_dir}: no tokenizer/ directory")
        return cls(cfg=ck.config, params=ck.params, tokenizer=Tokenizer.load(ck.tokenizer_dir), path=Path(ckpt_dir))

    def _get(self, name, make):
        if name not in self._cache:
            self._cache[name] = make()
        return self._cache[name]

    @property
    def llm(self):
        return self._get("llm", lambda: module_from_params("llm", self.cfg.llm, self.params["llm"]))

    @property
    def mllm(self):
        return self._get("mllm", lambda: module_from_params("mllm", self.cfg.mllm, self.params["mllm"]))

    @property
    def vit(self):
        return self._get("vit", lambda: module_from_params("vit", self.cfg.vit, self.params["vit"]))

    @property
    def judge(self) -> "Judge":
        return self._get("judge", lambda: Judge(self.vit))

    @property
    def detokenizer(self):
        from seed_story_jax.models.detokenizer import Detokenizer

        return self._get("detokenizer", lambda: Detokenizer(self.cfg, self.params))


class Judge:
    """ViT features of PIL images or uint8 arrays (squash transform at the ViT's size; batches
    padded to a fixed size so the encoder compiles once)."""

    def __init__(self, vit, batch: int = 16):
        from seed_story_jax.story import vit_encoder

        self.cfg = vit.cfg
        self.batch = batch
        self._encode = vit_encoder(vit)  # shares compilations with the story loop's and other judges

    def features(self, images) -> np.ndarray:
        from PIL import Image

        from seed_story_jax.models.vit import encode_batches
        from seed_story_jax.transforms import vit_squash_448

        arrs = [vit_squash_448(im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, np.uint8)),
                               size=self.cfg.image_size) for im in images]
        if not arrs:
            return np.zeros((0, self.cfg.n_queries, self.cfg.output_dim), np.float32)
        return encode_batches(self._encode, arrs, self.batch)


# ------------------------------------------------------------------------------------ teacher forced


def _teacher_forced_run(llm_def, res_def, llm_state, res_state, batch, feats):
    """Per row: (nll sum, tokens, regressed features of the target, has target)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from seed_story_jax.models import mllm as M

    llm, res = nnx.merge(llm_def, llm_state), nnx.merge(res_def, res_state)
    out = M.forward(llm, res, batch["input_ids"], feats, batch["ids_cmp_mask"], batch["embeds_cmp_mask"],
                    batch["ids_gen_mask"], batch["embeds_gen_mask"], max_gen=1)
    lg = out.logits[:, :-1].astype(jnp.float32)
    lab = batch["labels"][:, 1:]
    valid = lab != M.IGNORE
    picked = jnp.take_along_axis(lg, jnp.where(valid, lab, 0)[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, jax.nn.logsumexp(lg, axis=-1) - picked, 0.0).sum(axis=1)
    return nll, valid.sum(axis=1), out.rec[:, 0].astype(jnp.float32), out.gen_valid[:, 0]


@functools.lru_cache(maxsize=None)
def _teacher_forced_jit():
    import jax

    return jax.jit(_teacher_forced_run, static_argnums=(0, 1))


def _teacher_forced_fn(models: Models):
    """jit: (llm state, mllm state, batch, feats) → per-row (nll sum, tokens, regressed features of the
    target, has target). One module-level jit with the graphdefs static: the trained and the
    random-init model (same configs) share its compilation."""
    from flax import nnx

    return models._get("teacher_forced", lambda: functools.partial(
        _teacher_forced_jit(), nnx.split(models.llm)[0], nnx.split(models.mllm)[0]))


def story_samples(story: EvalStory, feats: np.ndarray, tokenizer, cfg) -> list[dict]:
    """The stage-2 samples of one story (g = 0 .. n−2) with their image-feature slots."""
    from data_pipeline.samples import build_sample

    m, n_tok = cfg.mllm.max_images, cfg.mllm.num_img_tokens
    max_len = cfg.data.max_length if cfg.data is not None else 1280
    n = min(len(story.captions), m)
    out = []
    for g in range(n - 1):
        s = build_sample(story.captions[:n], g, tokenizer, num_img_tokens=n_tok, max_length=max_len)
        if s is None:
            continue  # too long for the model's context, as training drops it
        slots = np.zeros((m,) + feats.shape[1:], np.float32)
        slots[: g + 2] = feats[: g + 2]
        cmp = np.zeros(m, bool)
        cmp[: g + 1] = True
        gen = np.zeros(m, bool)
        gen[g + 1] = True
        out.append({"input_ids": s.input_ids, "labels": s.labels, "ids_cmp_mask": s.ids_cmp_mask,
                    "ids_gen_mask": s.ids_gen_mask, "embeds_cmp_mask": cmp, "embeds_gen_mask": gen, "feats": slots})
    return out


def teacher_forced_predictions(models: Models, stories: Sequence[EvalStory], *, batch_size: int = 8,
                               progress: bool = False) -> dict:
    """Every stage-2 sample of the stories, teacher forced (the model sees the true frames before
    each target): nll sum, tokens, samples, and per story {target frame → (regressed, true features)}
    plus the judge's features of all its frames (`features`)."""
    import jax
    from flax import nnx
    from tqdm.auto import tqdm

    samples, owners, features = [], [], []
    for i, st in enumerate(stories):
        feats = models.judge.features(st.images[: models.cfg.mllm.max_images])
        features.append(feats)
        mine = story_samples(st, feats, models.tokenizer, models.cfg)
        samples += mine
        owners += [i] * len(mine)
    out = {"nll": 0.0, "tokens": 0.0, "samples": len(samples), "targets": [{} for _ in stories],
           "features": features}
    if not samples:
        return out
    run = _teacher_forced_fn(models)
    llm_state, res_state = nnx.split(models.llm)[1], nnx.split(models.mllm)[1]
    for start in tqdm(range(0, len(samples), batch_size), desc="eval: teacher forced", disable=not progress,
                      unit="batch"):
        chunk = samples[start:start + batch_size]
        real = len(chunk)
        chunk = chunk + [_blank(chunk[0])] * (batch_size - real)
        batch = {k: np.stack([c[k] for c in chunk]) for k in chunk[0] if k != "feats"}
        feats = np.stack([c["feats"] for c in chunk])
        r_nll, r_tok, r_rec, r_has = jax.device_get(run(llm_state, res_state, batch, feats))
        out["nll"] += float(r_nll[:real].sum())
        out["tokens"] += float(r_tok[:real].sum())
        for i in range(real):
            if r_has[i]:
                t = int(np.argmax(chunk[i]["embeds_gen_mask"]))
                out["targets"][owners[start + i]][t] = (r_rec[i], chunk[i]["feats"][t])
    return out


def teacher_forced(models: Models, stories: Sequence[EvalStory], *, batch_size: int = 8,
                   progress: bool = False) -> dict:
    """Caption CE / perplexity and target-feature cosine over every stage-2 sample of the stories."""
    tf = teacher_forced_predictions(models, stories, batch_size=batch_size, progress=progress)
    if not tf["samples"]:
        return {"text_ce": math.nan, "perplexity": math.nan, "feature_cosine": math.nan, "tokens": 0, "samples": 0}
    pairs = [pair for per_story in tf["targets"] for _, pair in sorted(per_story.items())]
    ce = tf["nll"] / max(tf["tokens"], 1.0)
    out = {"text_ce": ce, "perplexity": perplexity(ce), "tokens": int(tf["tokens"]), "samples": tf["samples"]}
    out.update(_cosines([p for p, _ in pairs], [t for _, t in pairs]))
    return out


def _cosines(pred: Sequence, target: Sequence, means: Optional[tuple] = None) -> dict:
    """feature_cosine: mean per-image cosine (the training objective); feature_cosine_centred: the
    same after subtracting from predictions and targets their mean over the set (or `means`) — the
    part of a frame's features that is not common to every frame, which a model that regresses
    the average frame misses (its centred predictions are zero: cosine 0)."""
    if not len(pred):
        return {"feature_cosine": math.nan, "feature_cosine_centred": math.nan}
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    pm, tm = means if means is not None else (pred.mean(axis=0), target.mean(axis=0))
    return {"feature_cosine": float(np.mean([feature_cosine(p, t) for p, t in zip(pred, target)])),
            "feature_cosine_centred": feature_cosine(pred - pm, target - tm)}


def _blank(like: dict) -> dict:
    """A padding row: no supervised token, no image."""
    out = {k: np.zeros_like(v) for k, v in like.items()}
    out["labels"] = np.full_like(like["labels"], -100)
    return out


# ------------------------------------------------------------------------------------ generated stories


@dataclasses.dataclass
class GeneratedStory:
    """What a story runner returns for one held-out story told from its first frame and captions."""

    frames: Optional[list]  # uint8 (H, W, 3) per generated frame 1 .. F−1 (None: not rendered)
    features: np.ndarray  # (F−1, T, D) regressed features of frames 1 .. F−1
    seconds: float = math.nan
    peak_bytes: float = math.nan


# (stories, cache policy, frames, *, render: bool) → one GeneratedStory per story
StoryRunner = Callable[..., list]


def generated_metrics(models: Models, stories: Sequence[EvalStory], outputs: Sequence[GeneratedStory]) -> dict:
    """Feature cosine against the true frames, character accuracy, style and character consistency
    of generated stories (frames 1 .. F−1 of each; frame 0 is given)."""
    preds, trues, tails, frames_all, truths_all = [], [], [], [], []
    style_v, style_g, char_v, char_g, char_p = [], [], [], [], []
    for st, out in zip(stories, outputs):
        f = len(out.features) + 1
        tf = models.judge.features(st.images[1:f])
        preds += list(out.features)
        trues += list(tf)
        tail = max(1, len(tf) // 5)  # the last fifth of the story: where a cache policy shows
        tails += [len(preds) - tail + i for i in range(tail)]
        if out.frames is None:
            continue
        gf = models.judge.features(out.frames)
        style_v.append(pooled(gf))
        style_g += [st.key] * len(gf)
        if st.truths is not None:
            frames_all += list(out.frames)
            truths_all += st.truths[1:f]
            crops, groups, pos = _character_crops(out.frames, st.truths[1:f], st.key)
            if crops:
                char_v.append(pooled(models.judge.features(crops)))
                char_g += groups
                char_p += pos
    report = _cosines(preds, trues)
    if tails:  # centred on the whole set's means, like the rest
        means = (np.mean(np.asarray(preds, np.float64), axis=0), np.mean(np.asarray(trues, np.float64), axis=0))
        last = _cosines([preds[i] for i in tails], [trues[i] for i in tails], means)
        report["last_frames_feature_cosine"] = last["feature_cosine"]
        report["last_frames_feature_cosine_centred"] = last["feature_cosine_centred"]
    if style_v:
        report["style_consistency"] = consistency(np.concatenate(style_v), style_g)
    if char_v:
        report["character_consistency"] = consistency(np.concatenate(char_v), char_g, char_p, CHAR_MIN_DISTANCE,
                                                      strata=[g[0] for g in char_g])
    if truths_all:
        report["characters"] = character_scores(frames_all, truths_all)
        report["characters"]["chance_accuracy"] = chance_accuracy(frames_all, truths_all)
    secs = [o.seconds for o in outputs]
    report["seconds"] = float(np.sum(secs))
    report["peak_bytes"] = float(np.nanmax([o.peak_bytes for o in outputs])) if outputs else math.nan
    return report


def _character_crops(frames, truths, key) -> tuple[list, list, list]:
    crops, groups, pos = [], [], []
    for img, tr in zip(frames, truths):
        for c in tr["characters"]:
            crops.append(crop_box(img, c["bbox"]))
            groups.append((key, c["name"]))
            pos.append(c["centre"])
    return crops, groups, pos


def chance_accuracy(frames: Sequence, truths: Sequence[dict]) -> float:
    """Character accuracy of the frames against the truths of *other* frames (shifted by half the
    set, so mostly another story's): what a painter gets from its prior alone — the same blobs in
    the usual places — without following the story. Accuracy above it is earned."""
    n = len(truths)
    if n < 2:
        return math.nan
    shift = n // 2
    return character_scores(frames, [truths[(i + shift) % n] for i in range(n)])["character_accuracy"]


def reference_metrics(models: Models, stories: Sequence[EvalStory], frames: int) -> dict:
    """The same consistency and character scores on the true frames: what a perfect painter gets."""
    style_v, style_g, char_v, char_g, char_p, imgs, truths = [], [], [], [], [], [], []
    for st in stories:
        fr = st.images[1:frames]
        style_v.append(pooled(models.judge.features(fr)))
        style_g += [st.key] * len(fr)
        if st.truths is not None:
            imgs += fr
            truths += st.truths[1:frames]
            crops, groups, pos = _character_crops(fr, st.truths[1:frames], st.key)
            char_v.append(pooled(models.judge.features(crops)))
            char_g += groups
            char_p += pos
    out = {"style_consistency": consistency(np.concatenate(style_v), style_g)}
    if char_v:
        out["character_consistency"] = consistency(np.concatenate(char_v), char_g, char_p, CHAR_MIN_DISTANCE,
                                                   strata=[g[0] for g in char_g])
        out["characters"] = character_scores(imgs, truths)
        out["characters"]["chance_accuracy"] = chance_accuracy(imgs, truths)
    return out


# ==============================================================================================
# the whole evaluation
# ==============================================================================================


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    split: str = "val"
    stories: int = 8  # held-out stories for the teacher-forced and generated metrics
    story_frames: int = 10  # frames per generated held-out story
    table_stories: int = 2  # long synthetic stories per Table-2 cell
    table_frames: tuple[int, ...] = TABLE2_FRAMES
    policies: tuple[str, ...] = POLICIES
    table_render: bool = False  # paint Table-2 frames too (character scores; slower)
    policy: str = "multimodal-sink"  # cache policy of the held-out generated stories
    seed: int = 1234  # long synthetic stories: a seed the training set did not use
    table_synth: Optional[dict] = None  # generator options for the long stories, over the held-out set's
    reference_policy: str = "multimodal-sink"  # the long-story table's paired differences are against it
    batch_size: int = 8
    skip_generation: bool = False  # teacher-forced metrics only (no story loop)
    look_stories: int = 0  # synthetic stories of the teacher-forced look margins (looks.py); 0: none
    look_frames: int = 12
    look_synth: Optional[dict] = None  # their generator options, over the held-out set's and looks.DEFAULT_SYNTH


def evaluate(models: Models | str | Path, data, options: EvalOptions = EvalOptions(), *,
             runner: Optional[StoryRunner] = None, progress: bool = True) -> dict:
    """The evaluation report (a JSON-able dict) of a checkpoint on the held-out stories in `data`."""
    models = models if isinstance(models, Models) else Models.load(models)
    t0 = time.perf_counter()
    stories = load_stories(data, options.split, options.stories)
    report: dict = {"checkpoint": str(models.path) if models.path else None, "data": str(data),
                    "split": options.split, "stories": len(stories)}
    report["teacher_forced"] = teacher_forced(models, stories, batch_size=options.batch_size, progress=progress)
    if options.look_stories:
        from seed_story_jax import looks

        synth = {**(synth_options(data) or {}), **looks.DEFAULT_SYNTH, **(options.look_synth or {})}
        report["looks"] = looks.teacher_forced_looks(
            models, stories=options.look_stories, frames=options.look_frames, size=_story_size(stories),
            seed=options.seed, synth=synth, batch_size=options.batch_size, progress=progress)
    if not options.skip_generation:
        runner = runner or default_runner(models, progress=progress)
        frames = min(options.story_frames, min(len(s.captions) for s in stories))
        outs = runner(stories, options.policy, frames, render=True)
        report["generated"] = {"policy": options.policy, "frames": frames,
                               **generated_metrics(models, stories, outs)}
        report["reference"] = reference_metrics(models, stories, frames)
        if options.table_frames and options.policies:
            report["table2"] = table2(models, runner, options, size=_story_size(stories), synth=synth_options(data))
    report["seconds"] = time.perf_counter() - t0
    return report


def _story_size(stories) -> int:
    return int(stories[0].images[0].size[0])


def table2(models: Models, runner: StoryRunner, options: EvalOptions, *, size: int,
           synth: Optional[dict] = None) -> list[dict]:
    """Rows (policy, frames) over long synthetic stories: quality, seconds, peak memory.

    The stories are drawn like the held-out set (`synth`: its generator options) with
    `options.table_synth` laid over (e.g. characters who leave for longer than the cache window
    and come back unnamed-look). Besides all frames and the last fifth, the feature cosine is
    reported on the *return frames* — frames where a character is back after being away — as the
    mean over stories ± its standard error, and, for every policy, the per-story difference from
    `options.reference_policy` on the same frames (mean ± stderr: a paired comparison). The look
    margin on return frames (`return_frames_look_margin`) asks whether the returning characters'
    look, told only before they left, is recalled: centred cosine to the true frame minus that to
    the same frame with them recoloured (`..._of_truth`: what the true features score)."""
    from data_pipeline.synth import SynthOptions

    longest = max(options.table_frames)
    synth = {**(synth or {}), **dict(options.table_synth or {})}
    stories = long_synthetic_stories(options.table_stories, longest, size, options.seed, synth)
    truth_feats = {st.key: models.judge.features(st.images[1:]) for st in stories}
    # Each return frame once more with the returning characters recoloured (same story otherwise):
    # a prediction nearer the true frame than this one carries the look the story told long ago.
    synth_opts = SynthOptions.from_dict(synth)
    recoloured = {st.key: recoloured_features(models.judge, options.seed, i, longest, size, synth_opts,
                                              returning(st.truths)) for i, st in enumerate(stories)}
    rows, per_story = [], {}
    for frames in options.table_frames:
        cut = [_truncate(st, frames) for st in stories]
        truths = [truth_feats[st.key][:frames - 1] for st in cut]
        rcs = [recoloured[st.key] for st in cut]
        # what the true features themselves score (the most a model could): policy-independent
        as_predicted = [GeneratedStory(frames=None, features=t, seconds=0.0, peak_bytes=0.0) for t in truths]
        truth_margin = _mean_stderr("return_frames_look_margin_of_truth", [
            v for v in return_frame_cosines(cut, as_predicted, truths, rcs)["look_margin"] if v is not None])
        for policy in options.policies:
            outs = runner(cut, policy, frames, render=options.table_render)
            m = generated_metrics(models, cut, outs)
            row = {"policy": policy, "frames": frames, "seconds": m["seconds"] / max(1, len(cut)),
                   "seconds_total": m["seconds"], "peak_bytes": m["peak_bytes"],
                   **{k: m[k] for k in ("feature_cosine", "feature_cosine_centred", "last_frames_feature_cosine",
                                        "last_frames_feature_cosine_centred") if k in m}}
            if "characters" in m:
                row["character_accuracy"] = m["characters"]["character_accuracy"]
            ret = return_frame_cosines(cut, outs, truths, rcs)
            per_story[(frames, policy)] = ret
            for name, vals in ret.items():
                row.update(_mean_stderr(f"return_frames_{name}", [v for v in vals if v is not None]))
            row["return_frames"] = int(sum(len(return_frames(st.truths)) for st in cut if st.truths))
            row.update(truth_margin)
            rows.append(row)
    ref = options.reference_policy
    for row in rows:
        base = per_story.get((row["frames"], ref))
        if base is None or row["policy"] == ref:
            continue
        mine = per_story[(row["frames"], row["policy"])]
        for name in mine:
            diffs = [b - a for a, b in zip(mine[name], base[name]) if a is not None and b is not None]
            row.update(_mean_stderr(f"return_frames_{name}_{_slug(ref)}_minus_this", diffs))
    return rows


def recoloured_features(judge, seed: int, index: int, frames: int, size: int, options, names_at: dict) -> dict:
    """Frame t → the judge's features of synthetic story (seed, index)'s frame t with the characters
    `names_at[t]` recoloured (data_pipeline/synth.recoloured_frames)."""
    from data_pipeline.synth import recoloured_frames

    drawn = recoloured_frames(seed, index, frames, size, options, names_at)
    order = sorted(drawn)
    return dict(zip(order, judge.features([drawn[t] for t in order]))) if order else {}


def returning(truths: Optional[Sequence[dict]]) -> dict[int, list[str]]:
    """Frame index → the characters back on stage in it after being away: present in an earlier
    frame, absent from the one before."""
    seen, prev, out = set(), set(), {}
    for t, tr in enumerate(truths or []):
        names = [c["name"] for c in tr["characters"]]
        back = [n for n in names if n in seen and n not in prev]
        if t > 0 and back:
            out[t] = back
        seen |= set(names)
        prev = set(names)
    return out


def staying(truths: Optional[Sequence[dict]]) -> dict[int, list[str]]:
    """Frame index → the characters on stage in it and in the frame before."""
    prev, out = set(), {}
    for t, tr in enumerate(truths or []):
        names = [c["name"] for c in tr["characters"]]
        stay = [n for n in names if n in prev]
        if t > 0 and stay:
            out[t] = stay
        prev = set(names)
    return out


def look_margin(pred, true, recoloured, pred_mean, true_mean) -> float:
    """Centred feature cosine of `pred` to the true frames minus that to the same frames with some
    characters recoloured: > 0 when the prediction carries those characters' look."""
    p = np.asarray(pred, np.float64) - pred_mean
    return feature_cosine(p, np.asarray(true, np.float64) - true_mean) - \
        feature_cosine(p, np.asarray(recoloured, np.float64) - true_mean)


def return_frames(truths: Optional[Sequence[dict]]) -> list[int]:
    """Indices of the frames in which some character is back on stage after being away."""
    return sorted(returning(truths))


def return_frame_cosines(stories: Sequence[EvalStory], outputs: Sequence[GeneratedStory],
                         truth_features: Sequence[np.ndarray],
                         recoloured: Optional[Sequence[dict]] = None) -> dict[str, list]:
    """Per story: mean feature cosine (raw, and centred on the run's means over all frames) of the
    regressed features on its return frames; None for a story without one. With `recoloured`
    (per story: return frame → the judge's features of it with the returning characters in other
    colours) also the look margin: centred cosine to the true frame − to the recoloured one."""
    preds = np.concatenate([np.asarray(o.features, np.float64) for o in outputs])
    trues = np.concatenate([np.asarray(t, np.float64) for t in truth_features])
    pm, tm = preds.mean(axis=0), trues.mean(axis=0)
    out = {"feature_cosine": [], "feature_cosine_centred": []}
    if recoloured is not None:
        out["look_margin"] = []
    for k, (st, gen, tf) in enumerate(zip(stories, outputs, truth_features)):
        frames = return_frames(st.truths)
        if not frames:
            for v in out.values():
                v.append(None)
            continue
        idx = [t - 1 for t in frames]  # frame t is output t − 1
        p, t = np.asarray(gen.features, np.float64)[idx], np.asarray(tf, np.float64)[idx]
        out["feature_cosine"].append(feature_cosine(p, t))
        out["feature_cosine_centred"].append(feature_cosine(p - pm, t - tm))
        if recoloured is not None:
            out["look_margin"].append(look_margin(p, t, np.stack([recoloured[k][f] for f in frames]), pm, tm))
    return out


def _mean_stderr(name: str, xs) -> dict:
    xs = np.asarray(list(xs), np.float64)
    if not xs.size:
        return {name: math.nan, f"{name}_stderr": math.nan, f"{name}_n": 0}
    se = float(xs.std(ddof=1) / math.sqrt(xs.size)) if xs.size > 1 else math.nan
    return {name: float(xs.mean()), f"{name}_stderr": se, f"{name}_n": int(xs.size)}


def _slug(policy: str) -> str:
    return policy.replace("-", "_")


def _truncate(st: EvalStory, frames: int) -> EvalStory:
    return EvalStory(st.key, st.captions[:frames], st.images[:frames], None if st.truths is None else st.truths[:frames])


def default_runner(models: Models, *, progress: bool = False) -> StoryRunner:
    """The story loop (seed_story_jax/story.py) in given-captions mode (story visualisation): each
    story is told from its first frame and caption with captions 1 .. F−1 given; all stories of a
    call go through the loop as one batch. Peak memory is the KV cache's (what the policy changes):
    bytes of the largest cache the loop allocated."""
    from seed_story_jax import story as S

    def run(stories: Sequence[EvalStory], policy: str, frames: int, *, render: bool = True) -> list:
        teller = models._get("teller", lambda: S.StoryTeller(S.StoryModel(
            cfg=models.cfg, llm=models.llm, mllm=models.mllm, tokenizer=models.tokenizer, vit=models.vit,
            detokenizer=models.detokenizer if render else None)))
        if render and teller.model.detokenizer is None:
            teller.model.detokenizer = models.detokenizer
        opts = S.StoryOptions(frames=frames, policy=policy, render="end" if render else "none",
                              render_batch=min(8, len(stories) * (frames - 1)), progress=progress)
        t = time.perf_counter()
        told = teller.tell([st.images[0] for st in stories], [st.captions[0] for st in stories], opts,
                           captions=[st.captions[1:frames] for st in stories])
        seconds = (time.perf_counter() - t) / len(stories)
        out = []
        for st in told:
            gen = st.frames[1:]
            cap = st.meta["cache"]["capacity"]
            out.append(GeneratedStory(frames=[f.image for f in gen] if render else None,
                                      features=np.stack([f.features for f in gen]), seconds=seconds,
                                      peak_bytes=float(kv_cache_bytes(models.cfg.llm, cap, batch=1))))
        return out

    return run


def kv_cache_bytes(llm_cfg, capacity: int, batch: int = 1) -> int:
    """K and V buffers of a cache of `capacity` slots (the model's compute dtype)."""
    from seed_story_jax.nn.params import dtype_of

    item = np.dtype(dtype_of(llm_cfg.dtype)).itemsize
    return 2 * llm_cfg.num_layers * batch * capacity * llm_cfg.num_kv_heads * llm_cfg.resolved_head_dim * item


# ==============================================================================================
# summary
# ==============================================================================================


def _f(x, nd=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def summary_lines(report: dict, baseline: Optional[dict] = None) -> list[str]:
    """Human-readable lines; with `baseline` (e.g. the randomly initialised model) side by side."""
    rows = flat_metrics(report)
    base = flat_metrics(baseline) if baseline else {}
    lines = []
    width = max(len(k) for k in rows) if rows else 10
    head = f"{'metric'.ljust(width)}  {'model':>9}" + (f"  {'random':>9}  better" if baseline else "")
    lines.append(head)
    for k, (v, higher) in rows.items():
        line = f"{k.ljust(width)}  {_f(v):>9}"
        if baseline:
            b = base.get(k, (None, higher))[0]
            better = "" if b is None or v is None or math.isnan(v) or math.isnan(b) else \
                ("yes" if (v > b if higher else v < b) else "NO")
            line += f"  {_f(b):>9}  {better}"
        lines.append(line)
    if report.get("looks"):
        from seed_story_jax import looks

        lines += looks.summary_lines(report["looks"])
    if report.get("table2"):
        lines.append("")
        lines.append("cache policies on long synthetic stories (Table 2 in miniature):")
        lines.append("(feature cosine raw / centred on the set's mean feature; 'last': the last fifth of each story)")
        lines.append(f"{'frames':>6}  {'policy':<16} {'cos':>6} {'centred':>7} {'last':>6} {'last c.':>7} "
                     f"{'char acc':>8} {'s/story':>8} {'KV MB':>6}")
        for r in report["table2"]:
            mb = r["peak_bytes"] / 2**20 if r["peak_bytes"] == r["peak_bytes"] else None
            lines.append(f"{r['frames']:>6}  {r['policy']:<16} {_f(r.get('feature_cosine')):>6} "
                         f"{_f(r.get('feature_cosine_centred')):>7} {_f(r.get('last_frames_feature_cosine')):>6} "
                         f"{_f(r.get('last_frames_feature_cosine_centred')):>7} {_f(r.get('character_accuracy')):>8} "
                         f"{_f(r['seconds'], 1):>8} {_f(mb, 2):>6}")
        rows = [r for r in report["table2"] if r.get("return_frames_feature_cosine_n")]
        if rows:
            ref = next((r["policy"] for r in rows if not any(k.endswith("_minus_this") for k in r)), "reference")
            lines.append("")
            lines.append(f"return frames (a character back after being away; mean over stories ± stderr; "
                         f"Δ: {ref} − this, paired by story):")
            lines.append(f"{'frames':>6}  {'policy':<16} {'cos':>15} {'centred':>15} {'Δ centred':>15} "
                         f"{'look':>15} {'Δ look':>15} {'stories':>7}")
            for r in rows:
                d, dl = (next((k for k in r if k.startswith(f"return_frames_{m}_") and k.endswith("_minus_this")),
                              None) for m in ("feature_cosine_centred", "look_margin"))
                lines.append(f"{r['frames']:>6}  {r['policy']:<16} {_pm(r, 'return_frames_feature_cosine'):>15} "
                             f"{_pm(r, 'return_frames_feature_cosine_centred'):>15} "
                             f"{(_pm(r, d) if d else '—'):>15} {_pm(r, 'return_frames_look_margin'):>15} "
                             f"{(_pm(r, dl) if dl else '—'):>15} {r['return_frames_feature_cosine_n']:>7}")
            truth = rows[0].get("return_frames_look_margin_of_truth")
            lines.append(f"(look: centred cosine to the true return frame − to it with the returning characters "
                         f"recoloured; > 0: the look told long ago is recalled; the true features: {_f(truth)})")
    return lines


def _pm(row: dict, key: str, nd: int = 3) -> str:
    return f"{_f(row.get(key), nd)} ± {_f(row.get(key + '_stderr'), nd)}"


def flat_metrics(report: Optional[dict]) -> dict[str, tuple[Optional[float], bool]]:
    """metric name → (value, higher is better): the numbers a trained model should improve."""
    if not report:
        return {}
    out = {}
    tf = report.get("teacher_forced", {})
    out["text CE (nats)"] = (tf.get("text_ce"), False)
    out["perplexity"] = (tf.get("perplexity"), False)
    out["feature cosine (teacher forced)"] = (tf.get("feature_cosine"), True)
    out["  centred on the mean feature"] = (tf.get("feature_cosine_centred"), True)
    g = report.get("generated")
    if g:
        out["feature cosine (generated story)"] = (g.get("feature_cosine"), True)
        out["  centred on the mean feature "] = (g.get("feature_cosine_centred"), True)
        if "style_consistency" in g:
            out["style consistency margin"] = (g["style_consistency"]["margin"], True)
        if "character_consistency" in g:
            out["character consistency margin"] = (g["character_consistency"]["margin"], True)
        if "characters" in g:
            out["character accuracy"] = (g["characters"]["character_accuracy"], True)
            ch = g["characters"].get("chance_accuracy")
            if ch is not None and not math.isnan(ch):
                out["  above chance (other frames' truth)"] = (g["characters"]["character_accuracy"] - ch, True)
            out["frames exactly right"] = (g["characters"]["frame_exact"], True)
    return out


def write_report(report: dict, path) -> Path:
    from seed_story_jax.atomic import atomic_path

    path = Path(path)
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(_finite(report), indent=2, default=_json_default, allow_nan=False))
    return path


def _finite(x):
    """NaN/inf → None, so the file is strict JSON."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)) and not math.isfinite(float(x)):
        return None
    return x


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
