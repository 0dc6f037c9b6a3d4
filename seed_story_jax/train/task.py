"""What a training stage plugs into the generic machinery: a model bundle, a trainable predicate,
a loss function and examples.

    loss_fn(model, batch, rng) -> (scalar loss, {name: scalar metric})

`model` is the stage's `Bundle` (one attribute per component: llm, vit, unet, ...), rebuilt inside
the jitted step from (graphdef, trainable params, frozen params); `batch` is one microbatch (dict of
arrays with a leading example axis); `rng` a typed key for noise and dropout. The loss is a mean over
the microbatch's examples (microbatches are equal-sized, so their mean is the step's mean).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Sequence

from flax import nnx


class Bundle(nnx.Module):
    """The components a stage trains or runs, as attributes named like the config sections, so a
    parameter path reads `llm/layers/0/self_attn/q_proj/lora_a`."""

    def __init__(self, **components: nnx.Module):
        for name, module in components.items():
            setattr(self, name, module)


@dataclasses.dataclass
class Task:
    name: str
    build: Callable[[nnx.Rngs], Bundle]
    trainable: Callable[[tuple], bool]  # parameter path (component first) → trained?
    loss_fn: Callable[[Bundle, dict, Any], tuple[Any, dict]]
    examples: Any  # random-access dataset (grain.MapDataset or a Sequence) of dicts of np arrays
    tokens_per_example: float = 0.0  # for tokens/s
    flops_per_example: float = 0.0  # model FLOPs per example, forward + backward (the task's formula)
    flops_note: str = ""  # how flops_per_example is counted
    key: Any = None  # hashable identity of (model, trainable set, data shapes): reuse compilations
    example_spec: Any = None  # {field: (shape, dtype)} of one example; None: read from examples[0].
    #                           `seed-story plan` needs only this, so a task for planning needs no data.


def example_spec(task: "Task") -> dict:
    import numpy as np

    if task.example_spec is not None:
        return {k: (tuple(v[0]), np.dtype(v[1])) for k, v in task.example_spec.items()}
    ex = task.examples[0]
    return {k: (np.asarray(v).shape, np.asarray(v).dtype) for k, v in ex.items()}


def path_str(path: Sequence) -> str:
    return "/".join(str(p) for p in path)


def _lora_member(path: tuple) -> bool:
    names = [str(p) for p in path]
    return any(n.startswith("lora_") or "norm" in n or n in ("embed_tokens", "lm_head") for n in names)


def trainable_predicate(preset: str, trained: Sequence[str], regex: str = "") -> Callable[[tuple], bool]:
    """Presets (TrainConfig.trainable) restricted to the stage's `trained` components.

    lora: LoRA A/B + every RMSNorm + embed_tokens + lm_head of the llm, and all of the agent's
          resamplers (`mllm`) — SEED-Story stage 2 (spec §2.4);
    kv:   UNet to_k/to_v of every attention (self and cross) + the de-tokenizer resampler (§4.3);
    unet: the whole UNet + the de-tokenizer resampler;  full: everything in `trained`.
    `regex` (searched in "component/path") replaces the preset when given."""
    trained = tuple(trained)
    if regex:
        pattern = re.compile(regex)
        return lambda path: bool(pattern.search(path_str(path)))

    def pred(path: tuple) -> bool:
        comp = str(path[0])
        if comp not in trained:
            return False
        names = {str(p) for p in path}
        if preset == "full":
            return True
        if preset == "lora":
            return comp == "mllm" or (comp == "llm" and _lora_member(path))
        if preset == "kv":
            return comp == "detokenizer" or (comp == "unet" and bool(names & {"to_k", "to_v"}))
        if preset == "unet":
            return comp in ("unet", "detokenizer")
        raise ValueError(f"unknown trainable preset {preset!r}")

    return pred
