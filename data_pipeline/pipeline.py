"""grain input pipeline: built records → SEED-Story training batches of static shape.

    StorySource (ArrayRecord via tfds)
      → IndexSampler: seeded global shuffle, epochs, per-process shard (process_index/count)
      → MakeSample (grain RandomMap: g from the record's own seeded rng; decode only the frames
        used; ViT / SDXL transforms; the §5.2 sample; image slots padded to max_images)
      → KeepSample (drops samples at >= max_length, as the original)
      → Batch(batch_size, drop_remainder)
      → grain worker processes
      → a DataLoaderIterator whose state saves/restores (get_state/set_state, or orbax).

Batch layout (stages 2 and 3), B = batch_size, L = max_length, M = max_images:
    input_ids, attention_mask, labels  (B, L) int32
    ids_cmp_mask, ids_gen_mask         (B, L) bool
    images                             (B, M, S, S, 3) from the ViT transform (zeros in empty slots)
    image_valid                        (B, M) bool  slot holds an image (the first g+2 slots)
    embeds_cmp_mask, embeds_gen_mask   (B, M) bool  slot is an input / the target image
    num_images, g                      (B,) int32;  record_index (B,) int64
  stage 3 adds  sd_image (B, sd, sd, 3) float32 in [-1, 1] (the target frame), time_ids (B, 6) float32.
Row-major order of True entries in embeds_cmp_mask matches the k-th group of True positions in
ids_cmp_mask, as in the original's concatenated `images`.
Stage 1 (de-tokenizer on frames): image (B, S, S, 3), sd_image, time_ids, record_index, frame.

`sample_dataset` gives the same samples as a random-access grain MapDataset (for trainers that index
global batches by step); it cannot drop, so a too-long sample redraws a smaller g there.

Everything the workers run lives in this importable module (grain pickles it into spawned
processes); the main process must have absl flags marked parsed (the CLI and conftest do).
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any, Optional

import grain.python as grain
import numpy as np

from data_pipeline.builder import StorySource
from data_pipeline.samples import build_sample, build_view_sample
from seed_story_jax.errors import DataError


def mark_flags_parsed() -> None:
    """grain workers read absl flags; outside absl.app nobody parses them."""
    import absl.flags

    if not absl.flags.FLAGS.is_parsed():
        absl.flags.FLAGS.mark_as_parsed()


def decode_image(data: bytes):
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


class Transforms:
    """The image transforms of a stage (spec §1.3), from seed_story_jax.transforms: ViT squash 448
    (stage 2), ViT keep-ratio 448 (stages 1, 3), SDXL 1024 crop + time ids (stages 1, 3; stage 3
    with the crop offsets in their SDXL slots; quirky_time_ids=True reproduces the original's swap)."""

    def __init__(self, stage: int, image_size: int, sd_size: int, quirky_time_ids: bool = False):
        self.stage, self.image_size, self.sd_size = stage, image_size, sd_size
        self.quirky_time_ids = quirky_time_ids and stage == 3

    def vit(self, img) -> np.ndarray:
        from seed_story_jax import transforms as T

        fn = T.vit_squash_448 if self.stage == 2 else T.vit_keep_ratio_448
        return np.asarray(fn(img, size=self.image_size))

    def sd(self, img) -> tuple[np.ndarray, np.ndarray]:
        from seed_story_jax import transforms as T

        arr, time_ids = T.sdxl_crop_1024(img, size=self.sd_size, quirky_time_ids=self.quirky_time_ids)
        return np.asarray(arr, np.float32), np.asarray(time_ids, np.float32).reshape(6)


class MakeSample(grain.RandomMapTransform):
    """grain RandomMapTransform: record → one training sample.

    A sample at >= max_length is dropped (None, as the original) when `too_long="drop"`; random
    access (sample_dataset) cannot drop, so there `too_long="shorter"` redraws g below the drawn
    one until the sample fits. `tokenizer` is a Tokenizer object (must pickle when workers > 0) or
    a tokenizer directory, loaded once per worker."""

    def __init__(self, tokenizer, *, stage: int, max_length: int, num_img_tokens: int, max_images: int,
                 image_size: int, sd_size: int, quirky_time_ids: bool = False,
                 transforms: Optional[Transforms] = None, too_long: str = "drop", cache_views: float = 0.0,
                 cache=None):
        if not 0.0 <= cache_views <= 1.0:
            raise ValueError(f"data.cache_views must be in [0, 1], got {cache_views}")
        if cache_views and cache is None:
            raise ValueError("data.cache_views needs the story cache's config (cache:)")
        # (policy, capacity) of the cache a `cache_views` share of stage-2/3 samples is seen through
        self.view = None
        if cache_views:
            from seed_story_jax.cache import CachePolicy

            if cache.policy not in ("sink", "multimodal-sink"):
                raise ValueError(f"data.cache_views needs a sink or multimodal-sink cache, got cache.policy "
                                 f"{cache.policy!r}")
            self.view = (CachePolicy.from_config(cache), cache.capacity)
        self.cache_views = cache_views
        if too_long not in ("drop", "shorter"):
            raise ValueError(f"too_long must be 'drop' or 'shorter', got {too_long!r}")
        self.too_long = too_long
        self._tok = tokenizer
        self._tok_obj = None if isinstance(tokenizer, (str, Path)) else tokenizer
        self.stage = stage
        self.max_length = max_length
        self.num_img_tokens = num_img_tokens
        self.max_images = max_images
        self.image_size = image_size
        self.transforms = transforms or Transforms(stage, image_size, sd_size, quirky_time_ids)

    @property
    def tokenizer(self):
        if self._tok_obj is None:
            from seed_story_jax.tokenizer import Tokenizer

            self._tok_obj = Tokenizer.load(self._tok)
        return self._tok_obj

    def __getstate__(self):
        d = dict(self.__dict__)
        if isinstance(self._tok, (str, Path)):
            d["_tok_obj"] = None
        return d

    def random_map(self, record: dict, rng: np.random.Generator) -> Optional[dict]:
        n = min(len(record["captions"]), self.max_images)
        if self.stage == 1:
            f = int(rng.integers(n))
            img = decode_image(record["images"][f])
            sd, time_ids = self.transforms.sd(img)
            return {"image": self.transforms.vit(img), "sd_image": sd, "time_ids": time_ids,
                    "record_index": np.int64(record["index"]), "frame": np.int32(f)}
        if self.view is not None and rng.random() < self.cache_views:
            return self._view_sample(record, rng)
        g = int(rng.integers(0, n - 1))  # randint(0, n-2) inclusive, as the original
        s = build_sample(record["captions"][:n], g, self.tokenizer, num_img_tokens=self.num_img_tokens,
                         max_length=self.max_length)
        while s is None and self.too_long == "shorter" and g > 0:
            g = int(rng.integers(0, g))
            s = build_sample(record["captions"][:n], g, self.tokenizer, num_img_tokens=self.num_img_tokens,
                             max_length=self.max_length)
        if s is None:
            if self.too_long == "shorter":
                raise DataError(f"record {record['key']}: even 2 images and captions need >= max_length "
                                f"({self.max_length}) tokens")
            return None  # too long: dropped before any image is decoded
        return self._arrays(record, s, g)

    def _view_sample(self, record: dict, rng: np.random.Generator) -> dict:
        """A target anywhere in the whole record (not only its first max_images frames), seen
        through the story cache (`samples.build_view_sample`)."""
        g = int(rng.integers(0, len(record["captions"]) - 1))
        try:
            s = build_view_sample(record["captions"], g, self.tokenizer, *self.view, num_img_tokens=self.num_img_tokens,
                                  max_length=self.max_length, max_images=self.max_images)
        except DataError as e:
            raise DataError(f"record {record['key']}: {e}") from None
        return self._arrays(record, s, g)

    def _arrays(self, record: dict, s, g: int) -> dict:
        k = len(s.image_ids)  # input images, then the target
        used = [decode_image(record["images"][i]) for i in s.image_ids]
        first = self.transforms.vit(used[0])
        images = np.zeros((self.max_images,) + first.shape, first.dtype)
        images[0] = first
        for i, img in enumerate(used[1:], start=1):
            images[i] = self.transforms.vit(img)
        valid = np.zeros(self.max_images, bool)
        valid[:k] = True
        cmp = np.zeros(self.max_images, bool)
        cmp[:k - 1] = True
        gen = np.zeros(self.max_images, bool)
        gen[k - 1] = True
        out = {
            "input_ids": s.input_ids, "attention_mask": s.attention_mask, "labels": s.labels,
            "ids_cmp_mask": s.ids_cmp_mask, "ids_gen_mask": s.ids_gen_mask,
            "images": images, "image_valid": valid, "embeds_cmp_mask": cmp, "embeds_gen_mask": gen,
            "num_images": np.int32(k), "g": np.int32(g), "record_index": np.int64(record["index"]),
        }
        if self.stage == 3:
            out["sd_image"], out["time_ids"] = self.transforms.sd(used[-1])
        return out


class KeepSample(grain.FilterTransform):
    """Drops the samples MakeSample returned as None (too long)."""

    def filter(self, element) -> bool:
        return element is not None


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
    read_threads: int = 2  # per worker; records are small, decoding is the cost
    read_prefetch: int = 16  # records read ahead per worker
    drop_remainder_shard: bool = True  # finite epochs: every process gets len // count positions


def make_loader(data_cfg, tokenizer, *, path=None, split: Optional[str] = None, cache=None,
                process_index: Optional[int] = None, process_count: Optional[int] = None,
                workers: Optional[int] = None, num_epochs: Any = "config", seed: Optional[int] = None,
                options: LoaderOptions = LoaderOptions(), transforms: Optional[Transforms] = None):
    """A grain DataLoader for `data_cfg` (a DataConfig). Shards by jax.process_index()/process_count()
    unless given. `num_epochs` defaults to the config's (None: forever)."""
    mark_flags_parsed()
    source = StorySource(path or data_cfg.path, split or data_cfg.split)
    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    epochs = data_cfg.num_epochs if num_epochs == "config" else num_epochs
    shard = grain.ShardOptions(shard_index=process_index, shard_count=process_count,
                               drop_remainder=options.drop_remainder_shard)
    # The sampler walks one global shuffled stream; process p takes positions p, p + count, ...
    # (the DataLoader's sharding). So processes are disjoint and together cover every epoch, and a
    # record's rng (seed + global position) — hence its g — does not depend on the process count.
    sampler = grain.IndexSampler(num_records=len(source), shard_options=grain.NoSharding(), shuffle=True,
                                 num_epochs=epochs, seed=data_cfg.shuffle_seed if seed is None else seed)
    ops = [
        MakeSample(tokenizer, stage=data_cfg.stage, max_length=data_cfg.max_length,
                 num_img_tokens=data_cfg.num_img_tokens, max_images=data_cfg.max_images,
                 image_size=data_cfg.image_size, sd_size=data_cfg.sd_size,
                 quirky_time_ids=data_cfg.quirky_time_ids, transforms=transforms,
                 cache_views=data_cfg.cache_views, cache=cache),
        KeepSample(),
        grain.Batch(batch_size=data_cfg.batch_size, drop_remainder=True),
    ]
    return grain.DataLoader(
        data_source=source, sampler=sampler, operations=ops,
        worker_count=data_cfg.workers if workers is None else workers,
        worker_buffer_size=data_cfg.worker_buffer_size, shard_options=shard,
        read_options=grain.ReadOptions(num_threads=options.read_threads,
                                       prefetch_buffer_size=options.read_prefetch),
    )


def sample_dataset(data_cfg, tokenizer, *, path=None, split: Optional[str] = None, epochs: int = 1,
                   seed: Optional[int] = None, transforms: Optional[Transforms] = None,
                   cache=None) -> grain.MapDataset:
    """Random-access samples (no batching, no workers) for step-indexed trainers: `epochs` passes over
    the records, each shuffled differently and with g drawn afresh from the element's seeded rng.
    Too-long samples redraw a smaller g instead of being dropped (random access cannot drop)."""
    seed = data_cfg.shuffle_seed if seed is None else seed
    source = StorySource(path or data_cfg.path, split or data_cfg.split)
    make = MakeSample(tokenizer, stage=data_cfg.stage, max_length=data_cfg.max_length,
                      num_img_tokens=data_cfg.num_img_tokens, max_images=data_cfg.max_images,
                      image_size=data_cfg.image_size, sd_size=data_cfg.sd_size,
                      quirky_time_ids=data_cfg.quirky_time_ids, transforms=transforms, too_long="shorter",
                      cache_views=data_cfg.cache_views, cache=cache)
    return grain.MapDataset.source(source).shuffle(seed=seed).random_map(make, seed=seed).repeat(epochs)


def make_iterator(data_cfg, tokenizer, **kwargs):
    """An iterator over batches with get_state()/set_state() and orbax save/load."""
    return iter(make_loader(data_cfg, tokenizer, **kwargs))


# ------------------------------------------------------------------------------------------
# iterator state through orbax (what the trainer's CheckpointManager does with its items)
# ------------------------------------------------------------------------------------------


def save_iterator(iterator, directory) -> None:
    """Write the iterator's position to `directory` with orbax's grain handler."""
    import orbax.checkpoint as ocp

    ckptr = ocp.Checkpointer(grain.PyGrainCheckpointHandler())
    ckptr.save(Path(directory).absolute(), args=grain.PyGrainCheckpointSave(iterator))


def restore_iterator(iterator, directory):
    """Move `iterator` (from an identically configured loader) to the position saved in `directory`."""
    import orbax.checkpoint as ocp

    ckptr = ocp.Checkpointer(grain.PyGrainCheckpointHandler())
    return ckptr.restore(Path(directory).absolute(), args=grain.PyGrainCheckpointRestore(iterator))


def close_iterator(iterator) -> None:
    """Stop an iterator's worker processes now rather than at garbage collection."""
    close = getattr(getattr(iterator, "_iterator", None), "close", None)
    if close is not None:
        close()
