"""Build a self-attention layer from the local backend's builders and run it."""

import torch

from protoformer import TransformerConfig
from protoformer.backends import LocalSpecProvider
from protoformer.transformer.attention import SelfAttention, SelfAttentionSubmodules

backend = LocalSpecProvider()
config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4)

# Each slot names the builder of one general layer kind; a miswired slot raises SpecError here.
submodules = SelfAttentionSubmodules(
    linear_qkv=backend.column_parallel_linear(),
    core_attention=backend.core_attention(),
    linear_proj=backend.row_parallel_linear(),
)
attention = SelfAttention(config, submodules, layer_number=1)

hidden_states = torch.randn(16, 2, config.hidden_size)  # [s, b, h]
output, bias = attention(hidden_states)  # [s, b, h], output bias (added by the caller) or None
print(f"{type(attention).__name__}: {tuple(hidden_states.shape)} -> {tuple(output.shape)}, "
      f"bias {None if bias is None else tuple(bias.shape)}")
