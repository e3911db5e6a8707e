"""Training FLOPs per token of a decoder-only (and an encoder-decoder) model, for MFU reports.

    flops_per_token = 6 * N_matmul + 6 * L * s * n_heads * (d_qk + d_v)

* `N_matmul` counts the weights that take part in a matrix multiply per token: every
  layer's attention projections (for MLA, the down- and up-projections of the query and
  the key/value latent) and MLP linears (3 of them when gated), plus the output layer
  `hidden_size * vocab_size` (counted even when tied to the embedding: the multiply still
  happens). The embedding lookup, norms and biases do no matmul work and are left out.
  An MoE layer counts its router (`hidden_size * num_moe_experts`), the `moe_router_topk`
  routed experts a token goes through (not all of them) and its shared experts.
  A multiply-add is 2 FLOPs; the backward pass costs twice the forward pass (gradients
  with respect to inputs and weights), hence 2 * 3 = 6 per weight.
* The attention term is the score (`q k^T`: 2 * s * d_qk per head) and context
  (`p v`: 2 * s * d_v per head) matmuls of one token against `s` positions, times 3 for
  forward and backward. As in the PaLM and Megatron-LM reports (and torchtitan's MFU), the
  causal mask is *not* credited (half of the scores are masked but are usually still
  computed): `6 N + 12 L h s` for `d_qk = d_v = h / n_heads`. With `causal=True` the
  attention term is halved (the "causal count": only the unmasked half is credited, as
  FlashAttention's kernels skip the masked blocks).
"""

from __future__ import annotations

from protoformer.config import TransformerConfig
from protoformer.models.common import check_sizes

__all__ = ["attention_flops_per_token", "encoder_decoder_flops_per_token", "flops_per_token",
           "inactive_expert_params", "matmul_params"]


def _attention_params(config: TransformerConfig) -> int:
    return config.attention_matmul_params  # MLA configs count their latent projections


def _mlp_params(config: TransformerConfig, width: int | None = None) -> int:
    linears = 3 if config.gated_linear_unit else 2
    return linears * config.hidden_size * (config.ffn_size if width is None else width)


def _moe_active_params(config: TransformerConfig) -> int:
    """Matmul weights one token uses in an MoE layer: router, top-k experts, shared experts."""
    experts = config.num_moe_experts or 0
    active = config.hidden_size * experts + config.moe_router_topk * _mlp_params(config, config.moe_ffn_size)
    shared = config.moe_shared_expert_intermediate_size
    if shared is not None:
        active += _mlp_params(config, shared) + (config.hidden_size if config.moe_shared_expert_gate else 0)
    return active


def matmul_params(config: TransformerConfig, vocab_size: int) -> int:
    """Weights used in a matmul per token: all layers' linears plus the output layer."""
    attention = config.num_layers * _attention_params(config)
    mlp = sum(_moe_active_params(config) if is_moe else _mlp_params(config)
              for is_moe in config.moe_layer_pattern)
    return attention + mlp + config.hidden_size * vocab_size


def inactive_expert_params(config: TransformerConfig) -> int:
    """Parameters of the routed experts a token does *not* use, over all MoE layers
    (`(num_moe_experts - moe_router_topk)` experts per layer, biases included): total
    parameters minus this is the active parameter count."""
    experts = config.num_moe_experts
    if experts is None:
        return 0
    per_expert = _mlp_params(config, config.moe_ffn_size)
    if config.add_bias_linear:
        fc1 = 2 * config.moe_ffn_size if config.gated_linear_unit else config.moe_ffn_size
        per_expert += fc1 + config.hidden_size
    return sum(config.moe_layer_pattern) * (experts - config.moe_router_topk) * per_expert


def attention_flops_per_token(config: TransformerConfig, seq_len: int, *,
                              causal: bool = False) -> int:
    """Forward+backward FLOPs of the attention score and context matmuls for one token
    (halved with `causal`: only the unmasked half of a causal mask's scores)."""
    heads = config.num_attention_heads
    d_qk, d_v = config.attention_head_dims
    full = 6 * config.num_layers * seq_len * heads * (d_qk + d_v)
    return full // 2 if causal else full


def flops_per_token(config: TransformerConfig, vocab_size: int, seq_len: int, *,
                    causal: bool = False) -> int:
    """Training (forward + backward) FLOPs per token at sequence length `seq_len`: the
    PaLM / torchtitan count, or with `causal` the count that credits half the attention."""
    check_sizes("flops_per_token", vocab_size=vocab_size, seq_len=seq_len)
    return 6 * matmul_params(config, vocab_size) + attention_flops_per_token(
        config, seq_len, causal=causal)


def encoder_decoder_flops_per_token(config: TransformerConfig, encoder_config: TransformerConfig,
                                    vocab_size: int, source_len: int,
                                    target_len: int) -> tuple[int, int]:
    """Training FLOPs (per source token, per target token) of an encoder-decoder model.

    A source token runs the encoder layers (bidirectional self-attention over `source_len`);
    a target token runs the decoder layers — self-attention over `target_len`, a
    cross-attention (the same projections again) over `source_len`, the MLP — and the output
    layer. The rules are those of `flops_per_token`.
    """
    check_sizes("encoder_decoder_flops_per_token", vocab_size=vocab_size,
                   source_len=source_len, target_len=target_len)
    encoder = encoder_config.num_layers * (_attention_params(encoder_config)
                                           + _mlp_params(encoder_config))
    decoder = (config.num_layers * (2 * _attention_params(config) + _mlp_params(config))
               + config.hidden_size * vocab_size)
    per_source = 6 * encoder + attention_flops_per_token(encoder_config, source_len)
    per_target = (6 * decoder + attention_flops_per_token(config, target_len)
                  + attention_flops_per_token(config, source_len))
    return per_source, per_target
