"""Compile counting and peak-memory reading, for the "compiled once" guarantees and benchmarks."""

from __future__ import annotations

import contextlib
import resource
import threading

import jax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_count = 0
_installed = False


def _listener(event: str, duration: float, **kwargs) -> None:
    global _count
    if event == _COMPILE_EVENT:
        with _lock:
            _count += 1


def _install() -> None:
    global _installed
    if not _installed:
        jax.monitoring.register_event_duration_secs_listener(_listener)
        _installed = True


def compile_count() -> int:
    _install()
    return _count


class CompileCounter(contextlib.AbstractContextManager):
    """`with CompileCounter() as c: ...; c.count` = XLA backend compilations inside the block."""

    def __enter__(self):
        self._start = compile_count()
        self.count = 0
        return self

    def __exit__(self, *exc):
        self.count = compile_count() - self._start
        return False

    @property
    def so_far(self) -> int:
        return compile_count() - self._start


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")
