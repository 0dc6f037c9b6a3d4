"""Random-init check shared by the model tests: our fresh parameters against the original's."""

import jax
import numpy as np


def _stds(tree: dict, min_size: int) -> dict:
    return {"/".join(str(getattr(k, "key", k)) for k in path): float(np.std(np.asarray(v)))
            for path, v in jax.tree_util.tree_leaves_with_path(tree) if np.asarray(v).size >= min_size}


def assert_init_like(ours: dict, theirs: dict, rel: float = 0.15, min_size: int = 512) -> None:
    """Every tensor of ≥ `min_size` values has the std of the original's fresh init within `rel`
    (both trees in our param layout). A fixed std 0.02 on 32-64-wide layers is 3-5× off: the
    tiny models trained from scratch would start with every signal that much weaker per layer."""
    a, b = _stds(ours, min_size), _stds(theirs, min_size)
    assert a.keys() == b.keys() and a
    off = {k: (round(a[k], 4), round(b[k], 4)) for k in a if abs(a[k] / b[k] - 1) > rel}
    assert not off, f"init std (ours, original's) off by more than {rel:.0%}: {off}"


def qwen_resampler_init_(module) -> None:
    """Qwen-VL's Resampler._init_weights on a torch reference, in place (written from the
    original; the reference module leaves it out): trunc_normal(0.02) weights and zero biases on
    every nn.Linear, the MHA's out_proj included, while its in_proj keeps xavier_uniform."""
    import torch

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    torch.nn.init.zeros_(m.bias)
