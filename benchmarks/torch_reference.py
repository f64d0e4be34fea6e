"""The PyTorch reference for stage 2, written the way LLaRA does it, holding rsllm_jax's exact weights.

LLaRA (and most PyTorch LLM recommenders) run transformers' `LlamaForCausalLM` wrapped by peft's
`get_peft_model(LoraConfig(...))`, build `inputs_embeds` from the model's embedding table and
overwrite the ID-placeholder positions with the projected item embedding, then call the model on
the embeddings. On top of that we compute the same losses as rsllm_jax (losses.py): masked NIP
cross-entropy on answer tokens and two cosine/temperature InfoNCE losses with in-batch negatives
over masked-mean-pooled final hidden states.

Weights come from the JAX parameter tree (`from_jax`): the frozen LLaMA through the checkpoint
converter's HF table (checkpoint/hf.py), the LoRA factors, projector, added-token rows and item
table copied leaf by leaf, so both sides start from identical numbers.
"""
from __future__ import annotations

import numpy as np
import peft
import torch
import torch.nn.functional as F
import transformers
from flax import traverse_util

from rsllm_jax.checkpoint.hf import to_hf_tensors
from rsllm_jax.models.lora import LORA_REGEX, split_trainable

_NEG = -1e9  # as rsllm_jax.losses: masked logits stay finite
_GROUP = dict(q_proj="self_attn", k_proj="self_attn", v_proj="self_attn", o_proj="self_attn",
              gate_proj="mlp", up_proj="mlp", down_proj="mlp")


def _t(x) -> torch.Tensor:
    # np.array copies: the JAX buffers may be donated (freed) by the JAX train step afterwards.
    return torch.tensor(np.array(x, dtype=np.float32))


def hf_llama(config, llm_params) -> transformers.LlamaForCausalLM:
    """LlamaForCausalLM holding the (LoRA-free) JAX LLaMA weights, via the converter's HF name table."""
    hf_cfg = transformers.LlamaConfig(**config.to_hf_config(), attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(hf_cfg)
    state = {name: _t(w) for name, w in to_hf_tensors(llm_params, config)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()  # tied to the embedding
    if unexpected or set(missing) - allowed:
        raise ValueError(f"weight conversion mismatch: missing {missing}, unexpected {unexpected}")
    return model


def _layer(tree: dict, i: int) -> dict:
    """Layer i of a per-layer (`layers_{i}`) or scanned (`layers`, leading axis) subtree."""
    if "layers" in tree:
        return {k: v[i] for k, v in traverse_util.flatten_dict(tree["layers"], sep="/").items()}
    return traverse_util.flatten_dict(tree[f"layers_{i}"], sep="/")


def copy_lora(peft_model, lora_params: dict, num_layers: int, targets) -> None:
    """JAX lora_a [*fan_in, r] -> lora_A.weight [r, fan_in]; lora_b [r, *fan_out] -> lora_B.weight [fan_out, r]."""
    layers = peft_model.get_base_model().model.layers
    with torch.no_grad():
        for i in range(num_layers):
            leaves = _layer(lora_params, i)
            for name in targets:
                module = getattr(getattr(layers[i], _GROUP[name]), name)
                a = np.asarray(leaves[f"{_GROUP[name]}/{name}/lora_a"])
                b = np.asarray(leaves[f"{_GROUP[name]}/{name}/lora_b"])
                module.lora_A["default"].weight.copy_(_t(a.reshape(-1, a.shape[-1]).T))
                module.lora_B["default"].weight.copy_(_t(b.reshape(b.shape[0], -1).T))


def _dense(kernel, bias) -> torch.nn.Linear:
    layer = torch.nn.Linear(*np.shape(kernel))
    with torch.no_grad():
        layer.weight.copy_(_t(np.asarray(kernel).T))
        layer.bias.copy_(_t(bias))
    return layer


class TorchRSLLM(torch.nn.Module):
    """peft-LoRA LLaMA reading hybrid prompts; `losses` mirrors rsllm_jax.train.rsllm_step.rsllm_loss."""

    def __init__(self, peft_model, projector, added, item_table, vocab_size: int):
        super().__init__()
        self.peft_model = peft_model
        self.projector, self.added = projector, added
        self.register_buffer("item_table", item_table)
        self.vocab_size = vocab_size

    @property
    def base(self) -> transformers.LlamaForCausalLM:
        return self.peft_model.get_base_model()

    def embed(self, input_ids: torch.Tensor, slot_items: torch.Tensor) -> torch.Tensor:
        """LLaRA's splice: token embeddings, then the projected ID written in place at each slot."""
        is_added = input_ids >= self.vocab_size
        x = self.base.model.embed_tokens(input_ids.masked_fill(is_added, 0))
        if is_added.any():
            x = torch.where(is_added[..., None], self.added((input_ids - self.vocab_size).clamp(min=0)), x)
        is_slot = slot_items >= 0
        # Only the slots are projected (under autocast the projector's output is bf16: cast to the embedding's).
        x[is_slot] = self.projector(self.item_table[slot_items[is_slot]]).to(x.dtype)
        return x

    def hidden(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [B, T, D] (LlamaModel, no LM head: the towers need no logits)."""
        return self.base.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state

    def losses(self, b: dict[str, torch.Tensor], weight_tt: float, weight_ut: float, temperature: float):
        h = self.hidden(self.embed(b["input_ids"], b["slot_items"]), b["attention_mask"])
        logits = self.base.lm_head(h)
        t = self.hidden(self.embed(b["target_input_ids"], b["target_slot_items"]), b["target_attention_mask"])
        v_t = masked_mean_pool(t, b["target_attention_mask"])
        nce = dict(temperature=temperature, item_ids=b["target_item"], valid=b["valid"])
        nip = nip_loss(logits, b["labels"], b["loss_mask"])
        l_ut = info_nce(masked_mean_pool(h, b["history_mask"]), v_t, **nce)
        l_tt = info_nce(masked_mean_pool(h, b["answer_mask"]), v_t, **nce)
        total = (1.0 - weight_tt - weight_ut) * nip + weight_tt * l_tt + weight_ut * l_ut
        return total, dict(loss=total, nip=nip, l_ut=l_ut, l_tt=l_tt)

    @torch.no_grad()
    def generate(self, input_ids, slot_items, attention_mask, new_tokens: int) -> torch.Tensor:
        """Greedy, exactly `new_tokens` per row (EOS stopping disabled); returns only the new tokens."""
        embeds = self.embed(input_ids, slot_items)
        return self.peft_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, do_sample=False,
                                        max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)


# ---- losses: rsllm_jax/losses.py in torch (fp32, explicit denominators) ----
def nip_loss(logits, labels, mask):
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.clamp(0, logits.shape[-1] - 1).flatten().long(),
                         reduction="none").view(labels.shape)
    mask = mask.float()
    return torch.where(mask > 0, ce, 0.0).sum() / mask.sum().clamp(min=1.0)


def l2_normalize(x, eps: float = 1e-6):
    x = x.float()
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True).clamp(min=eps * eps))


def info_nce(queries, keys, *, temperature, item_ids, valid):
    b = queries.shape[0]
    logits = l2_normalize(queries) @ l2_normalize(keys).T / temperature
    eye = torch.eye(b, dtype=torch.bool)
    drop = (item_ids[:, None] == item_ids[None, :]) & ~eye  # duplicate targets are not negatives
    drop |= ~valid.bool()[None, :]
    logits = logits.masked_fill(drop, _NEG)
    per_row = F.cross_entropy(logits, torch.arange(b), reduction="none")
    w = valid.float()
    return (per_row * w).sum() / w.sum().clamp(min=1.0)


def masked_mean_pool(hidden, mask):
    m = mask.float()[..., None]
    return (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1.0)


# ---- assembly ----
def from_jax(params: dict, llm_config, lora_cfg) -> TorchRSLLM:
    """The whole RSLLM parameter tree (llm incl. LoRA, projector, added_embeddings, rec) -> TorchRSLLM."""
    lora_params, base_params = split_trainable(params["llm"], LORA_REGEX)
    model = hf_llama(llm_config, base_params)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(
        r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.targets), bias="none", task_type="CAUSAL_LM"))
    copy_lora(peft_model, lora_params, llm_config.num_layers, lora_cfg.targets)
    # Exactly N new tokens: no EOS stopping (rsllm_jax's generate is also run without stop ids).
    peft_model.generation_config.eos_token_id = None
    proj = params["projector"]
    projector = torch.nn.Sequential(_dense(proj["fc1"]["kernel"], proj["fc1"]["bias"]), torch.nn.GELU(),
                                    _dense(proj["fc2"]["kernel"], proj["fc2"]["bias"]))
    added = torch.nn.Embedding.from_pretrained(_t(params["added_embeddings"]["embedding"]), freeze=False)
    return TorchRSLLM(peft_model, projector, added, _t(params["rec"]["item_table"]), llm_config.vocab_size)


def trainable_groups(model: TorchRSLLM, weight_decay: float) -> list[dict]:
    """Adam groups as make_optimizer sets them: weight decay on the projector only."""
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("projector.")]
    return [dict(params=list(model.projector.parameters()), weight_decay=weight_decay),
            dict(params=rest, weight_decay=0.0)]
