"""StoryStream jsonl + image root → validated story chunks (spec §5.1).

A StoryStream line is `{"id", "images": [relative paths], "captions": [...], "orders"}`. Like the
original `chunk_data.py`, a story is split into consecutive non-overlapping chunks of `chunk`
frames and the incomplete tail is dropped. Unlike the original (which checks only the last image it
decodes, at training time), every image is checked here, once, at build time: a chunk with any bad
image is dropped whole, because a story with a missing frame tells a different story.

Bad data never raises out of the readers in "skip" mode: each problem is counted by reason in a
`DropReport` and logged with file and line. In "fail" mode the first problem raises `DataError`
naming the file and line.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Optional

from seed_story_jax.errors import DataError

log = logging.getLogger("seed_story_jax.data")

# Problems with a jsonl line (the whole source story is dropped).
LINE_REASONS = ("malformed_line", "missing_field", "length_mismatch", "too_short", "reserved_token")
# Problems with one image (its chunk is dropped).
IMAGE_REASONS = ("path_escape", "missing_image", "undecodable_image", "too_small", "bad_aspect")

# Captions must not contain the image markup: the sample builder finds images by these tokens.
RESERVED = ("<img>", "</img>", "<img_")


class BadData(DataError):
    """One bad line or image; `reason` is one of LINE_REASONS or IMAGE_REASONS."""

    def __init__(self, reason: str, message: str, *, file=None, line=None):
        where = f"{file}:{line}" if line is not None else (str(file) if file else "")
        super().__init__(f"{where}: {reason}: {message}" if where else f"{reason}: {message}")
        self.reason = reason
        self.detail = message
        self.file = file
        self.line = line


@dataclasses.dataclass(frozen=True)
class Story:
    """One chunk of a source story: what one training record holds."""

    key: str  # unique and stable: "<jsonl path without .jsonl>/<line>/<chunk>"
    id: int  # the source story's id
    chunk: int  # index of this chunk within the source story
    images: tuple[str, ...]  # paths relative to the image root
    captions: tuple[str, ...]
    file: str = ""  # the jsonl file and line it came from, for messages
    line: int = 0


@dataclasses.dataclass
class DropReport:
    """Counts of what was read, kept and dropped (and why)."""

    on_error: str = "skip"
    lines: int = 0
    stories: int = 0  # source stories that parsed and passed the line checks
    chunks_seen: int = 0
    chunks_kept: int = 0
    images_kept: int = 0
    images_in_dropped_chunks: int = 0  # good images discarded with their chunk
    tail_frames: int = 0  # frames in incomplete tail chunks (dropped by design, as the original)
    dropped_lines: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    dropped_images: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    dropped_chunks: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list = dataclasses.field(default_factory=list)  # first few messages, for the summary
    problems: list = dataclasses.field(default_factory=list)  # every problem (reason, file, line, message)

    def __post_init__(self):
        if self.on_error not in ("skip", "fail"):
            raise ValueError(f"on_error must be 'skip' or 'fail', got {self.on_error!r}")

    def problem(self, err: BadData) -> None:
        if self.on_error == "fail":
            raise err
        counter = self.dropped_lines if err.reason in LINE_REASONS else self.dropped_images
        counter[err.reason] += 1
        if len(self.examples) < 20:
            self.examples.append(str(err))
        self.problems.append({"reason": err.reason, "file": str(err.file) if err.file else None,
                              "line": err.line, "message": str(err)})
        log.warning("skipped: %s", err)

    @property
    def stories_dropped(self) -> int:
        return sum(self.dropped_lines.values())

    @property
    def chunks_dropped(self) -> int:
        return sum(self.dropped_chunks.values())

    def to_dict(self) -> dict:
        return {
            "on_error": self.on_error,
            "lines": self.lines,
            "stories": self.stories,
            "stories_dropped": self.stories_dropped,
            "dropped_lines": dict(sorted(self.dropped_lines.items())),
            "chunks_seen": self.chunks_seen,
            "chunks_kept": self.chunks_kept,
            "chunks_dropped": self.chunks_dropped,
            "dropped_chunks": dict(sorted(self.dropped_chunks.items())),
            "images_kept": self.images_kept,
            "images_dropped": sum(self.dropped_images.values()),
            "dropped_images": dict(sorted(self.dropped_images.items())),
            "images_in_dropped_chunks": self.images_in_dropped_chunks,
            "tail_frames": self.tail_frames,
            "examples": list(self.examples),
        }

    def summary(self) -> str:
        def fmt(c):
            return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"

        return "\n".join([
            f"lines read {self.lines}; stories kept {self.stories}, dropped {self.stories_dropped} ({fmt(self.dropped_lines)})",
            f"records (chunks) written {self.chunks_kept} of {self.chunks_seen}; dropped {self.chunks_dropped} ({fmt(self.dropped_chunks)})",
            f"images kept {self.images_kept}; bad images {sum(self.dropped_images.values())} ({fmt(self.dropped_images)}); "
            f"good images discarded with their chunk {self.images_in_dropped_chunks}",
            f"tail frames not in a full chunk: {self.tail_frames}",
        ])


# ------------------------------------------------------------------------------------------
# jsonl
# ------------------------------------------------------------------------------------------


def jsonl_files(path: str | os.PathLike) -> list[Path]:
    """A jsonl file, or every *.jsonl below a directory (sorted, so builds are reproducible)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(q for q in p.rglob("*.jsonl") if q.is_file())
        if not files:
            raise DataError(f"{p}: no *.jsonl files below this directory")
        return files
    raise FileNotFoundError(f"{p}: no such file or directory")


def _parse_line(text: str, file, line: int) -> tuple[int, list[str], list[str]]:
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadData("malformed_line", f"invalid JSON ({e.msg} at column {e.colno})", file=file, line=line) from None
    if not isinstance(rec, dict):
        raise BadData("malformed_line", f"expected an object, got {type(rec).__name__}", file=file, line=line)
    for field in ("images", "captions"):
        if field not in rec:
            raise BadData("missing_field", f"no {field!r}", file=file, line=line)
        v = rec[field]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise BadData("malformed_line", f"{field!r} must be a list of strings", file=file, line=line)
    sid = rec.get("id", line)  # chunk_data.py numbers stories by line when there is no id
    if isinstance(sid, bool) or not isinstance(sid, int):
        raise BadData("malformed_line", f"'id' must be an integer, got {sid!r}", file=file, line=line)
    return sid, rec["images"], rec["captions"]


def read_stories(files: Iterable[Path], chunk: int, report: DropReport) -> Iterator[Story]:
    """Parse, check and chunk every line; bad lines go to `report`."""
    files = [Path(f) for f in files]
    base = os.path.commonpath([str(f.resolve().parent) for f in files]) if files else ""
    for file in files:
        name = Path(os.path.relpath(file.resolve(), base)).with_suffix("").as_posix()
        with open(file, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                report.lines += 1
                try:
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise BadData("malformed_line", f"not UTF-8 ({e.reason})", file=file, line=line_no) from None
                    sid, images, captions = _parse_line(text, file, line_no)
                    if len(images) != len(captions):
                        raise BadData("length_mismatch", f"{len(images)} images but {len(captions)} captions",
                                      file=file, line=line_no)
                    if len(images) < chunk:
                        raise BadData("too_short", f"{len(images)} frames, fewer than one chunk of {chunk}",
                                      file=file, line=line_no)
                    for c in captions:
                        if any(r in c for r in RESERVED):
                            raise BadData("reserved_token", f"caption contains image markup: {c[:60]!r}",
                                          file=file, line=line_no)
                except BadData as e:
                    report.problem(e)
                    continue
                report.stories += 1
                n_chunks = len(images) // chunk
                report.tail_frames += len(images) - n_chunks * chunk
                for k in range(n_chunks):
                    sl = slice(k * chunk, (k + 1) * chunk)
                    yield Story(key=f"{name}/{line_no}/{k}", id=sid, chunk=k,
                                images=tuple(images[sl]), captions=tuple(captions[sl]),
                                file=str(file), line=line_no)


# ------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------


def resolve_image(root: str | os.PathLike, rel: str) -> Path:
    """The file `rel` names under `root`; refuses absolute paths and anything resolving outside
    the root (`..`, symlinks pointing out)."""
    drive = len(rel) > 1 and rel[0].isalpha() and rel[1] == ":" and (len(rel) == 2 or rel[2] in "/\\")
    if not rel or os.path.isabs(rel) or rel.startswith(("/", "\\")) or drive:
        raise BadData("path_escape", f"image path {rel!r} is absolute or empty")
    root_r = Path(root).resolve()
    try:
        target = (root_r / rel).resolve()
    except (ValueError, OSError) as e:  # embedded NUL, symlink loops, over-long names
        raise BadData("missing_image", f"image path {rel!r} cannot be resolved ({e})") from None
    if not target.is_relative_to(root_r):
        raise BadData("path_escape", f"image path {rel!r} resolves outside the image root {root_r}")
    return target


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    min_resolution: int = 128  # the original's rule: both height and width >= this
    min_aspect: float = 0.2  # the original's rule: min_aspect <= h/w <= 1/min_aspect


def check_image_bytes(data: bytes, limits: ImageLimits, name: str = "") -> tuple[int, int]:
    """Decode fully (truncated files fail here, not in a training worker); return (height, width)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            w, h = im.size
    except Image.UnidentifiedImageError:
        raise BadData("undecodable_image", f"{name}: not an image format PIL recognises") from None
    except Exception as e:  # PIL raises many types for truncated or corrupt files
        raise BadData("undecodable_image", f"{name}: cannot decode ({type(e).__name__}: {e})") from None
    if h < limits.min_resolution or w < limits.min_resolution:
        raise BadData("too_small", f"{name}: {w}x{h} is below the minimum side {limits.min_resolution}")
    aspect = h / w
    if aspect < limits.min_aspect or aspect > 1.0 / limits.min_aspect:
        raise BadData("bad_aspect", f"{name}: {w}x{h} has aspect h/w {aspect:.3f} outside "
                                    f"[{limits.min_aspect}, {1.0 / limits.min_aspect:.3g}]")
    return h, w


def load_image(root, rel: str, limits: ImageLimits) -> tuple[bytes, int, int]:
    path = resolve_image(root, rel)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadData("missing_image", f"{rel}: no such file under {root}") from None
    except IsADirectoryError:
        raise BadData("missing_image", f"{rel}: is a directory") from None
    except OSError as e:
        raise BadData("missing_image", f"{rel}: cannot read ({e.strerror})") from None
    h, w = check_image_bytes(data, limits, rel)
    return data, h, w


@dataclasses.dataclass
class CheckedStory:
    """A story with its images read and checked; `problems` empty means keep it."""

    story: Story
    images: list[bytes]
    sizes: list[tuple[int, int]]
    problems: list[tuple[str, str]]  # (reason, message) per bad image


def check_story(story: Story, root, limits: ImageLimits) -> CheckedStory:
    """Read and check every image (all of them, so bad images are counted exactly)."""
    images, sizes, problems = [], [], []
    for rel in story.images:
        try:
            data, h, w = load_image(root, rel, limits)
        except BadData as e:
            problems.append((e.reason, e.detail))
            continue
        images.append(data)
        sizes.append((h, w))
    return CheckedStory(story, images, sizes, problems)


def record_digest(story: Story, images: list[bytes]) -> bytes:
    """A content hash of one record (for the dataset fingerprint)."""
    h = hashlib.sha256()
    h.update(story.key.encode())
    for c in story.captions:
        h.update(b"\0" + c.encode())
    for b in images:
        h.update(hashlib.sha256(b).digest())
    return h.digest()


def account(checked: CheckedStory, report: DropReport) -> Optional[CheckedStory]:
    """Count a checked story into `report`; return it when it is to be written."""
    report.chunks_seen += 1
    if not checked.problems:
        report.chunks_kept += 1
        report.images_kept += len(checked.images)
        return checked
    s = checked.story
    for reason, msg in checked.problems:
        report.problem(BadData(reason, msg, file=s.file, line=s.line))
    report.dropped_chunks[checked.problems[0][0]] += 1
    report.images_in_dropped_chunks += len(checked.images)
    return None
