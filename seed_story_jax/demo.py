"""`seed-story demo`: the whole SEED-Story pipeline at toy size, trained on this machine (issue 9).

    OUT/story.html  OUT/storyboard.png  OUT/story.json  OUT/frames/   the 30-frame story
    OUT/eval.json                                                     trained vs randomly initialised
    OUT/model/                                                        the trained checkpoint (cached)
    OUT/work/                                                         data, tokenizer, stage runs

Steps (each leaves its output in OUT/work and is skipped when that output is there, so an
interrupted demo continues where it stopped and a finished one goes straight to the story):

    1 synth      synthetic stories with ground truth (data_pipeline/synth.py), train + held-out val
    2 tokenizer  a SentencePiece BPE trained on the training captions, + the 66 image tokens
    3 dataset    the training stories as ArrayRecord (`seed-story data build`)
    4 init       a randomly initialised complete model (`seed-story init`)
    5 vae        the autoencoder, trained to reconstruct the frames: SDXL's VAE is pretrained and
                 frozen in every SEED-Story stage; nothing is downloaded here, so the demo teaches
                 its tiny VAE first (MSE + a small KL), then sets vae.scaling_factor = 1/std of the
                 latents as SD did. This model is the "randomly initialised self" of the evaluation:
                 random agent and de-tokenizer, with the frozen pieces (ViT, VAE) a real run has.
    6-8 stage 1, 2, 3 (seed_story_jax/train): each starts from the previous checkpoint (train.init)
                 and is exported as a complete checkpoint; stage 3's is OUT/model. Stages 3 and 2
                 compile their train steps in a thread while stage 1 compiles and trains.
    9 story      a 30-frame story with the multimodal sink from a held-out first frame and caption
    10 eval      trained and random-init models on the held-out stories (seed_story_jax/evaluate.py)

The config is configs/demo.yaml: a normal config (base: tiny.yaml) plus a `demo:` block that only
this module reads. The work directory is keyed by a fingerprint of the resolved config, so changing
the config (or an override) retrains instead of reusing a model made from other settings.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

DEMO_CONFIG = "demo"
STORY_FILES = ("story.json", "story.html", "storyboard.png", "frames")


# =============================================================================================
# settings
# =============================================================================================


@dataclasses.dataclass(frozen=True)
class StorySettings:
    frames: int = 30
    policy: str = "multimodal-sink"
    # how the model writes the captions (StoryOptions' fields; temperature 0: greedy, the original's)
    temperature: float = 0.0
    top_p: float = 1.0
    max_text_tokens: int = 100
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    stories: int = 8
    frames: int = 10
    table_frames: tuple[int, ...] = (50,)
    table_stories: int = 2
    policies: tuple[str, ...] = ("dense", "sink", "window", "multimodal-sink")
    enabled: bool = True
    # generator options of the long stories over the training set's (SynthOptions fields)
    table_synth: dict = dataclasses.field(default_factory=dict)
    # the teacher-forced look margins (seed_story_jax/looks.py): stories, frames, generator options
    # over the training set's and looks.DEFAULT_SYNTH
    look_stories: int = 0
    look_frames: int = 12
    look_synth: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """The `demo:` block of configs/demo.yaml."""

    stories: int = 64
    val_stories: int = 8
    frames: int = 10
    size: int = 32
    seed: int = 0
    tokenizer_vocab: int = 400
    synth: dict = dataclasses.field(default_factory=dict)  # data_pipeline.synth.SynthOptions fields
    vae: dict = dataclasses.field(default_factory=lambda: {"steps": 200, "lr": 2e-3, "kl": 1e-4, "batch_size": 16,
                                                           "loss": "mse"})
    stages: dict = dataclasses.field(default_factory=dict)  # {1: {train overrides}, 2: ..., 3: ...}
    story: StorySettings = StorySettings()
    eval: EvalSettings = EvalSettings()

    @classmethod
    def from_tree(cls, tree: dict) -> "DemoSettings":
        from seed_story_jax.config import ConfigError, from_dict

        tree = dict(tree or {})
        raw = tree.pop("stages", None) or {}
        bad = sorted(str(k) for k in raw if str(k) not in ("1", "2", "3"))
        stages = {int(k): dict(v or {}) for k, v in raw.items() if str(k) in ("1", "2", "3")}
        if bad:
            raise ConfigError(f"demo.stages: stages are 1, 2, 3, got {bad}")
        vae_over = tree.pop("vae", None) or {}
        unknown = sorted(set(vae_over) - set(cls().vae))
        if unknown:
            raise ConfigError(f"demo.vae: unknown key(s) {unknown}; known: {sorted(cls().vae)}")
        vae = {**cls().vae, **vae_over}
        if vae["loss"] not in ("mse", "l1"):
            raise ConfigError(f"demo.vae.loss must be mse or l1, got {vae['loss']!r}")
        synth = dict(tree.pop("synth", None) or {})
        ev_tree = dict(tree.pop("eval", None) or {})
        table_synth = dict(ev_tree.pop("table_synth", None) or {})
        look_synth = dict(ev_tree.pop("look_synth", None) or {})
        from data_pipeline.synth import SynthOptions
        from seed_story_jax.looks import DEFAULT_SYNTH

        for where, opts in (("demo.synth", synth), ("demo.eval.table_synth", {**synth, **table_synth}),
                            ("demo.eval.look_synth", {**synth, **DEFAULT_SYNTH, **look_synth})):
            try:
                SynthOptions.from_dict(opts)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{where}: {e}") from None
        story = from_dict(StorySettings, tree.pop("story", None) or {}, "demo.story")
        ev = dataclasses.replace(from_dict(EvalSettings, ev_tree, "demo.eval"), table_synth=table_synth,
                                 look_synth=look_synth)
        if ev.look_stories < 0 or ev.look_frames < 3:
            raise ConfigError(f"demo.eval: need look_stories >= 0 and look_frames >= 3, got {ev.look_stories}, "
                              f"{ev.look_frames}")
        from seed_story_jax.evaluate import POLICIES

        for p in (story.policy,) + tuple(ev.policies):
            if p not in POLICIES:
                raise ConfigError(f"demo: unknown cache policy {p!r}; known: {', '.join(POLICIES)}")
        if story.frames < 2:
            raise ConfigError(f"demo.story.frames must be >= 2, got {story.frames}")
        if story.temperature < 0 or not 0 < story.top_p <= 1 or story.max_text_tokens < 1:
            raise ConfigError(f"demo.story: need temperature >= 0, 0 < top_p <= 1, max_text_tokens >= 1; got "
                              f"{story.temperature}, {story.top_p}, {story.max_text_tokens}")
        base = from_dict(_Scalars, tree, "demo")
        return cls(**dataclasses.asdict(base), synth=synth, vae=vae, stages=stages, story=story, eval=ev)


@dataclasses.dataclass(frozen=True)
class _Scalars:
    stories: int = 64
    val_stories: int = 8
    frames: int = 10
    size: int = 32
    seed: int = 0
    tokenizer_vocab: int = 400


@dataclasses.dataclass
class DemoConfig:
    tree: dict  # the resolved config tree without the demo block
    settings: DemoSettings
    fingerprint: str

    def config(self, **sections) -> Any:
        """The SeedStoryConfig of the tree with `sections` (dicts) deep-merged in."""
        from seed_story_jax.config import config_from_tree

        tree = copy.deepcopy(self.tree)
        for k, v in sections.items():
            tree[k] = {**(tree.get(k) or {}), **v}
        return config_from_tree(tree)


def load_demo_config(path=None, overrides=()) -> DemoConfig:
    from seed_story_jax.config import ConfigError, apply_overrides, config_from_tree, load_yaml_tree, \
        resolve_config_path

    path = resolve_config_path(path or DEMO_CONFIG)
    tree = load_yaml_tree(path)
    stages = (tree.get("demo") or {}).get("stages")
    if isinstance(stages, dict):  # YAML reads `1:` as an int, an override `demo.stages.1.x=` as "1"
        tree["demo"]["stages"] = {str(k): v for k, v in stages.items()}
    tree = apply_overrides(tree, list(overrides))
    demo_tree = tree.pop("demo", None) or {}
    try:
        settings = DemoSettings.from_tree(demo_tree)
        config_from_tree(tree)  # validate the rest now, not after ten minutes
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    blob = json.dumps({"tree": tree, "demo": demo_tree}, sort_keys=True, default=str)
    return DemoConfig(tree=tree, settings=settings, fingerprint=hashlib.sha256(blob.encode()).hexdigest()[:12])


# =============================================================================================
# the run
# =============================================================================================


@dataclasses.dataclass
class Demo:
    out: Path
    dc: DemoConfig
    progress: bool = True
    log: Any = print
    timings: dict = dataclasses.field(default_factory=dict)
    # stage → task and config compiled ahead by `precompile_stages`, and its thread
    _ahead: dict = dataclasses.field(default_factory=dict, init=False, repr=False)
    _ahead_cfg: dict = dataclasses.field(default_factory=dict, init=False, repr=False)
    _precompiling: Any = dataclasses.field(default=None, init=False, repr=False)

    # ---- layout ------------------------------------------------------------------------------
    @property
    def work(self) -> Path:
        return self.out / "work"

    @property
    def model(self) -> Path:
        return self.out / "model"

    def path(self, name: str) -> Path:
        return self.work / name

    # ---- driver ------------------------------------------------------------------------------
    def run(self, *, retrain: bool = False, evaluate: bool = True) -> dict:
        t0 = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_fingerprint(retrain)
        use_compilation_cache(self.out / "cache" / "xla")
        steps = [("synth", self.synth), ("tokenizer", self.tokenizer), ("dataset", self.dataset),
                 ("init", self.init), ("vae", self.vae), ("stage1", lambda: self.stage(1)),
                 ("stage2", lambda: self.stage(2)), ("stage3", lambda: self.stage(3)), ("story", self.story)]
        if evaluate and self.dc.settings.eval.enabled:
            steps.append(("eval", self.evaluate))
        cached = self.model_ready()
        for i, (name, fn) in enumerate(steps, start=1):
            if cached and name not in ("synth", "story", "eval"):
                continue
            self.log(f"[{i}/{len(steps)}] {name} ...")
            t, c = time.perf_counter(), _cpu_seconds()
            fn()
            self.timings[name] = time.perf_counter() - t
            self.log(f"[{i}/{len(steps)}] {name}: {self.timings[name]:.0f} s ({_cpu_seconds() - c:.0f} s CPU)")
        self.timings["total"] = time.perf_counter() - t0
        summary = {"out": str(self.out), "cached_model": cached, "timings_s": self.timings,
                   "cpu_s": _cpu_seconds(), "fingerprint": self.dc.fingerprint}
        (self.work / "last_run.json").write_text(json.dumps(summary, indent=2))
        return summary

    def model_ready(self) -> bool:
        from seed_story_jax.checkpoint import is_checkpoint

        return is_checkpoint(self.model) and _stamp(self.model) == self.dc.fingerprint

    def _check_fingerprint(self, retrain: bool) -> None:
        stamp = self.work / "fingerprint"
        if self.work.exists() and (retrain or not stamp.is_file() or stamp.read_text() != self.dc.fingerprint):
            why = "--retrain" if retrain else "the config changed"
            self.log(f"demo: {why}: starting over in {self.work}")
            shutil.rmtree(self.work)
            if self.model.exists():
                shutil.rmtree(self.model)
        self.work.mkdir(parents=True, exist_ok=True)
        stamp.write_text(self.dc.fingerprint)

    # ---- 1-3: data -----------------------------------------------------------------------------
    def synth(self) -> None:
        from data_pipeline.synth import SynthOptions, write_synthetic

        s = self.dc.settings
        if not (self.path("data") / "synth.json").is_file():
            write_synthetic(self.path("data"), stories=s.stories, val_stories=s.val_stories, frames=s.frames,
                            size=s.size, seed=s.seed, progress=self.progress, overwrite=True,
                            options=SynthOptions.from_dict(s.synth))

    def captions(self, split: str = "train") -> list[list[str]]:
        lines = (self.path("data") / f"{split}.jsonl").read_text().splitlines()
        return [json.loads(x)["captions"] for x in lines if x.strip()]

    def tokenizer(self) -> None:
        from seed_story_jax.tokenizer import train_tiny_tokenizer

        if not (self.path("tokenizer")).is_dir():
            texts = [c for caps in self.captions() for c in caps] + ["[INST]"]
            train_tiny_tokenizer(self.path("tokenizer"), texts, self.dc.settings.tokenizer_vocab)

    def tokenizer_obj(self):
        from seed_story_jax.tokenizer import Tokenizer

        return Tokenizer.load(self.path("tokenizer"))

    def dataset(self) -> None:
        from data_pipeline.builder import build
        from data_pipeline.storystream import ImageLimits

        if not self.path("dataset").is_dir():
            d = self.dc.tree.get("data") or {}
            build(self.path("data") / "train.jsonl", self.path("data") / "images", self.path("dataset"),
                  chunk=self.dc.settings.frames, limits=ImageLimits(d.get("min_resolution", 32), d.get("min_aspect", 0.2)),
                  progress=self.progress, on_error="fail")

    # ---- 4-5: the model before SEED-Story's stages ------------------------------------------------
    def base_config(self):
        """The model config every stage shares: vocabulary from the tokenizer, the data path."""
        vocab = self.tokenizer_obj().vocab_size
        return self.dc.config(llm={"vocab_size": _round_up(vocab, 64)}, data={"path": str(self.path("dataset"))})

    def init(self) -> None:
        from seed_story_jax.checkpoint import is_checkpoint
        from seed_story_jax.config import dump_config

        if is_checkpoint(self.path("init")):
            return
        from seed_story_jax.cli import main

        cfg_file = self.work / "config.yaml"
        cfg_file.write_text(dump_config(self.base_config()))
        with cheap_random_init():
            rc = main(["init", str(cfg_file), str(self.path("init")), "--tokenizer", str(self.path("tokenizer"))])
        if rc != 0 or not is_checkpoint(self.path("init")):
            raise RuntimeError(f"seed-story init failed (exit {rc})")

    def vae(self) -> None:
        from seed_story_jax.checkpoint import is_checkpoint

        if is_checkpoint(self.path("random")):
            return
        train_vae(self, self.path("init"), self.path("random"))

    # ---- 6-8: SEED-Story's three stages ------------------------------------------------------------
    def stage_src(self, k: int) -> Path:
        return self.path("random") if k == 1 else self.path(f"ckpt{k - 1}")

    def stage_done(self, k: int) -> bool:
        from seed_story_jax.checkpoint import is_checkpoint

        dst = self.model if k == 3 else self.path(f"ckpt{k}")
        return is_checkpoint(dst) and (k != 3 or self.model_ready())

    def stage_config(self, k: int, base_from: Optional[Path] = None):
        """Stage k's config: the model config of its source checkpoint (`base_from`: another
        checkpoint with the same model config) with the demo's train settings for stage k."""
        from seed_story_jax.checkpoint import read_config
        from seed_story_jax.config import config_from_tree

        src = self.stage_src(k)
        base = read_config(base_from or src)  # carries the VAE scaling factor measured in step 5
        tree = _tree_of(base)
        over = dict(self.dc.settings.stages.get(k, {}))
        tree["train"] = {**(self.dc.tree.get("train") or {}), **over, "stage": k, "init": str(src)}
        tree["data"] = {**(tree.get("data") or {}), "stage": k}
        return config_from_tree(tree)

    def stage_task(self, cfg, k: int):
        from seed_story_jax.train.stages import make_task

        task = make_task(cfg)
        return dataclasses.replace(task, build=zero_init(task.build))

    def stage(self, k: int) -> None:
        if self.stage_done(k):
            return
        if k == 1:
            self.precompile_stages()
        self.wait_precompiled(k)
        src, dst = self.stage_src(k), (self.model if k == 3 else self.path(f"ckpt{k}"))
        cfg = self.stage_config(k)
        from seed_story_jax.train.loop import run as train_run

        # the task the thread compiled (same examples: every checkpoint carries the same tokenizer)
        task = self._ahead.pop(k, None) if cfg == self._ahead_cfg.get(k) else None
        task = task or self.stage_task(cfg, k)
        result = train_run(cfg, self.path(f"stage{k}"), task=task, progress=self.progress)
        export_checkpoint(src, dst, result.state.params, cfg, stamp=self.dc.fingerprint if k == 3 else None)

    # ---- compiling stages 2 and 3 while stage 1 runs ---------------------------------------------------
    def precompile_stages(self, stages=(3, 2)) -> None:
        """Compile the train steps of later stages in a thread (XLA compiles on one core; the
        main thread compiles and trains stage 1 meanwhile) into the persistent compilation cache,
        where their runs find them. Their configs are known once the VAE is trained: every stage
        checkpoint has the random model's config. Best effort: a failure only costs the time."""
        import threading

        todo = [k for k in stages if not self.stage_done(k)]
        if not todo or self._precompiling is not None:
            return

        def work():
            for k in todo:
                try:
                    cfg = self.stage_config(k, base_from=self.path("random"))
                    # the source checkpoint does not exist yet: examples and tokenizer from the random one
                    task = self.stage_task(dataclasses.replace(
                        cfg, train=dataclasses.replace(cfg.train, init=str(self.path("random")))), k)
                    from seed_story_jax.train.loop import compile_step

                    compile_step(cfg, task=task)
                    self._ahead[k], self._ahead_cfg[k] = task, cfg
                except Exception as e:  # noqa: BLE001 - the stage compiles when it runs
                    self.log(f"demo: compiling stage {k} ahead failed ({type(e).__name__}: {str(e)[:200]}); "
                             f"it compiles when it runs")

        self._precompiling = threading.Thread(target=work, name="demo-precompile", daemon=True)
        self._precompiling.start()

    def wait_precompiled(self, k: int) -> None:
        """Stage k's own compile would race the thread's: let the thread finish first."""
        if k > 1 and self._precompiling is not None:
            self._precompiling.join()

    # ---- 9: the story --------------------------------------------------------------------------------
    def held_out_start(self):
        """(first frame PIL image, first caption, the rest of the captions) of held-out story 0."""
        from seed_story_jax.evaluate import load_stories

        st = load_stories(self.path("data"), "val" if self.dc.settings.val_stories else "train", limit=1)[0]
        return st.images[0], st.captions[0], st.captions[1:]

    def story(self) -> None:
        image, caption, _ = self.held_out_start()
        tell_story(self.model, image, caption, self.out, self.dc.settings.story, progress=self.progress)

    # ---- 10: evaluation --------------------------------------------------------------------------------
    def evaluate(self) -> None:
        from seed_story_jax import evaluate as E

        ev = self.dc.settings.eval
        opts = E.EvalOptions(split="val", stories=ev.stories, story_frames=ev.frames, table_frames=ev.table_frames,
                             table_stories=ev.table_stories, policies=ev.policies, seed=self.dc.settings.seed + 10_000,
                             table_synth=ev.table_synth, look_stories=ev.look_stories, look_frames=ev.look_frames,
                             look_synth=ev.look_synth or None)
        reports = {}
        # The cache-policy table and the looks are about the trained model; the random one only
        # needs the metrics.
        random_opts = dataclasses.replace(opts, table_frames=(), look_stories=0)
        for name, ckpt, o in (("trained", self.model, opts), ("random_init", self.path("random"), random_opts)):
            self.log(f"evaluating the {name.replace('_', ' ')} model")
            reports[name] = E.evaluate(ckpt, self.path("data"), o, progress=self.progress)
        E.write_report(reports, self.out / "eval.json")
        self.eval_reports = reports


# =============================================================================================
# pieces
# =============================================================================================


def use_compilation_cache(path: Path) -> None:
    """Keep XLA executables on disk: the evaluation compiles the same programs for the trained and
    the random-init model, and a second demo run compiles almost nothing."""
    import jax

    if not jax.config.jax_compilation_cache_dir:
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@contextlib.contextmanager
def cheap_random_init():
    """Random initialisation with the `unsafe_rbg` PRNG: one RngBitGenerator op per draw instead of
    threefry's unrolled rounds, so XLA compiles the init of every parameter about 2.5× faster. Only
    the init's numbers depend on it (they are saved); training and sampling keep the default PRNG."""
    import jax

    old = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "unsafe_rbg")
    try:
        yield
    finally:
        jax.config.update("jax_default_prng_impl", old)


def zero_init(build):
    """A task's `build` whose parameters start at zero instead of random.

    Every demo run starts from a complete checkpoint (train.init), which the train loop lays over
    the params it initialised; the random initialisers would be compiled (minutes for the UNet on a
    loaded 2-core CPU) and then thrown away. With zeros they are dead code XLA drops at once."""
    import jax.numpy as jnp
    from flax import nnx

    def make(rngs):
        model = build(rngs)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return nnx.merge(graphdef, jax_tree_zeros(params), rest)

    def jax_tree_zeros(state):
        import jax

        return jax.tree.map(jnp.zeros_like, state)

    return make


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _tree_of(cfg) -> dict:
    from seed_story_jax.config import to_dict

    return {k: v for k, v in to_dict(cfg).items() if v is not None}


def _stamp(path: Path) -> Optional[str]:
    p = Path(path) / "manifest.json"
    try:
        return json.loads(p.read_text()).get("demo_fingerprint")
    except (OSError, json.JSONDecodeError):
        return None


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _str_keys(tree):
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return np.asarray(tree)


def merge_params(base: dict, update: dict) -> dict:
    """`base` with every leaf present in `update` replaced (keys compared as strings, as orbax
    stores list indices); `update` may hold any subset of the tree (e.g. only to_k/to_v)."""
    out = dict(base)
    keymap = {str(k): k for k in base}
    for k, v in update.items():
        bk = keymap.get(str(k))
        if bk is None:
            raise KeyError(f"trained parameter {k!r} is not in the checkpoint it was trained from")
        out[bk] = merge_params(base[bk], v) if isinstance(v, dict) else np.asarray(v).astype(np.asarray(base[bk]).dtype)
    return out


def export_checkpoint(src, dst, trained: dict, cfg, *, stamp: Optional[str] = None) -> Path:
    """A complete checkpoint at `dst`: `src`'s components and tokenizer with the `trained`
    params ({component: subtree}) laid over them, and `cfg` minus its train/data sections."""
    import jax

    from seed_story_jax.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(src)
    trained = jax.device_get(trained)
    params = dict(ck.params)
    for comp, sub in trained.items():
        if comp not in params:
            raise KeyError(f"trained component {comp!r} is not in {src}")
        params[comp] = merge_params(params[comp], sub)
    model_cfg = dataclasses.replace(cfg, train=None)
    extra = {k: v for k, v in ck.manifest.items() if k not in ("format", "components")}
    if stamp:
        extra["demo_fingerprint"] = stamp
    return save_checkpoint(dst, model_cfg, params, tokenizer_dir=ck.tokenizer_dir, overwrite=True, extra=extra)


# ---------------------------------------------------------------------------------------- VAE warm-up


class _Frames:
    """Random-access training frames as SDXL-crop arrays in [-1, 1] (the VAE's examples)."""

    def __init__(self, arrays: np.ndarray):
        self.x = arrays

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[int(i)]}

    def __repr__(self):
        return f"_Frames(n={len(self.x)}, shape={self.x.shape[1:]})"


def train_vae(demo: Demo, src: Path, dst: Path) -> None:
    """Teach the frozen-in-every-stage autoencoder to reconstruct the synthetic frames, then set
    vae.scaling_factor = 1 / std(latents) (SD's recipe) and save the complete checkpoint."""
    import jax
    import jax.numpy as jnp

    from seed_story_jax.checkpoint import load_component, read_config
    from seed_story_jax.models import vae as V
    from seed_story_jax.train.loop import run as train_run
    from seed_story_jax.train.task import Bundle, Task
    from seed_story_jax.transforms import load_image, sdxl_crop_1024

    cfg0 = read_config(src)
    sd = cfg0.data.sd_size if cfg0.data else cfg0.detokenizer.height
    rels = [r for line in (demo.path("data") / "train.jsonl").read_text().splitlines() if line.strip()
            for r in json.loads(line)["images"]]
    frames = np.stack([np.asarray(sdxl_crop_1024(load_image(demo.path("data") / "images" / r), size=sd)[0],
                                  np.float32) for r in rels])
    v = demo.dc.settings.vae
    kl_w = float(v["kl"])
    l1_loss = v["loss"] == "l1"  # SD's VAE reconstruction term: flat colour regions come out sharper
    vcfg = cfg0.vae

    def loss_fn(model, batch, rng):
        x = batch["image"]
        post = model.vae.encode(x)
        z = post.sample(rng)
        rec = model.vae.decode(z)
        mse = jnp.mean((rec - x) ** 2)
        l1 = jnp.mean(jnp.abs(rec - x))
        kl = 0.5 * jnp.mean(jnp.sum(post.mean ** 2 + jnp.exp(post.logvar) - 1.0 - post.logvar, axis=-1))
        return (l1 if l1_loss else mse) + kl_w * kl, {"mse": mse, "l1": l1, "kl": kl}

    task = Task(name="vae", build=zero_init(lambda rngs: Bundle(vae=V.build(vcfg, rngs))),
                trainable=lambda p: str(p[0]) == "vae", loss_fn=loss_fn, examples=_Frames(frames))
    train_tree = {**(demo.dc.tree.get("train") or {}), "stage": 0, "init": str(src),
                  "steps": int(v["steps"]), "lr": float(v["lr"]), "batch_size": int(v["batch_size"])}
    tree = _tree_of(cfg0)
    tree["train"] = train_tree
    from seed_story_jax.config import config_from_tree

    cfg = config_from_tree(tree)
    result = train_run(cfg, demo.path("vae_run"), task=task, progress=demo.progress)
    params = merge_params(load_component(src, "vae"), jax.device_get(result.state.params["vae"]))
    from flax import nnx

    from seed_story_jax.evaluate import module_from_params

    graphdef, state = nnx.split(module_from_params("vae", vcfg, params))
    encode = jax.jit(lambda st, x: nnx.merge(graphdef, st).encode(x).mean)
    z = np.concatenate([np.asarray(encode(state, frames[i:i + 64])) for i in range(0, len(frames) - 63, 64)]
                       or [np.asarray(encode(state, frames))])
    scale = float(1.0 / max(z.std(), 1e-6))
    cfg_out = dataclasses.replace(cfg, vae=dataclasses.replace(vcfg, scaling_factor=scale))
    export_checkpoint(src, dst, {"vae": params}, cfg_out)


# ---------------------------------------------------------------------------------------- the story


def tell_story(ckpt, image, caption: str, out: Path, settings: StorySettings, *, progress: bool = True) -> dict:
    """A story of settings.frames frames from (image, caption) — free generation: the model writes
    every later caption and paints every later frame — with its outputs (story.json, story.html,
    storyboard.png, frames/) placed in `out`. Returns story.json's content."""
    from seed_story_jax import story as S

    teller = S.StoryTeller(S.load_story_model(ckpt))
    told = teller.tell([image], [caption], S.StoryOptions(
        frames=settings.frames, policy=settings.policy, temperature=settings.temperature, top_p=settings.top_p,
        max_text_tokens=settings.max_text_tokens, seed=settings.seed, render="end", progress=progress))[0]
    tmp = Path(out) / ".story-new"
    if tmp.exists():
        shutil.rmtree(tmp)
    S.write_story(told, tmp, start_image=image)
    publish(tmp, Path(out))
    shutil.rmtree(tmp, ignore_errors=True)
    return json.loads((Path(out) / "story.json").read_text())


def publish(src: Path, out: Path) -> None:
    """Move a story directory's files into `out`, replacing an older story there."""
    for name in STORY_FILES:
        s, d = src / name, out / name
        if not s.exists():
            continue
        if d.is_dir():
            shutil.rmtree(d)
        elif d.exists():
            d.unlink()
        os.replace(s, d)


# ---------------------------------------------------------------------------------------- summary


def summary_text(demo: Demo, summary: dict) -> str:
    from seed_story_jax import evaluate as E

    out = demo.out
    lines = ["", "=" * 72, f"The story: {out / 'story.html'}  (open it in a browser)",
             f"           {out / 'storyboard.png'}  (all frames on one sheet)",
             f"Model:     {demo.model}" + ("  (cached: delete it or pass --retrain to train again)"
                                           if summary["cached_model"] else ""),
             f"Time:      {summary['timings_s']['total']:.0f} s wall ({summary['cpu_s']:.0f} s CPU): "
             + ", ".join(f"{k} {v:.0f}s" for k, v in summary["timings_s"].items() if k != "total")]
    reports = getattr(demo, "eval_reports", None)
    if reports:
        lines += ["", f"Evaluation on {reports['trained']['stories']} held-out stories ({out / 'eval.json'}):", ""]
        lines += E.summary_lines(reports["trained"], reports["random_init"])
    lines.append("=" * 72)
    return "\n".join(lines)
