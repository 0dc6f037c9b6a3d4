"""Training machinery pieces: schedule, AdamW vs torch, tfevents encoding, mesh shapes, sharding rules,
trainable presets, per-process batch assembly."""

import math
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P

from seed_story_jax.config import ConfigError, LlamaConfig, LoRAConfig, MeshConfig, TrainConfig
from seed_story_jax.train import data as D
from seed_story_jax.train import metrics as M
from seed_story_jax.train import optim
from seed_story_jax.train.mesh import make_mesh, resolve_shape
from seed_story_jax.nn.sharding import fit_spec
from seed_story_jax.train.task import trainable_predicate

STAGE2 = TrainConfig(stage=2, steps=6000, lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05,
                     warmup_steps=100, min_lr_ratio=0.05)


def _formula(step, cfg):
    # spec §5.3, written independently: linear warmup, then 0.5·((1+m)+(1−m)·cos(π·p)), floored at 0.
    if step < cfg.warmup_steps:
        return cfg.lr * step / max(1, cfg.warmup_steps)
    p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    m = cfg.min_lr_ratio
    return cfg.lr * max(0.0, 0.5 * ((1 + m) + (1 - m) * math.cos(math.pi * p)))


@pytest.mark.parametrize("step", [0, 1, 50, 99, 100, 101, 3050, 5999, 6000, 6500])
def test_schedule_equals_formula(step):
    got = float(optim.lr_schedule(STAGE2)(step))
    assert got == pytest.approx(_formula(step, STAGE2), rel=1e-6, abs=1e-12)


def test_schedule_landmarks():
    sched = optim.lr_schedule(STAGE2)
    assert float(sched(0)) == 0.0
    assert float(sched(100)) == pytest.approx(1e-4, rel=1e-6)
    assert float(sched(3050)) == pytest.approx(1e-4 * 0.525, rel=1e-6)  # p = 0.5
    assert float(sched(6000)) == pytest.approx(1e-4 * 0.05, rel=1e-5)  # min_lr_ratio


def test_adamw_matches_torch():
    """Three AdamW steps with clipping and the stage-2 schedule (warmup 2 here) equal torch.optim.AdamW +
    clip_grad_norm_ + LambdaLR, fp32, to 1e-6 relative."""
    cfg = TrainConfig(steps=10, lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.05, warmup_steps=2,
                      min_lr_ratio=0.05, clip_norm=1.0)
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal((5, 3)).astype(np.float32)
    grads = [rng.standard_normal((5, 3)).astype(np.float32) * s for s in (3.0, 0.1, 2.0)]

    tx = optim.make_optimizer(cfg)
    params = {"w": jnp.asarray(p0)}
    st = tx.init(params)
    for g in grads:
        upd, st = tx.update({"w": jnp.asarray(g)}, st, params)
        params = jax.tree.map(jnp.add, params, upd)

    w = torch.nn.Parameter(torch.tensor(p0))
    opt = torch.optim.AdamW([w], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _formula(s, cfg) / cfg.lr)
    for g in grads:
        w.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_([w], cfg.clip_norm)
        opt.step()
        sched.step()
    np.testing.assert_allclose(np.asarray(params["w"]), w.detach().numpy(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------ tfevents


def _decode_fields(buf: bytes) -> list[tuple[int, object]]:
    """Minimal protobuf reader (varint, fixed64, length-delimited, fixed32)."""
    out, i = [], 0

    def varint():
        nonlocal i
        shift = n = 0
        while True:
            b = buf[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n

    while i < len(buf):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            out.append((field, varint()))
        elif wire == 1:
            out.append((field, struct.unpack("<d", buf[i:i + 8])[0]))
            i += 8
        elif wire == 2:
            n = varint()
            out.append((field, buf[i:i + n]))
            i += n
        elif wire == 5:
            out.append((field, struct.unpack("<f", buf[i:i + 4])[0]))
            i += 4
        else:
            raise AssertionError(f"wire type {wire}")
    return out


def test_crc32c_known_vector():
    assert M.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert M.crc32c(b"") == 0


def test_tfevents_roundtrip(tmp_path):
    w = M.MetricsWriter(tmp_path)
    w.write(7, {"loss": 1.5, "lr": 1e-4})
    w.write(8, {"loss": float("nan")})
    w.close()
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1
    records = M.read_records(files[0])  # raises on any CRC mismatch
    assert len(records) == 3
    first = dict(_decode_fields(records[0]))
    assert first[3] == b"brain.Event:2"
    ev = dict(_decode_fields(records[1]))
    assert ev[2] == 7 and isinstance(ev[1], float)
    values = [dict(_decode_fields(v)) for _, v in _decode_fields(ev[5])]
    got = {v[1].decode(): v[2] for v in values}
    assert got == {"loss": 1.5, "lr": pytest.approx(1e-4)}
    assert 5 not in dict(_decode_fields(records[2])) or not _decode_fields(dict(_decode_fields(records[2]))[5])
    lines = M.read_jsonl(tmp_path / "metrics.jsonl")
    assert lines[0] == {"step": 7, "loss": 1.5, "lr": 1e-4} and lines[1]["step"] == 8
    # a flipped byte is detected
    data = bytearray(files[0].read_bytes())
    data[-6] ^= 1
    files[0].write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC"):
        M.read_records(files[0])


# ------------------------------------------------------------------------------ mesh and rules


def test_resolve_shape():
    assert resolve_shape(MeshConfig(), 8) == (1, 8, 1)
    assert resolve_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    assert resolve_shape(MeshConfig(data=1, fsdp=1, tensor=1), 8) == (1, 1, 1)
    assert resolve_shape(MeshConfig(data=-1, fsdp=1, tensor=1, dcn_data=2), 8) == (4, 1, 1)
    with pytest.raises(ConfigError, match="fixed axes"):
        resolve_shape(MeshConfig(data=3, fsdp=-1), 8)
    with pytest.raises(ConfigError, match="needs 16"):
        resolve_shape(MeshConfig(data=4, fsdp=4, tensor=1), 8)


def test_make_mesh_shapes():
    m = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert m.axis_names == ("data", "fsdp", "tensor") and m.devices.shape == (2, 2, 2)
    one = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1))
    assert one.devices.size == 1
    hybrid = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1, dcn_data=2))  # one process → still 2 slices of 4
    assert hybrid.devices.shape == (2, 4, 1)


def test_fit_spec_drops_axes_that_do_not_divide():
    m = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert fit_spec(P("tensor", "fsdp"), (33, 4096), m) == P(None, "fsdp")
    assert fit_spec(P("tensor", "fsdp"), (32066, 4096), m) == P("tensor", "fsdp")
    assert fit_spec(P(("data", "fsdp"), None), (6, 3), m) == P("data")
    assert fit_spec(P(("data", "fsdp")), (8,), m) == P(("data", "fsdp"))
    assert fit_spec(P("tensor"), (3,), m) == P()


def test_fitted_spec_passes_an_axis_a_dimension_cannot_take_to_the_next():
    from seed_story_jax.nn.sharding import fitted_spec

    m, rules = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2)), MeshConfig().rules
    conv = ("kernel_h", "kernel_w", "conv_in", "conv_out")
    # the ViT's patch conv: 3 input channels cannot take fsdp, so its embed dimension does
    assert fitted_spec(conv[:3] + ("embed",), (14, 14, 3, 1664), m, rules) == P(None, None, None, "fsdp")
    # a UNet conv: FSDP over the input channels, tensor over the output ones (never replicated)
    assert fitted_spec(conv, (3, 3, 320, 640), m, rules) == P(None, None, "fsdp", "tensor")
    assert fitted_spec(conv, (3, 3, 6, 320), m, rules) == P(None, None, None, "tensor")
    # each mesh axis at most once; a batch that does not split keeps what divides it
    assert fitted_spec(("embed", "embed"), (64, 64), m, rules) == P("fsdp")
    assert fitted_spec(("batch", None), (6, 3), m, rules) == P("data")  # data is 1 here
    assert fitted_spec(("vocab", "embed"), (33, 64), m, rules) == P(None, "fsdp")


def test_trainable_presets_on_llama_paths():
    from flax import nnx

    from seed_story_jax.models import llama
    from seed_story_jax.train.task import Bundle

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=2,
                      num_kv_heads=2, lora=LoRAConfig(rank=2, alpha=4.0))
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Bundle(llm=llama.build(cfg, nnx.Rngs(0))))
    paths = [tuple(p) for p, _ in nnx.state(model, nnx.Param).flat_state()]
    lora = trainable_predicate("lora", ("llm", "mllm"))
    chosen = {"/".join(map(str, p)) for p in paths if lora(p)}
    assert "llm/layers/0/self_attn/q_proj/lora_a" in chosen and "llm/layers/1/mlp/down_proj/lora_b" in chosen
    assert {"llm/embed_tokens/embedding", "llm/lm_head/kernel", "llm/norm/scale",
            "llm/layers/0/input_layernorm/scale", "llm/layers/1/post_attention_layernorm/scale"} <= chosen
    assert not any(c.endswith("proj/kernel") for c in chosen)  # base weights frozen
    # 7 LoRA targets × 2 factors × 2 layers + 2×2 layer norms + final norm + embed + head
    assert len(chosen) == 28 + 4 + 1 + 2
    assert all(trainable_predicate("full", ("llm",))(p) for p in paths)
    assert not any(trainable_predicate("full", ("unet",))(p) for p in paths)
    kv = trainable_predicate("kv", ("unet", "detokenizer"))
    assert kv(("unet", "down_blocks", 1, "attn2", "to_k", "kernel"))
    assert not kv(("unet", "down_blocks", 1, "attn2", "to_q", "kernel"))
    assert kv(("detokenizer", "proj_in", "kernel")) and not kv(("vae", "encoder", "to_k"))
    rx = trainable_predicate("full", ("llm",), regex=r"lm_head")
    assert [p for p in paths if rx(p)] == [("llm", "lm_head", "kernel")]


# ------------------------------------------------------------------------------ batches


def test_synthetic_lm_is_deterministic_and_structured():
    ds = D.SyntheticLM(vocab_size=50, seq_len=64, num_examples=10, seed=3)
    a, b = ds[4], D.SyntheticLM(50, 64, 10, seed=3)[4]
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    np.testing.assert_array_equal(a["input_ids"][1:], a["labels"][:-1])
    follows = np.mean(ds.perm[a["input_ids"]] == a["labels"])
    assert follows > 0.75


def test_local_rows_and_global_assembly():
    m = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sh = NamedSharding(m, P(("data", "fsdp")))
    assert D.local_rows(sh, 8) == list(range(8))  # one process holds every row
    x = {"a": np.arange(8 * 3).reshape(8, 3)}
    rows = [0, 1, 2, 3, 4, 5, 6, 7]
    g = D.to_global(x, {"a": NamedSharding(m, P(("data", "fsdp"), None))}, rows, 8)
    np.testing.assert_array_equal(np.asarray(g["a"]), x["a"])
    assert g["a"].sharding.spec == P(("data", "fsdp"), None)


def test_batch_iterator_state_roundtrip():
    ds = D.SyntheticLM(vocab_size=50, seq_len=8, num_examples=20, seed=0)
    it = D.batch_iterator(ds, 4, [0, 1, 2, 3], seed=1)
    first = [next(it)["input_ids"] for _ in range(3)]
    state = it.get_state()
    nxt = next(it)["input_ids"]
    it2 = D.batch_iterator(ds, 4, [0, 1, 2, 3], seed=1)
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["input_ids"], nxt)
    # a process holding rows 2,3 reads exactly those rows of the same global batch
    half = D.batch_iterator(ds, 4, [2, 3], seed=1)
    np.testing.assert_array_equal(next(half)["input_ids"], first[0][2:])


# ------------------------------------------------------------------------------ CLI errors


def test_cli_errors_are_one_line(tmp_path, capsys):
    from seed_story_jax.cli import main

    tiny = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")
    assert main(["train", tiny, "--workdir", str(tmp_path)]) == 2  # tiny.yaml has no train: section
    assert "no `train:` section" in capsys.readouterr().err
    assert main(["train", tiny, "train.stage=5", "--workdir", str(tmp_path)]) == 2
    assert "train.stage must be 0, 1, 2 or 3" in capsys.readouterr().err
    assert main(["plan", tiny, "train.steps=10", "--topology", "tpu-8"]) == 2
    assert "unknown topology 'tpu-8'" in capsys.readouterr().err
    assert main(["train", tiny, "train.stage=0", "train.data=/nowhere", "--workdir", str(tmp_path)]) == 2
    assert "stage 0 reads only 'synthetic'" in capsys.readouterr().err


class _LossProbe:
    """Stands in for the stage-1 bundle: latents are the image, and the 'UNet' predicts the timestep
    itself as the noise, so each row's MSE ≈ t² tells which t the loss drew."""

    class vae:
        @staticmethod
        def encode_latents(x, key):
            return jnp.concatenate([x, x[..., :1]], axis=-1)

    @staticmethod
    def detokenizer(features):
        return features, features[:, 0]

    @staticmethod
    def unet(noisy, t, ctx, text_embeds, time_ids):
        return jnp.broadcast_to(t.astype(jnp.float32)[:, None, None, None], noisy.shape)


def test_denoising_loss_timestep_bias_and_min_snr():
    from seed_story_jax import schedulers as sch
    from seed_story_jax.config import SchedulerConfig
    from seed_story_jax.train.stage1 import Timesteps, denoising_loss

    cfg = SchedulerConfig()
    img, feats = jnp.zeros((16, 4, 4, 3)), jnp.ones((16, 2, 8))

    def loss(ts, key=0):
        return jax.jit(lambda k: denoising_loss(_LossProbe, feats, img, None, k, cfg, timesteps=ts))(
            jax.random.key(key))

    plain, m = loss(Timesteps())
    assert float(plain) == float(m["mse"]) and 1e4 < float(plain) < 1e6  # uniform t: mean t² ≈ 3.3e5
    only = Timesteps(bias="range", multiplier=1e12, begin=990, end=1000)  # every draw in [990, 1000)
    mse = float(loss(only)[1]["mse"])
    assert 989.0 ** 2 < mse < 1001.0 ** 2
    # one timestep (t = 500): the loss is the MSE × min(SNR, γ)/SNR there, the metric stays the MSE
    at500 = dict(bias="range", multiplier=1e12, begin=500, end=501)
    w = float(sch.min_snr_weight(sch.alphas_cumprod(cfg), jnp.array([500]), 0.05)[0])
    assert w < 1.0
    weighted, m = loss(Timesteps(**at500, snr_gamma=0.05))
    assert float(weighted) == pytest.approx(float(m["mse"]) * w, rel=1e-5)
    assert float(loss(Timesteps(**at500, snr_gamma=1e6))[0]) == pytest.approx(float(m["mse"]), rel=1e-6)


@pytest.mark.parametrize("over, match", [
    (dict(timestep_bias="latest"), "timestep_bias must be"),
    (dict(timestep_bias_multiplier=0.0), "timestep_bias_multiplier"),
    (dict(timestep_bias_portion=0.0), "timestep_bias_portion"),
    (dict(timestep_bias_begin=500, timestep_bias_end=500), "timestep_bias_begin"),
    (dict(snr_gamma=-1.0), "snr_gamma"),
])
def test_timestep_options_are_checked(over, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(stage=1, **over).validate()
