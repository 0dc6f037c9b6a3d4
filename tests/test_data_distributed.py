"""Two real JAX processes (jax.distributed on CPU): the default sharding by jax.process_index() gives
disjoint records that together cover the set. Slow (two fresh interpreters importing jax)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from data_pipeline import builder, storystream as ss, synth

SCRIPT = textwrap.dedent("""
    import json, sys
    import absl.flags
    absl.flags.FLAGS.mark_as_parsed()
    import jax
    pid, port, ds, tok, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from data_pipeline import pipeline
    from seed_story_jax.config import DataConfig
    cfg = DataConfig(path=ds, max_length=1024, num_img_tokens=4, image_size=28, batch_size=2, workers=0)
    seen = [int(r) for b in pipeline.make_iterator(cfg, tok, num_epochs=1) for r in b["record_index"]]
    json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(), "seen": seen},
              open(out, "w"))
    jax.distributed.shutdown()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_jax_processes_shard_disjointly(tmp_path):
    from seed_story_jax.tokenizer import train_tiny_tokenizer

    synth.write_synthetic(tmp_path / "s", stories=16, frames=10, size=32, seed=1, progress=False)
    builder.build(tmp_path / "s" / "train.jsonl", tmp_path / "s" / "images", tmp_path / "ds",
                  limits=ss.ImageLimits(32, 0.2), progress=False)
    train_tiny_tokenizer(tmp_path / "tok", None, 400)
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(i), port, str(tmp_path / "ds"), str(tmp_path / "tok"),
                               str(tmp_path / f"out{i}.json")], env=env, cwd=os.getcwd(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]
    res = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    assert [r["process_index"] for r in res] == [0, 1] and all(r["process_count"] == 2 for r in res)
    a, b = set(res[0]["seen"]), set(res[1]["seen"])
    assert len(res[0]["seen"]) == len(a) == 8 and len(b) == 8
    assert not a & b and a | b == set(range(16))
