"""The resampler torch references (Qwen-VL Resampler, ResamplerXLV2) for the tests. They live in
`convert/torch_ref/resamplers.py` so that `seed-story convert --verify` can use them too."""

from convert.torch_ref.resamplers import (  # noqa: F401
    AttentionPool2d,
    FeedForward,
    PerceiverAttention,
    Resampler,
    ResamplerXLV2,
    get_2d_sincos_pos_embed,
    get_abs_pos,
)
