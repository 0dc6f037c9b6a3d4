"""`make bench`: run every benchmark in benchmarks/ and rewrite benchmarks/RESULTS.md from the records.

    python -m benchmarks.run_all                 # every CPU benchmark, then GPU variants if a GPU is here
    python -m benchmarks.run_all --only vit,data # a subset
    python -m benchmarks.run_all --report-only   # no runs: rewrite RESULTS.md from benchmarks/results/*.json
    python -m benchmarks.run_all --gpu-only      # only the GPU variants (on a lent GPU machine)

A benchmark is any `benchmarks/<name>.py` (besides this file and common.py) that accepts `--out`.
CPU variants run with JAX_PLATFORMS=cpu, so they measure the CPU even on a machine with a GPU. A
benchmark's GPU variants are the `--gpu*` flags its `--help` lists; they run only when jax sees a
GPU, into results/<name>_<flag>.json. A failed run keeps the previous record (writes are atomic);
RESULTS.md lists the failure and keeps showing the older numbers with their date.

RESULTS.md is generated down to the KEEP marker; what follows the marker (hand-written notes: the
demo's wall time, training numbers, pod plans) is carried over unchanged.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
NOT_BENCHMARKS = {"__init__", "common", "run_all"}
KEEP = "<!-- Everything below this line is hand-written and kept by benchmarks/run_all.py. -->"


@dataclasses.dataclass(frozen=True)
class Spec:
    """How to read one benchmark's JSON record: the headline ratio, which way is better, the goal."""

    what: str
    ratio_key: str = "ratio"
    ratio_means: str = ""
    higher_is_better: bool = True
    goal: Optional[float] = None
    issue: Optional[int] = None
    ours: Callable[[dict], str] = lambda r: ""
    reference: Callable[[dict], str] = lambda r: ""


def _get(rec, *path, fmt="{:.4g}", unit=""):
    try:
        for p in path:
            rec = rec[p]
        return fmt.format(rec) + unit
    except (KeyError, IndexError, TypeError, ValueError):
        return ""


# The benchmarks known when this was written; any other benchmark is shown from its own "ratio" and
# "goal" keys (and "higher_is_better"), so new ones appear without editing this table.
SPECS = {
    "decode": Spec("LLM decode, per-token latency (8 layers, d 512, vocab 32066, 256 prompt + 128 new, batch 1)",
                   ratio_means="JAX s/token ÷ transformers s/token", higher_is_better=False, goal=0.5, issue=2,
                   ours=lambda r: _get(r, "rows", 0, "ms_per_token", unit=" ms/token"),
                   reference=lambda r: _get(r, "rows", 1, "ms_per_token", unit=" ms/token")),
    "vit": Spec("Qwen ViT encode, images/s (width 384, 6 layers, 224 px, batch 4, fp32)",
                ratio_means="JAX images/s ÷ torch reference images/s", higher_is_better=True, issue=3,
                ours=lambda r: _get(r, "jax", "images_per_s", unit=" img/s"),
                reference=lambda r: _get(r, "torch", "images_per_s", unit=" img/s")),
    "data": Spec("Training input pipeline, samples/s at 448 px (2 workers, stage 2)",
                 ratio_key="ratio_ours_over_reference", ratio_means="grain samples/s ÷ torch DataLoader samples/s",
                 higher_is_better=True, issue=7,
                 ours=lambda r: _get(r, "rows", 0, "samples_per_s", unit=" samples/s"),
                 reference=lambda r: _get(r, "rows", 1, "samples_per_s", unit=" samples/s")),
    "unet": Spec("SDXL-style UNet, one CFG denoising step (batch 2, 32² latents, fp32)",
                 ratio_means="JAX s/step ÷ diffusers s/step", higher_is_better=False, goal=0.8, issue=4,
                 ours=lambda r: _get(r, "jax", "median", unit=" s/step"),
                 reference=lambda r: _get(r, "torch", "median", unit=" s/step")),
    "story": Spec("Long story, multimodal-sink cache vs the released window re-encoding (50 frames)",
                  ratio_means="multimodal-sink tokens/s ÷ window tokens/s", higher_is_better=True, goal=10.0, issue=6),
    "convert_memory": Spec("Converting a synthetic ~1 B-parameter HF checkpoint to bf16: peak RSS",
                           ratio_means="peak RSS ÷ output size", higher_is_better=False, goal=1.3, issue=2),
    "train_step": Spec("Stage-2 training step: frozen ViT + resamplers + LoRA Llama, CE + cosine, AdamW "
                       "(CPU: 4 layers, d 256, 384 tokens, batch 8, fp32)",
                       ratio_means="JAX s/step ÷ torch s/step", higher_is_better=False, goal=1.0, issue=8,
                       ours=lambda r: _get(r, "jax", "step_s", "median", unit=" s/step"),
                       reference=lambda r: _get(r, "torch", "step_s", "median", unit=" s/step")),
    "train_tiny": Spec("Stage 2 on the tiny config (300 steps): held-out CE and cosine", issue=8,
                       ratio_means="held-out CE ÷ unigram CE"),
}


def discover() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.py") if p.stem not in NOT_BENCHMARKS)


def gpu_flags(name: str) -> list[str]:
    """The `--gpu*` flags a benchmark's --help lists (its GPU variants)."""
    try:
        out = subprocess.run([sys.executable, str(HERE / f"{name}.py"), "--help"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"}).stdout
    except subprocess.TimeoutExpired:
        return []
    return sorted(set(re.findall(r"(--gpu[\w-]*)", out)))


def have_gpu() -> bool:
    code = "import jax, sys; sys.exit(0 if any(d.platform == 'gpu' for d in jax.devices()) else 1)"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    try:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def variant_name(name: str, flag: str = "") -> str:
    return name if not flag else f"{name}_{flag.lstrip('-').replace('-', '_')}"


def run_one(name: str, flag: str, timeout: float, gpu: bool) -> dict:
    """Run one benchmark (output streamed to the terminal); return {rc, seconds, when}."""
    out = RESULTS_DIR / f"{variant_name(name, flag)}.json"
    cmd = [sys.executable, str(HERE / f"{name}.py"), "--out", str(out)] + ([flag] if flag else [])
    env = dict(os.environ)
    if gpu:
        env.pop("JAX_PLATFORMS", None)
    else:
        env["JAX_PLATFORMS"] = "cpu"
    print(f"\n=== {variant_name(name, flag)}: {' '.join(cmd[1:])}", flush=True)
    t = time.perf_counter()
    try:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    return {"rc": rc, "seconds": time.perf_counter() - t, "when": dt.datetime.now().isoformat(timespec="seconds")}


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------


def machine_facts() -> dict:
    facts = {"os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
             "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        facts["memory_gb"] = round(kb / 2**20)
    except (OSError, AttributeError):
        pass
    return facts


def record_date(path: Path, rec: dict) -> str:
    """When a record was measured: its own `date` (benchmarks/common.py writes one), else the commit that
    last changed it (a clone's file times are the clone's), else the file time (a new, uncommitted one)."""
    if isinstance(rec.get("date"), str):
        return rec["date"][:10]
    if not subprocess.run(["git", "diff", "--quiet", "HEAD", "--", path.name], cwd=path.parent,
                          capture_output=True).returncode:
        out = subprocess.run(["git", "log", "-1", "--format=%cs", "--", path.name], cwd=path.parent,
                             capture_output=True, text=True).stdout.strip()
        if out:
            return out
    return dt.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d")


def load_records() -> dict[str, dict]:
    recs = {}
    for p in sorted(RESULTS_DIR.glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            rec = {"_error": f"unreadable: {e}"}
        if not isinstance(rec, dict):
            rec = {"_error": "not a JSON object"}
        rec["_file"] = p.name
        rec["_date"] = record_date(p, rec)
        recs[p.stem] = rec
    return recs


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v).replace("|", "\\|").replace("\n", " ")


def md_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def headline(name: str, rec: dict) -> dict:
    """One summary row: ours, reference, ratio, goal, met."""
    base = name.split("_gpu")[0]
    spec = SPECS.get(base, Spec(what=rec.get("benchmark", name)))
    ratio = rec.get(spec.ratio_key, rec.get("ratio"))
    goal = rec.get("goal", spec.goal)
    higher = rec.get("higher_is_better", spec.higher_is_better)
    met = ""
    if isinstance(ratio, (int, float)) and isinstance(goal, (int, float)):
        met = "yes" if (ratio >= goal if higher else ratio <= goal) else "no"
    goal_s = "recorded (no numeric goal)" if goal is None else f"{'≥' if higher else '≤'} {goal:g}"
    load = rec.get("load_avg_after") or (rec.get("machine") or {}).get("load_avg")
    return {
        "benchmark": name, "what": spec.what if name == base else f"{spec.what} — GPU variant",
        "ours": spec.ours(rec) if name == base else "", "reference": spec.reference(rec) if name == base else "",
        "ratio": ratio if isinstance(ratio, (int, float)) else "—",
        "ratio means": (rec.get("ratio_means") or spec.ratio_means) + (" (lower is better)" if not higher else
                                                                          " (higher is better)")
        if (rec.get("ratio_means") or spec.ratio_means) else "",
        "goal": goal_s, "met": met or "—", "load avg (1 min)": _fmt(load[0]) if load else "",
        "measured": rec["_date"],
    }


def details(name: str, rec: dict) -> str:
    """The record's own table (`rows`) or its scalar fields, for the per-benchmark section."""
    parts = []
    if isinstance(rec.get("rows"), list) and rec["rows"] and all(isinstance(r, dict) for r in rec["rows"]):
        parts.append(md_table(rec["rows"]))
    scalars = {k: v for k, v in rec.items()
               if not k.startswith("_") and k not in ("rows", "machine", "benchmark")
               and (isinstance(v, (int, float, str, bool)) or
                    (isinstance(v, list) and len(v) <= 8 and all(isinstance(x, (int, float)) for x in v)))}
    nested = {f"{k}.{kk}": vv for k, v in rec.items() if isinstance(v, dict) and k not in ("machine", "args", "config")
              for kk, vv in v.items() if isinstance(vv, (int, float, str, bool))}
    items = {**scalars, **nested}
    if items:
        parts.append("\n".join(f"- {k}: {_fmt(v)}" for k, v in items.items()))
    for key in ("config", "args"):
        if isinstance(rec.get(key), dict):
            parts.append(f"- {key}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in rec[key].items() if k != "out"))
    m = rec.get("machine") or {}
    if m:
        parts.append("- machine: " + ", ".join(f"{k} {_fmt(v)}" for k, v in m.items()
                                               if k in ("cpus", "jax", "torch", "torch_threads", "jax_devices", "load_avg")))
    return "\n\n".join(parts)


def kept_text() -> str:
    if RESULTS_MD.exists():
        text = RESULTS_MD.read_text()
        if KEEP in text:
            return text.split(KEEP, 1)[1].strip("\n")
    return ""


def _load_line(loads: list, cpus: int) -> str:
    if not loads:
        return "- Load was not recorded. The ratios compare two implementations measured back to back, so they are the numbers to read."
    span = f"1-minute load average {min(loads):.1f}–{max(loads):.1f} in the records"
    if max(loads) > cpus:
        return (f"- The machine was shared and oversubscribed while some of these were measured ({span}, {cpus} cores). "
                "Absolute times are pessimistic and noisy; the ratios compare two implementations measured back to "
                "back under the same load, so they are the numbers to read.")
    return (f"- The machine was not oversubscribed ({span}, {cpus} cores). The ratios compare two implementations "
            "measured back to back, so they are the numbers to read.")


def render(records: dict[str, dict], failures: dict[str, dict], date: str, kept: str) -> str:
    m = machine_facts()
    loads = [r.get("load_avg_after") or (r.get("machine") or {}).get("load_avg") for r in records.values()]
    loads = [x[0] for x in loads if x]
    out = [
        "# Benchmark results",
        "",
        f"Generated by `make bench` (`python -m benchmarks.run_all`) on {date}. Each benchmark measures its PyTorch "
        "reference in the same run on the same machine and reports the ratio; its JSON record is in "
        "`benchmarks/results/` (regenerate this page from them with `python -m benchmarks.run_all --report-only`).",
        "",
        "## Machine",
        "",
        f"- {m.get('cpus')}-core CPU ({m.get('cpu', 'unknown model')}), {m.get('memory_gb', '?')} GB RAM, "
        f"{m.get('os')}, Python {m.get('python')}; no accelerator unless a GPU row says so.",
        _load_line(loads, m.get("cpus") or 1),
        "",
        "## Summary",
        "",
    ]
    bench = {k: v for k, v in records.items() if k.split("_gpu")[0] in set(discover()) | set(SPECS)}
    if bench:
        cols = ["benchmark", "what", "ours", "reference", "ratio", "ratio means", "goal", "met", "load avg (1 min)",
                "measured"]
        out.append(md_table([headline(k, v) for k, v in bench.items()], cols))
    else:
        out.append("No records yet.")
    missing = [n for n in discover() if n not in records]
    if missing:
        out += ["", "Not measured yet: " + ", ".join(f"`{n}`" for n in missing) + "."]
    if failures:
        out += ["", "### Failed in the last run (older records, if any, are shown above)", ""]
        out += [f"- `{k}`: exit {v['rc']} after {v['seconds']:.0f} s at {v['when']}" for k, v in failures.items()]
    out += ["", "## Details"]
    for k, v in bench.items():
        spec = SPECS.get(k.split("_gpu")[0])
        title = f"### {k}" + (f" (issue {spec.issue})" if spec and spec.issue else "")
        out += ["", title, "", f"Record `benchmarks/results/{v['_file']}`, measured {v['_date']}.", "", details(k, v)]
    others = {k: v for k, v in records.items() if k not in bench}
    if others:
        out += ["", "## Other records in benchmarks/results/"]
        for k, v in others.items():
            out += ["", f"### {k}", "", f"`benchmarks/results/{v['_file']}`, {v['_date']}.", "", details(k, v)]
    out += ["", KEEP, ""]
    if kept:
        out += [kept, ""]
    return "\n".join(out)


def write_report(failures: dict | None = None, date: str | None = None) -> Path:
    from seed_story_jax.atomic import atomic_path

    text = render(load_records(), failures or {}, date or dt.date.today().isoformat(), kept_text())
    with atomic_path(RESULTS_MD, overwrite=True) as tmp:
        tmp.write_text(text)
    return RESULTS_MD


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated benchmark names (default: all in benchmarks/)")
    p.add_argument("--skip", default="", help="comma-separated benchmark names to leave out")
    p.add_argument("--report-only", action="store_true", help="run nothing; rewrite RESULTS.md from the records")
    p.add_argument("--no-gpu", action="store_true", help="skip GPU variants even when a GPU is present")
    p.add_argument("--gpu-only", action="store_true",
                   help="run only the GPU variants (a lent GPU machine's time is short; exit 1 if none is seen)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark run")
    args = p.parse_args(argv)
    names = discover()
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            p.error(f"unknown benchmark(s) {unknown}; available: {names}")
        names = wanted
    names = [n for n in names if n not in {s.strip() for s in args.skip.split(",")}]
    failures = {}
    if not args.report_only:
        RESULTS_DIR.mkdir(exist_ok=True)
        gpu = not args.no_gpu and have_gpu()
        if args.gpu_only and not gpu:
            print("--gpu-only: no GPU visible to jax", file=sys.stderr)
            return 1
        for n in names if not args.gpu_only else ():
            r = run_one(n, "", args.timeout, gpu=False)
            if r["rc"] != 0:
                failures[n] = r
        for n in names if gpu else ():
            for flag in gpu_flags(n):
                r = run_one(n, flag, args.timeout, gpu=True)
                if r["rc"] != 0:
                    failures[variant_name(n, flag)] = r
        if not gpu and not args.no_gpu:
            print("\n(no GPU visible to jax: GPU variants not run)")
    path = write_report(failures)
    print(f"\nwrote {path}" + (f"; {len(failures)} failed: {', '.join(failures)}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
