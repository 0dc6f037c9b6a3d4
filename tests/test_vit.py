"""Qwen-VL ViT-G/14 port (spec §1) against the plain torch reference (convert/torch_ref/qwen_vit.py),
and its converter (convert/vit.py) both ways.

Tolerances: relative = max|ours − torch| / max|torch|, ≤ 1e-5 in float32 at tiny sizes.
The tiny model keeps the real model's resize ratios: image 112 / patch 14 = 8×8 patches, a 4×4
learned table bicubic-upsampled to 8×8 (real: 16 → 32), 16 pool queries (4×4 sin-cos keys → 8×8).
"""

import dataclasses
import json
import math

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from convert import io as cio
from convert import vit as CV
from convert.torch_ref import qwen_vit as R
from seed_story_jax import cli
from seed_story_jax.checkpoint import read_config
from seed_story_jax.config import CONFIG_DIR, SeedStoryConfig, ViTConfig, dump_config, load_config
from seed_story_jax.models import vit as V
from tests.init_stats import assert_init_like, qwen_resampler_init_

TOL = 1e-5
TINY = ViTConfig(image_size=112, patch_size=14, width=64, layers=2, heads=4, mlp_width=128, output_dim=128,
                 n_queries=16, pool_heads=4, pos_grid=4)
N_TENSORS, N_ELEMENTS = 594, 1_935_610_624


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _torch_ref(cfg=TINY, seed=0):
    torch.manual_seed(seed)
    ref = R.from_config(cfg)
    with torch.no_grad():  # move every tensor off its init (zero biases, unit norms) so all of them matter
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref


def _state_dict(ref, dtype=np.float32):
    return {k: v.detach().numpy().astype(dtype) for k, v in ref.state_dict().items()}


def _model(cfg, params):
    return V.from_params(cfg, params)


def _images(cfg=TINY, n=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, cfg.image_size, cfg.image_size, 3)).astype(np.float32)


def _run_torch(ref, x):
    with torch.no_grad():
        return ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()


@pytest.fixture(scope="module")
def tiny():
    ref = _torch_ref()
    sd = _state_dict(ref)
    x = _images()
    return ref, sd, x, _run_torch(ref, x)


# --------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "full")])
def test_matches_torch_reference(tiny, scan, remat):
    ref, sd, x, want = tiny
    cfg = dataclasses.replace(TINY, scan_layers=scan, remat=remat)
    assert list(sd) == list(CV.torch_keys(cfg))  # the reference has the original's key names and order
    model = _model(cfg, CV.from_torch(sd, cfg))
    got = np.asarray(V.make_encoder(model)(x))
    assert got.shape == (2, 16, 128)
    assert _rel(got, want) <= TOL


def test_bf16_scan_as_in_the_shipped_config(tiny):
    """bf16 params and compute, scanned blocks (configs/qwen-vit-g.yaml): runs, returns bf16, and stays
    close to the fp32 reference (bf16 has 8 mantissa bits: 3e-2 relative)."""
    ref, sd, x, want = tiny
    cfg = dataclasses.replace(TINY, param_dtype="bfloat16", dtype="bfloat16", scan_layers=True)
    params = CV.from_torch(sd, cfg)
    assert params["blocks"]["q_proj"]["kernel"].dtype == ml_dtypes.bfloat16
    got = V.make_encoder(_model(cfg, params))(x)
    assert got.dtype == jax.numpy.bfloat16 and _rel(np.asarray(got, np.float32), want) <= 3e-2


def test_in_proj_split_is_per_head(tiny):
    ref, sd, x, want = tiny
    c, h = TINY.width, TINY.heads
    d = c // h
    params = CV.from_torch(sd, TINY)
    w = sd["transformer.resblocks.0.attn.in_proj.weight"]
    b = sd["transformer.resblocks.0.attn.in_proj.bias"]
    # Output channel h·3d + j·d + i of the fused projection is channel h·d + i of q (j=0), k (1), v (2).
    for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
        for head in range(h):
            rows = slice(head * 3 * d + j * d, head * 3 * d + (j + 1) * d)
            cols = slice(head * d, (head + 1) * d)
            assert np.array_equal(params["blocks"][0][name]["kernel"][:, cols], w[rows].T)
            assert np.array_equal(params["blocks"][0][name]["bias"][cols], b[rows])
    # A block-wise [q; k; v] split (nn.MultiheadAttention's layout) is a different function: the parity
    # test above would fail with it.
    wrong = CV.from_torch(sd, TINY)
    for i in range(TINY.layers):
        wi = sd[f"transformer.resblocks.{i}.attn.in_proj.weight"]
        bi = sd[f"transformer.resblocks.{i}.attn.in_proj.bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            wrong["blocks"][i][name] = {"kernel": wi[j * c:(j + 1) * c].T, "bias": bi[j * c:(j + 1) * c]}
    assert _rel(V.make_encoder(_model(TINY, wrong))(x), want) > 1e-2


def test_position_tables_are_torch_bicubic(tiny):
    ref, sd, x, want = tiny
    params = CV.from_torch(sd, TINY)
    g = TINY.image_size // TINY.patch_size
    table = torch.from_numpy(sd["positional_embedding"]).reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expect = F.interpolate(table, size=(g, g), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(g * g, -1)
    np.testing.assert_allclose(params["positional_embedding_resized"], expect.numpy(), rtol=0, atol=1e-6)
    # Another kernel (jax.image.resize: Keys a = -0.5; or bilinear) moves the output beyond tolerance.
    for method in ("bicubic", "bilinear"):
        other = dict(params)
        other["positional_embedding_resized"] = np.asarray(jax.image.resize(
            sd["positional_embedding"].reshape(4, 4, -1), (g, g, TINY.width), method)).reshape(g * g, -1)
        assert np.abs(other["positional_embedding_resized"] - params["positional_embedding_resized"]).max() > 1e-3
        assert _rel(V.make_encoder(_model(TINY, other))(x), want) > 10 * TOL
    # The pool's key table likewise (its query table is the un-resized sin-cos grid).
    pool = torch.from_numpy(sd["attn_pool.pos_embed"]).reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expect = F.interpolate(pool, size=(g, g), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(g * g, -1)
    np.testing.assert_allclose(params["attn_pool"]["key_pos_embed"], expect.numpy(), rtol=0, atol=1e-6)


def test_uncond_features_are_the_zero_image(tiny):
    ref, sd, _, _ = tiny
    model = _model(TINY, CV.from_torch(sd, TINY))
    got = np.asarray(V.uncond_features(model))
    want = _run_torch(ref, np.zeros((1, 112, 112, 3), np.float32))
    assert got.shape == (1, 16, 128) and _rel(got, want) <= TOL


def test_encode_batches_compiles_once(tiny, compile_counter):
    _, sd, _, _ = tiny
    model = _model(TINY, CV.from_torch(sd, TINY))
    enc = V.make_encoder(model)
    imgs = list(_images(n=5, seed=3))
    feats = V.encode_batches(enc, imgs[:2], 2)  # warm-up compile for batch shape 2
    with compile_counter() as c:
        feats = V.encode_batches(enc, imgs, 2)  # 2 + 2 + 1 (padded)
    assert c.count == 0
    assert feats.shape == (5, 16, 128)
    np.testing.assert_allclose(feats[4], np.asarray(enc(np.stack(imgs[4:5])))[0], rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Full size: abstract model, 594 tensors both ways, without allocating 8 GB
# --------------------------------------------------------------------------------------------


def test_full_size_abstract_and_every_tensor_accounted():
    from seed_story_jax.models import abstract_params

    cfg = load_config(CONFIG_DIR / "qwen-vit-g.yaml").vit
    keys = CV.torch_keys(cfg)
    assert len(keys) == N_TENSORS and sum(math.prod(s) for s in keys.values()) == N_ELEMENTS

    def counted(tree):
        total = sum(x.size for x in jax.tree.leaves(tree))
        derived = tree["positional_embedding_resized"].size + tree["attn_pool"]["key_pos_embed"].size
        return total - derived

    abstract = abstract_params("vit", cfg)  # scan_layers: true — blocks stacked on a leading axis
    assert counted(abstract) == N_ELEMENTS
    # The converter at full size, unstacked (stacking would copy): compare per layer.
    flat = dataclasses.replace(cfg, scan_layers=False)
    layer = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), abstract["blocks"])
    abstract = {**abstract, "blocks": {i: layer for i in range(cfg.layers)}}

    # Import: every original tensor as a zero-stride array (no memory), through the real converter.
    dt = np.dtype(ml_dtypes.bfloat16)
    zero = np.zeros((), dt)
    sd = {k: np.broadcast_to(zero, s) for k, s in keys.items()}
    params = CV.from_torch(sd, flat)
    got = jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype)), params)
    want = jax.tree.map(lambda a: (tuple(a.shape), np.dtype(a.dtype)), abstract)
    assert got == want
    # Export: the same 594 keys, in the original's order, with their shapes and dtype.
    exported = [(k, a.shape, a.dtype) for k, a in CV.iter_torch(params, flat)]
    assert [(k, s, dt) for k, s in keys.items()] == exported


# --------------------------------------------------------------------------------------------
# Converter through the CLI: files, dtypes, bad input, Qwen-VL-Chat directories, encode
# --------------------------------------------------------------------------------------------


def _config_file(tmp_path, cfg=TINY):
    p = tmp_path / "vit.yaml"
    p.write_text(dump_config(SeedStoryConfig(vit=cfg)))
    return str(p)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_cli_round_trip_is_bit_exact(tmp_path, tiny, dtype):
    _, sd32, x, want = tiny
    sd = {k: v.astype(dtype) for k, v in sd32.items()}
    src = tmp_path / "qwen_vit_G.pt"
    cio.write_torch_pickle(sd, src)
    assert CV.detect(src)
    ckpt, back = tmp_path / "ckpt", tmp_path / "back.pt"
    cfg = dataclasses.replace(TINY, scan_layers=dtype != np.float16)  # both params layouts through orbax
    args = ["convert", str(src), str(ckpt), "--config", _config_file(tmp_path, cfg)]
    if dtype == np.float16:
        args.append("--verify")  # torch reference on the source vs the port on the checkpoint, fp32
    assert cli.main(args) == 0
    assert cli.main(["convert", str(ckpt), str(back)]) == 0
    out = cio.open_state_dict(back)
    assert list(out) == list(sd)
    for k in sd:
        assert out.dtype(k) == np.dtype(dtype) and out[k].tobytes() == sd[k].tobytes(), k
    loaded = torch.load(back, weights_only=True)  # torch itself reads the export
    assert list(loaded) == list(sd) and loaded["proj"].dtype == (torch.float16 if dtype == np.float16 else torch.bfloat16)
    # The converted half-precision model still computes the same function (in fp32 compute).
    model = V.load(ckpt, dtype="float32")
    assert _rel(V.make_encoder(model)(x), _run_torch(R.load_state_dict(R.from_config(TINY), sd), x)) <= 1e-2


def test_bare_state_dict_needs_a_config_unless_it_is_the_released_model(tmp_path, tiny, capsys):
    src = tmp_path / "tiny.pt"
    cio.write_torch_pickle(tiny[1], src)
    assert cli.main(["convert", str(src), str(tmp_path / "ckpt")]) == 2
    assert "--config" in capsys.readouterr().err and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("edit,needle", [
    ("missing", "transformer.resblocks.1.mlp.c_fc.bias"),
    ("extra", "attn_pool.extra_tensor"),
    ("shape", "transformer.resblocks.0.attn.in_proj.bias"),
])
def test_cli_refuses_bad_state_dicts(tmp_path, tiny, capsys, edit, needle):
    sd = dict(tiny[1])
    if edit == "missing":
        del sd[needle]
    elif edit == "extra":
        sd[needle] = np.zeros(3, np.float32)
    else:
        sd[needle] = np.zeros((7,), np.float32)
    src = tmp_path / "bad.pt"
    cio.write_torch_pickle(sd, src)
    before = set(tmp_path.iterdir())
    code = cli.main(["convert", str(src), str(tmp_path / "ckpt"), "--kind", "vit", "--config", _config_file(tmp_path)])
    assert code != 0
    assert needle in capsys.readouterr().err
    assert set(tmp_path.iterdir()) == before | {tmp_path / "vit.yaml"}  # nothing written, no temp left


def _qwen_vl_chat_dir(tmp_path, sd, fmt):
    """A Qwen-VL-Chat-like checkpoint: LLM tensors and `transformer.visual.*` over two shards."""
    root = tmp_path / f"Qwen-VL-Chat-{fmt}"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "qwen", "visual": {
        "heads": TINY.heads, "image_size": TINY.image_size, "layers": TINY.layers, "mlp_ratio": 2.0,
        "output_dim": TINY.output_dim, "patch_size": TINY.patch_size, "width": TINY.width}}))
    rng = np.random.default_rng(5)
    llm = {"transformer.wte.weight": rng.standard_normal((50, 8)).astype(ml_dtypes.bfloat16),
           "transformer.h.0.attn.c_attn.weight": rng.standard_normal((24, 8)).astype(ml_dtypes.bfloat16),
           "lm_head.weight": rng.standard_normal((50, 8)).astype(ml_dtypes.bfloat16)}
    visual = {"transformer.visual." + k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}
    everything = {**llm, **visual}
    names = list(everything)
    shards = {1: names[: len(names) // 2], 2: names[len(names) // 2:]}
    if fmt == "safetensors":
        cio.write_safetensors(everything, root, max_shard_bytes=sum(v.nbytes for v in everything.values()) // 2 + 1)
    else:
        weight_map = {}
        for i, keys in shards.items():
            name = f"pytorch_model-0000{i}-of-00002.bin"
            cio.write_torch_pickle({k: everything[k] for k in keys}, root / name)
            weight_map.update({k: name for k in keys})
        (root / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root, visual


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_qwen_vl_chat_directory_is_accepted(tmp_path, tiny, fmt):
    root, visual = _qwen_vl_chat_dir(tmp_path, tiny[1], fmt)
    assert CV.detect(root)
    ckpt = tmp_path / "ckpt"
    assert cli.main(["convert", str(root), str(ckpt)]) == 0  # kind detected; heads from config.json
    cfg = read_config(ckpt).vit
    assert (cfg.heads, cfg.image_size, cfg.pool_heads, cfg.pos_grid) == (TINY.heads, TINY.image_size, 1, 4)
    back = tmp_path / "vit.pt"
    assert cli.main(["convert", str(ckpt), str(back)]) == 0
    out = cio.read_state_dict(back)
    assert len(out) == N_TENSORS - 48 * 12 + TINY.layers * 12
    for k, v in out.items():
        assert v.tobytes() == visual["transformer.visual." + k].tobytes(), k


def test_encode_command(tmp_path, tiny, capsys):
    from PIL import Image

    from seed_story_jax import transforms as T

    _, sd, _, _ = tiny
    src = tmp_path / "vit.pt"
    cio.write_torch_pickle(sd, src)
    ckpt = tmp_path / "ckpt"
    assert cli.main(["convert", str(src), str(ckpt), "--config", _config_file(tmp_path)]) == 0
    paths = []
    for i, size in enumerate([(130, 90), (60, 200), (112, 112)]):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, size[::-1] + (3,), dtype=np.uint8)).save(p)
        paths.append(str(p))
    out = tmp_path / "feats.npy"
    assert cli.main(["encode", "--ckpt", str(ckpt), *paths, "--out", str(out), "--batch-size", "2"]) == 0
    feats = np.load(out)
    ref = R.load_state_dict(R.from_config(TINY), sd)
    want = _run_torch(ref, np.stack([T.vit_squash_448(T.load_image(p), 112) for p in paths]))
    assert feats.shape == (3, 16, 128) and feats.dtype == np.float32 and _rel(feats, want) <= TOL
    # A bad image: clear error naming it, exit 2, no output.
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"junk")
    out2 = tmp_path / "feats2.npy"
    assert cli.main(["encode", "--ckpt", str(ckpt), paths[0], str(bad), "--out", str(out2)]) == 2
    assert "bad.jpg" in capsys.readouterr().err and not out2.exists()


def test_random_init_is_the_originals():
    """A ViT trained or frozen from scratch (the demo's) starts as the original would: torch's
    defaults for the patch conv and the blocks' nn.Linear, N(0, 1)-scaled tables, and the pool's own
    init (Qwen-VL's Resampler._init_weights: trunc_normal(0.02) on nn.Linear, written here; the MHA
    in_proj xavier_uniform)."""
    torch.manual_seed(0)
    ref = R.from_config(TINY)
    qwen_resampler_init_(ref.attn_pool)
    theirs = CV.from_torch(_state_dict(ref), TINY)
    from flax import nnx

    with nnx.use_eager_sharding(False):
        ours = nnx.state(V.QwenViT(TINY, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()
    assert_init_like(ours, theirs)
