"""The mixture-of-experts layers of DeepSeek-V3 (`architectures.deepseek_v3` holds the rest).

Config: the first `first_k_dense_replace` layers have a dense MLP of `intermediate_size`, the
others `n_routed_experts` experts of `moe_intermediate_size` plus `n_shared_experts` shared
experts (one MLP of `n_shared_experts * moe_intermediate_size`, no gate). The router scores
experts with a sigmoid (in float32); `e_score_correction_bias` (protoformer's expert bias of
aux-loss-free balancing) shifts only the choice; the choice is limited to the `topk_group`
best of `n_group` expert groups; the chosen scores are divided by their sum when
`norm_topk_prob`, then multiplied by `routed_scaling_factor`.

transformers scores a group by its best *two* experts, Megatron-Core (and protoformer) by
its best `num_experts_per_tok // topk_group`; both are 2 in DeepSeek-V3 (8 // 4), and a
config where they differ is refused. So is `moe_layer_freq` other than 1 (transformers
ignores it, DeepSeek's own code does not) and a non-sigmoid `scoring_func`.
"""

from __future__ import annotations

from collections.abc import Mapping

from protoformer.architectures.conversion import (
    ConfigReader,
    HFConversionError,
    JSONDict,
    UnsupportedHFModelError,
)
from protoformer.architectures.moe_conversion import (
    MOE_DESCRIBED_FIELDS,
    ExpertNames,
    MoEFields,
    moe_layer_rules,
)
from protoformer.config import TransformerConfig

__all__ = ["DEEPSEEK_MOE_FIELDS", "deepseek_mlp_layer_rules", "deepseek_moe_config_values",
           "deepseek_moe_fields"]

# The MoE fields a DeepSeek-V3 config determines (besides the dense ones).
DEEPSEEK_MOE_FIELDS = tuple(name for name in MOE_DESCRIBED_FIELDS
                            if name not in ("num_query_groups", "kv_channels"))

# How transformers scores an expert group: the sum of its best two experts' scores.
_GROUP_SCORE_EXPERTS = 2

deepseek_mlp_layer_rules = moe_layer_rules(ExpertNames(), shared="shared_experts",
                                           expert_bias="e_score_correction_bias")


def _group_limit(reader: ConfigReader, experts: int, topk: int) -> tuple[int | None, int | None]:
    """(`moe_router_num_groups`, `moe_router_group_topk`), None when the groups limit nothing."""
    groups = reader.get_optional_int("n_group")
    group_topk = reader.get_optional_int("topk_group")
    if groups is None or group_topk is None or groups <= 1 or group_topk >= groups:
        return None, None
    if experts % groups != 0 or experts // groups < _GROUP_SCORE_EXPERTS:
        raise HFConversionError(f"{reader.where}: n_group={groups} must divide n_routed_experts="
                                f"{experts} into groups of at least {_GROUP_SCORE_EXPERTS}")
    if topk // group_topk != _GROUP_SCORE_EXPERTS:
        raise UnsupportedHFModelError(
            f"{reader.where}: n_group={groups}, topk_group={group_topk} with num_experts_per_tok="
            f"{topk}: transformers scores a group by its best {_GROUP_SCORE_EXPERTS} experts, "
            f"protoformer by its best num_experts_per_tok // topk_group = {topk // group_topk}; "
            f"they agree only when num_experts_per_tok = {_GROUP_SCORE_EXPERTS} * topk_group")
    return groups, group_topk


def deepseek_moe_fields(values: Mapping[str, object], where: str) -> MoEFields | None:
    """The experts of a DeepSeek-V3 config.json mapping, or None when every layer is dense."""
    reader = ConfigReader(values, where)
    num_layers = reader.get_int("num_hidden_layers")
    experts = reader.get_optional_int("n_routed_experts")
    first_dense = reader.get_optional_int("first_k_dense_replace") or 0
    if not experts or first_dense >= num_layers:
        return None
    frequency = reader.get_int("moe_layer_freq", 1)
    if frequency != 1:
        raise UnsupportedHFModelError(
            f"{where}: moe_layer_freq={frequency} is not supported: transformers' DeepseekV3 "
            "puts experts in every layer from first_k_dense_replace on (it ignores "
            "moe_layer_freq) while DeepSeek's own code uses every N-th; set it to 1")
    scoring = reader.get_str("scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise UnsupportedHFModelError(f"{where}: scoring_func={scoring!r} is not supported; "
                                      "DeepSeek-V3 routers score with 'sigmoid'")
    method = reader.get_str("topk_method", "noaux_tc")
    if method != "noaux_tc":
        raise UnsupportedHFModelError(f"{where}: topk_method={method!r} is not supported; "
                                      "DeepSeek-V3 routes with 'noaux_tc' (expert bias)")
    shared = reader.get_int("n_shared_experts", 1)
    if shared < 1:
        raise UnsupportedHFModelError(f"{where}: n_shared_experts={shared}: transformers' "
                                      "DeepseekV3 has at least one shared expert")
    topk = reader.get_int("num_experts_per_tok")
    groups, group_topk = _group_limit(reader, experts, topk)
    scaling = reader.get_float("routed_scaling_factor", 1.0)
    expert_ffn = reader.get_int("moe_intermediate_size")
    return MoEFields(
        num_experts=experts,
        expert_ffn_size=expert_ffn,
        topk=topk,
        moe_layers=tuple(index >= first_dense for index in range(num_layers)),
        normalize_topk=reader.get_bool("norm_topk_prob", True),
        score_function="sigmoid",
        topk_scaling_factor=None if scaling == 1.0 else scaling,
        num_groups=groups,
        group_topk=group_topk,
        expert_bias=True,
        shared_expert_size=shared * expert_ffn,
        router_dtype="fp32",
    )


def deepseek_moe_config_values(config: TransformerConfig) -> JSONDict:
    """The routed-expert keys of a DeepSeek-V3 config.json for `config` (with experts), or
    `UnsupportedHFModelError` listing what DeepSeek-V3 cannot represent."""
    experts = config.num_moe_experts
    assert experts is not None
    pattern = config.moe_layer_pattern
    first_moe = pattern.index(True) if True in pattern else config.num_layers
    problems: list[str] = []
    if not all(pattern[first_moe:]):
        problems.append("dense layers after the first MoE layer (DeepSeek-V3 has dense layers "
                        "first, then experts in every layer)")
    if config.moe_router_score_function != "sigmoid" or not config.moe_router_enable_expert_bias:
        problems.append("a router without sigmoid scores and expert bias (DeepSeek-V3's "
                        "e_score_correction_bias)")
    shared = config.moe_shared_expert_intermediate_size
    if shared is None or shared % config.moe_ffn_size != 0 or config.moe_shared_expert_gate:
        problems.append(f"moe_shared_expert_intermediate_size={shared}"
                        f"{' with a gate' if config.moe_shared_expert_gate else ''} (DeepSeek-V3 "
                        "has n_shared_experts ungated shared experts of moe_ffn_hidden_size)")
    groups, group_topk = config.moe_router_num_groups, config.moe_router_group_topk
    if group_topk is not None and config.moe_router_topk // group_topk != _GROUP_SCORE_EXPERTS:
        problems.append(f"moe_router_group_topk={group_topk} with moe_router_topk="
                        f"{config.moe_router_topk} (transformers scores a group by its best "
                        f"{_GROUP_SCORE_EXPERTS} experts)")
    if config.moe_expert_capacity_factor is not None:
        problems.append("moe_expert_capacity_factor (DeepSeek-V3 drops no tokens)")
    if config.moe_router_topk == 1 and config.moe_normalizes_topk_probs:
        problems.append("moe_router_topk=1 with normalised weights")
    if problems:
        raise UnsupportedHFModelError("cannot export this model as DeepseekV3ForCausalLM: "
                                      + "; ".join(problems))
    assert shared is not None
    return {
        "n_routed_experts": experts,
        "moe_intermediate_size": config.moe_ffn_size,
        "n_shared_experts": shared // config.moe_ffn_size,
        "num_experts_per_tok": config.moe_router_topk,
        "first_k_dense_replace": first_moe,
        "moe_layer_freq": 1,
        "n_group": groups if groups is not None else 1,
        "topk_group": group_topk if group_topk is not None else 1,
        "norm_topk_prob": config.moe_normalizes_topk_probs,
        "routed_scaling_factor": config.moe_router_topk_scaling_factor or 1.0,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
    }
