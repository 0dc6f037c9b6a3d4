"""`seed-story init CONFIG OUT [a.b=c ...]`: a randomly initialised complete model as a checkpoint.

Every config section with a model (llm, vit, unet, vae, detokenizer, mllm) is initialised (one
compiled function per component) and saved with the config; a config with an `llm` also gets a
tokenizer — `--tokenizer DIR`, or a tiny SentencePiece model trained on the fly with the 66 image
tokens (the llm's vocabulary is then set to the tokenizer's size when that is smaller). The result
is what `seed-story generate` and training take: for tests, benchmarks and training from scratch.
"""

from __future__ import annotations

import dataclasses
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HELP = "write a randomly initialised model (every component in CONFIG) as a checkpoint"


def add_arguments(p) -> None:
    p.add_argument("config", help="config name (tiny, george-7b, ...) or YAML path")
    p.add_argument("out", help="checkpoint directory to create (must not exist)")
    p.add_argument("overrides", nargs="*", help="key.path=value config overrides")
    p.add_argument("--tokenizer", help="tokenizer directory to ship (default: train a tiny one when there is an llm)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed")


def init_params(component: str, section, seed: int = 0, *, to_host: bool = True) -> dict:
    """Random params of one component (the checkpoint tree), initialised in one compiled function
    (on the default device; `to_host` copies them to numpy)."""
    import jax
    from flax import nnx

    from seed_story_jax.models import build

    def make(key):
        return nnx.state(build(component, section, nnx.Rngs(params=key, default=key)), nnx.Param).to_pure_dict()

    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(component.encode()) % (2 ** 31))
    # Runs once: on CPU, unoptimised code compiles several times faster than it would run slower.
    fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True} \
        if jax.default_backend() == "cpu" else None
    params = jax.jit(make).lower(key).compile(compiler_options=fast)(key)
    return jax.device_get(params) if to_host else params


def init_checkpoint(cfg, out, *, tokenizer_dir=None, seed: int = 0, overwrite: bool = False) -> Path:
    """Initialise every model section of `cfg` and save a checkpoint at `out` (atomically)."""
    from seed_story_jax.checkpoint import save_checkpoint
    from seed_story_jax.config import ConfigError
    from seed_story_jax.models import COMPONENTS
    from seed_story_jax.tokenizer import Tokenizer, train_tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok = None
        if cfg.llm is not None:
            if tokenizer_dir is not None:
                tok = Tokenizer.load(tokenizer_dir)
            else:
                base = cfg.llm.vocab_size - 66
                if base < 300:
                    raise ConfigError(f"llm.vocab_size {cfg.llm.vocab_size} is too small for a trained tokenizer "
                                      f"(need >= 366); pass --tokenizer")
                tok = train_tiny_tokenizer(Path(tmp) / "tokenizer", vocab_size=base)
            if tok.vocab_size > cfg.llm.vocab_size:
                raise ConfigError(f"tokenizer has {tok.vocab_size} ids but llm.vocab_size is {cfg.llm.vocab_size}")
            if tokenizer_dir is None and tok.vocab_size < cfg.llm.vocab_size:
                cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=tok.vocab_size))
            tok_dir = Path(tmp) / "tok_out"
            tok.save(tok_dir)
        names = [name for name in COMPONENTS if getattr(cfg, name, None) is not None]
        # Two components at a time: XLA compiles each on one core, and the values depend only on
        # (component, seed), not on the order.
        with ThreadPoolExecutor(max_workers=2) as pool:
            params = dict(zip(names, pool.map(lambda name: init_params(name, getattr(cfg, name), seed), names)))
        if not params:
            raise ConfigError("the config has no model section (llm, vit, unet, vae, detokenizer, mllm)")
        return save_checkpoint(out, cfg, params, tokenizer_dir=tok_dir if tok is not None else None,
                               extra={"init": {"seed": seed, "random": True}}, overwrite=overwrite)


def run(args) -> int:
    from seed_story_jax.config import load_config, resolve_config_path

    cfg = load_config(resolve_config_path(args.config), args.overrides)
    out = init_checkpoint(cfg, args.out, tokenizer_dir=args.tokenizer, seed=args.seed)
    from seed_story_jax.checkpoint import components_of

    print(f"{out}: random {cfg.name or args.config} checkpoint ({', '.join(components_of(out))})")
    return 0
