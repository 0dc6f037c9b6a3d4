"""Long multimodal stories (spec §3): start image + text → text until `<img>` → image tokens →
regressed features → de-tokenizer picture → the features become the next input image → on.

    model = load_story_model(ckpt_dir)
    teller = StoryTeller(model)
    stories = teller.tell([start_image], ["George sees a kite."], StoryOptions(frames=25))
    write_story(stories[0], "out/")

Each frame, with a persistent cache (policies dense / sink / multimodal-sink, `cache.py`):
 1. text: a compiled `while_loop` samples and writes text tokens until a row produces `<img>` (or
    EOS, or `max_text_tokens`); rows that stopped write nothing more. Image tokens are suppressed as
    the original's processor does (mllm.ImageTokenForcing). Given captions skip this: the caption
    is written as one chunk and `<img>` follows.
 2. image, one compiled step: `<img>` + the n `<img_xxxxx>` queries are written as one chunk (what
    the original's forcing produces token by token); their final-norm hidden states go through the
    output resampler (the regressed features); the n query slots are rewound and rewritten with the
    input-resampled features + `</img>` — the image as the next frame's context sees it (the original
    re-encodes the prompt with the regressed features in the image's slots). The logits at `</img>`
    start the next frame's text.
The `window` policy is the released behaviour: every frame re-tokenizes the prompt of the last
`window_images` images (gen_george.py string surgery, "[INST]" separators; vis_george_sink.py id
surgery for captions) and re-encodes it from scratch in a fresh dense cache, feeding the image
tokens one by one as the released generate does (`image_query="decode"`).

Differences from the original, on purpose: text is kept as generated ids (no re-tokenization)
except in `window`; EOS before `<img>` ends the frame's text and the image still follows (the
original would end the story); with captions `<img>` is forced right after the caption (the
original lets the model write text first and then drops it).
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import re
import time
import unicodedata
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seed_story_jax import cache as kvc
from seed_story_jax import generate as gen
from seed_story_jax.models import mllm as agent

INST = "[INST]"


@dataclasses.dataclass(frozen=True)
class StoryOptions:
    frames: int = 25  # images in the story, the given start image included (the original's story_len)
    policy: Optional[str] = None  # dense | window | sink | multimodal-sink (None: the config's cache.policy)
    positions: Optional[str] = None  # shifted | original (None: the config's)
    capacity: Optional[int] = None  # sink policies: slots (None: the config's); dense/window: derived
    max_text_tokens: int = 100  # per frame; `<img>` is forced after this many
    min_text_tokens: int = 0  # `<img>` and EOS are banned before this many (benchmarks: fixed lengths)
    temperature: float = 0.0  # 0: greedy (the original)
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0  # sampling
    render: str = "each"  # each: a picture per frame as it comes | end: all at the end, in batches | none
    render_batch: int = 8
    render_steps: Optional[int] = None  # de-tokenizer steps (None: the config's)
    render_seed: Optional[int] = None  # de-tokenizer noise seed (None: the config's)
    image_query: Optional[str] = None  # chunk | decode (None: decode for window, chunk otherwise)
    progress: bool = True


@dataclasses.dataclass
class Frame:
    text: str  # tags stripped as the original does, "[INST]" separator dropped
    raw_text: str
    token_ids: list
    features: Optional[np.ndarray]  # (T_out, D) regressed features (None for the start frame)
    image: Optional[np.ndarray] = None  # (H, W, 3) uint8
    timings: dict = dataclasses.field(default_factory=dict)
    cache_occupancy: int = 0


@dataclasses.dataclass
class Story:
    frames: list
    meta: dict


def clean_text(text: str) -> str:
    """The original's `re.sub(r'\\s*<[^>]*>\\s*', ' ', text).strip()`."""
    return re.sub(r"\s*<[^>]*>\s*", " ", text).strip()


def display_text(text: str) -> str:
    """The caption as shown: markup and control characters gone (a sampled byte-fallback piece can
    decode to NUL or U+FFFD, which a browser drops and a reader cannot use)."""
    t = clean_text(text)
    t = t[len(INST):].strip() if t.startswith(INST) else t
    t = "".join(c for c in t if c.isspace() or (unicodedata.category(c)[0] != "C" and c != "\ufffd"))
    return " ".join(t.split())


# ------------------------------------------------------------------------------------------- model


@dataclasses.dataclass
class StoryModel:
    cfg: object  # SeedStoryConfig
    llm: nnx.Module
    mllm: nnx.Module
    tokenizer: object
    vit: Optional[nnx.Module] = None
    detokenizer: Optional[object] = None

    @classmethod
    def from_params(cls, cfg, params: dict, tokenizer, where: str = "llm") -> "StoryModel":
        """From parameter trees in memory: "llm" and "mllm" (the agent), "vit" and the de-tokenizer's
        ("detokenizer", "unet", "vae") where present."""
        from seed_story_jax.models import llama, vit
        from seed_story_jax.models.detokenizer import Detokenizer

        with nnx.use_eager_sharding(False):
            res = nnx.eval_shape(lambda: agent.build(cfg.mllm, nnx.Rngs(0)))
        graphdef, state = nnx.split(res)
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params["mllm"]))
        return cls(cfg=cfg, llm=llama.from_params(cfg.llm, params["llm"], where=where), mllm=nnx.merge(graphdef, state),
                   tokenizer=tokenizer, vit=vit.from_params(cfg.vit, params["vit"]) if "vit" in params else None,
                   detokenizer=Detokenizer(cfg, params) if "detokenizer" in params else None)


def load_story_model(ckpt_dir, *, render: bool = True) -> StoryModel:
    """The components a story needs from a checkpoint directory: llm, mllm, tokenizer, vit, and
    (when `render`) the de-tokenizer (detokenizer, unet, vae)."""
    from seed_story_jax.checkpoint import CheckpointError, components_of, load_component, read_config
    from seed_story_jax.models import vit
    from seed_story_jax.models.detokenizer import Detokenizer
    from seed_story_jax.tokenizer import Tokenizer

    cfg = read_config(ckpt_dir)
    need = ["llm", "mllm", "vit"] + (["detokenizer", "unet", "vae"] if render else [])
    have = components_of(ckpt_dir)
    missing = [n for n in need if n not in have or getattr(cfg, n) is None]
    if missing:
        raise CheckpointError(f"{ckpt_dir}: a story needs components {missing} (have {have})")
    if not (Path(ckpt_dir) / "tokenizer").is_dir():
        raise CheckpointError(f"{ckpt_dir}: no tokenizer/ directory")
    model = StoryModel.from_params(cfg, {"llm": load_component(ckpt_dir, "llm"), "mllm": load_component(ckpt_dir, "mllm")},
                                   Tokenizer.load(Path(ckpt_dir) / "tokenizer"), where=f"{ckpt_dir}/params/llm")
    return dataclasses.replace(model, vit=vit.load(ckpt_dir), detokenizer=Detokenizer.load(ckpt_dir) if render else None)


# ------------------------------------------------------------------------------------------- pure steps


@functools.partial(jax.jit, static_argnums=0)
def _vit_forward(graphdef, state, images):
    return nnx.merge(graphdef, state)(images)


def vit_encoder(vit):
    """`encode(images) -> features` of a ViT through one module-level jit, so every teller and judge
    of the same ViT config shares its compilations (`models.vit.make_encoder` compiles afresh for
    each encoder it makes). Same program, same numbers."""
    graphdef, state = nnx.split(vit)
    return functools.partial(_vit_forward, graphdef, state)


def _logits_at_last(llm, hidden, mask):
    last = jnp.maximum(mask.astype(jnp.int32).sum(axis=1) - 1, 0)
    return llm.logits(jnp.take_along_axis(hidden, last[:, None, None], axis=1))[:, 0].astype(jnp.float32)


def prefill(llm_def, llm_state, res_def, res_state, tokens, mask, kinds, feats, slots, cache):
    """A chunk (B, T) through the cache, input images (B, M, T_in, D) merged into its image-token
    slots (kinds == IMG). Returns (next-token logits (B, V) at each row's last real token, cache)."""
    llm, res = nnx.merge(llm_def, llm_state), nnx.merge(res_def, res_state)
    embeds = llm.embed(tokens)
    if feats is not None:
        cmp = mask & (kinds == kvc.IMG)
        embeds = agent.merge_image_embeds(embeds, agent.resample_inputs(res, feats), cmp, slots)
    _, hidden, cache = llm(inputs_embeds=embeds, token_mask=mask, kinds=kinds, cache=cache, compute_logits=False)
    return _logits_at_last(llm, hidden, mask), cache


def text_loop(llm_def, llm_state, logits, last, cache, key, temperature, top_k, top_p, min_new, *,
              max_new: int, greedy: bool, forcing, stops: tuple, vocab: int, pad: int):
    """Sample up to `max_new` text tokens per row, writing each to the cache, until the row picks
    one of `stops` (`<img>`, EOS; not written). Returns (tokens (B, max_new), counts (B,), cache)."""
    llm = nnx.merge(llm_def, llm_state)
    b, v = logits.shape
    stop_ids = jnp.asarray(stops, jnp.int32)

    def pick(logits, last, i):
        logits = forcing(logits, last)
        if vocab < v:  # ids the tokenizer cannot spell
            logits = jnp.where(jnp.arange(v) < vocab, logits, -jnp.inf)
        logits = jnp.where(i < min_new, logits.at[:, stop_ids].set(-jnp.inf), logits)
        return gen.sample_logits(logits, jax.random.fold_in(key, i), temperature, top_k, top_p, greedy=greedy)

    def feed(tok, stop, cache):
        lg, _, cache = llm(tok[:, None], token_mask=~stop[:, None], cache=cache)
        return lg[:, 0].astype(jnp.float32), cache

    def cond(c):
        return (c[0] < max_new) & ~jnp.all(c[-1])

    def body(c):
        i, logits, last, cache, out, count, done = c
        tok = pick(logits, last, i)
        stop = done | jnp.isin(tok, stop_ids)
        out = out.at[:, i].set(jnp.where(stop, pad, tok))
        count = count + (~stop).astype(jnp.int32)
        new, cache = jax.lax.cond(jnp.all(stop), lambda t, s, c: (logits, c), feed, tok, stop, cache)
        logits = jnp.where(stop[:, None], logits, new)
        last = jnp.where(stop, last, tok)
        return i + 1, logits, last, cache, out, count, stop

    init = (jnp.int32(0), logits, last, cache, jnp.full((b, max_new), pad, jnp.int32), jnp.zeros((b,), jnp.int32),
            jnp.zeros((b,), jnp.bool_))
    _, _, _, cache, out, count, _ = jax.lax.while_loop(cond, body, init)
    return out, count, cache


def image_step(llm_def, llm_state, res_def, res_state, cache, *, seq: tuple, query: str, commit: bool):
    """`<img>` + image queries → regressed features (B, T_out, D); with `commit`, the image slots are
    rewritten with the input-resampled features + `</img>`. Returns (features, logits at `</img>`
    (B, V) or None, cache)."""
    llm, res = nnx.merge(llm_def, llm_state), nnx.merge(res_def, res_state)
    b, n = cache.batch, len(seq) - 2
    ids = jnp.broadcast_to(jnp.asarray(seq[:-1], jnp.int32), (b, n + 1))
    kinds = jnp.broadcast_to(jnp.asarray([kvc.BOI] + [kvc.IMG] * n, jnp.int8), (b, n + 1))
    if query == "chunk":
        _, hidden, cache = llm(ids, kinds=kinds, cache=cache, compute_logits=False)
        h = hidden[:, 1:]
    else:  # one token per forward, as the released generate feeds forced tokens

        def one(cache, x):
            _, hid, cache = llm(x[0][:, None], kinds=x[1][:, None], cache=cache, compute_logits=False)
            return cache, hid[:, 0]

        cache, hs = jax.lax.scan(one, cache, (ids.T, kinds.T))
        h = jnp.swapaxes(hs[1:], 0, 1)
    feats = res.output_resampler(h)
    if not commit:
        return feats, None, cache
    cache = kvc.rewind(cache, n)
    embeds = jnp.concatenate([res.input_resampler(feats).astype(llm.dtype),
                              llm.embed(jnp.full((b, 1), seq[-1], jnp.int32))], axis=1)
    kinds = jnp.broadcast_to(jnp.asarray([kvc.IMG] * n + [kvc.EOI], jnp.int8), (b, n + 1))
    _, hidden, cache = llm(inputs_embeds=embeds, kinds=kinds, cache=cache, compute_logits=False)
    return feats, llm.logits(hidden[:, -1]).astype(jnp.float32), cache


# ------------------------------------------------------------------------------------------- driver


def _bucket(n: int, limit: int) -> int:
    b = gen.bucket(n, 16)
    return min(b, limit) if n <= limit else b


class StoryTeller:
    """Tells batches of stories with one model; every step is compiled once per shape and reused
    across frames and calls. `compiles()` reports the compilations of the decode loop's programs;
    JAX caches them per function, so the counts (and the programs) are shared by every teller
    in the process: compare counts before and after a call."""

    def __init__(self, model: StoryModel):
        self.model = model
        self.cfg = model.cfg
        n = self.cfg.mllm.num_img_tokens
        self.tok = model.tokenizer
        self.tokens = agent.ImageTokens.from_tokenizer(self.tok, n)
        self.image_string = "<img>" + "".join(f"<img_{i:05d}>" for i in range(n)) + "</img>"
        self.forcing = agent.ImageTokenForcing(self.tokens, self.cfg.mllm.suppress_mode)
        self.llm_def, self.llm_state = nnx.split(model.llm)
        self.res_def, self.res_state = nnx.split(model.mllm)
        self._prefill = jax.jit(prefill, static_argnums=(0, 2), donate_argnums=(9,))
        self._text = jax.jit(text_loop, static_argnums=(0,), donate_argnums=(4,),
                             static_argnames=("max_new", "greedy", "forcing", "stops", "vocab", "pad"))
        self._image = jax.jit(image_step, static_argnums=(0, 2), donate_argnums=(4,),
                              static_argnames=("seq", "query", "commit"))
        self._uncond = None
        self._enc = self._enc_of = None  # the ViT encoder, made once per ViT

    # -- pieces -----------------------------------------------------------------------------------

    def compiles(self) -> dict:
        return {"text_loop": self._text._cache_size(), "image_step": self._image._cache_size(),
                "prefill": self._prefill._cache_size()}

    def _vit_encoder(self):
        if self._enc_of is not self.model.vit:
            self._enc, self._enc_of = vit_encoder(self.model.vit), self.model.vit
        return self._enc

    def encode_images(self, images: Sequence) -> np.ndarray:
        """PIL images → ViT features (B, T_in, D) (squashed to the ViT's size, as the original)."""
        from seed_story_jax import transforms

        if self.model.vit is None:
            raise ValueError("this StoryModel has no ViT: pass start features instead of images")
        x = np.stack([transforms.vit_squash_448(transforms.to_rgb(im), self.model.vit.cfg.image_size) for im in images])
        enc = self._vit_encoder()
        if self._uncond is None:
            self._uncond = np.asarray(enc(np.zeros_like(x[:1])), np.float32)  # spec §4.4
        return np.asarray(enc(x), np.float32)

    def after_image(self, text: str) -> list[int]:
        """Ids of `text` as it tokenizes right after `</img>` (the original encodes IMG + caption)."""
        ids = self.tok.encode(self.image_string + text)
        seq = list(self.tokens.sequence)
        if ids[:len(seq)] != seq:
            raise ValueError("the tokenizer does not encode the image markup as the image token sequence")
        return ids[len(seq):]

    def _policy(self, o: StoryOptions) -> tuple[str, kvc.CachePolicy, object]:
        from seed_story_jax.config import CacheConfig

        cc = self.cfg.cache or CacheConfig()
        cc = dataclasses.replace(cc, **{k: v for k, v in (("policy", o.policy), ("positions", o.positions),
                                                           ("capacity", o.capacity)) if v is not None})
        cc.validate()
        return cc.policy, kvc.CachePolicy.from_config(cc), cc

    def _chunks(self, rows: list[list[int]], kinds_of, limit: int, min_len: int = 1):
        """Right-padded (tokens, mask, kinds) chunks of at most `limit` covering every row, at least
        `min_len` long (padding is masked: it is never written to the cache nor seen)."""
        longest = max(len(r) for r in rows)
        start = 0
        while start < longest or start == 0:
            part = [r[start:start + limit] for r in rows]
            t = _bucket(max(max(len(p) for p in part), min_len, 1), limit)
            tokens = np.full((len(rows), t), self.tok.pad_id if self.tok.pad_id is not None else 0, np.int32)
            mask = np.zeros((len(rows), t), bool)
            for i, p in enumerate(part):
                tokens[i, :len(p)] = p
                mask[i, :len(p)] = True
            yield tokens, mask, kinds_of(tokens) * mask
            start += limit

    def _run_prefill(self, rows, cache, feats=None, slots=None, min_len: int = 1):
        limit = cache.policy.max_chunk(cache.capacity)
        logits = None
        for tokens, mask, kinds in self._chunks(rows, self.tokens.kinds, limit, min_len):
            if feats is not None and tokens.shape[1] < max(len(r) for r in rows):
                raise ValueError(f"a prompt with images of {max(len(r) for r in rows)} tokens does not fit one "
                                 f"cache chunk ({limit}); enlarge the cache ring (cache.capacity)")
            new, cache = self._prefill(self.llm_def, self.llm_state, self.res_def, self.res_state, tokens, mask,
                                       kinds, feats, slots, cache)
            has = mask.any(axis=1)
            logits = new if logits is None else jnp.where(jnp.asarray(has)[:, None], new, logits)
        return logits, cache

    def _text_frame(self, logits, last, cache, key, frame, o: StoryOptions):
        return self._text(self.llm_def, self.llm_state, logits, jnp.asarray(last, jnp.int32), cache,
                          jax.random.fold_in(key, frame), np.float32(max(o.temperature, 1e-6)), np.int32(o.top_k),
                          np.float32(o.top_p), np.int32(o.min_text_tokens), max_new=o.max_text_tokens,
                          greedy=o.temperature <= 0.0, forcing=self.forcing,
                          stops=(self.tokens.boi, self.tok.eos_id), vocab=min(self.tok.vocab_size, logits.shape[-1]),
                          pad=0)

    # -- the loop ---------------------------------------------------------------------------------

    def tell(self, start, first_texts: Sequence[str], options: StoryOptions = StoryOptions(),
             captions: Optional[Sequence[Sequence[str]]] = None) -> list[Story]:
        """`start`: PIL images or ViT features (B, T_in, D) of the start frames; `first_texts`: their
        captions; `captions[b]`: the texts of frames 1.. (story visualisation), or None (free
        generation). Returns one Story per row."""
        o = options
        if o.frames < 2:
            raise ValueError(f"a story needs at least 2 frames (the start image and one more), got {o.frames}")
        if o.render not in ("each", "end", "none"):
            raise ValueError(f"render must be each, end or none, got {o.render!r}")
        b = len(first_texts)
        if captions is not None:
            if len(captions) != b or any(len(c) < o.frames - 1 for c in captions):
                raise ValueError(f"captions: need {o.frames - 1} per story (frames 1..{o.frames - 1})")
        feats0 = start if isinstance(start, np.ndarray) else self.encode_images(start)
        if feats0.shape[0] != b:
            raise ValueError(f"{feats0.shape[0]} start images for {b} texts")
        policy, pol, cc = self._policy(o)
        query = o.image_query or ("decode" if policy == "window" else "chunk")
        t0 = time.perf_counter()
        if policy == "window":
            frames = self._tell_window(feats0, first_texts, captions, o, cc, query)
        else:
            frames = self._tell_cached(feats0, first_texts, captions, o, pol, cc, query)
        if o.render == "end":
            self._render_all(frames, o)
        total = time.perf_counter() - t0
        stories = []
        for r in range(b):
            fr = [f[r] for f in frames]
            meta = {"policy": policy, "positions": cc.positions, "mode": "captions" if captions else "free",
                    "num_frames": len(fr), "image_query": query, "seed": o.seed, "temperature": o.temperature,
                    "max_text_tokens": o.max_text_tokens, "batch": b, "total_s": total,
                    "cache": {"capacity": self._capacity_used, "sink_tokens": pol.sink_tokens if policy not in
                              ("dense", "window") else 0, "pin_slots": pol.pin_slots, "window_images": cc.window_images}}
            stories.append(Story(frames=fr, meta=meta))
        return stories

    def _start_frames(self, first_texts):
        return [[Frame(text=t, raw_text=t, token_ids=[], features=None) for t in first_texts]]

    def _finish_frame(self, frames, texts, ids, feats, timings, occ, o):
        row = []
        for r in range(len(texts)):
            row.append(Frame(text=display_text(texts[r]), raw_text=texts[r], token_ids=ids[r],
                             features=np.asarray(feats[r]), timings=dict(timings), cache_occupancy=int(occ[r])))
        if o.render == "each":
            t = time.perf_counter()
            imgs = self._render(np.stack([f.features for f in row]), o)
            for f, im in zip(row, imgs):
                f.image = im
                f.timings["render_s"] = time.perf_counter() - t
        frames.append(row)

    def _bar(self, o, total):
        from tqdm import tqdm

        return tqdm(total=total, desc="story", unit="frame", disable=not o.progress)

    def _tell_cached(self, feats0, first_texts, captions, o, pol, cc, query):
        b, n = len(first_texts), len(self.tokens.img)
        rows = [[self.tok.bos_id] + self.tok.encode(t + self.image_string) for t in first_texts]
        cap_ids = None if captions is None else [[self.after_image(c) for c in cs[:o.frames - 1]] for cs in captions]
        cap_len = max((len(c) for cs in cap_ids for c in cs), default=1) if cap_ids else 1
        if pol.kind == "dense":  # capacity: the whole story
            per_frame = [max(len(c[k]) for c in cap_ids) for k in range(o.frames - 1)] if cap_ids \
                else [o.max_text_tokens] * (o.frames - 1)
            need = max(len(r) for r in rows) + sum(per_frame) + (o.frames - 1) * (n + 2)
            capacity = -(-need // 64) * 64
        else:
            capacity = cc.capacity
        self._capacity_used = capacity
        cache = kvc.KVCache.for_model(self.cfg.llm, b, capacity, policy=pol)
        frames = self._start_frames(first_texts)
        logits, cache = self._run_prefill(rows, cache, feats0[:, None], np.ones((b, 1), bool))
        key = jax.random.key(o.seed)
        last = np.full((b,), self.tokens.eoi, np.int32)
        with self._bar(o, o.frames - 1) as bar:
            for k in range(1, o.frames):
                timings = {}
                t = time.perf_counter()
                if cap_ids is not None:  # one chunk length for every caption: one compilation
                    logits, cache = self._run_prefill([c[k - 1] for c in cap_ids], cache, min_len=cap_len)
                    ids = [c[k - 1] for c in cap_ids]
                    jax.block_until_ready(logits)
                else:
                    out, count, cache = self._text_frame(logits, last, cache, key, k, o)
                    out, count = np.asarray(out), np.asarray(count)
                    ids = [out[r, :count[r]].tolist() for r in range(b)]
                timings["text_s"] = time.perf_counter() - t
                t = time.perf_counter()
                feats, logits, cache = self._image(self.llm_def, self.llm_state, self.res_def, self.res_state, cache,
                                                   seq=self.tokens.sequence, query=query, commit=True)
                feats = np.asarray(feats, np.float32)
                timings["image_s"] = time.perf_counter() - t
                timings["text_tokens"] = max(len(i) for i in ids)
                occ = np.asarray(kvc.occupancy(cache))
                texts = [self.tok.decode(i) for i in ids]
                self._finish_frame(frames, texts, ids, feats, timings, occ, o)
                bar.update(1)
                bar.set_postfix(cache=int(occ.max()))
        return frames

    def _tell_window(self, feats0, first_texts, captions, o, cc, query):
        """The released behaviour: re-tokenize and re-encode the last `window_images` images each frame."""
        b, n, w = len(first_texts), len(self.tokens.img), cc.window_images
        images = [[feats0[r]] for r in range(b)]
        if captions is None:
            prompts = [t + self.image_string for t in first_texts]
        else:
            ids_rows = [[self.tok.bos_id] + self.tok.encode(t + self.image_string) for t in first_texts]
        frames = self._start_frames(first_texts)
        key = jax.random.key(o.seed)
        self._capacity_used = 0
        with self._bar(o, o.frames - 1) as bar:
            for k in range(1, o.frames):
                timings = {}
                t = time.perf_counter()
                if captions is None:
                    rows = [[self.tok.bos_id] + self.tok.encode(p) for p in prompts]
                else:
                    ids = [captions[r][k - 1] for r in range(b)]
                    rows = [ids_rows[r] + self.after_image(ids[r]) for r in range(b)]
                bucket = gen.bucket(max(len(r) for r in rows), 16)
                capacity = -(-(bucket + o.max_text_tokens + n + 2) // 64) * 64
                self._capacity_used = max(self._capacity_used, capacity)
                cache = kvc.KVCache.for_model(self.cfg.llm, b, capacity)
                m = w + 1
                feats = np.zeros((b, m) + feats0.shape[1:], np.float32)
                slots = np.zeros((b, m), bool)
                for r in range(b):
                    feats[r, :len(images[r])] = np.stack(images[r])
                    slots[r, :len(images[r])] = True
                logits, cache = self._run_prefill(rows, cache, feats, slots)
                if captions is None:
                    out, count, cache = self._text_frame(logits, np.array([r[-1] for r in rows], np.int32), cache,
                                                         key, k, o)
                    out, count = np.asarray(out), np.asarray(count)
                    ids = [out[r, :count[r]].tolist() for r in range(b)]
                    texts = [self.tok.decode(i) for i in ids]
                else:
                    texts = ids
                    ids = [self.after_image(x) for x in ids]
                timings["text_s"] = time.perf_counter() - t
                t = time.perf_counter()
                new, _, cache = self._image(self.llm_def, self.llm_state, self.res_def, self.res_state, cache,
                                            seq=self.tokens.sequence, query=query, commit=False)
                new = np.asarray(new, np.float32)
                timings["image_s"] = time.perf_counter() - t
                timings["text_tokens"] = max(len(i) for i in ids)
                occ = np.asarray(kvc.occupancy(cache))
                self._finish_frame(frames, texts, ids, new, timings, occ, o)
                for r in range(b):
                    images[r].append(new[r])
                    if captions is None:  # gen_george.py
                        prompts[r] = prompts[r] + clean_text(texts[r]) + self.image_string
                        while len(images[r]) > w:
                            p = prompts[r]
                            prompts[r] = p[p.index("</img>") + len("</img>") + len(INST):]
                            images[r].pop(0)
                    else:  # vis_george_sink.py (generated text dropped, caption k+1 comes with the next frame)
                        ids_rows[r] = rows[r] + list(self.tokens.sequence)
                        while len(images[r]) > w:
                            ids_rows[r] = ids_rows[r][ids_rows[r].index(self.tokens.eoi) + 1:]
                            images[r].pop(0)
                bar.update(1)
        return frames

    # -- pictures ---------------------------------------------------------------------------------

    def _render(self, feats: np.ndarray, o: StoryOptions) -> np.ndarray:
        det = self.model.detokenizer
        if det is None:
            raise ValueError("rendering needs the de-tokenizer (load the model with render=True)")
        if self._uncond is None:  # models.vit.uncond_features: the all-zero normalised image (spec §4.4)
            s = self.model.vit.cfg.image_size
            self._uncond = np.asarray(self._vit_encoder()(np.zeros((1, s, s, 3), np.float32)), np.float32)
        return det.sample(feats, self._uncond, num_steps=o.render_steps, seed=o.render_seed)

    def _render_all(self, frames, o: StoryOptions) -> None:
        """Every generated frame in batches of `render_batch` (the last padded: one compilation)."""
        todo = [f for row in frames[1:] for f in row]
        bs = max(1, min(o.render_batch, len(todo)))
        for s in range(0, len(todo), bs):
            part = todo[s:s + bs]
            x = np.stack([f.features for f in part])
            if len(part) < bs:
                x = np.concatenate([x, np.repeat(x[-1:], bs - len(part), axis=0)])
            t = time.perf_counter()
            imgs = self._render(x, o)
            for f, im in zip(part, imgs):
                f.image = im
                f.timings["render_s"] = (time.perf_counter() - t) / len(part)


# ------------------------------------------------------------------------------------------- outputs


def write_story(story: Story, out_dir, start_image=None, *, overwrite: bool = False) -> Path:
    """OUT/story.json, OUT/frames/NN.png, OUT/storyboard.png, OUT/story.html, written atomically.
    `start_image`: the PIL start picture (frame 0), resized to the generated frames' size."""
    from PIL import Image

    from seed_story_jax.atomic import atomic_path

    frames = story.frames
    size = next((f.image.shape[1], f.image.shape[0]) for f in frames if f.image is not None) \
        if any(f.image is not None for f in frames) else (256, 256)
    out = Path(out_dir)
    with atomic_path(out, directory=True, overwrite=overwrite) as tmp:
        (tmp / "frames").mkdir()
        pictures, listed = [], []
        for i, f in enumerate(frames):
            if i == 0 and start_image is not None:
                im = start_image.convert("RGB").resize(size, Image.BICUBIC)
            elif f.image is not None:
                im = Image.fromarray(np.asarray(f.image, np.uint8))
            else:
                im = None
            name = None
            if im is not None:
                name = f"frames/{i:02d}.png"
                im.save(tmp / name)
            pictures.append(im)
            listed.append({"text": f.text, "image": name, "raw_text": f.raw_text, "tokens": len(f.token_ids),
                           "timings": f.timings, "cache_occupancy": f.cache_occupancy})
        storyboard(pictures, [f.text for f in frames]).save(tmp / "storyboard.png")
        (tmp / "story.html").write_text(_html(listed))
        timings = {k: float(sum(f.timings.get(k, 0.0) for f in frames)) for k in ("text_s", "image_s", "render_s")}
        doc = {"frames": listed, "storyboard": "storyboard.png", "html": "story.html", "timings": timings,
               **story.meta}
        (tmp / "story.json").write_text(json.dumps(doc, indent=2))
    return out


def storyboard(pictures: list, texts: list[str], *, columns: int = 5, cell: int = 192):
    """A grid of the frames with their subtitles under each."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    cols = max(1, min(columns, len(pictures)))
    rows = -(-len(pictures) // cols)
    lines = [textwrap.wrap(t, width=max(8, cell // 7))[:6] for t in texts]
    text_h = 12 * max([len(x) for x in lines] + [1]) + 8
    sheet = Image.new("RGB", (cols * (cell + 8) + 8, rows * (cell + text_h + 8) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (im, ls) in enumerate(zip(pictures, lines)):
        x = 8 + (i % cols) * (cell + 8)
        y = 8 + (i // cols) * (cell + text_h + 8)
        if im is not None:
            sheet.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
        draw.text((x, y + cell + 2), f"{i:02d}", fill="gray", font=font)
        for j, line in enumerate(ls):
            draw.text((x + 22 if j == 0 else x, y + cell + 2 + 12 * j), line, fill="black", font=font)
    return sheet


def _html(frames: list[dict]) -> str:
    cells = []
    for i, f in enumerate(frames):
        img = f'<img src="{html.escape(f["image"])}" alt="frame {i}">' if f["image"] else ""
        cells.append(f'<figure>{img}<figcaption><b>{i:02d}</b> {html.escape(f["text"])}</figcaption></figure>')
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>SEED-Story</title><style>"
            "body{font-family:sans-serif;margin:2em;background:#fafafa}"
            "main{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:1em}"
            "figure{margin:0;background:white;padding:.5em;box-shadow:0 1px 3px #0002}"
            "img{width:100%;image-rendering:pixelated}figcaption{font-size:.9em}</style></head><body>"
            f"<h1>SEED-Story</h1><main>\n{chr(10).join(cells)}\n</main></body></html>\n")
