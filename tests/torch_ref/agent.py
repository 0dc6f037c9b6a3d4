"""Plain PyTorch reference of the SEED-Story agent (spec §2.4–2.7), written from the spec.

transformers' `LlamaForCausalLM` wrapped the way peft 0.4 wraps it (peft is not a dependency), so
`state_dict()` carries the released checkpoints' key names:

    llm.base_model.model.model.layers.{i}.self_attn.q_proj.weight               (frozen base)
    llm.base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.default.weight (r, in)
    llm.base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.default.weight (out, r)
    llm.base_model.model.model.layers.{i}.input_layernorm.original_module.weight
    llm.base_model.model.model.layers.{i}.input_layernorm.modules_to_save.default.weight
    llm.base_model.model.model.norm.{original_module,modules_to_save.default}.weight
    llm.base_model.model.{model.embed_tokens,lm_head}.weight
    input_resampler.*, output_resampler.*    (convert/torch_ref/resamplers.Resampler)

`ContinuousLVLM.forward` / `.generate` follow the original `src/models_clm/models.py` (§2.6, §2.7),
with `AutoImageTokenGenerationProcessor` (0.0 suppression, max + 10 forcing). One deliberate
difference from calling HF with a padding mask: the attention mask is not passed to the Llama,
because the original's xformers attention ignores it (causal only).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

from convert.torch_ref.resamplers import Resampler

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


# ------------------------------------------------------------------------------ peft 0.4 layout


class LoraLinear(nn.Linear):
    """peft 0.4 `Linear`: an nn.Linear (base weight at `.weight`) plus lora_A/lora_B ModuleDicts;
    y = x Wᵀ + B(A(dropout(x))) · alpha / r."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base.in_features, base.out_features, bias=False)
        self.weight = base.weight
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, base.out_features, bias=False)})
        self.lora_dropout = nn.ModuleDict({"default": nn.Dropout(dropout)})
        self.scaling = alpha / r
        nn.init.kaiming_uniform_(self.lora_A["default"].weight, a=5 ** 0.5)
        nn.init.zeros_(self.lora_B["default"].weight)

    def forward(self, x):
        lora = self.lora_B["default"](self.lora_A["default"](self.lora_dropout["default"](x)))
        return F.linear(x, self.weight) + lora * self.scaling


class ModulesToSaveWrapper(nn.Module):
    """peft's wrapper of a fully trained module: `original_module` (unused) and the trained copy."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict({"default": copy.deepcopy(module)})

    def forward(self, *args, **kwargs):
        return self.modules_to_save["default"](*args, **kwargs)


class LoraModel(nn.Module):
    def __init__(self, model: LlamaForCausalLM):
        super().__init__()
        self.model = model


class PeftModelForCausalLM(nn.Module):
    """`llm.base_model.model` = the wrapped LlamaForCausalLM."""

    def __init__(self, model: LlamaForCausalLM, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
                 targets=ATTN + MLP):
        super().__init__()
        for layer in model.model.layers:
            for name in targets:
                parent = layer.self_attn if name in ATTN else layer.mlp
                setattr(parent, name, LoraLinear(getattr(parent, name), r, alpha, dropout))
            for name in NORMS:
                setattr(layer, name, ModulesToSaveWrapper(getattr(layer, name)))
        model.model.norm = ModulesToSaveWrapper(model.model.norm)
        self.base_model = LoraModel(model)

    @property
    def hf(self) -> LlamaForCausalLM:
        return self.base_model.model

    def get_input_embeddings(self):
        return self.hf.get_input_embeddings()

    def forward(self, **kwargs):
        return self.hf(**kwargs)


def randomize_adapters(llm: PeftModelForCausalLM, seed: int = 0, scale: float = 0.05) -> None:
    """Nonzero LoRA B and trained norms differing from the originals, so a test sees both."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in llm.modules():
            if isinstance(m, LoraLinear):
                w = m.lora_B["default"].weight
                w.copy_(torch.randn(w.shape, generator=g) * scale)
            if isinstance(m, ModulesToSaveWrapper):
                w = m.modules_to_save["default"].weight
                w.copy_(1.0 + torch.randn(w.shape, generator=g) * 0.1)


def tiny_llama(vocab_size: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
               eps: float = 1e-5, theta: float = 10000.0, max_pos: int = 2048, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      rms_norm_eps=eps, rope_theta=theta, max_position_embeddings=max_pos,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()


# ------------------------------------------------------------------------------ the agent


def cosine_loss(rec, target):
    target = target / target.norm(dim=-1, keepdim=True)
    rec = rec / rec.norm(dim=-1, keepdim=True)
    return (1 - (target * rec).sum(-1)).mean()


class AutoImageTokenGenerationProcessor(LogitsProcessor):
    """img_ids_list = ids of "<img><img_00000>…<img_{n-1}></img>" (the original encodes that string)."""

    def __init__(self, img_ids_list, suppress_value: float = 0.0):
        self.img_ids_list = [int(i) for i in img_ids_list]
        self.suppress_value = suppress_value

    def __call__(self, input_ids, scores):
        for i in range(input_ids.shape[0]):
            cur = input_ids[i, -1].item()
            if cur in self.img_ids_list[:-1]:
                out = self.img_ids_list[self.img_ids_list.index(cur) + 1]
                scores[i, ..., out] = scores[i, ...].max() + 10.0
            else:
                scores[i, ..., torch.tensor(self.img_ids_list[1:], dtype=torch.long)] = self.suppress_value
        return scores


class ContinuousLVLM(nn.Module):
    def __init__(self, llm: PeftModelForCausalLM, input_resampler: Resampler, output_resampler: Resampler,
                 lm_loss_scale: float = 1.0, rec_loss_scale: float = 1.0):
        super().__init__()
        self.llm = llm
        self.input_resampler = input_resampler
        self.output_resampler = output_resampler
        self.lm_loss_scale = lm_loss_scale
        self.rec_loss_scale = rec_loss_scale

    def forward(self, input_ids, labels, image_embeds, embeds_gen_mask, embeds_cmp_mask, ids_gen_mask, ids_cmp_mask):
        """image_embeds (N_img, T, D) concatenated over the batch; masks as the original (§2.6)."""
        input_embeds = self.llm.get_input_embeddings()(input_ids)
        dim = input_embeds.shape[-1]
        image_embeds_lm = self.input_resampler(image_embeds)
        if embeds_cmp_mask.sum() > 0:
            # .to: under autocast the resampler gives bf16 and the embedding table fp32
            input_embeds[ids_cmp_mask] = image_embeds_lm[embeds_cmp_mask].view(-1, dim).to(input_embeds.dtype)
        out = self.llm(inputs_embeds=input_embeds, labels=labels, output_hidden_states=True, return_dict=True)
        last_hidden = out.hidden_states[-1]
        if embeds_gen_mask.sum() > 0:
            target = image_embeds[embeds_gen_mask]
            h = last_hidden[ids_gen_mask].view(target.shape[0], -1, dim)
            rec = self.output_resampler(h)
            rec_loss = cosine_loss(rec, target)
        else:
            rec, rec_loss = None, torch.zeros(())
        total = self.lm_loss_scale * out.loss + self.rec_loss_scale * rec_loss
        return {"total_loss": total, "lm_loss": out.loss, "rec_loss": rec_loss, "logits": out.logits,
                "hidden": last_hidden, "recon_image_embeds": rec}

    @torch.no_grad()
    def generate(self, img_ids_list, input_ids, image_embeds=None, embeds_cmp_mask=None, ids_cmp_mask=None,
                 num_img_gen_tokens: int = 64, max_new_tokens: int = 120, eos_token_id: int = 2,
                 suppress_value: float = 0.0, after=()):
        """Greedy decoding with forcing and the hidden-state read-back of the original (one row).
        `after`: logits processors run after the original's (benchmarks fix the text length)."""
        processors = LogitsProcessorList([AutoImageTokenGenerationProcessor(img_ids_list, suppress_value), *after])
        input_embeds = self.llm.get_input_embeddings()(input_ids)
        dim = input_embeds.shape[-1]
        if image_embeds is not None:
            image_embeds_lm = self.input_resampler(image_embeds)
            input_embeds[ids_cmp_mask] = image_embeds_lm[embeds_cmp_mask].view(-1, dim)
        output = self.llm.hf.generate(input_ids=input_ids, inputs_embeds=input_embeds, output_hidden_states=True,
                                      return_dict_in_generate=True, logits_processor=processors, num_beams=1,
                                      do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                      pad_token_id=0)
        generate_ids = output.sequences[0][input_ids.shape[1]:]
        eoi = img_ids_list[-1]
        last_hidden = torch.cat([h[-1] for h in output.hidden_states], dim=1)[0, input_ids.shape[1]:, :]
        eoi_indices = torch.where(generate_ids == eoi)[0].tolist()
        feat = None
        if eoi_indices:
            e = eoi_indices[-1]
            feat = self.output_resampler(last_hidden[e - num_img_gen_tokens:e][None])
        return {"generate_ids": generate_ids, "img_gen_feat": feat, "has_img_output": bool(eoi_indices)}


def tiny_agent(cfg, seed: int = 0) -> ContinuousLVLM:
    """The agent of a seed-story config (its llm.lora rank/alpha) with random weights: nonzero LoRA,
    trained-looking norms and resamplers (tests and the story benchmark)."""
    c = cfg.llm
    hf = tiny_llama(c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads,
                    eps=c.rms_norm_eps, theta=c.rope_theta, seed=seed)
    llm = PeftModelForCausalLM(hf, r=c.lora.rank, alpha=c.lora.alpha)
    randomize_adapters(llm, seed)
    res = []
    for i, rc in enumerate((cfg.mllm.input_resampler, cfg.mllm.output_resampler)):
        r = Resampler(rc.grid_size, rc.embed_dim, rc.num_heads, rc.kv_dim, eps=rc.eps)
        g = torch.Generator().manual_seed(100 + seed + i)
        with torch.no_grad():
            for name, p in r.named_parameters():
                if name != "pos_embed":
                    p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim > 1 else 0.3)
                            + (1.0 if name.startswith("ln") and name.endswith("weight") else 0.0))
        res.append(r)
    return ContinuousLVLM(llm, res[0], res[1], cfg.mllm.lm_loss_scale, cfg.mllm.rec_loss_scale).eval()
