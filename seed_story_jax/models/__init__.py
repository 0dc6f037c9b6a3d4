"""One model = one file. Each model module exposes `build(section_cfg, rngs) -> nnx.Module`; a
checkpoint stores one params tree per config section that has a model (the component names below)."""

from __future__ import annotations

import importlib

# config section / checkpoint component → module with build(section_cfg, rngs)
COMPONENTS = {
    "llm": "seed_story_jax.models.llama",
    "vit": "seed_story_jax.models.vit",
    "unet": "seed_story_jax.models.unet",
    "vae": "seed_story_jax.models.vae",
    "detokenizer": "seed_story_jax.models.detokenizer",  # ResamplerXLV2 params
    "mllm": "seed_story_jax.models.mllm",  # the agent's input/output resamplers (the Llama is `llm`)
}


def module_for(component: str):
    if component not in COMPONENTS:
        raise KeyError(f"unknown component {component!r}; known: {sorted(COMPONENTS)}")
    return importlib.import_module(COMPONENTS[component])


def build(component: str, section_cfg, rngs):
    """Instantiate a component's module (under nnx.use_eager_sharding(False) unless a mesh is set)."""
    from flax import nnx

    mod = module_for(component)
    with nnx.use_eager_sharding(False):
        return mod.build(section_cfg, rngs)


def abstract_params(component: str, section_cfg):
    """ShapeDtypeStruct tree of a component's params, without allocating them. A model module's own
    `abstract_params(section_cfg)` wins (the UNet's avoids flax's slow Rngs tracing at SDXL size)."""
    from flax import nnx

    mod = module_for(component)
    if hasattr(mod, "abstract_params"):
        return mod.abstract_params(section_cfg)

    def make():
        return nnx.state(build(component, section_cfg, nnx.Rngs(0)), nnx.Param).to_pure_dict()

    import jax

    return jax.eval_shape(make)
