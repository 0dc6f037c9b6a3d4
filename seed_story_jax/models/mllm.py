"""The SEED-Story agent (spec §2.3–2.7): Llama + Qwen input/output resamplers, the interleaved
image/text embeddings, the CE + cosine training loss, and image-token generation.

Components. A checkpoint keeps the decoder and the resamplers apart: `llm` is the Llama
(`models/llama.py`, LoRA optional) and `mllm` is `AgentResamplers`, the module `build` returns:

    mllm/input_resampler/...    ViT features (N, 256, D) -> (N, 64, D)  into the <img_xxxxx> slots
    mllm/output_resampler/...   hidden states (N, 64, D) -> (N, 256, D)  regressed ViT features

Every function below takes the two modules (or their split graphdef/state) side by side.

Static-shape image layout (the batch of `data_pipeline/pipeline.py`), B rows, L tokens, M slots:
    input_ids, labels (B, L); ids_cmp_mask, ids_gen_mask (B, L) bool
    image features (B, M, T_in, D) (ViT output, computed outside: the ViT is frozen)
    embeds_cmp_mask, embeds_gen_mask (B, M) bool
Within a row, the k-th True slot of embeds_cmp_mask fills the k-th group of `num_img_tokens` True
positions of ids_cmp_mask (row-major, as the original's boolean scatter `E[ids_cmp_mask] =
image_embeds_lm[embeds_cmp_mask]` over a batch whose rows each carry their own images); the k-th
True slot of embeds_gen_mask is the regression target of the k-th group of ids_gen_mask positions.
The matching is done with index arrays computed from the masks (cumsum / stable argsort), so no
shape depends on the data. The original pads and scatters over the whole concatenated batch; the
two agree whenever each row holds as many image groups as images (the sample builder guarantees
it; `check_image_masks` checks a batch on the host).

Numerics that follow the original on purpose: attention is causal only (the original's xformers
path ignores the padding mask; right padding makes this harmless); the regressed features are the
final-RMSNorm hidden states at the *input* positions of the target's <img_xxxxx> tokens; the cosine
loss normalises without an epsilon. Losses run in fp32. Where the original divides by zero (no
supervised token, no target image) the loss term is 0 here.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seed_story_jax import cache as kvc
from seed_story_jax.config import MLLMConfig
from seed_story_jax.models.resamplers import QwenResampler

IGNORE = -100


class AgentResamplers(nnx.Module):
    """Component `mllm`: the agent's two Qwen resamplers (spec §2.3)."""

    def __init__(self, cfg: MLLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.input_resampler = QwenResampler.from_config(cfg.input_resampler, rngs)
        self.output_resampler = QwenResampler.from_config(cfg.output_resampler, rngs)


def build(cfg: MLLMConfig, rngs: nnx.Rngs) -> AgentResamplers:
    return AgentResamplers(cfg, rngs=rngs)


# ------------------------------------------------------------------------------ static-shape matching


def _true_first(mask: jax.Array) -> jax.Array:
    """(B, N) bool → (B, N) indices: the True entries in order, then the rest."""
    return jnp.argsort(jnp.logical_not(mask).astype(jnp.int8), axis=1, stable=True).astype(jnp.int32)


def merge_image_embeds(embeds: jax.Array, image_embeds_lm: jax.Array, ids_cmp_mask: jax.Array,
                       embeds_cmp_mask: jax.Array) -> jax.Array:
    """embeds (B, L, E) with the cmp positions replaced by resampled images (B, M, n, E).

    Position l of row b with rank r among the row's cmp positions takes token r % n of the
    (r // n)-th True slot of embeds_cmp_mask[b]. Positions beyond the row's images keep their
    token embedding (the original would raise on such a batch)."""
    b, m, n, _ = image_embeds_lm.shape
    ids_cmp_mask = ids_cmp_mask.astype(jnp.bool_)
    rank = jnp.cumsum(ids_cmp_mask.astype(jnp.int32), axis=1) - 1
    k, j = rank // n, rank % n
    order = _true_first(embeds_cmp_mask.astype(jnp.bool_))
    n_img = embeds_cmp_mask.astype(jnp.int32).sum(axis=1, keepdims=True)
    slot = jnp.take_along_axis(order, jnp.clip(k, 0, m - 1), axis=1)
    rows = jnp.arange(b)[:, None]
    src = image_embeds_lm[rows, slot, jnp.maximum(j, 0)]  # (B, L, E)
    use = ids_cmp_mask & (k < n_img)
    return jnp.where(use[..., None], src.astype(embeds.dtype), embeds)


def gen_groups(ids_gen_mask: jax.Array, embeds_gen_mask: jax.Array, n: int, max_gen: int):
    """Index arrays of the first `max_gen` target images per row.

    Returns positions (B, G, n) of each group's n hidden states, slots (B, G) of the matching
    target images, and valid (B, G): the row has that group and that image."""
    b, length = ids_gen_mask.shape
    m = embeds_gen_mask.shape[1]
    ids_gen_mask = ids_gen_mask.astype(jnp.bool_)
    embeds_gen_mask = embeds_gen_mask.astype(jnp.bool_)
    pos = _true_first(ids_gen_mask)
    need = max_gen * n
    if need > length:
        pos = jnp.pad(pos, ((0, 0), (0, need - length)))
    pos = pos[:, :need].reshape(b, max_gen, n)
    slots = _true_first(embeds_gen_mask)
    if max_gen > m:
        slots = jnp.pad(slots, ((0, 0), (0, max_gen - m)))
    slots = slots[:, :max_gen]
    g = jnp.arange(max_gen)[None, :]
    n_groups = ids_gen_mask.astype(jnp.int32).sum(axis=1, keepdims=True) // n
    n_imgs = embeds_gen_mask.astype(jnp.int32).sum(axis=1, keepdims=True)
    valid = (g < n_groups) & (g < n_imgs)
    return pos, slots, valid


def check_image_masks(batch: dict, num_img_tokens: int) -> None:
    """Host-side check that every row has one group of `num_img_tokens` cmp (gen) positions per
    cmp (gen) image slot; raises DataError naming the row."""
    from seed_story_jax.errors import DataError

    for ids_key, emb_key in (("ids_cmp_mask", "embeds_cmp_mask"), ("ids_gen_mask", "embeds_gen_mask")):
        pos = np.asarray(batch[ids_key]).sum(axis=1)
        imgs = np.asarray(batch[emb_key]).sum(axis=1)
        bad = np.flatnonzero(pos != imgs * num_img_tokens)
        if bad.size:
            r = int(bad[0])
            raise DataError(f"row {r}: {int(pos[r])} {ids_key} positions for {int(imgs[r])} {emb_key} images "
                            f"of {num_img_tokens} tokens")


# ------------------------------------------------------------------------------ forward and loss


def resample_inputs(mllm: AgentResamplers, image_feats: jax.Array) -> jax.Array:
    """(B, M, T_in, D) ViT features → (B, M, n, E) input embeddings of every slot."""
    b, m = image_feats.shape[:2]
    out = mllm.input_resampler(image_feats.reshape((b * m,) + image_feats.shape[2:]))
    return out.reshape((b, m) + out.shape[1:])


def input_embeddings(llm, mllm: AgentResamplers, input_ids, image_feats=None, ids_cmp_mask=None,
                     embeds_cmp_mask=None) -> jax.Array:
    """Token embeddings with the input images merged into their slots (spec §2.6 steps 2–4)."""
    embeds = llm.embed(input_ids)
    if image_feats is None:
        return embeds
    return merge_image_embeds(embeds, resample_inputs(mllm, image_feats), ids_cmp_mask, embeds_cmp_mask)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ForwardOutput:
    logits: jax.Array  # (B, L, V)
    hidden: jax.Array  # (B, L, E) final-norm hidden states
    rec: Optional[jax.Array] = None  # (B, G, T_out, E) regressed features of each target group
    target: Optional[jax.Array] = None  # (B, G, T_in, D) the targets' ViT features
    gen_valid: Optional[jax.Array] = None  # (B, G) bool


def forward(llm, mllm: AgentResamplers, input_ids, image_feats, ids_cmp_mask, embeds_cmp_mask,
            ids_gen_mask=None, embeds_gen_mask=None, *, max_gen: int = 1,
            dropout_key: Optional[jax.Array] = None) -> ForwardOutput:
    """Spec §2.6 steps 1–6 with static shapes; `max_gen` target images per row are regressed."""
    embeds = input_embeddings(llm, mllm, input_ids, image_feats, ids_cmp_mask, embeds_cmp_mask)
    logits, hidden, _ = llm(inputs_embeds=embeds, dropout_key=dropout_key)
    out = ForwardOutput(logits=logits, hidden=hidden)
    if ids_gen_mask is None:
        return out
    n = mllm.cfg.num_img_tokens
    pos, slots, valid = gen_groups(ids_gen_mask, embeds_gen_mask, n, max_gen)
    b, g = slots.shape
    h = jnp.take_along_axis(hidden, pos.reshape(b, g * n)[..., None], axis=1).reshape(b * g, n, -1)
    rec = mllm.output_resampler(h)
    out.rec = rec.reshape((b, g) + rec.shape[1:])
    out.target = jax.lax.stop_gradient(image_feats[jnp.arange(b)[:, None], slots])
    out.gen_valid = valid
    return out


def lm_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Shift-by-one CE (fp32), mean over the batch's labels != -100; (loss, number of tokens)."""
    lg = logits[:, :-1].astype(jnp.float32)
    lab = labels[:, 1:]
    valid = lab != IGNORE
    picked = jnp.take_along_axis(lg, jnp.where(valid, lab, 0)[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(lg, axis=-1) - picked
    count = valid.sum()
    return jnp.where(valid, nll, 0.0).sum() / jnp.maximum(count, 1), count


def cosine_loss(rec: jax.Array, target: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """mean over the valid groups' tokens of 1 − cos(rec_t, target_t) (channel axis), fp32, no
    epsilon (as the original); (loss, number of images). Invalid groups are replaced by ones
    before normalising so their (masked) gradient is finite."""
    v = valid[:, :, None, None]
    r = jnp.where(v, rec.astype(jnp.float32), 1.0)
    t = jnp.where(v, target.astype(jnp.float32), 1.0)
    r = r / jnp.linalg.norm(r, axis=-1, keepdims=True)
    t = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
    per = 1.0 - jnp.sum(r * t, axis=-1)  # (B, G, T)
    n_img = valid.sum()
    total = jnp.where(valid[..., None], per, 0.0).sum()
    return total / jnp.maximum(n_img * per.shape[-1], 1), n_img


def loss_fn(llm, mllm: AgentResamplers, batch: dict, image_feats: jax.Array, *, max_gen: Optional[int] = None,
            dropout_key: Optional[jax.Array] = None):
    """Stage-2 objective (spec §2.6): lm_loss_scale·CE + rec_loss_scale·cosine.

    batch: input_ids, labels, ids_cmp_mask, ids_gen_mask (B, L); embeds_cmp_mask, embeds_gen_mask
    (B, M). image_feats (B, M, T, D): ViT features of every slot. `max_gen` (default
    cfg.max_gen_images) target images per row are regressed. Returns (total, metrics)."""
    cfg = mllm.cfg
    max_gen = cfg.max_gen_images if max_gen is None else max_gen
    out = forward(llm, mllm, batch["input_ids"], image_feats, batch["ids_cmp_mask"], batch["embeds_cmp_mask"],
                  batch["ids_gen_mask"], batch["embeds_gen_mask"], max_gen=max_gen, dropout_key=dropout_key)
    return losses(out, batch["labels"], cfg)


def losses(out: ForwardOutput, labels: jax.Array, cfg: MLLMConfig):
    """(total, metrics) of a forward output: the two terms, their scaled sum and their counts."""
    ce, n_tok = lm_loss(out.logits, labels)
    rec, n_img = cosine_loss(out.rec, out.target, out.gen_valid)
    total = cfg.lm_loss_scale * ce + cfg.rec_loss_scale * rec
    return total, {"total_loss": total, "lm_loss": ce, "rec_loss": rec, "lm_tokens": n_tok, "gen_images": n_img}


# ------------------------------------------------------------------------------ image tokens


@dataclasses.dataclass(frozen=True)
class ImageTokens:
    """Ids of `<img>`, the first n `<img_xxxxx>` and `</img>`, read from a tokenizer."""

    boi: int
    eoi: int
    img: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tokenizer, num_img_tokens: int) -> "ImageTokens":
        """Encodes "<img><img_00000>…</img>" as the original's processor does; each must be one token."""
        text = "<img>" + "".join(f"<img_{i:05d}>" for i in range(num_img_tokens)) + "</img>"
        ids = [int(i) for i in tokenizer.encode(text)]
        if len(ids) != num_img_tokens + 2 or len(set(ids)) != len(ids):
            raise ValueError(f"tokenizer encodes the {num_img_tokens}-token image markup as {len(ids)} ids "
                             f"(expected {num_img_tokens + 2} distinct ones): does it have the image tokens?")
        return cls(boi=ids[0], eoi=ids[-1], img=tuple(ids[1:-1]))

    @property
    def sequence(self) -> tuple[int, ...]:
        return (self.boi,) + self.img + (self.eoi,)

    def kinds(self, tokens: np.ndarray) -> np.ndarray:
        """Cache slot kinds (cache.TEXT/BOI/IMG/EOI) of a token array."""
        k = np.full(np.shape(tokens), kvc.TEXT, np.int8)
        k[np.isin(tokens, self.img)] = kvc.IMG
        k[np.asarray(tokens) == self.boi] = kvc.BOI
        k[np.asarray(tokens) == self.eoi] = kvc.EOI
        return k

    def cmp_mask(self, tokens: np.ndarray) -> np.ndarray:
        """(B, P) bool: the positions strictly inside every complete `<img>` … `</img>` pair."""
        tokens = np.asarray(tokens)
        out = np.zeros(tokens.shape, bool)
        for r, row in enumerate(tokens):
            open_at = None
            for p, t in enumerate(row):
                if t == self.boi:
                    open_at = p
                elif t == self.eoi and open_at is not None:
                    out[r, open_at + 1:p] = True
                    open_at = None
        return out


@dataclasses.dataclass(frozen=True)
class ImageTokenForcing:
    """The original's AutoImageTokenGenerationProcessor as a pure jnp logits processor (spec §2.7).

    After `<img>` or an `<img_k>` the next token of `<img> <img_0> … <img_{n-1}> </img>` gets
    max(logits) + 10; otherwise the n image tokens and `</img>` get 0.0 (`zero`, the original's
    rule: not a ban, a negative-logit model can still pick them) or −inf (`neg_inf`). Hashable by
    value, so equal processors share compilations."""

    tokens: ImageTokens
    suppress_mode: str = "zero"

    def __post_init__(self):
        if self.suppress_mode not in ("zero", "neg_inf"):
            raise ValueError(f"suppress_mode must be 'zero' or 'neg_inf', got {self.suppress_mode!r}")

    def __call__(self, logits: jax.Array, last: jax.Array, generated=None, step=None) -> jax.Array:
        seq = jnp.asarray(self.tokens.sequence, jnp.int32)
        match = last[:, None] == seq[None, :-1]  # (B, n + 1)
        in_image = match.any(axis=1)
        nxt = seq[jnp.argmax(match, axis=1) + 1]
        rows = jnp.arange(logits.shape[0])
        forced = logits.at[rows, nxt].set(logits.max(axis=-1) + 10.0)
        fill = 0.0 if self.suppress_mode == "zero" else -jnp.inf
        suppressed = logits.at[:, seq[1:]].set(fill)
        return jnp.where(in_image[:, None], forced, suppressed)


@dataclasses.dataclass(frozen=True)
class ImageFeatureCapture:
    """Decode-loop observer: keeps the final-norm hidden states of the last n decoded *inputs* in a
    ring and snapshots them when `</img>` is produced — the original's read-back of positions
    [e − n, e) before the last `</img>` e of the generated ids — without leaving the compiled loop."""

    eoi: int
    n: int

    def init(self, batch: int, hidden_size: int, dtype=jnp.float32) -> dict:
        z = jnp.zeros((batch, self.n, hidden_size), dtype)
        return {"ring": z, "feats": z, "pushed": jnp.zeros((), jnp.int32), "has": jnp.zeros((batch,), jnp.bool_)}

    def __call__(self, obs: dict, token_in, hidden_in, token_out, step) -> dict:
        p = obs["pushed"] % self.n
        ring = jax.lax.dynamic_update_index_in_dim(obs["ring"], hidden_in.astype(obs["ring"].dtype), p, axis=1)
        ordered = jnp.take(ring, (p + 1 + jnp.arange(self.n)) % self.n, axis=1)  # oldest first
        hit = token_out == self.eoi
        return {"ring": ring, "feats": jnp.where(hit[:, None, None], ordered, obs["feats"]),
                "pushed": obs["pushed"] + 1, "has": obs["has"] | hit}


# ------------------------------------------------------------------------------ generation (spec §2.7)


def prefill(llm_def, llm_state, res_def, res_state, tokens, lengths, kinds, ids_cmp_mask, image_feats,
            embeds_cmp_mask, cache):
    """Prompt (B, P) right-padded, input images merged into their slots, through the cache.
    Returns (next-token logits (B, V) f32 at each row's last token, hidden (B, P, E), cache)."""
    llm, mllm = nnx.merge(llm_def, llm_state), nnx.merge(res_def, res_state)
    embeds = input_embeddings(llm, mllm, tokens, image_feats, ids_cmp_mask, embeds_cmp_mask)
    mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    _, hidden, cache = llm(inputs_embeds=embeds, token_mask=mask, kinds=kinds, cache=cache, compute_logits=False)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)
    return llm.logits(last)[:, 0].astype(jnp.float32), hidden, cache


def decode(llm_def, llm_state, res_def, res_state, logits, last, cache, key, temperature, top_k, top_p, eos, pad, *,
           max_new: int, greedy: bool, processor, capture: ImageFeatureCapture):
    """The compiled decode loop with image-token forcing and the feature read-back inside it.
    Returns (tokens (B, N), counts (B,), cache, features (B, T_out, E) (zeros without an image),
    has_image (B,))."""
    from seed_story_jax import generate as gen

    mllm = nnx.merge(res_def, res_state)
    width = mllm.output_resampler.embed_dim
    obs = capture.init(logits.shape[0], width, jnp.float32)
    out, count, cache, obs = gen.decode_loop(llm_def, llm_state, logits, last, cache, key, temperature, top_k, top_p,
                                             eos, pad, max_new=max_new, greedy=greedy, processor=processor,
                                             observer=capture, obs=obs)
    feats = mllm.output_resampler(obs["feats"])
    feats = jnp.where(obs["has"][:, None, None], feats, jnp.zeros_like(feats))
    return out, count, cache, feats, obs["has"]


@dataclasses.dataclass
class AgentOutput:
    tokens: np.ndarray  # (B, max_new_tokens), pad after EOS
    num_generated: np.ndarray  # (B,)
    features: np.ndarray  # (B, T_out, E) regressed features of the last generated image (zeros if none)
    has_image: np.ndarray  # (B,) bool: a `</img>` was generated
    prompt_lengths: np.ndarray


class AgentGenerator:
    """Prompt (text + input images) → tokens with image-token forcing → regressed image features.

        g = AgentGenerator(llm, mllm, ImageTokens.from_tokenizer(tok, cfg.num_img_tokens))
        out = g.generate([ids], images=[feats (k, T_in, D)], options=GenerateOptions(...))

    `images[b]` holds the features of the input images of row b in order (ViT features, or regressed
    features fed back); they fill the complete `<img>` … `</img>` groups of the prompt. Params are
    split once; prefill and decode are each compiled once per (batch, prompt bucket, capacity)."""

    def __init__(self, llm, mllm: AgentResamplers, tokens: ImageTokens, *, suppress_mode: Optional[str] = None,
                 cache_dtype=None, min_bucket: int = 16):
        from seed_story_jax import generate as gen

        self.cfg = mllm.cfg
        if len(tokens.img) != self.cfg.num_img_tokens:
            raise ValueError(f"{len(tokens.img)} image token ids for num_img_tokens={self.cfg.num_img_tokens}")
        self.llm_cfg = llm.cfg
        self.tokens = tokens
        self.processor = ImageTokenForcing(tokens, suppress_mode or self.cfg.suppress_mode)
        self.capture = ImageFeatureCapture(eoi=tokens.eoi, n=self.cfg.num_img_tokens)
        self.llm_def, self.llm_state = nnx.split(llm)
        self.res_def, self.res_state = nnx.split(mllm)
        self.cache_dtype = cache_dtype
        self.min_bucket = min_bucket
        self._gen = gen
        self._prefill = jax.jit(prefill, static_argnums=(0, 2), donate_argnums=10)
        self._decode = jax.jit(decode, static_argnums=(0, 2), donate_argnums=6,
                               static_argnames=("max_new", "greedy", "processor", "capture"))

    def new_cache(self, batch: int, capacity: int) -> kvc.KVCache:
        return kvc.KVCache.for_model(self.llm_cfg, batch, capacity, self.cache_dtype)

    def prepare(self, prompts: Sequence[Sequence[int]], images: Optional[Sequence] = None, pad: int = 0) -> dict:
        """Host-side static-shape inputs: tokens (B, P bucket), lengths, kinds, ids_cmp_mask,
        image features (B, M, T_in, D) and embeds_cmp_mask (B, M)."""
        lengths = np.array([len(p) for p in prompts], np.int32)
        if (lengths < 1).any():
            raise ValueError("every prompt needs at least one token (e.g. BOS)")
        p = self._gen.bucket(int(lengths.max()), self.min_bucket)
        tokens = np.full((len(prompts), p), pad, np.int32)
        for i, ids in enumerate(prompts):
            tokens[i, : len(ids)] = ids
        cmp = self.tokens.cmp_mask(tokens)
        cmp &= np.arange(p)[None, :] < lengths[:, None]
        m, rcfg = self.cfg.max_images, self.cfg.input_resampler
        feats = np.zeros((len(prompts), m, rcfg.input_tokens, rcfg.kv_dim), np.float32)
        slots = np.zeros((len(prompts), m), bool)
        n = self.cfg.num_img_tokens
        for b in range(len(prompts)):
            imgs = [] if images is None or images[b] is None else list(images[b])
            groups, rem = divmod(int(cmp[b].sum()), n)
            if rem or groups != len(imgs):
                raise ValueError(f"prompt {b}: {len(imgs)} input images for {cmp[b].sum()} image-token positions "
                                 f"(need {n} per complete <img>…</img> group)")
            if len(imgs) > m:
                raise ValueError(f"prompt {b}: {len(imgs)} input images > mllm.max_images ({m})")
            for k, f in enumerate(imgs):
                feats[b, k] = np.asarray(f, np.float32)
                slots[b, k] = True
        return {"tokens": tokens, "lengths": lengths, "kinds": self.tokens.kinds(tokens), "ids_cmp_mask": cmp,
                "image_feats": feats, "embeds_cmp_mask": slots}

    def prefill(self, inputs: dict, cache: kvc.KVCache):
        a = {k: jnp.asarray(v) for k, v in inputs.items()}
        return self._prefill(self.llm_def, self.llm_state, self.res_def, self.res_state, a["tokens"], a["lengths"],
                             a["kinds"], a["ids_cmp_mask"], a["image_feats"], a["embeds_cmp_mask"], cache)

    def decode(self, logits, last, cache, options):
        o = options
        eos = () if o.eos_token_id is None else (
            tuple(o.eos_token_id) if isinstance(o.eos_token_id, (tuple, list)) else (o.eos_token_id,))
        return self._decode(
            self.llm_def, self.llm_state, self.res_def, self.res_state, logits, jnp.asarray(last, jnp.int32), cache,
            jax.random.key(o.seed), jnp.float32(max(o.temperature, 1e-6)), jnp.int32(o.top_k), jnp.float32(o.top_p),
            jnp.asarray(eos or (-1,), jnp.int32), jnp.int32(o.pad_token_id),
            max_new=o.max_new_tokens, greedy=o.temperature <= 0.0, processor=self.processor, capture=self.capture)

    def generate(self, prompts: Sequence[Sequence[int]], images: Optional[Sequence] = None, options=None, *,
                 capacity: Optional[int] = None) -> AgentOutput:
        options = options or self._gen.GenerateOptions()
        inputs = self.prepare(prompts, images, options.pad_token_id)
        tokens, lengths = inputs["tokens"], inputs["lengths"]
        cap = capacity or self._gen.cache_capacity(tokens.shape[1], options.max_new_tokens)
        if int(lengths.max()) + options.max_new_tokens > cap:
            raise ValueError(f"cache capacity {cap} < prompt {int(lengths.max())} + "
                             f"{options.max_new_tokens} new tokens")
        logits, _, cache = self.prefill(inputs, self.new_cache(len(prompts), cap))
        last = tokens[np.arange(len(prompts)), lengths - 1]
        out, count, _, feats, has = self.decode(logits, last, cache, options)
        return AgentOutput(tokens=np.asarray(out), num_generated=np.asarray(count), features=np.asarray(feats),
                           has_image=np.asarray(has), prompt_lengths=lengths)
