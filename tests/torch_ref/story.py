"""The released story loop in PyTorch (spec §3.1, `gen_george.py`): every frame re-tokenizes the
windowed prompt and calls the original's `generate` (tests/torch_ref/agent.py: transformers' greedy
generate with the image-token processor and the hidden-state read-back) from scratch.

`n_text` fixes the text length as benchmarks do (`<img>` and EOS banned before it, `<img>` forced at
it); None leaves the model free (the original: it stops at `<img>` by itself)."""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch
from transformers import LogitsProcessor

IMG_KIND = 2  # seed_story_jax.cache.IMG
INST = "[INST]"


def clean_text(text: str) -> str:
    import re

    return re.sub(r"\s*<[^>]*>\s*", " ", text).strip()


class FixedTextLength(LogitsProcessor):
    def __init__(self, prompt_len: int, n_text: int, boi: int, eos: int):
        self.prompt_len, self.n_text, self.boi, self.eos = prompt_len, n_text, boi, eos

    def __call__(self, input_ids, scores):
        i = input_ids.shape[1] - self.prompt_len
        if i < self.n_text:
            scores[:, [self.boi, self.eos]] = -torch.inf
        elif i == self.n_text:
            scores[:] = -torch.inf
            scores[:, self.boi] = 0.0
        return scores


def released_story(agent, tok, tokens, image_string: str, start: np.ndarray, text: str, *, frames: int,
                   window: int, n_text: Optional[int] = None, max_new_tokens: int = 500) -> list[dict]:
    """Frames 1..frames−1 from the start image's features (T_in, D) and caption: per frame the text
    ids, the regressed features, the seconds the frame took, and the prompt's length and images."""
    n = len(tokens.img)
    prompt = text + image_string
    images = [torch.from_numpy(np.asarray(start, np.float32))]
    out_frames = []
    for k in range(1, frames):
        t = time.perf_counter()
        ids = [tok.bos_id] + tok.encode(prompt)
        n_images = len(images)
        cmp = torch.from_numpy(tokens.kinds(np.asarray(ids, np.int32)) == IMG_KIND)[None]
        after = [] if n_text is None else [FixedTextLength(len(ids), n_text, tokens.boi, tok.eos_id)]
        with torch.inference_mode():
            out = agent.generate(list(tokens.sequence), torch.tensor([ids]), torch.stack(images),
                                 torch.ones(len(images), dtype=torch.bool), cmp, num_img_gen_tokens=n,
                                 max_new_tokens=max_new_tokens if n_text is None else n_text + n + 2,
                                 eos_token_id=tok.eos_id, after=after)
        gen = out["generate_ids"].tolist()
        if out["img_gen_feat"] is None:
            raise ValueError(f"frame {k}: the model wrote no image")
        images.append(out["img_gen_feat"][0])
        text_ids = gen[:gen.index(tokens.boi)] if tokens.boi in gen else gen
        out_frames.append({"frame": k, "token_ids": text_ids, "features": images[-1].numpy().copy(),
                           "seconds": time.perf_counter() - t, "prompt_tokens": len(ids),
                           "prompt_images": n_images})
        prompt = prompt + clean_text(tok.decode(gen)) + image_string
        while len(images) > window:
            prompt = prompt[prompt.index("</img>") + len("</img>") + len(INST):]
            images.pop(0)
    return out_frames
