"""StoryStream chunks → a tfds ArrayRecord dataset, and the grain data source that reads it back.

No TensorFlow: tfds writes ArrayRecord through its GeneratorBasedBuilder and reads through
`as_data_source`, and the images are stored as their original encoded bytes (already checked to
decode), not as `tfds.features.Image` (which needs TF). Layout of a build directory:

    OUT/story_stream/1.0.0/            the tfds dataset (dataset_info.json, *.array_record-*)
    OUT/build_report.json              what was kept and dropped, and why; the fingerprint
    OUT/problems.jsonl                 every skipped line or image: reason, jsonl file, line, message
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import shutil
import threading
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from data_pipeline import storystream as ss
from seed_story_jax.atomic import atomic_path
from seed_story_jax.errors import DataError

NAME = "story_stream"
VERSION = "1.0.0"


def _tfds():
    import tensorflow_datasets as tfds

    return tfds


def _checked_stories(stories: Iterable[ss.Story], root, limits: ss.ImageLimits, workers: int
                     ) -> Iterator[ss.CheckedStory]:
    """check_story over `stories`, in order, in `workers` processes (0: here)."""
    if workers <= 0:
        for s in stories:
            yield ss.check_story(s, root, limits)
        return
    # spawn: the parent may hold threads (tqdm, tfds); a bounded window keeps memory flat.
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        window: list[cf.Future] = []
        for s in stories:
            window.append(pool.submit(ss.check_story, s, root, limits))
            if len(window) >= 8 * workers:
                yield window.pop(0).result()
        for f in window:
            yield f.result()


def _make_builder_class():
    tfds = _tfds()

    class StoryStream(tfds.core.GeneratorBasedBuilder):
        """Chunks of StoryStream stories: captions + encoded frames (spec §5.1)."""

        VERSION = tfds.core.Version(VERSION)
        # No checksums file to look up (nothing is downloaded); tfds' lookup of it for a builder
        # inside a package needs the `importlib_resources` backport.
        code_path = None

        def _log_download_bytes(self):  # tfds' banners; our progress bar and summary say it
            pass

        def _log_download_done(self):
            pass

        def __init__(self, *, stories=None, image_root=None, split="train", limits=None, workers=0,
                     report=None, progress=None, **kwargs):
            self._stories = stories
            self._image_root = image_root
            self._split = split
            self._limits = limits or ss.ImageLimits()
            self._workers = workers
            self._report = report
            self._progress = progress
            super().__init__(**kwargs)

        def _info(self):
            f = tfds.features
            return tfds.core.DatasetInfo(
                builder=self,
                description="StoryStream-format stories chunked for SEED-Story training (seed-story data build).",
                features=f.FeaturesDict({
                    "key": f.Text(),
                    "id": np.int64,
                    "chunk": np.int32,
                    "captions": f.Sequence(f.Text()),
                    "image_paths": f.Sequence(f.Text()),
                    "images": f.Sequence(f.Tensor(shape=(), dtype=np.object_)),  # encoded bytes
                    "sizes": f.Tensor(shape=(None, 2), dtype=np.int32),  # (height, width) per frame
                }),
                metadata=tfds.core.MetadataDict(),
            )

        def _split_generators(self, dl_manager):
            return {self._split: self._generate_examples()}

        def _generate_examples(self):
            digest = hashlib.sha256()
            for checked in _checked_stories(self._stories, self._image_root, self._limits, self._workers):
                kept = ss.account(checked, self._report)
                if self._progress is not None:
                    self._progress.update(1)
                    self._progress.set_postfix(kept=self._report.chunks_kept, dropped=self._report.chunks_dropped,
                                               refresh=False)
                if kept is None:
                    continue
                s = kept.story
                digest.update(ss.record_digest(s, kept.images))
                yield s.key, {
                    "key": s.key, "id": s.id, "chunk": s.chunk,
                    "captions": list(s.captions), "image_paths": list(s.images),
                    "images": kept.images, "sizes": np.asarray(kept.sizes, np.int32).reshape(-1, 2),
                }
            if self._report.chunks_kept == 0:
                raise DataError(f"no usable records: {self._report.summary()}")
            self.info.metadata["fingerprint"] = digest.hexdigest()[:16]
            self.info.metadata["report"] = self._report.to_dict()

    return StoryStream


_BUILDER_CLASS = None


def builder_class():
    """The tfds builder class (defined on first use so importing this module stays light)."""
    global _BUILDER_CLASS
    if _BUILDER_CLASS is None:
        _BUILDER_CLASS = _make_builder_class()
    return _BUILDER_CLASS


def build(jsonl, images, out, *, split: str = "train", chunk: int = 10, limits: ss.ImageLimits = ss.ImageLimits(),
          workers: int = 0, on_error: str = "skip", progress: bool = True, overwrite: bool = False) -> ss.DropReport:
    """Read `jsonl` (file or directory), check every image under `images`, write the dataset to `out`.

    `out` appears only when the build succeeds (atomic). Returns the drop report."""
    files = ss.jsonl_files(jsonl)
    root = Path(images)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: image root is not a directory")
    if chunk < 2:
        raise DataError(f"--chunk must be >= 2, got {chunk}")
    report = ss.DropReport(on_error=on_error)
    tfds = _tfds()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"building {split}", unit=" records")
    try:
        with atomic_path(out, directory=True, overwrite=overwrite) as tmp:
            builder = builder_class()(
                stories=ss.read_stories(files, chunk, report), image_root=root, split=split, limits=limits,
                workers=workers, report=report, progress=bar, data_dir=str(tmp), file_format="array_record")
            with _quiet_tfds(tfds), _log_above_bar(bar):
                builder.download_and_prepare()
            shutil.rmtree(Path(tmp) / "downloads", ignore_errors=True)
            info = {
                "name": NAME, "version": VERSION, "split": split, "chunk": chunk,
                "min_resolution": limits.min_resolution, "min_aspect": limits.min_aspect,
                "jsonl": [str(f) for f in files], "images": str(root),
                "fingerprint": builder.info.metadata["fingerprint"], "report": report.to_dict(),
            }
            (Path(tmp) / "build_report.json").write_text(json.dumps(info, indent=2))
            with open(Path(tmp) / "problems.jsonl", "w") as f:
                for prob in report.problems:
                    f.write(json.dumps(prob) + "\n")
    finally:
        if bar is not None:
            bar.close()
    return report


class _log_above_bar:
    """Skip messages go to stderr above the progress bar (not through it), once."""

    def __init__(self, bar):
        self.bar = bar

    def __enter__(self):
        import logging
        import sys

        bar = self.bar

        class Handler(logging.Handler):
            def emit(self, record):
                msg = f"{record.levelname.lower()}: {record.getMessage()}"
                if bar is not None:
                    bar.write(msg, file=sys.stderr)
                else:
                    print(msg, file=sys.stderr)

        self.handler = Handler(logging.WARNING)
        self.propagate = ss.log.propagate
        ss.log.addHandler(self.handler)
        ss.log.propagate = False

    def __exit__(self, *exc):
        ss.log.removeHandler(self.handler)
        ss.log.propagate = self.propagate


class _quiet_tfds:
    """tfds prints its own progress bars and a banner; ours is the one that counts drops."""

    def __init__(self, tfds):
        self.tfds = tfds

    def __enter__(self):
        self.tfds.disable_progress_bar()
        import logging

        self._logger = logging.getLogger("absl")
        self._level = self._logger.level
        self._logger.setLevel(logging.WARNING)

    def __exit__(self, *exc):
        self.tfds.enable_progress_bar()
        self._logger.setLevel(self._level)


# ------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------


def dataset_dir(path) -> Path:
    """The tfds dataset directory inside a build directory (or the path itself if it is one)."""
    p = Path(path)
    if (p / "dataset_info.json").is_file():
        return p
    d = p / NAME / VERSION
    if (d / "dataset_info.json").is_file():
        return d
    raise DataError(f"{p}: not a dataset built by `seed-story data build` (no {NAME}/{VERSION}/dataset_info.json)")


def read_build_report(path) -> dict:
    p = Path(path) / "build_report.json"
    if not p.is_file():
        p = dataset_dir(path).parent.parent / "build_report.json"
    return json.loads(p.read_text())


class StorySource:
    """grain RandomAccessDataSource over one split of a built dataset.

    Records come back as plain dicts: key/id/chunk, captions (str), image_paths (str), images (encoded
    bytes), sizes ((n, 2) int32, height/width). The tfds reader opens lazily, so the object pickles
    cheaply into grain workers; `repr` names the dataset by content (fingerprint), not by path, so a
    saved iterator state restores on another machine or after a move, and is refused for another
    dataset."""

    def __init__(self, path, split: str = "train"):
        self._dir = dataset_dir(path)
        info = json.loads((self._dir / "dataset_info.json").read_text())
        splits = {s["name"]: s for s in info.get("splits", [])}
        if split not in splits:
            raise DataError(f"{self._dir}: no split {split!r}; splits: {sorted(splits)}")
        self._split = split
        self._len = sum(int(n) for n in splits[split].get("shardLengths", []))
        meta_file = self._dir / "metadata.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        self._fingerprint = meta.get("fingerprint", "unknown")
        self._src = None
        self._lock = threading.Lock()

    def _source(self):
        if self._src is None:
            with self._lock:
                if self._src is None:
                    self._src = _tfds().builder_from_directory(str(self._dir)).as_data_source(self._split)
        return self._src

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self._len:
            raise IndexError(f"record {index} out of range [0, {self._len})")
        r = self._source()[int(index)]
        return {
            "key": _str(r["key"]),
            "id": int(r["id"]),
            "chunk": int(r["chunk"]),
            "captions": [_str(c) for c in r["captions"]],
            "image_paths": [_str(p) for p in r["image_paths"]],
            "images": [bytes(b) for b in r["images"]],
            "sizes": np.asarray(r["sizes"], np.int32).reshape(-1, 2),
            "index": int(index),
        }

    def __repr__(self) -> str:
        return (f"StorySource(name={NAME}, version={VERSION}, split={self._split!r}, "
                f"num_records={self._len}, fingerprint={self._fingerprint})")

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_src"] = None
        d["_lock"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock = threading.Lock()


def _str(x) -> str:
    return x.decode("utf-8") if isinstance(x, (bytes, np.bytes_)) else str(x)
