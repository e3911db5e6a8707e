"""What the mixture-of-experts families share: reading a Llama-style MoE config (Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE), the MoE fields of `TransformerConfig`, and the tensor rules of
routers, routed experts and shared experts.

Routed experts. protoformer's `GroupedMLP` holds one layer's experts in two tensors:
`experts.linear_fc1.weight [E, 2f, h]` (each expert's gate rows, then its up rows) and
`experts.linear_fc2.weight [E, h, f]`. Checkpoint files (what `save_pretrained` writes, and
what transformers 4 models hold) store one tensor per expert and projection,
`experts.{e}.gate_proj.weight [f, h]` and so on; transformers 5 models hold them fused in
memory, `experts.gate_up_proj [E, 2f, h]` and `experts.down_proj [E, h, f]`, which is our
layout exactly. Loading reads either (`HFModelInfo.fused_experts` says which); `save_hf`
writes the per-expert files that every transformers version reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from protoformer.architectures.conversion import (
    DESCRIBED_FIELDS,
    ConfigReader,
    HFConversionError,
    HFModelInfo,
    JSONDict,
    MLPLayerRules,
    TensorRule,
    UnsupportedHFModelError,
    activation_name,
    checked_config,
    hf_model_info,
    mlp_rules,
    owned,
    same,
)
from protoformer.architectures.decoder_config import (
    decoder_config_values,
    read_decoder_config,
    read_head_dim,
    require_default_rope,
)
from protoformer.architectures.registry import ModelSizes
from protoformer.config import TransformerConfig

__all__ = [
    "MOE_DESCRIBED_FIELDS",
    "ExpertNames",
    "MoEFields",
    "aux_loss_coeff",
    "gpt_moe_config_values",
    "gpt_moe_exportable_problems",
    "layers_from_sparse_step",
    "moe_layer_rules",
    "read_gpt_attention_config",
    "read_gpt_moe_info",
    "refuse_attention_bias",
    "refuse_sliding_window",
    "routed_expert_rules",
    "uses_fused_experts",
    "with_moe",
]

_ConfigT = TypeVar("_ConfigT", bound=TransformerConfig)

# The config fields an MoE checkpoint's config determines, besides `DESCRIBED_FIELDS`.
MOE_DESCRIBED_FIELDS: tuple[str, ...] = (
    *DESCRIBED_FIELDS, "num_query_groups", "kv_channels", "moe_ffn_hidden_size",
    "moe_router_topk", "moe_router_score_function", "moe_normalizes_topk_probs",
    "moe_router_topk_scaling_factor", "moe_router_num_groups", "moe_router_group_topk",
    "moe_router_enable_expert_bias", "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate", "moe_expert_capacity_factor")


# ------------------------------------------------------------------ config: HF -> protoformer
@dataclass(frozen=True)
class MoEFields:
    """The mixture-of-experts settings a Hugging Face config states, in protoformer's terms.

    `moe_layers[i]` is whether layer i has experts; `normalize_topk` whether the selected
    experts' weights are divided by their sum (HF `norm_topk_prob`; Mixtral always).
    """

    num_experts: int
    expert_ffn_size: int
    topk: int
    moe_layers: tuple[bool, ...]
    normalize_topk: bool
    score_function: str = "softmax"  # "softmax" | "sigmoid"
    topk_scaling_factor: float | None = None
    num_groups: int | None = None
    group_topk: int | None = None
    expert_bias: bool = False
    shared_expert_size: int | None = None
    shared_expert_gate: bool = False
    aux_loss_coeff: float = 0.0
    router_dtype: str | None = None  # "fp32" where the checkpoint's router runs in float32


def with_moe(config: _ConfigT, moe: MoEFields, where: str) -> _ConfigT:
    """`config` (its dense sizes read from the checkpoint) with `moe`'s experts, validated.

    Softmax routers: HF's `norm_topk_prob` divides the top-k softmax probabilities by their
    sum, which equals a softmax over the selected logits (`moe_router_pre_softmax=False`);
    without it the top-k probabilities of the full softmax are kept (`pre_softmax=True`).
    Sigmoid routers: `moe_router_norm_topk_prob`.
    """
    softmax = moe.score_function == "softmax"
    if moe.topk == 1 and moe.normalize_topk:
        raise UnsupportedHFModelError(
            f"{where}: num_experts_per_tok=1 with normalised top-k weights gives every token's "
            "expert the weight 1 exactly; protoformer's router keeps the routing probability "
            "(a weight of 1 has no gradient), so this model cannot be represented")
    try:
        return dataclasses.replace(
            config,
            num_moe_experts=moe.num_experts,
            moe_ffn_hidden_size=moe.expert_ffn_size,
            moe_layer_freq=[int(flag) for flag in moe.moe_layers],
            moe_router_topk=moe.topk,
            moe_router_score_function="softmax" if softmax else "sigmoid",
            moe_router_pre_softmax=softmax and not moe.normalize_topk,
            moe_router_norm_topk_prob=None if softmax else moe.normalize_topk,
            moe_router_topk_scaling_factor=moe.topk_scaling_factor,
            moe_router_num_groups=moe.num_groups,
            moe_router_group_topk=moe.group_topk,
            moe_router_dtype="fp32" if moe.router_dtype == "fp32" else None,
            moe_router_enable_expert_bias=moe.expert_bias,
            moe_aux_loss_coeff=moe.aux_loss_coeff,
            moe_shared_expert_intermediate_size=moe.shared_expert_size,
            moe_shared_expert_gate=moe.shared_expert_gate,
        )
    except ValueError as error:  # TransformerConfig's validation names the field
        raise HFConversionError(f"{where}: {error}") from error


def read_gpt_attention_config(reader: ConfigReader, dtype: torch.dtype, *, ffn_hidden_size: int,
                              qk_layernorm: bool, add_qkv_bias: bool) -> TransformerConfig:
    """The dense part of a Llama-style MoE config (Mixtral, Qwen-MoE, OLMoE): sizes, grouped
    query attention, RMSNorm, the gated activation and plain RoPE (`rope_type` 'default')."""
    head_dim = read_head_dim(reader)
    theta, _ = require_default_rope(reader, "this family")
    base = read_decoder_config(reader, dtype, head_dim=head_dim, rotary_base=theta,
                               ffn_hidden_size=ffn_hidden_size)
    return checked_config(reader, lambda: dataclasses.replace(
        base, qk_layernorm=qk_layernorm, add_qkv_bias=add_qkv_bias))


def read_gpt_moe_info(reader: ConfigReader, dtype: torch.dtype, *, model_type: str,
                      architecture: str, experts_key: str, expert_ffn_key: str,
                      normalize_topk: bool | None, every_layer: bool = True,
                      qk_layernorm: bool = False, add_qkv_bias: bool = False,
                      shared_expert_key: str | None = None,
                      described_fields: tuple[str, ...] = MOE_DESCRIBED_FIELDS) -> HFModelInfo:
    """A Llama-style MoE config (Mixtral, Qwen-MoE, OLMoE) -> `HFModelInfo`: the attention
    part (`read_gpt_attention_config`, dense width `intermediate_size`) with the experts.

    `experts_key` / `expert_ffn_key`: the keys of the expert count and width;
    `normalize_topk` None reads `norm_topk_prob` (default false); `every_layer=False` places
    the experts by Qwen's `decoder_sparse_step` / `mlp_only_layers`; `shared_expert_key`
    names the width of a gated shared expert (Qwen2-MoE).
    """
    config = read_gpt_attention_config(reader, dtype,
                                       ffn_hidden_size=reader.get_int("intermediate_size"),
                                       qk_layernorm=qk_layernorm, add_qkv_bias=add_qkv_bias)
    layers = config.num_layers
    config = with_moe(config, MoEFields(
        num_experts=reader.get_int(experts_key),
        expert_ffn_size=reader.get_int(expert_ffn_key),
        topk=reader.get_int("num_experts_per_tok"),
        moe_layers=(True,) * layers if every_layer else layers_from_sparse_step(reader, layers),
        normalize_topk=(normalize_topk if normalize_topk is not None
                        else reader.get_bool("norm_topk_prob", False)),
        shared_expert_size=(reader.get_int(shared_expert_key) if shared_expert_key is not None
                            else None),
        shared_expert_gate=shared_expert_key is not None,
        aux_loss_coeff=aux_loss_coeff(reader),
    ), reader.where)
    return hf_model_info(reader, config, model_type=model_type, architecture=architecture,
                         described_fields=described_fields)


def refuse_attention_bias(reader: ConfigReader) -> None:
    """Refuse `attention_bias=true` where it biases q/k/v and o_proj but not the experts."""
    if reader.get_bool("attention_bias", False):
        raise UnsupportedHFModelError(
            f"{reader.where}: attention_bias=true puts a bias on o_proj but not on the experts, "
            "which protoformer's add_bias_linear cannot represent")


def refuse_sliding_window(reader: ConfigReader, *, switch: str | None = None) -> None:
    """Refuse a sliding attention window shorter than the context (switched on by `switch`
    where the family has such a key, e.g. Qwen's `use_sliding_window`)."""
    if switch is not None and not reader.get_bool(switch, False):
        return
    window = reader.get_optional_int("sliding_window")
    if window is not None and 0 < window < reader.get_int("max_position_embeddings"):
        raise UnsupportedHFModelError(
            f"{reader.where}: sliding_window={window} (below max_position_embeddings="
            f"{reader.get_int('max_position_embeddings')}) is not supported for mixture-of-"
            "experts models yet; protoformer converts them with full causal attention only")


def layers_from_sparse_step(reader: ConfigReader, num_layers: int) -> tuple[bool, ...]:
    """Qwen-MoE's rule: layer i has experts unless listed in `mlp_only_layers`, and only when
    `(i + 1) % decoder_sparse_step == 0`."""
    step = reader.get_int("decoder_sparse_step", 1)
    if step < 1:
        raise HFConversionError(f"{reader.where}: decoder_sparse_step={step} must be >= 1")
    raw: object = reader.values.get("mlp_only_layers") or []
    entries: list[object] = list(raw) if isinstance(raw, list) else [None]  # pyright: ignore[reportUnknownArgumentType]  # JSON list
    dense = {i for i in entries if isinstance(i, int) and not isinstance(i, bool)}
    if len(dense) != len({repr(i) for i in entries}):  # a non-integer entry
        raise HFConversionError(f"{reader.where}: mlp_only_layers={raw!r} must be a list of "
                                "layer indices")
    return tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))


# ------------------------------------------------------------------ tensor rules
@dataclass(frozen=True)
class ExpertNames:
    """A family's names around its MoE block: the block (`mlp`, Mixtral's files
    `block_sparse_moe`), the router (`gate`) and each expert's gate/up/down projections."""

    block: str = "mlp"
    fused_block: str = "mlp"  # the block's name in transformers 5 models
    router: str = "gate"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


def _stack_gate_up(num_experts: int) -> Callable[[Sequence[Tensor]], Tensor]:
    def to_ours(parts: Sequence[Tensor]) -> Tensor:
        gates = torch.stack(tuple(parts[:num_experts]))  # [E, f, h]
        ups = torch.stack(tuple(parts[num_experts:]))  # [E, f, h]
        return torch.cat((gates, ups), dim=1)  # [E, 2f, h]
    return to_ours


def _unstack_gate_up(fused: Tensor) -> tuple[Tensor, ...]:
    gates, ups = torch.chunk(fused, 2, dim=1)  # [E, f, h] each
    return tuple(owned(t) for t in (*gates.unbind(0), *ups.unbind(0)))


def _stack(parts: Sequence[Tensor]) -> Tensor:
    return torch.stack(tuple(parts))  # [E, h, f]


def _unstack(stacked: Tensor) -> tuple[Tensor, ...]:
    return tuple(owned(t) for t in stacked.unbind(0))


def routed_expert_rules(ours: str, theirs: str, num_experts: int, names: ExpertNames, *,
                        fused: bool) -> list[TensorRule]:
    """`{ours}.linear_fc1/linear_fc2` of a `GroupedMLP` <-> the experts under `theirs`
    (`...mlp.experts`): the fused pair of transformers 5 models, or one tensor per expert."""
    fc1, fc2 = f"{ours}.linear_fc1.weight", f"{ours}.linear_fc2.weight"
    if fused:
        return [same(fc1, f"{theirs}.gate_up_proj"), same(fc2, f"{theirs}.down_proj")]
    experts = range(num_experts)
    gate_up = tuple(f"{theirs}.{e}.{names.gate}.weight" for e in experts) + \
        tuple(f"{theirs}.{e}.{names.up}.weight" for e in experts)
    down = tuple(f"{theirs}.{e}.{names.down}.weight" for e in experts)
    return [TensorRule(fc1, gate_up, _stack_gate_up(num_experts), _unstack_gate_up),
            TensorRule(fc2, down, _stack, _unstack)]


def moe_layer_rules(names: ExpertNames = ExpertNames(), *, shared: str | None = None,
                    shared_gate: str | None = None,
                    expert_bias: str | None = None) -> MLPLayerRules:
    """The `model_rules` MLP callback of an MoE family: dense layers as `mlp_rules`, MoE
    layers as router (+ `expert_bias` <-> `{router}.{expert_bias}`), routed experts and the
    shared experts (module `shared`, its sigmoid gate `shared_gate`) when the config has them."""

    def rules(info: HFModelInfo, index: int, ours: str, theirs: str) -> list[TensorRule]:
        config = info.config
        if not config.moe_layer_pattern[index]:
            return mlp_rules(config, f"{ours}.mlp", f"{theirs}.mlp")
        assert config.num_moe_experts is not None  # an MoE layer
        block = f"{theirs}.{names.fused_block if info.fused_experts else names.block}"
        router = f"{block}.{names.router}"
        result = [same(f"{ours}.mlp.router.weight", f"{router}.weight")]
        if config.moe_router_enable_expert_bias:
            if expert_bias is None:
                raise UnsupportedHFModelError(f"{info.architecture} has no expert bias")
            result.append(same(f"{ours}.mlp.router.expert_bias", f"{router}.{expert_bias}"))
        result.extend(routed_expert_rules(f"{ours}.mlp.experts", f"{block}.experts",
                                          config.num_moe_experts, names,
                                          fused=info.fused_experts))
        if config.moe_shared_expert_intermediate_size is not None:
            if shared is None:
                raise UnsupportedHFModelError(f"{info.architecture} has no shared experts")
            result.extend(mlp_rules(config, f"{ours}.mlp.shared_experts", f"{block}.{shared}"))
            if config.moe_shared_expert_gate:
                if shared_gate is None:
                    raise UnsupportedHFModelError(f"{info.architecture} has no shared-expert gate")
                result.append(same(f"{ours}.mlp.shared_experts.gate_weight",
                                   f"{block}.{shared_gate}.weight"))
        return result

    return rules


def uses_fused_experts(names: Sequence[str]) -> bool:
    """Whether a source's tensor names are transformers 5's fused expert layout."""
    return any(name.endswith(".experts.gate_up_proj") for name in names)


# ------------------------------------------------------------------ config: protoformer -> HF
def gpt_moe_exportable_problems(config: TransformerConfig) -> list[str]:
    """What a Llama-style MoE family (softmax router, grouped-query attention, no biases on the
    MLP) cannot represent of `config`; the family adds its own checks."""
    problems: list[str] = []
    if type(config) is not TransformerConfig:
        problems.append(f"a {type(config).__name__} (these models take a plain TransformerConfig)")
    if config.num_moe_experts is None:
        problems.append("no experts (num_moe_experts is None)")
        return problems
    if config.normalization != "RMSNorm":
        problems.append(f"normalization={config.normalization!r} (they use RMSNorm)")
    if not config.gated_linear_unit:
        problems.append("gated_linear_unit=False (their experts are gated)")
    if config.add_bias_linear:
        problems.append("add_bias_linear=True (their o_proj and experts have no bias)")
    if config.rotary_percent != 1.0 or config.rotary_interleaved or config.rope_scaling is not None:
        problems.append("rotary_percent/rotary_interleaved/rope_scaling (they rotate whole "
                        "heads by halves with plain RoPE)")
    if config.softmax_scale is not None:
        problems.append(f"softmax_scale={config.softmax_scale} (they use 1/sqrt(head_dim))")
    if config.moe_router_score_function != "softmax":
        problems.append("sigmoid router scores (their routers use a softmax)")
    if config.moe_router_topk_scaling_factor is not None:
        problems.append("moe_router_topk_scaling_factor (their routers do not scale)")
    if config.moe_router_num_groups is not None:
        problems.append("group-limited routing (moe_router_num_groups)")
    if config.moe_expert_capacity_factor is not None:
        problems.append("moe_expert_capacity_factor (their experts drop no tokens)")
    return problems


def gpt_moe_config_values(config: TransformerConfig, sizes: ModelSizes, *, model_type: str,
                          hf_class: str) -> JSONDict:
    """The config.json keys every Llama-style MoE family shares."""
    values = decoder_config_values(config, sizes, model_type=model_type, hf_class=hf_class)
    values.update({
        "hidden_act": activation_name(config),
        # transformers 5 reads rope_parameters, older versions rope_theta.
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rotary_base},
        "rope_theta": config.rotary_base,
        "num_experts_per_tok": config.moe_router_topk,
        "output_router_logits": config.moe_aux_loss_coeff > 0,
        "router_aux_loss_coef": config.moe_aux_loss_coeff or 0.001,
    })
    return values


def aux_loss_coeff(reader: ConfigReader) -> float:
    """transformers adds `router_aux_loss_coef` times its balancing loss to the training loss
    only with `output_router_logits`; protoformer's `moe_aux_loss_coeff` does the same."""
    if not reader.get_bool("output_router_logits", False):
        return 0.0
    return reader.get_float("router_aux_loss_coef", 0.001)
