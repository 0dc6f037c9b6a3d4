"""Token decoding under jit: bucketed prefill, then a compiled decode loop over a static KV cache.

    gen = Generator(model)                       # nnx.split once; jitted functions are cached here
    out = gen.generate([[1, 450, 4996], [1, 20]], GenerateOptions(max_new_tokens=32))
    out.tokens  (B, max_new_tokens) int32, pad after EOS;  out.num_generated (B,)

The prompt is right-padded to a bucket length and the cache capacity is derived from (bucket,
max_new_tokens), so prompts of different lengths share compilations. Decoding runs in one
`lax.while_loop` (no host round trip per token) that stops when every row has emitted EOS;
`Generator.step` is the same one-token step as a jitted function with a donated cache, for callers
that interleave decoding with other work (the story loop).

A logits processor is a pure jnp function `processor(logits, last_token, generated, step) -> logits`
(logits (B, V) f32, last_token (B,), generated (B, max_new) so far, step scalar) applied inside the
compiled step before sampling; it is part of the compilation key, so pass the same function object.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from seed_story_jax import cache as kvc

LogitsProcessor = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
Observer = Callable  # (obs, token_in, hidden_in, token_out, step) -> obs; see decode_loop


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    eos_token_id: Optional[int | tuple[int, ...]] = 2  # None: never stop early
    pad_token_id: int = 0
    seed: int = 0


@dataclasses.dataclass
class GenerateOutput:
    tokens: np.ndarray  # (B, max_new_tokens), pad after EOS
    num_generated: np.ndarray  # (B,) tokens up to and including EOS
    prompt_lengths: np.ndarray


def bucket(n: int, minimum: int = 16) -> int:
    """Next power of two ≥ n (at least `minimum`): prompt lengths share compilations."""
    b = minimum
    while b < n:
        b *= 2
    return b


def cache_capacity(prompt_bucket: int, max_new_tokens: int, multiple: int = 64) -> int:
    n = prompt_bucket + max_new_tokens
    return -(-n // multiple) * multiple


# ------------------------------------------------------------------------------ sampling


def sample_logits(logits: jax.Array, key: jax.Array, temperature, top_k, top_p, *, greedy: bool) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus) on (B, V) logits; argmax when greedy.
    temperature/top_k/top_p may be traced, so changing them does not recompile."""
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    v = logits.shape[-1]
    logits = logits / temperature
    desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v).astype(jnp.int32)
    ranks = jnp.arange(v)
    desc = jnp.where(ranks < k, desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the better-ranked tokens
    keep = (ranks < k) & ((before < top_p) | (ranks == 0))
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------------------ pure steps


def prefill(graphdef, state, tokens, lengths, cache):
    """tokens (B, P) right-padded, lengths (B,) → (logits at each row's last token (B, V) f32,
    final-norm hidden (B, P, E), cache)."""
    model = nnx.merge(graphdef, state)
    p = tokens.shape[1]
    mask = jnp.arange(p)[None, :] < lengths[:, None]
    _, hidden, cache = model(tokens, token_mask=mask, cache=cache, compute_logits=False)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)
    return model.logits(last)[:, 0].astype(jnp.float32), hidden, cache


def step(graphdef, state, token, cache):
    """One token per row (B,) → (logits (B, V) f32, hidden (B, E), cache)."""
    model = nnx.merge(graphdef, state)
    logits, hidden, cache = model(token[:, None], cache=cache)
    return logits[:, 0].astype(jnp.float32), hidden[:, 0], cache


def decode_loop(graphdef, state, logits, last, cache, key, temperature, top_k, top_p, eos, pad, *,
                max_new: int, greedy: bool, processor: Optional[LogitsProcessor],
                observer: Optional[Observer] = None, obs=None):
    """Sample max_new tokens starting from `logits` (the prompt's next-token logits).

    With an `observer`, its state `obs` (a pytree) rides in the loop carry: after each step,
    `obs = observer(obs, token_in (B,), hidden_in (B, E), token_out (B,), i)` sees the token fed,
    its final-norm hidden state and the token recorded from it (pad once a row is done), and the
    result is (tokens, counts, cache, obs) instead of (tokens, counts, cache)."""
    b = logits.shape[0]

    def pick(logits, last, out, i):
        if processor is not None:
            logits = processor(logits, last, out, i)
        return sample_logits(logits, jax.random.fold_in(key, i), temperature, top_k, top_p, greedy=greedy)

    def record(tok, out, done, count, i):
        tok = jnp.where(done, pad, tok)
        out = out.at[:, i].set(tok)
        count = count + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, eos)
        return tok, out, done, count

    out = jnp.full((b, max_new), pad, jnp.int32)
    done = jnp.zeros((b,), jnp.bool_)
    count = jnp.zeros((b,), jnp.int32)
    tok = pick(logits, last, out, jnp.int32(0))
    tok, out, done, count = record(tok, out, done, count, 0)

    def cond(c):
        i, _, _, _, done, _, _ = c
        return (i < max_new) & ~jnp.all(done)

    def body(c):
        i, tok, cache, out, done, count, obs = c
        logits, hidden, cache = step(graphdef, state, tok, cache)
        nxt = pick(logits, tok, out, i)
        nxt, out, done, count = record(nxt, out, done, count, i)
        if observer is not None:
            obs = observer(obs, tok, hidden, nxt, i)
        return i + 1, nxt, cache, out, done, count, obs

    _, _, cache, out, _, count, obs = jax.lax.while_loop(
        cond, body, (jnp.int32(1), tok, cache, out, done, count, obs))
    return (out, count, cache) if observer is None else (out, count, cache, obs)


# ------------------------------------------------------------------------------ driver


class Generator:
    """Jitted prefill / step / decode loop for one model. Params are split once at construction;
    call `refresh(model)` after changing the model's params."""

    def __init__(self, model: nnx.Module, *, processor: Optional[LogitsProcessor] = None,
                 cache_dtype=None, min_bucket: int = 16):
        self.graphdef, self.state = nnx.split(model)
        self.cfg = model.cfg
        self.processor = processor
        self.cache_dtype = cache_dtype
        self.min_bucket = min_bucket
        self._prefill = jax.jit(prefill, static_argnums=0, donate_argnums=4)
        self._step = jax.jit(step, static_argnums=0, donate_argnums=3)
        self._loop = jax.jit(decode_loop, static_argnums=0, donate_argnums=4,
                             static_argnames=("max_new", "greedy", "processor"))

    def refresh(self, model: nnx.Module) -> None:
        self.graphdef, self.state = nnx.split(model)

    def new_cache(self, batch: int, capacity: int) -> kvc.KVCache:
        return kvc.KVCache.for_model(self.cfg, batch, capacity, self.cache_dtype)

    def pad_prompts(self, prompts: Sequence[Sequence[int]], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.array([len(p) for p in prompts], np.int32)
        if (lengths < 1).any():
            raise ValueError("every prompt needs at least one token (e.g. BOS)")
        p = bucket(int(lengths.max()), self.min_bucket)
        tokens = np.full((len(prompts), p), pad, np.int32)
        for i, ids in enumerate(prompts):
            tokens[i, : len(ids)] = ids
        return tokens, lengths

    def prefill(self, tokens, lengths, cache):
        return self._prefill(self.graphdef, self.state, jnp.asarray(tokens), jnp.asarray(lengths), cache)

    def step(self, token, cache):
        return self._step(self.graphdef, self.state, jnp.asarray(token, jnp.int32), cache)

    def generate(self, prompts: Sequence[Sequence[int]], options: GenerateOptions = GenerateOptions(),
                 *, capacity: Optional[int] = None) -> GenerateOutput:
        tokens, lengths = self.pad_prompts(prompts, options.pad_token_id)
        cap = capacity or cache_capacity(tokens.shape[1], options.max_new_tokens)
        if int(lengths.max()) + options.max_new_tokens > cap:
            raise ValueError(f"cache capacity {cap} < prompt {int(lengths.max())} + {options.max_new_tokens} new tokens")
        logits, _, cache = self.prefill(tokens, lengths, self.new_cache(len(prompts), cap))
        last = tokens[np.arange(len(prompts)), lengths - 1]
        out, count, _ = self.decode(logits, last, cache, options)
        return GenerateOutput(tokens=np.asarray(out), num_generated=np.asarray(count), prompt_lengths=lengths)

    def decode(self, logits, last, cache, options: GenerateOptions):
        """The compiled decode loop from a prefill's logits: (tokens (B, N), counts (B,), cache)."""
        o = options
        eos = () if o.eos_token_id is None else (
            tuple(o.eos_token_id) if isinstance(o.eos_token_id, (tuple, list)) else (o.eos_token_id,))
        return self._loop(
            self.graphdef, self.state, logits, jnp.asarray(last, jnp.int32), cache, jax.random.key(o.seed),
            jnp.float32(max(o.temperature, 1e-6)), jnp.int32(o.top_k), jnp.float32(o.top_p),
            jnp.asarray(eos or (-1,), jnp.int32), jnp.int32(o.pad_token_id),
            max_new=o.max_new_tokens, greedy=o.temperature <= 0.0, processor=self.processor)


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], options: GenerateOptions = GenerateOptions(),
             **kw) -> GenerateOutput:
    """One-off convenience; keep a `Generator` to reuse compilations across calls."""
    return Generator(model, **kw).generate(prompts, options)
