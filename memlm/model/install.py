"""Installing memory attention into a transformers model, the way transformers wants it:
one attention function registered with `AttentionInterface`. A forward pass given a
`memory_session=` keyword (transformers passes extra keywords down to every attention
call) attends through the session; any other call is plain SDPA, so the model stays a
stock model for everything else (`generate`, training, evaluation).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from memlm.memory.session import MemorySession, ModelShape

ATTENTION_NAME = "memlm"


def memory_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    memory_session: MemorySession | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if memory_session is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError("memory attention runs one sequence at a time (batch size 1)")
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    return memory_session.attend(module.layer_idx, query, key, value, scaling), None


AttentionInterface.register(ATTENTION_NAME, memory_attention)
# The masks SDPA gets: without one registered, transformers builds no mask for a custom
# attention name, and SDPA's `is_causal` then aligns a query chunk that follows cached tokens
# to the start of the keys (wrong for a prompt read after a cached document).
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def install_memory_attention(model: PreTrainedModel) -> ModelShape:
    """Route the model's attention through `memory_attention`; returns the shapes sessions need."""
    model.set_attn_implementation(ATTENTION_NAME)
    config = model.config
    rotary = model.model.rotary_emb
    if getattr(rotary, "rope_type", "default") == "dynamic":
        raise ValueError("dynamic NTK RoPE changes its frequencies with length; memory positions need fixed ones")
    return ModelShape(
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        inv_freq=rotary.inv_freq.detach().float(),
        dtype=model.dtype,
        device=model.device,
    )
