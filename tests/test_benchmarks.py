"""benchmarks/train_step.py end to end at toy size: both sides train on the same batch, the record
says so, and `make bench` finds its GPU variant."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(tmp_path, *overrides):
    out = tmp_path / "train_step.json"
    proc = subprocess.run([sys.executable, "benchmarks/train_step.py", "--out", str(out), "--config", "tiny-stage2",
                           "--batch", "2", "--repeats", "2", "--warmup", "1", "--set", "llm.num_layers=1", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    return proc, out


def test_train_step_benchmark_measures_both_sides(tmp_path):
    proc, out = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    jax_rec, torch_rec = rec["jax"], rec["torch"]
    # one batch, every image slot used, the same trainables on both sides
    assert jax_rec["batch_hash"] == torch_rec["batch_hash"] and jax_rec["slots_filled"] == 1.0
    assert jax_rec["trainable_params"] == torch_rec["trainable_params"] > 0
    assert jax_rec["compiles_after_first"] == 0  # the timed steps reuse the first step's executable
    for side in (jax_rec, torch_rec):
        assert len(side["step_s"]["runs"]) == 2 and all(t > 0 for t in side["step_s"]["runs"])
        assert len(side["losses"]) == 4 and all(math.isfinite(x) for x in side["losses"])
        assert side["losses"][-1] < side["losses"][0]  # both actually train
    assert rec["ratio"] == jax_rec["step_s"]["median"] / torch_rec["step_s"]["median"]
    assert rec["flops_per_example"] > 0 and "ratio (ours s/step" in proc.stdout


def test_train_step_benchmark_full_finetune_counts_match(tmp_path):
    proc, out = _run(tmp_path, "train.trainable=full")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["jax"]["trainable_params"] == rec["torch"]["trainable_params"]
    lora = json.loads(_run(tmp_path)[1].read_text())
    assert rec["jax"]["trainable_params"] > lora["jax"]["trainable_params"]


def test_bad_config_fails_without_a_record(tmp_path):
    proc, out = _run(tmp_path, "llm.hidden_size=65")
    assert proc.returncode != 0 and not out.exists()
    assert "hidden_size" in proc.stderr or "embed_dim" in proc.stderr


def test_make_bench_finds_the_gpu_variant():
    from benchmarks.run_all import gpu_flags

    assert gpu_flags("train_step") == ["--gpu"]
