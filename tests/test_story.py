"""The story loop (seed_story_jax/story.py) and the `init` / `generate` commands on the tiny model.

* The decode loop (and the image step) compile once for a whole story: frames after the second
  compile nothing.
* The cached loop is the original's generation: with capacity ≥ the story, multimodal-sink (both
  position modes), sink and dense tell the same story (token ids identical, regressed features
  ≤ 1e-5 relative); frame 1 equals `mllm.AgentGenerator` (the torch-checked generator with forced
  image tokens, test_mllm.py) on the same prompt: text ids identical, features ≤ 1e-4 relative.
* The window policy reproduces gen_george.py's prompt surgery (checked against a transcription of
  the original loop) and its outputs: the released loop run in PyTorch with transformers' generate
  and the same weights writes the same text, frame after frame, and regresses the same features.
* `seed-story init tiny` then `seed-story generate --frames 30` writes every output; story.json
  lists files that exist.
"""

import dataclasses
import json
import re

import jax
import numpy as np
import pytest
from PIL import Image

from seed_story_jax import cli
from seed_story_jax.story import StoryOptions, StoryTeller, _bucket, load_story_model

FEAT_RTOL = 1e-5


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("story") / "ckpt"
    assert cli.main(["init", "tiny", str(out), "detokenizer.num_inference_steps=2"]) == 0
    return out


@pytest.fixture(scope="module")
def teller(ckpt):
    return StoryTeller(load_story_model(ckpt, render=False))


def _start(teller, b=2):
    rng = np.random.default_rng(0)
    return np.stack([rng.normal(size=(16, 64)).astype(np.float32) for _ in range(b)])


TEXTS = ["George sees a red kite in the park.", "The man with the yellow hat laughs."]


def test_story_compiles_the_decode_step_once(teller, compile_counter):
    o = StoryOptions(frames=7, max_text_tokens=6, render="none", progress=False, temperature=0.8, seed=3)
    before = teller.compiles()
    with compile_counter() as c:
        stories = teller.tell(_start(teller), TEXTS, o)
    after = teller.compiles()
    assert after["text_loop"] - before["text_loop"] <= 1
    assert after["image_step"] - before["image_step"] <= 1
    # A second story of the same shapes compiles nothing at all.
    with compile_counter() as c:
        again = teller.tell(_start(teller), TEXTS, dataclasses.replace(o, seed=4))
    assert c.count == 0, c.count
    assert len(stories) == 2 and all(len(s.frames) == 7 for s in stories + again)
    for s in stories:
        assert all(f.features.shape == (16, 64) for f in s.frames[1:])
        occ = [f.cache_occupancy for f in s.frames[1:]]
        assert occ == sorted(occ) and occ[-1] <= 256


def test_tellers_share_the_vit_encoder_compilations(teller, compile_counter):
    """Start images through the ViT: a second teller of the same model (the evaluation makes one per
    checkpoint) compiles no encoder again, and the features are `models.vit.make_encoder`'s."""
    from PIL import Image

    from seed_story_jax import transforms
    from seed_story_jax.models import vit as V

    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)) for _ in range(2)]
    got = teller.encode_images(imgs)
    other = StoryTeller(teller.model)
    with compile_counter() as c:
        again = other.encode_images(imgs)
    assert c.count == 0, c.count
    x = np.stack([transforms.vit_squash_448(im, teller.model.vit.cfg.image_size) for im in imgs])
    want = np.asarray(V.make_encoder(teller.model.vit)(x))
    np.testing.assert_array_equal(got, want)  # the same program: bit-identical
    np.testing.assert_array_equal(again, want)
    np.testing.assert_array_equal(other._uncond, np.asarray(V.uncond_features(teller.model.vit)))


def test_policies_without_eviction_tell_the_same_story(teller):
    """dense vs multimodal-sink (shifted, chunked image queries; original, image tokens fed one by
    one as the released generate does), both with room for the whole story (sink differs from
    multimodal-sink only in what it evicts: tests/test_cache_policies.py)."""
    o = StoryOptions(frames=4, max_text_tokens=7, render="none", progress=False)
    ref = teller.tell(_start(teller), TEXTS, dataclasses.replace(o, policy="dense"))
    for policy, positions, query in (("multimodal-sink", "shifted", "chunk"), ("multimodal-sink", "original", "decode")):
        got = teller.tell(_start(teller), TEXTS, dataclasses.replace(o, policy=policy, positions=positions,
                                                                     capacity=4 + 60 + 200, image_query=query))
        for s_ref, s in zip(ref, got):
            for f_ref, f in zip(s_ref.frames[1:], s.frames[1:]):
                assert f.token_ids == f_ref.token_ids, policy
                assert _rel(f.features, f_ref.features) <= FEAT_RTOL, (policy, positions, query)


def test_first_frame_equals_the_agent_generator(teller):
    """Frame 1 against mllm.AgentGenerator (forced image tokens decoded one by one, features read
    back inside its decode loop): same text ids, then from prompt + text + <img> the same features."""
    from seed_story_jax.generate import GenerateOptions
    from seed_story_jax.models import mllm

    o = StoryOptions(frames=2, max_text_tokens=10, render="none", progress=False)
    story = teller.tell(_start(teller), TEXTS, o)
    tok, m, it = teller.tok, teller.model, teller.tokens
    g = mllm.AgentGenerator(m.llm, m.mllm, it)
    feats0 = _start(teller)
    images = [feats0[i:i + 1] for i in range(2)]
    prompts = [[tok.bos_id] + tok.encode(t + teller.image_string) for t in TEXTS]
    opts = GenerateOptions(max_new_tokens=10, eos_token_id=None, pad_token_id=0)
    text = g.generate(prompts, images, opts).tokens
    n = len(it.img)
    prompts2 = [p + story[r].frames[1].token_ids + [it.boi] for r, p in enumerate(prompts)]
    img = g.generate(prompts2, images, dataclasses.replace(opts, max_new_tokens=n + 1))
    for r in range(2):
        got = story[r].frames[1].token_ids
        assert text[r, :len(got)].tolist() == got
        assert len(got) == 10 or text[r, len(got)] in (it.boi, tok.eos_id)
        assert img.tokens[r].tolist() == list(it.img) + [it.eoi] and img.has_image[r]
        assert _rel(story[r].frames[1].features, img.features[r]) <= 1e-4


def test_window_policy_is_the_released_prompt_surgery(teller):
    """gen_george.py's loop transcribed on strings (window 2 to evict early) versus what the
    window policy feeds the model, frame by frame."""
    o = StoryOptions(frames=6, max_text_tokens=5, render="none", progress=False, policy="window")
    cc = dataclasses.replace(teller.cfg.cache, window_images=2)
    teller_cfg = teller.cfg
    teller.cfg = dataclasses.replace(teller_cfg, cache=cc)
    seen = []
    real_prefill = teller._run_prefill

    def spy(rows, cache, feats=None, slots=None):
        seen.append(([list(r) for r in rows], None if slots is None else slots.sum(axis=1).tolist()))
        return real_prefill(rows, cache, feats, slots)

    teller._run_prefill = spy
    try:
        story = teller.tell(_start(teller, 1), TEXTS[:1], o)[0]
    finally:
        teller._run_prefill = real_prefill
        teller.cfg = teller_cfg
    img = teller.image_string
    prompt, n_images = TEXTS[0] + img, 1  # the original's variables
    for k in range(1, 6):
        rows, n_slots = seen[k - 1]
        assert rows[0] == [teller.tok.bos_id] + teller.tok.encode(prompt)
        assert n_slots == [n_images]
        text = re.sub(r"\s*<[^>]*>\s*", " ", story.frames[k].raw_text).strip()
        n_images += 1
        prompt = prompt + text + img
        while n_images > 2:
            prompt = prompt[prompt.index("</img>") + len("</img>") + len("[INST]"):]
            n_images -= 1


def test_window_policy_equals_the_released_loop_in_pytorch(teller):
    """The window policy against gen_george.py run in PyTorch (tests/torch_ref/story.py: the
    original's generate through transformers, LoRA unmerged), same weights, window 3 so images are
    evicted and the prompt is cut: every frame's text ids identical, regressed features ≤ 1e-4
    relative (fp32; the torch side re-encodes everything each frame, ours too but in JAX)."""
    import torch

    from convert import agent as convert_agent
    from seed_story_jax.config import LoRAConfig
    from seed_story_jax.story import StoryModel
    from tests.torch_ref import agent as torch_ref
    from tests.torch_ref.story import released_story

    cfg = teller.cfg
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, lora=LoRAConfig(rank=4, alpha=8.0, dropout=0.0)),
                              cache=dataclasses.replace(cfg.cache, window_images=3))
    agent = torch_ref.tiny_agent(cfg, seed=1)
    params = convert_agent.from_torch({k: v.detach().numpy().copy() for k, v in agent.state_dict().items()}, cfg,
                                      keep_lora=True)
    ours = StoryTeller(StoryModel.from_params(cfg, params, teller.tok))
    start = _start(teller, 1)
    torch.set_num_threads(1)
    want = released_story(agent, ours.tok, ours.tokens, ours.image_string, start[0], TEXTS[0], frames=7, window=3,
                          n_text=6)
    got = ours.tell(start, TEXTS[:1], StoryOptions(frames=7, min_text_tokens=6, max_text_tokens=6, render="none",
                                                   progress=False, policy="window"))[0]
    assert [w["prompt_images"] for w in want] == [1, 2, 3, 3, 3, 3]  # the first images were cut from the prompt
    for k, w in enumerate(want, start=1):
        assert got.frames[k].token_ids == w["token_ids"], k
        assert _rel(got.frames[k].features, w["features"]) <= 1e-4, k


def test_captions_mode_writes_the_given_texts(teller):
    caps = [["He climbs a tree.", "He finds a ball.", "He goes home."]] * 2
    story = teller.tell(_start(teller), TEXTS, StoryOptions(frames=4, render="none", progress=False), captions=caps)
    assert [f.text for f in story[0].frames] == [TEXTS[0]] + caps[0]
    assert story[0].frames[1].token_ids == teller.after_image(caps[0][0])
    with pytest.raises(ValueError, match="captions"):
        teller.tell(_start(teller), TEXTS, StoryOptions(frames=5, render="none", progress=False), captions=caps)


def test_captions_of_different_lengths_share_one_chunk_program(teller):
    """Given captions are written in chunks of one length (the longest caption's bucket), so a
    story compiles its caption chunk once — padding is masked, the features are the same as when
    each caption gets its own bucket (the chunk of a one-caption story)."""
    short, long_ = "He runs.", "He climbs a very tall tree and finds a red ball in the garden near the house."
    assert _bucket(len(teller.after_image(short)), 256) < _bucket(len(teller.after_image(long_)), 256)
    # JAX keeps one cache per jitted function, shared by every teller: earlier tests' programs
    # would be counted (and reused), so this count starts from an empty cache
    jax.clear_caches()
    fresh = StoryTeller(teller.model)
    o = StoryOptions(frames=3, render="none", progress=False)
    story = fresh.tell(_start(fresh), TEXTS, o, captions=[[short, long_]] * 2)
    assert fresh.compiles()["prefill"] == 2  # the start prompt with its image, and the captions
    alone = teller.tell(_start(teller), TEXTS, dataclasses.replace(o, frames=2), captions=[[short]] * 2)
    np.testing.assert_allclose(story[0].frames[1].features, alone[0].frames[1].features, rtol=1e-5, atol=1e-6)


def test_init_then_generate_writes_every_output(ckpt, tmp_path):
    start = tmp_path / "start.png"
    Image.fromarray((np.random.default_rng(1).random((40, 52, 3)) * 255).astype(np.uint8)).save(start)
    out = tmp_path / "out"
    argv = ["generate", "--ckpt", str(ckpt), "--image", str(start), "--text", "George sees a kite.",
            "--frames", "30", "--out", str(out), "--max-text-tokens", "6", "--render", "end"]
    assert cli.main(argv) == 0
    doc = json.loads((out / "story.json").read_text())
    assert len(doc["frames"]) == 30 and doc["policy"] == "multimodal-sink"
    listed = [f["image"] for f in doc["frames"]] + [doc["storyboard"], doc["html"]]
    assert all(name and (out / name).is_file() for name in listed), listed
    assert Image.open(out / doc["frames"][5]["image"]).size == (32, 32)
    page = (out / "story.html").read_text()
    assert all(f'src="{f["image"]}"' in page for f in doc["frames"])
    occ = [f["cache_occupancy"] for f in doc["frames"][1:]]
    assert occ == sorted(occ) and 4 + 192 < occ[-1] <= 256  # the ring filled, pins were kept
    # Refuses to overwrite; leaves nothing behind on bad input.
    assert cli.main(argv) == 2
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert cli.main(argv[:4] + [str(bad)] + argv[5:9] + ["--out", str(tmp_path / "o2")] + argv[11:]) == 2
    assert not (tmp_path / "o2").exists()


def test_display_text_drops_markup_and_control_characters():
    """Sampled byte-fallback pieces can decode to NUL or U+FFFD: the shown caption has neither."""
    from seed_story_jax.story import display_text

    assert display_text("[INST]Bo\x00 runs \ufffd <img_00001> to\x13  the park.") == "Bo runs to the park."
    assert display_text("Tom, a sad big cyan diamond.") == "Tom, a sad big cyan diamond."
