"""Small shared helpers for benchmarks: timing, a printed table, a JSON record, machine facts."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

RESULTS = Path(__file__).resolve().parent / "results"


def parser(name: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"benchmarks/{name}.py", description=description)
    p.add_argument("--out", default=str(RESULTS / f"{name}.json"), help="where to write the JSON record")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (the median is reported)")
    return p


def timeit(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> dict:
    """Wall seconds of `fn()` (which must block until its work is done): median, min, all runs."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return {"median": statistics.median(runs), "min": min(runs), "runs": runs}


def torch_at_best_threads(measure: Callable[[], float]) -> tuple[int, dict]:
    """Run `measure()` (seconds, lower is better) with torch at 1 and at all intra-op threads; set
    and return the faster count and every result. The reference is measured at its best: on a
    shared 2-core machine two threads can be several times slower than one."""
    import torch

    results = {}
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        results[threads] = measure()
    best = min(results, key=results.get)
    torch.set_num_threads(best)
    return best, results


def machine() -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        import jax

        info["jax"] = jax.__version__
        info["jax_devices"] = [str(d) for d in jax.devices()]
    except Exception:  # noqa: BLE001 - facts only
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        pass
    try:
        info["load_avg"] = os.getloadavg()
    except OSError:
        pass
    return info


def table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def write_json(path: str | os.PathLike, record: dict) -> Path:
    """Write atomically (temp file + rename), stamped with the date it was measured."""
    import datetime

    from seed_story_jax.atomic import atomic_path

    record = {"date": datetime.datetime.now().isoformat(timespec="seconds"), **record}
    path = Path(path)
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=str))
    return path
