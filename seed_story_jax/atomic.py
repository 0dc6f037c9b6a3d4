"""Every output is written to a temporary path beside its destination and renamed into place, so a
failed or interrupted command never leaves a half-written file or directory."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


class OutputExistsError(FileExistsError):
    pass


def refuse_existing(dst: str | os.PathLike) -> Path:
    """`dst` as a Path; an error if it exists (checked before any work, and again at the rename)."""
    dst = Path(dst)
    if dst.exists():
        raise OutputExistsError(f"{dst}: already exists (refusing to overwrite)")
    return dst


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike, *, directory: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path (a fresh directory if `directory`); on clean exit rename it to `dst`."""
    dst = Path(dst) if overwrite else refuse_existing(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dst.name}.tmp-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dst.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=dst.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(tmp, dst)
        _remove(old)
    else:
        os.replace(tmp, dst)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
