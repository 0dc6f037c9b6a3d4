"""Typed, frozen configuration: YAML files → nested dataclasses, `a.b=c` overrides, validation.

A YAML file may name others under `base:` (paths relative to it); they are deep-merged first, so
`george-7b.yaml` can be built from `llama2-7b.yaml` + `qwen-vit-g.yaml` + `sdxl-base.yaml`.

Each section dataclass below belongs to one model module; its owner adds fields there. Nothing here
imports jax, so `seed-story --help` and config validation stay fast.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "minimal", "save_dots", "save_qkv_proj")


class ConfigError(ValueError):
    """A config file, key or value is wrong; the message names which."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


# --------------------------------------------------------------------------------------------
# Section dataclasses
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """peft-style LoRA: y = x W + (x A B) · alpha / r on the named projections."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self, where: str) -> None:
        _check(self.rank > 0, f"{where}.rank must be > 0, got {self.rank}")
        valid = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        bad = set(self.targets) - valid
        _check(not bad, f"{where}.targets: unknown projections {sorted(bad)}; valid: {sorted(valid)}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32066
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: Optional[int] = None  # None: hidden_size // num_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    param_dtype: str = "float32"
    dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"
    lora: Optional[LoRAConfig] = None

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def validate(self, where: str = "llm") -> None:
        _check(self.num_heads % self.num_kv_heads == 0,
               f"{where}: num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        _check(self.head_dim is not None or self.hidden_size % self.num_heads == 0,
               f"{where}: hidden_size ({self.hidden_size}) not divisible by num_heads ({self.num_heads})")
        _check(self.resolved_head_dim % 2 == 0, f"{where}: head_dim must be even for RoPE")
        _check(self.param_dtype in DTYPES, f"{where}.param_dtype must be one of {DTYPES}")
        _check(self.dtype in DTYPES, f"{where}.dtype must be one of {DTYPES}")
        _check(self.remat in REMAT_POLICIES, f"{where}.remat must be one of {REMAT_POLICIES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers"):
            _check(getattr(self, name) > 0, f"{where}.{name} must be > 0")
        if self.lora is not None:
            self.lora.validate(f"{where}.lora")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Qwen-VL ViT-G/14 with its attention-pool resampler (spec §1). Owner: models/vit.py."""

    image_size: int = 448
    patch_size: int = 14
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_width: int = 8192
    output_dim: int = 4096
    n_queries: int = 256
    pool_heads: int = 32
    pos_grid: int = 16  # the learned position table's grid (Qwen hard-codes 16×16), resized to the patch grid
    ln_eps: float = 1e-6
    param_dtype: str = "float32"
    dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"

    def validate(self, where: str = "vit") -> None:
        _check(self.image_size % self.patch_size == 0, f"{where}: image_size must be a multiple of patch_size")
        _check(self.width % self.heads == 0, f"{where}: width must be divisible by heads")
        _check(self.output_dim % self.pool_heads == 0, f"{where}: output_dim must be divisible by pool_heads")
        _check(self.output_dim % 4 == 0, f"{where}.output_dim must be a multiple of 4 (2-D sin-cos table)")
        _check(self.pos_grid > 0, f"{where}.pos_grid must be > 0")
        g = int(round(self.n_queries ** 0.5))
        _check(g * g == self.n_queries, f"{where}.n_queries must be a square, got {self.n_queries}")
        _check(self.param_dtype in DTYPES and self.dtype in DTYPES, f"{where}: dtypes must be in {DTYPES}")
        _check(self.remat in REMAT_POLICIES, f"{where}.remat must be one of {REMAT_POLICIES}")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """SDXL-family UNet2DConditionModel (spec §4.5). Owner: models/unet.py.

    Field names follow diffusers' config.json except `num_attention_heads`, which is diffusers'
    (legacy-named) `attention_head_dim`: the number of heads per block. `transformer_layers_per_block`
    has one entry per down block: an int, or a tuple with one count per resnet layer (diffusers'
    asymmetric form, which then needs `reverse_transformer_layers_per_block`: per up block, one count per
    layer). The mid block uses the last down entry. Transformer GroupNorm eps is 1e-6 and LayerNorm eps
    1e-5 in diffusers' Transformer2DModel (not configurable there either).
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 2
    transformer_layers_per_block: tuple[Any, ...] = (1, 2, 10)
    reverse_transformer_layers_per_block: Optional[tuple[Any, ...]] = None
    num_attention_heads: tuple[int, ...] = (5, 10, 20)  # diffusers' legacy `attention_head_dim`
    cross_attention_dim: int = 2048
    use_linear_projection: bool = True
    addition_embed_type: Optional[str] = "text_time"
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 2816
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    sample_size: int = 128
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"  # per resnet / per transformer stack

    def layers_of(self, entry: Any, n: int) -> tuple[int, ...]:
        """Per-layer transformer depths of one block entry (int → n copies)."""
        return (entry,) * n if isinstance(entry, int) else tuple(entry)

    def validate(self, where: str = "unet") -> None:
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types", "transformer_layers_per_block", "num_attention_heads"):
            _check(len(getattr(self, name)) == n, f"{where}.{name} must have {n} entries (one per block)")
        down_ok = {"DownBlock2D", "CrossAttnDownBlock2D"}
        up_ok = {"UpBlock2D", "CrossAttnUpBlock2D"}
        _check(set(self.down_block_types) <= down_ok, f"{where}.down_block_types: each one of {sorted(down_ok)}")
        _check(set(self.up_block_types) <= up_ok, f"{where}.up_block_types: each one of {sorted(up_ok)}")
        for i, e in enumerate(self.transformer_layers_per_block):
            per = self.layers_of(e, self.layers_per_block)
            _check(len(per) == self.layers_per_block and all(isinstance(x, int) and x >= 1 for x in per),
                   f"{where}.transformer_layers_per_block[{i}]: an int >= 1 or {self.layers_per_block} of them")
        nested = any(not isinstance(e, int) for e in self.transformer_layers_per_block)
        _check(not nested or self.reverse_transformer_layers_per_block is not None,
               f"{where}: per-layer transformer_layers_per_block needs reverse_transformer_layers_per_block")
        if self.reverse_transformer_layers_per_block is not None:
            r = self.reverse_transformer_layers_per_block
            _check(len(r) == n and all(len(self.layers_of(e, self.layers_per_block + 1)) == self.layers_per_block + 1
                                       for e in r),
                   f"{where}.reverse_transformer_layers_per_block: {n} entries of {self.layers_per_block + 1} counts")
        for c, h in zip(self.block_out_channels, self.num_attention_heads):
            _check(c % h == 0, f"{where}: block channels {c} not divisible by {h} heads")
            _check(c % self.norm_num_groups == 0, f"{where}: block channels {c} not divisible by norm_num_groups")
        _check(self.addition_embed_type in (None, "text_time"), f"{where}.addition_embed_type: text_time or null")
        _check(self.conv_in_kernel % 2 == 1 and self.conv_out_kernel % 2 == 1, f"{where}: conv kernels must be odd")
        _check(self.param_dtype in DTYPES and self.dtype in DTYPES, f"{where}: dtypes must be in {DTYPES}")
        _check(self.remat in REMAT_POLICIES, f"{where}.remat must be one of {REMAT_POLICIES}")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL (spec §4.5). Owner: models/vae.py."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.13025
    sample_size: int = 1024
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    force_upcast: bool = True  # carried for diffusers' config.json only; our decode_dtype decides
    param_dtype: str = "float32"
    dtype: str = "float32"  # encoder compute dtype
    decode_dtype: str = "float32"  # decoder compute dtype; fp16 overflows at 1024² in the SDXL VAE

    @property
    def downsample_factor(self) -> int:
        """Image side / latent side: 8 for SDXL (4 blocks), 2 for the tiny 2-block VAE."""
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self, where: str = "vae") -> None:
        _check(self.decode_dtype in ("float32", "bfloat16"), f"{where}.decode_dtype must be float32 or bfloat16")
        _check(self.param_dtype in DTYPES and self.dtype in DTYPES, f"{where}: dtypes must be in {DTYPES}")
        _check(len(self.block_out_channels) >= 1 and self.layers_per_block >= 1,
               f"{where}: need at least one block and one layer per block")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        _check(not bad, f"{where}.block_out_channels {bad} not divisible by norm_num_groups {self.norm_num_groups}")
        _check(self.scaling_factor > 0, f"{where}.scaling_factor must be > 0")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Euler (sampling) and DDPM (training noise) with SDXL's settings. Owner: schedulers.py."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    interpolation_type: str = "linear"

    def validate(self, where: str = "scheduler") -> None:
        _check(self.beta_schedule in ("scaled_linear", "linear"), f"{where}.beta_schedule: scaled_linear|linear")
        _check(self.timestep_spacing in ("leading", "trailing", "linspace"), f"{where}.timestep_spacing: leading|trailing|linspace")
        _check(self.prediction_type == "epsilon", f"{where}.prediction_type: only epsilon is supported")
        _check(self.interpolation_type == "linear", f"{where}.interpolation_type: only linear is supported")
        _check(self.num_train_timesteps > 0, f"{where}.num_train_timesteps must be > 0")
        _check(0 < self.beta_start < self.beta_end < 1, f"{where}: need 0 < beta_start < beta_end < 1")


@dataclasses.dataclass(frozen=True)
class ResamplerXLV2Config:
    """ViT features → SDXL conditioning (spec §4.1–4.2). Owner: models/resamplers.py."""

    dim: int = 1024
    depth: int = 4
    dim_head: int = 64
    heads: int = 16
    num_queries: int = 64
    embedding_dim: int = 4096
    output1_dim: int = 768
    output2_dim: int = 1280
    ff_mult: int = 4
    normalize: bool = True  # F.normalize over the token axis, as SEED-Story always does
    eps: float = 1e-5
    param_dtype: str = "float32"
    dtype: str = "float32"

    def validate(self, where: str = "detokenizer.resampler") -> None:
        for name in ("dim", "depth", "dim_head", "heads", "num_queries", "embedding_dim", "output1_dim",
                     "output2_dim", "ff_mult"):
            _check(getattr(self, name) > 0, f"{where}.{name} must be > 0")
        _check(self.dim % self.heads == 0, f"{where}: dim ({self.dim}) must be divisible by heads ({self.heads}) "
               "(the attention pool splits dim over heads)")
        _check(self.param_dtype in DTYPES and self.dtype in DTYPES, f"{where}: dtypes must be in {DTYPES}")


@dataclasses.dataclass(frozen=True)
class QwenResamplerConfig:
    """Qwen-VL's 2-D Resampler as the agent uses it (spec §2.3). Owner: models/resamplers.py."""

    grid_size: int = 8
    embed_dim: int = 4096
    num_heads: int = 32
    kv_dim: int = 4096
    input_tokens: int = 256
    eps: float = 1e-5
    param_dtype: str = "float32"
    dtype: str = "float32"

    def validate(self, where: str = "resampler") -> None:
        _check(self.grid_size > 0, f"{where}.grid_size must be > 0")
        _check(self.embed_dim % self.num_heads == 0,
               f"{where}: embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})")
        _check(self.embed_dim % 4 == 0, f"{where}.embed_dim must be a multiple of 4 (2-D sin-cos table)")
        g = int(round(self.input_tokens ** 0.5))
        _check(self.input_tokens > 0 and g * g == self.input_tokens,
               f"{where}.input_tokens must be a square (a token grid), got {self.input_tokens}")
        _check(self.param_dtype in DTYPES and self.dtype in DTYPES, f"{where}: dtypes must be in {DTYPES}")


@dataclasses.dataclass(frozen=True)
class DetokenizerConfig:
    """ResamplerXLV2 + sampling settings (spec §4.4). Owner: models/detokenizer.py."""

    resampler: ResamplerXLV2Config = ResamplerXLV2Config()
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    height: int = 1024
    width: int = 1024
    seed: int = 42
    seed_policy: str = "per_image"  # per_image: re-seed every image (the original); free: one key stream

    def validate(self, where: str = "detokenizer") -> None:
        self.resampler.validate(f"{where}.resampler")
        _check(self.num_inference_steps > 0, f"{where}.num_inference_steps must be > 0")
        _check(self.seed_policy in ("per_image", "free"), f"{where}.seed_policy: per_image|free")
        _check(self.height % 8 == 0 and self.width % 8 == 0, f"{where}: height/width must be multiples of 8")


@dataclasses.dataclass(frozen=True)
class MLLMConfig:
    """Llama + input/output resamplers (spec §2.3–2.7). Owner: models/mllm.py."""

    input_resampler: QwenResamplerConfig = QwenResamplerConfig(grid_size=8, input_tokens=256)
    output_resampler: QwenResamplerConfig = QwenResamplerConfig(grid_size=16, input_tokens=64)
    num_img_tokens: int = 64
    lm_loss_scale: float = 1.0
    rec_loss_scale: float = 1.0
    suppress_mode: str = "zero"  # the original's 0.0-logit rule; "neg_inf" is the clean mode
    max_images: int = 10  # image slots per sample (static shapes)
    max_gen_images: int = 1  # target images per sample the loss regresses (SEED-Story: exactly one)

    def validate(self, where: str = "mllm") -> None:
        _check(self.suppress_mode in ("zero", "neg_inf"), f"{where}.suppress_mode: zero|neg_inf")
        self.input_resampler.validate(f"{where}.input_resampler")
        self.output_resampler.validate(f"{where}.output_resampler")
        n = self.num_img_tokens
        _check(self.input_resampler.grid_size ** 2 == n,
               f"{where}: input_resampler.grid_size² ({self.input_resampler.grid_size ** 2}) must equal "
               f"num_img_tokens ({n})")
        _check(self.output_resampler.input_tokens == n,
               f"{where}: output_resampler.input_tokens ({self.output_resampler.input_tokens}) must equal "
               f"num_img_tokens ({n})")
        _check(self.input_resampler.embed_dim == self.output_resampler.embed_dim,
               f"{where}: the two resamplers need the same embed_dim (the LLM width)")
        _check(self.output_resampler.grid_size ** 2 == self.input_resampler.input_tokens,
               f"{where}: output_resampler.grid_size² must equal input_resampler.input_tokens "
               "(regressed features are ViT-like and feed back as input images)")
        _check(self.max_images >= 1 and self.max_gen_images >= 1, f"{where}: max_images and max_gen_images must be >= 1")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """The decoder's KV cache: sink region + ring buffer (spec §3). Owner: cache.py."""

    policy: str = "multimodal-sink"  # dense | window | sink | multimodal-sink
    positions: str = "shifted"  # shifted (pre-RoPE keys, StreamingLLM) | original (post-RoPE)
    # Full size: 4 first tokens + 252 pinned slots (10 evicted images × 24 span tokens) + a 1792-token
    # ring (≈ the released 8-image window at 66 image + ~150 text tokens per frame). Max position in
    # shifted mode stays < capacity ≤ Llama-2's 4096.
    capacity: int = 2048  # sink policies: first tokens + pinned + ring slots (dense/window: derived per story)
    sink_tokens: int = 4  # first tokens kept forever (StreamingLLM's attention sinks)
    sink_capacity: int = 256  # first tokens + the multimodal sink's pinned slots (FIFO)
    window_images: int = 8  # window policy: images kept (the released value)
    boi_before: int = 4  # multimodal sink pins [BOI − boi_before, BOI + boi_after) of every evicted image
    boi_after: int = 8
    eoi_before: int = 8  # ... and [EOI − eoi_before, EOI + eoi_after)
    eoi_after: int = 4

    def validate(self, where: str = "cache") -> None:
        _check(self.policy in ("dense", "window", "sink", "multimodal-sink"),
               f"{where}.policy: dense|window|sink|multimodal-sink")
        _check(self.positions in ("shifted", "original"), f"{where}.positions: shifted|original")
        _check(self.capacity > self.sink_capacity or self.policy in ("dense", "window"),
               f"{where}: capacity must exceed sink_capacity")
        _check(self.sink_tokens >= 0 and self.window_images >= 1, f"{where}: sink_tokens >= 0, window_images >= 1")
        _check(self.sink_capacity > self.sink_tokens or self.policy != "multimodal-sink",
               f"{where}: multimodal-sink needs sink_capacity > sink_tokens (room for pinned image spans)")
        _check(min(self.boi_before, self.boi_after, self.eoi_before, self.eoi_after) >= 0,
               f"{where}: span sizes must be >= 0")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """StoryStream records → SEED-Story training batches (spec §5.1–5.2). Owner: data_pipeline/."""

    path: str = ""  # directory written by `seed-story data build`
    split: str = "train"
    stage: int = 2  # 1: single frames + SDXL target; 2: MLLM SFT (ViT squash); 3: keep-ratio ViT + SDXL target
    max_length: int = 1280  # samples with len(input_ids) >= max_length are dropped (the original's rule)
    num_img_tokens: int = 64  # <img_xxxxx> tokens per image (64 full size; tiny models use fewer)
    max_images: int = 10  # image slots per sample (static shapes); a record's frames beyond it are unused
    image_size: int = 448  # ViT input side
    sd_size: int = 1024  # SDXL target side (stages 1 and 3)
    quirky_time_ids: bool = False  # True reproduces the original stage-3 bug (spec §5.4: offsets swapped); we fix it by default
    batch_size: int = 30  # per process
    shuffle_seed: int = 42
    num_epochs: Optional[int] = None  # None: repeat forever
    workers: int = 2  # grain worker processes (0: in the main process)
    worker_buffer_size: int = 2
    chunk: int = 10  # frames per record when building (StoryStream chunk_data.py)
    min_resolution: int = 128  # build-time filter: both sides >= this
    min_aspect: float = 0.2  # build-time filter: min_aspect <= h/w <= 1/min_aspect
    # Share of stage-2/3 samples drawn from a whole record (beyond max_images frames) and seen
    # through the story cache (`cache:`, a sink policy) as the story loop will show it: teaches the
    # model to read what a long story's cache keeps (first tokens, pinned image spans, the ring).
    cache_views: float = 0.0

    def validate(self, where: str = "data") -> None:
        _check(self.stage in (1, 2, 3), f"{where}.stage must be 1, 2 or 3, got {self.stage}")
        _check(self.max_images >= 2, f"{where}.max_images must be >= 2 (one input + one target)")
        _check(self.num_img_tokens >= 1, f"{where}.num_img_tokens must be >= 1")
        _check(self.max_length > 2 * (self.num_img_tokens + 2) + 2,
               f"{where}.max_length ({self.max_length}) cannot hold two images of {self.num_img_tokens} tokens")
        _check(self.batch_size >= 1, f"{where}.batch_size must be >= 1")
        _check(self.chunk >= 2, f"{where}.chunk must be >= 2")
        _check(0.0 < self.min_aspect <= 1.0, f"{where}.min_aspect must be in (0, 1]")
        _check(self.min_resolution >= 1, f"{where}.min_resolution must be >= 1")
        _check(self.workers >= 0, f"{where}.workers must be >= 0")
        _check(0.0 <= self.cache_views <= 1.0, f"{where}.cache_views must be in [0, 1], got {self.cache_views}")
        _check(0 <= self.shuffle_seed < 2**32, f"{where}.shuffle_seed must be a 32-bit unsigned integer")
        _check(self.num_epochs is None or self.num_epochs >= 1, f"{where}.num_epochs must be >= 1 or null")


TRAINABLE_PRESETS = ("full", "lora", "kv", "unet")


TIMESTEP_BIAS = ("none", "earlier", "later", "range")  # diffusers' --timestep_bias_strategy


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training job (spec §5.3, §5.4). Owner: train/.

    stage 0 is a plain causal-LM objective on `llm` alone (the machinery's own proof); 1, 2, 3 are
    SEED-Story's stages. `trainable` picks a preset within the stage's trained components:
    full (everything), lora (LoRA adapters + norms + embeddings + lm_head + agent resamplers, §2.4),
    kv (UNet to_k/to_v + de-tokenizer resampler, §4.3), unet (whole UNet + resampler);
    `trainable_regex` (over "component/path/to/param") replaces the preset when set."""

    stage: int = 0
    steps: int = 1000
    batch_size: int = 8  # global examples per optimizer step (all processes, all microbatches)
    grad_accum: int = 1  # microbatches per step (lax.scan)
    seq_len: int = 128  # stage 0 sequence length
    lr: float = 1e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0  # AdamW, decoupled, on every trainable parameter (as the original)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    clip_norm: float = 1.0  # global-norm clipping; 0 disables
    trainable: str = "full"
    trainable_regex: str = ""
    dtype: str = ""  # compute dtype forced on every model section ("" keeps each section's)
    frozen_dtype: str = ""  # storage dtype of frozen params ("" keeps param_dtype)
    remat: str = ""  # remat policy forced on every model section that has one ("" keeps)
    checkpoint_every: int = 1000
    keep: int = 3  # checkpoints kept
    async_checkpoint: bool = True
    save_frozen: bool = False  # frozen params are rebuilt from `init`/seed on resume unless saved
    log_every: int = 10
    seed: int = 0
    data: str = "synthetic"  # stage 0: synthetic; stages 1-3: the `data:` section's dataset
    synthetic_examples: int = 4096
    init: str = ""  # a seed-story checkpoint directory to start the params from
    # stages 1 and 3 (the denoising loss), as diffusers' SDXL training script; the defaults are the
    # original's (t uniform, plain MSE). timestep_bias: one of TIMESTEP_BIAS
    timestep_bias: str = "none"
    timestep_bias_multiplier: float = 1.0
    timestep_bias_portion: float = 0.25
    timestep_bias_begin: int = 0
    timestep_bias_end: int = 1000
    snr_gamma: float = 0.0  # Min-SNR-γ loss weighting; 0 = off

    def validate(self, where: str = "train") -> None:
        _check(self.stage in (0, 1, 2, 3), f"{where}.stage must be 0, 1, 2 or 3, got {self.stage}")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "checkpoint_every", "keep", "log_every"):
            _check(getattr(self, name) >= 1, f"{where}.{name} must be >= 1")
        _check(self.batch_size % self.grad_accum == 0,
               f"{where}: batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        _check(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), f"{where}.betas: two numbers in [0, 1)")
        _check(self.lr > 0 and self.eps > 0, f"{where}: lr and eps must be > 0")
        _check(self.weight_decay >= 0 and self.clip_norm >= 0, f"{where}: weight_decay and clip_norm must be >= 0")
        _check(self.warmup_steps >= 0, f"{where}.warmup_steps must be >= 0")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"{where}.min_lr_ratio must be in [0, 1]")
        _check(self.trainable in TRAINABLE_PRESETS, f"{where}.trainable must be one of {TRAINABLE_PRESETS}")
        _check(self.dtype in ("",) + DTYPES and self.frozen_dtype in ("",) + DTYPES,
               f"{where}: dtype and frozen_dtype must be empty or one of {DTYPES}")
        _check(self.remat in ("",) + REMAT_POLICIES, f"{where}.remat must be empty or one of {REMAT_POLICIES}")
        _check(self.timestep_bias in TIMESTEP_BIAS,
               f"{where}.timestep_bias must be one of {TIMESTEP_BIAS}, got {self.timestep_bias!r}")
        _check(self.timestep_bias_multiplier > 0, f"{where}.timestep_bias_multiplier must be > 0")
        _check(0.0 < self.timestep_bias_portion <= 1.0, f"{where}.timestep_bias_portion must be in (0, 1]")
        _check(0 <= self.timestep_bias_begin < self.timestep_bias_end,
               f"{where}: need 0 <= timestep_bias_begin < timestep_bias_end")
        _check(self.snr_gamma >= 0, f"{where}.snr_gamma must be >= 0 (0 = off)")
        if self.trainable_regex:
            import re

            try:
                re.compile(self.trainable_regex)
            except re.error as e:
                raise ConfigError(f"{where}.trainable_regex: {e}") from None


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (-1 takes the rest) and the logical → mesh rules table."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1  # slices (multi-slice / multi-host data parallelism)
    rules: tuple[tuple[str, Any], ...] = (
        ("batch", ("data", "fsdp")),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("q_lora", None),
        ("lora_rank", None),
        ("norm", None),
        ("conv_in", "fsdp"),  # conv kernels are FSDP-sharded like linear ones (SDXL's ~640 MiB of them)
        ("conv_out", "tensor"),
        ("kernel_h", None),
        ("kernel_w", None),
        ("layers", None),
        ("queries", None),
        ("length", None),
        ("cache_batch", ("data", "fsdp")),
        ("cache_heads", "tensor"),
        ("cache_len", None),
    )

    def validate(self, where: str = "mesh") -> None:
        sizes = [self.data, self.fsdp, self.tensor]
        _check(sum(1 for s in sizes if s == -1) <= 1, f"{where}: at most one axis may be -1")
        _check(all(s == -1 or s >= 1 for s in sizes), f"{where}: axis sizes must be >= 1 or -1")


@dataclasses.dataclass(frozen=True)
class SeedStoryConfig:
    """A whole model or job: every section is optional so one file can hold just a Llama."""

    llm: Optional[LlamaConfig] = None
    vit: Optional[ViTConfig] = None
    unet: Optional[UNetConfig] = None
    vae: Optional[VAEConfig] = None
    scheduler: Optional[SchedulerConfig] = None
    detokenizer: Optional[DetokenizerConfig] = None
    mllm: Optional[MLLMConfig] = None
    cache: Optional[CacheConfig] = None
    data: Optional[DataConfig] = None
    train: Optional[TrainConfig] = None
    mesh: MeshConfig = MeshConfig()
    name: str = ""

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value) and hasattr(value, "validate"):
                value.validate(f.name)


# --------------------------------------------------------------------------------------------
# Machinery
# --------------------------------------------------------------------------------------------


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(tp: Any, value: Any, path: str) -> Any:
    tp = _unwrap_optional(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), f"{path}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, path)
    origin = typing.get_origin(tp)
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        return tuple(_freeze(v) for v in value)
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        _check(isinstance(value, bool), f"{path}: expected true/false, got {value!r}")
        return value
    if tp is str:
        _check(isinstance(value, str), f"{path}: expected a string, got {value!r}")
        return value
    return _freeze(value)


def _freeze(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types name their path."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    _check(not unknown, f"{path or cls.__name__}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """Plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(x) for x in cfg]
    return cfg


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml_tree(path: str | os.PathLike, _seen: tuple = ()) -> dict:
    """Read a YAML config and the `base:` files it names, merged (later wins)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    _check(path.resolve() not in _seen, f"{path}: circular `base:` include")
    try:
        data = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    _check(isinstance(data, dict), f"{path}: top level must be a mapping")
    bases = data.pop("base", []) or []
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for b in bases:
        merged = _deep_merge(merged, load_yaml_tree(path.parent / b, _seen + (path.resolve(),)))
    return _deep_merge(merged, data)


class YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string (its floats need a dot); configs and overrides mean the
    number, as YAML 1.2 does."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def read_yaml(text: str):
    """A YAML document as plain data (safe: no tags that build objects)."""
    return yaml.load(text, Loader=YamlLoader)


def apply_overrides(tree: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """`a.b=c` overrides; values parse as YAML (`llm.num_layers=2`, `llm.lora=null`)."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        _check("=" in item, f"override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        _check(all(parts), f"override {item!r}: empty key segment")
        node = tree
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            _check(isinstance(node[p], dict), f"override {item!r}: {p} is not a section")
            node = node[p]
        try:
            node[parts[-1]] = read_yaml(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: bad value: {e}") from None
    return tree


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> SeedStoryConfig:
    tree = apply_overrides(load_yaml_tree(path), overrides)
    try:
        cfg = from_dict(SeedStoryConfig, tree)
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg


def config_from_tree(tree: dict) -> SeedStoryConfig:
    cfg = from_dict(SeedStoryConfig, tree)
    cfg.validate()
    return cfg


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve_config_path(name_or_path: str) -> Path:
    """`tiny` → configs/tiny.yaml; a path is taken as is."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return CONFIG_DIR / f"{name_or_path}.yaml"
