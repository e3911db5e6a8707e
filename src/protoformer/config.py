"""Validated model configuration, named as in Megatron-Core.

`TransformerConfig` holds every size and option a layer reads; `__post_init__` derives the
defaults Megatron-Core derives (`num_query_groups`, `kv_channels`, `ffn_hidden_size`) and
rejects inconsistent values with a `ValueError` that names the field, the value and the rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MAX_SIZES", "MLATransformerConfig", "TransformerConfig", "size_problem"]

Normalization = Literal["LayerNorm", "RMSNorm"]
RecomputeGranularity = Literal["selective", "full"]
RopeScaling = Literal["llama3", "linear", "dynamic", "longrope"]
MLARopeType = Literal["rope", "yarn"]
RouterScoreFunction = Literal["softmax", "sigmoid"]
RouterDtype = Literal["fp32", "fp64"]
TokenDropPolicy = Literal["probs", "position"]
Fp8Recipe = Literal["tensorwise", "rowwise"]

_NORMALIZATIONS = ("LayerNorm", "RMSNorm")


def _fail(name: str, value: object, rule: str) -> ValueError:
    shown = repr(value)
    shown = shown if len(shown) <= 120 else shown[:117] + "..."
    return ValueError(f"TransformerConfig.{name}={shown}: {rule}")


MAX_SIZES: dict[str, int] = {
    "num_layers": 10_000,
    "hidden_size": 1 << 20,
    "num_attention_heads": 1 << 16,
    "num_query_groups": 1 << 16,
    "kv_channels": 1 << 16,
    "ffn_hidden_size": 1 << 24,
    "q_lora_rank": 1 << 20,
    "kv_lora_rank": 1 << 20,
    "qk_head_dim": 1 << 16,
    "qk_pos_emb_head_dim": 1 << 16,
    "v_head_dim": 1 << 16,
    "original_max_position_embeddings": 1 << 26,
    "vocab_size": 1 << 26,
    "max_sequence_length": 1 << 26,
}
"""The largest value each size may take: far beyond any real model (Llama-3.1-405B has 126
layers, hidden 16384, ffn 53248; the largest vocabularies hold ~10^6 tokens), small enough
that arithmetic on it and the tables built from it stay cheap. A size read from a file is
checked against these before anything is allocated; the memory estimate
(`protoformer.memory`) then judges whether the model fits."""


def size_problem(name: str, value: object, *, minimum: int = 1) -> str | None:
    """Why `value` is not an acceptable size `name` (an int in [minimum, MAX_SIZES[name]])."""
    maximum = MAX_SIZES.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be an int >= {minimum}"
    if value < minimum:
        return f"must be >= {minimum}"
    if maximum is not None and value > maximum:
        return f"must be at most {maximum:_} (no real model comes near)"
    return None


def _require_int(name: str, value: object, *, minimum: int) -> int:
    problem = size_problem(name, value, minimum=minimum)
    if problem is not None:
        raise _fail(name, value, problem)
    assert isinstance(value, int)
    return value


def _require_float(name: str, value: object, *, low: float, high: float | None = None,
                   high_inclusive: bool = False, low_inclusive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(name, value, "must be a number")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        raise _fail(name, value, "must be a finite number") from None
    if math.isnan(number):
        raise _fail(name, value, "must not be NaN")
    if math.isinf(number):
        raise _fail(name, value, "must be a finite number")
    if number < low or (number == low and not low_inclusive):
        bound = ">=" if low_inclusive else ">"
        raise _fail(name, value, f"must be {bound} {low}")
    if high is not None and (number > high or (number == high and not high_inclusive)):
        bound = "<=" if high_inclusive else "<"
        raise _fail(name, value, f"must be {bound} {high}")
    return number


def _is_floating_dtype(value: object) -> bool:
    return isinstance(value, torch.dtype) and value.is_floating_point


def _require_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, value, "must be True or False")
    return value


@dataclass
class TransformerConfig:
    """Sizes and options of a transformer, with Megatron-Core's field names.

    Derived defaults: `num_query_groups` = `num_attention_heads` (plain multi-head attention),
    `kv_channels` = `hidden_size // num_attention_heads`, `ffn_hidden_size` = 4 * `hidden_size`.
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int | None = None
    kv_channels: int | None = None
    ffn_hidden_size: int | None = None

    # Normalization.
    normalization: Normalization = "LayerNorm"
    layernorm_epsilon: float = 1e-5
    qk_layernorm: bool = False
    # Norms scale by `1 + weight` (weights start at 0), as Gemma's; Megatron-Core's name.
    layernorm_zero_centered_gamma: bool = False
    # The token embeddings are multiplied by this before the first layer (Gemma: sqrt(hidden)).
    embedding_multiplier: float = 1.0

    # Linear layers and the MLP.
    add_bias_linear: bool = True
    add_qkv_bias: bool = False
    gated_linear_unit: bool = False
    activation_func: Callable[[Tensor], Tensor] = F.gelu

    # Initialisation.
    init_method_std: float = 0.02
    perform_initialization: bool = True
    params_dtype: torch.dtype = torch.float32

    # Regularisation.
    attention_dropout: float = 0.1
    hidden_dropout: float = 0.1

    # Attention.
    softmax_scale: float | None = None
    attention_softmax_in_fp32: bool = True
    # Soft-capping (Gemma 2): the scaled attention scores become `c * tanh(scores / c)`
    # before the mask and softmax; None leaves them as they are. Hugging Face's name.
    attn_logit_softcapping: float | None = None
    # The output logits become `c * tanh(logits / c)` (Gemma 2), in the model and the loss.
    final_logit_softcapping: float | None = None

    # Rotary position embedding (read by the model, which builds one table for all layers).
    # `rope_scaling`: "llama3" (Llama 3.1 frequency bands), "linear" (frequencies divided by
    # `rope_scaling_factor`) or "dynamic" (NTK: the base grows once a sequence passes
    # `rope_original_max_position_embeddings`) or "longrope" (Phi-3's LongRoPE: each frequency
    # divided by its `rope_short_factor`, or by its `rope_long_factor` once a sequence passes
    # `rope_original_max_position_embeddings`; one factor per rotary channel pair).
    # `rotary_percent` < 1 rotates only the first fraction of each head's channels (partial
    # rotary: HF `partial_rotary_factor`, GPT-NeoX `rotary_pct`).
    # `rope_attention_factor` multiplies cos and sin (so the rotated channels of queries and
    # keys): LongRoPE's attention scaling; 1 for the others.
    rotary_base: float = 10000.0
    rotary_percent: float = 1.0
    rotary_interleaved: bool = False
    rope_scaling: RopeScaling | None = None
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    rope_short_factor: tuple[float, ...] | None = None
    rope_long_factor: tuple[float, ...] | None = None
    rope_attention_factor: float = 1.0

    # Parallelism and performance.
    sequence_parallel: bool = False
    delay_wgrad_compute: bool = False
    bf16: bool = False
    recompute_granularity: RecomputeGranularity | None = None

    # Fusions the layers apply themselves (a backend's fused kernels fill the slots; these two
    # are calls inside attention and the model, so they are switched here, as in Megatron-Core).
    apply_rope_fusion: bool = False
    cross_entropy_loss_fusion: bool = False
    # FP8 training of the layers' linears with torchao's float8 recipe of this name (one
    # scale per tensor, or per row); None computes them in the compute dtype. Taken by the
    # fused backend's linears on GPUs with float8 matmuls (`pip install protoformer[fp8]`).
    # Megatron-Core splits this into `fp8` (the format) and `fp8_recipe`; here the format
    # is torchao's (e4m3 forward, e5m2 gradients) and the field names the scaling recipe.
    fp8: Fp8Recipe | None = None

    # Mixture of experts (None experts = a dense model; see `moe_layer_pattern`).
    num_moe_experts: int | None = None
    moe_ffn_hidden_size: int | None = None  # each routed expert's width; default ffn_hidden_size
    moe_layer_freq: int | list[int] = 1  # N: every N-th layer (0, N, 2N, ...) is MoE; or 0/1 per layer
    moe_router_topk: int = 2
    moe_router_score_function: RouterScoreFunction = "softmax"
    moe_router_pre_softmax: bool = False  # softmax over all experts, then top-k (no renormalising)
    moe_router_norm_topk_prob: bool | None = None  # see `moe_normalizes_topk_probs`
    moe_router_topk_scaling_factor: float | None = None
    moe_router_num_groups: int | None = None  # group-limited routing (DeepSeek-V3)
    moe_router_group_topk: int | None = None
    moe_router_dtype: RouterDtype | None = None  # router GEMM and scores in fp32/fp64
    moe_router_enable_expert_bias: bool = False  # aux-loss-free balancing (sigmoid scores)
    moe_router_bias_update_rate: float = 1e-3
    moe_aux_loss_coeff: float = 0.0
    moe_z_loss_coeff: float | None = None
    moe_shared_expert_intermediate_size: int | None = None
    moe_shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x @ w) scales the shared experts
    moe_expert_capacity_factor: float | None = None  # None = dropless
    moe_token_drop_policy: TokenDropPolicy = "probs"
    expert_model_parallel_size: int = 1

    def __post_init__(self) -> None:
        self._validate_sizes()
        self._validate_options()
        self._validate_moe()

    def _validate_sizes(self) -> None:
        _require_int("num_layers", self.num_layers, minimum=1)
        _require_int("hidden_size", self.hidden_size, minimum=1)
        heads = _require_int("num_attention_heads", self.num_attention_heads, minimum=1)

        if self.num_query_groups is None:
            self.num_query_groups = heads
        groups = _require_int("num_query_groups", self.num_query_groups, minimum=1)
        if heads % groups != 0:
            raise _fail("num_query_groups", groups,
                        f"must divide num_attention_heads={heads} (each query group "
                        "serves the same number of heads)")

        if self.kv_channels is None:
            if self.hidden_size % heads != 0:
                raise _fail("hidden_size", self.hidden_size,
                            f"must be divisible by num_attention_heads={heads} when "
                            "kv_channels is not given; set kv_channels to the head size")
            self.kv_channels = self.hidden_size // heads
        _require_int("kv_channels", self.kv_channels, minimum=1)

        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        _require_int("ffn_hidden_size", self.ffn_hidden_size, minimum=1)

    def _validate_options(self) -> None:
        if self.normalization not in _NORMALIZATIONS:
            raise _fail("normalization", self.normalization,
                        f"must be one of {', '.join(_NORMALIZATIONS)}")
        _require_float("layernorm_epsilon", self.layernorm_epsilon, low=0.0, low_inclusive=False)
        _require_float("init_method_std", self.init_method_std, low=0.0, low_inclusive=False)
        _require_float("attention_dropout", self.attention_dropout, low=0.0, high=1.0)
        _require_float("hidden_dropout", self.hidden_dropout, low=0.0, high=1.0)
        if self.softmax_scale is not None:
            _require_float("softmax_scale", self.softmax_scale, low=0.0, low_inclusive=False)
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            cap = getattr(self, name)
            if cap is not None:
                _require_float(name, cap, low=0.0, low_inclusive=False)
        _require_float("rotary_base", self.rotary_base, low=0.0, low_inclusive=False)
        _require_float("rotary_percent", self.rotary_percent, low=0.0, high=1.0,
                       low_inclusive=False, high_inclusive=True)
        if self.rope_scaling not in (None, "llama3", "linear", "dynamic", "longrope"):
            raise _fail("rope_scaling", self.rope_scaling,
                        "must be None, 'llama3', 'linear', 'dynamic' or 'longrope'")
        self._validate_longrope()
        _require_float("rope_scaling_factor", self.rope_scaling_factor, low=1.0)
        _require_float("rope_low_freq_factor", self.rope_low_freq_factor, low=0.0,
                       low_inclusive=False)
        _require_float("rope_high_freq_factor", self.rope_high_freq_factor, low=0.0,
                       low_inclusive=False)
        if self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise _fail("rope_high_freq_factor", self.rope_high_freq_factor,
                        f"must be greater than rope_low_freq_factor={self.rope_low_freq_factor}")
        _require_int("rope_original_max_position_embeddings",
                     self.rope_original_max_position_embeddings, minimum=1)
        if self.fp8 not in (None, "tensorwise", "rowwise"):
            raise _fail("fp8", self.fp8, "must be None, 'tensorwise' or 'rowwise' (torchao's "
                        "float8 training recipes)")
        if self.recompute_granularity not in (None, "selective", "full"):
            raise _fail("recompute_granularity", self.recompute_granularity,
                        "must be None, 'selective' or 'full'")
        _require_float("embedding_multiplier", self.embedding_multiplier, low=0.0,
                       low_inclusive=False)
        for name in ("qk_layernorm", "layernorm_zero_centered_gamma", "add_bias_linear",
                     "add_qkv_bias", "gated_linear_unit",
                     "perform_initialization", "attention_softmax_in_fp32",
                     "rotary_interleaved", "sequence_parallel", "delay_wgrad_compute", "bf16"):
            _require_bool(name, getattr(self, name))
        for name in ("apply_rope_fusion", "cross_entropy_loss_fusion"):
            _require_bool(name, getattr(self, name))
        if not _is_floating_dtype(self.params_dtype):
            raise _fail("params_dtype", self.params_dtype, "must be a floating torch.dtype")
        if not callable(self.activation_func):
            raise _fail("activation_func", self.activation_func,
                        "must be a callable Tensor -> Tensor such as torch.nn.functional.gelu")

    def _validate_longrope(self) -> None:
        _require_float("rope_attention_factor", self.rope_attention_factor, low=0.0,
                       low_inclusive=False)
        factors = (("rope_short_factor", self.rope_short_factor),
                   ("rope_long_factor", self.rope_long_factor))
        if self.rope_scaling != "longrope":
            for name, value in factors:
                if value is not None:
                    raise _fail(name, value, "is only used with rope_scaling='longrope'; "
                                "set it to None")
            return
        pairs = int(self.head_dim * self.rotary_percent) // 2
        for name, value in factors:
            if not isinstance(value, tuple) or len(value) != pairs:  # pyright: ignore[reportUnnecessaryIsInstance]  # user input
                raise _fail(name, value, f"must be a tuple of {pairs} numbers (one per rotary "
                            "channel pair) with rope_scaling='longrope'")
            for item in value:
                _require_float(f"{name} entry", item, low=0.0, low_inclusive=False)

    def _validate_moe(self) -> None:
        experts = self.num_moe_experts
        if experts is None:
            for name in ("moe_ffn_hidden_size", "moe_router_num_groups", "moe_router_group_topk",
                         "moe_shared_expert_intermediate_size", "moe_expert_capacity_factor"):
                if getattr(self, name) is not None:
                    raise _fail(name, getattr(self, name),
                                "needs num_moe_experts (this config is dense); set "
                                "num_moe_experts or leave it unset")
            if self.expert_model_parallel_size != 1:
                raise _fail("expert_model_parallel_size", self.expert_model_parallel_size,
                            "needs num_moe_experts; expert parallelism splits the experts")
            return
        experts = _require_int("num_moe_experts", experts, minimum=1)
        if self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size
        _require_int("moe_ffn_hidden_size", self.moe_ffn_hidden_size, minimum=1)
        self._validate_moe_layer_freq()
        topk = _require_int("moe_router_topk", self.moe_router_topk, minimum=1)
        if topk > experts:
            raise _fail("moe_router_topk", topk,
                        f"must be <= num_moe_experts={experts} (a token picks distinct experts)")
        for name in ("moe_router_pre_softmax", "moe_router_enable_expert_bias",
                     "moe_shared_expert_gate"):
            _require_bool(name, getattr(self, name))
        self._validate_moe_router(experts, topk)
        _require_float("moe_aux_loss_coeff", self.moe_aux_loss_coeff, low=0.0)
        if self.moe_z_loss_coeff is not None:
            _require_float("moe_z_loss_coeff", self.moe_z_loss_coeff, low=0.0)
        if self.moe_shared_expert_intermediate_size is not None:
            _require_int("moe_shared_expert_intermediate_size",
                         self.moe_shared_expert_intermediate_size, minimum=1)
        elif self.moe_shared_expert_gate:
            raise _fail("moe_shared_expert_gate", True,
                        "gates the shared experts; set moe_shared_expert_intermediate_size too")
        if self.moe_expert_capacity_factor is not None:
            _require_float("moe_expert_capacity_factor", self.moe_expert_capacity_factor,
                           low=0.0, low_inclusive=False)
        if self.moe_token_drop_policy not in ("probs", "position"):
            raise _fail("moe_token_drop_policy", self.moe_token_drop_policy,
                        "must be 'probs' or 'position'")
        ep = _require_int("expert_model_parallel_size", self.expert_model_parallel_size,
                          minimum=1)
        if experts % ep != 0:
            raise _fail("expert_model_parallel_size", ep,
                        f"must divide num_moe_experts={experts} (each rank holds as many experts)")

    def _validate_moe_layer_freq(self) -> None:
        freq = cast(object, self.moe_layer_freq)  # user input: check every entry's type
        if not isinstance(freq, (list, tuple)):
            _require_int("moe_layer_freq", freq, minimum=1)
            return
        pattern: list[int] = []
        entries = cast("list[object] | tuple[object, ...]", freq)
        for value in entries:
            if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
                pattern.append(value)
        if len(pattern) != len(entries) or len(pattern) != self.num_layers:
            raise _fail("moe_layer_freq", entries,
                        f"a list must hold one 0 (dense) or 1 (MoE) per layer "
                        f"({self.num_layers} entries)")
        self.moe_layer_freq = pattern

    def _validate_moe_router(self, experts: int, topk: int) -> None:
        score = self.moe_router_score_function
        if score not in ("softmax", "sigmoid"):
            raise _fail("moe_router_score_function", score, "must be 'softmax' or 'sigmoid'")
        if score == "softmax" and topk == 1 and not self.moe_router_pre_softmax:
            raise _fail("moe_router_pre_softmax", False,
                        "must be True with moe_router_topk=1 and softmax scores (a softmax "
                        "over one selected logit is always 1 and has no gradient)")
        norm = self.moe_router_norm_topk_prob
        if norm is not None:
            _require_bool("moe_router_norm_topk_prob", norm)
            if score == "softmax" and norm == self.moe_router_pre_softmax:
                raise _fail("moe_router_norm_topk_prob", norm,
                            "with softmax scores moe_router_pre_softmax decides it: "
                            "pre_softmax=False renormalises over the top-k, True does not; "
                            "leave moe_router_norm_topk_prob unset")
        if self.moe_router_topk_scaling_factor is not None:
            _require_float("moe_router_topk_scaling_factor", self.moe_router_topk_scaling_factor,
                           low=0.0, low_inclusive=False)
        groups, group_topk = self.moe_router_num_groups, self.moe_router_group_topk
        if (groups is None) != (group_topk is None):
            name = "moe_router_group_topk" if group_topk is None else "moe_router_num_groups"
            raise _fail(name, None, "group-limited routing needs both moe_router_num_groups "
                                    "and moe_router_group_topk")
        if groups is not None and group_topk is not None:
            groups = _require_int("moe_router_num_groups", groups, minimum=1)
            if experts % groups != 0:
                raise _fail("moe_router_num_groups", groups,
                            f"must divide num_moe_experts={experts}")
            group_topk = _require_int("moe_router_group_topk", group_topk, minimum=1)
            if group_topk > groups or group_topk > topk:
                raise _fail("moe_router_group_topk", group_topk,
                            f"must be <= moe_router_num_groups={groups} and <= "
                            f"moe_router_topk={topk} (a group is scored by its top "
                            "topk // group_topk experts)")
            if topk > group_topk * (experts // groups):
                raise _fail("moe_router_topk", topk,
                            f"must be <= group_topk * experts per group = "
                            f"{group_topk * (experts // groups)}")
        if self.moe_router_dtype not in (None, "fp32", "fp64"):
            raise _fail("moe_router_dtype", self.moe_router_dtype, "must be None, 'fp32' or 'fp64'")
        if self.moe_router_enable_expert_bias and score != "sigmoid":
            raise _fail("moe_router_enable_expert_bias", True,
                        "aux-loss-free expert bias needs moe_router_score_function='sigmoid'")
        _require_float("moe_router_bias_update_rate", self.moe_router_bias_update_rate, low=0.0)

    @property
    def multi_latent_attention(self) -> bool:
        """Whether the layers use multi-latent attention (`MLATransformerConfig`), which applies
        its own rotary embedding (Megatron-Core's flag of the same name)."""
        return False

    @property
    def attention_head_dims(self) -> tuple[int, int]:
        """(query/key width, value width) of one attention head (FLOP counts)."""
        return self.head_dim, self.head_dim

    @property
    def attention_matmul_params(self) -> int:
        """Weights of one layer's attention projections (query, key, value, output; no
        biases): what every token multiplies through (FLOP counts, memory estimates)."""
        return self.hidden_size * self.head_dim * (2 * self.num_attention_heads
                                                   + 2 * self.query_groups)

    # Derived sizes, named as Megatron-Core derives them.
    @property
    def head_dim(self) -> int:
        """Size of one attention head (`kv_channels`)."""
        assert self.kv_channels is not None  # set in __post_init__
        return self.kv_channels

    @property
    def query_groups(self) -> int:
        """Number of key/value heads (`num_query_groups` after defaults)."""
        assert self.num_query_groups is not None  # set in __post_init__
        return self.num_query_groups

    @property
    def ffn_size(self) -> int:
        """Width of the MLP's hidden layer (`ffn_hidden_size` after defaults)."""
        assert self.ffn_hidden_size is not None  # set in __post_init__
        return self.ffn_hidden_size

    @property
    def moe_ffn_size(self) -> int:
        """Width of one routed expert's hidden layer (`moe_ffn_hidden_size` after defaults)."""
        if self.moe_ffn_hidden_size is None:
            return self.ffn_size
        return self.moe_ffn_hidden_size

    @property
    def moe_layer_pattern(self) -> tuple[bool, ...]:
        """Per layer (0-based): is it an MoE layer? Megatron-Core's rule for an int
        `moe_layer_freq` N: layers 0, N, 2N, ... (so DeepSeek's "first k dense" is a list)."""
        if self.num_moe_experts is None:
            return (False,) * self.num_layers
        freq = self.moe_layer_freq
        if isinstance(freq, int):
            return tuple(i % freq == 0 for i in range(self.num_layers))
        return tuple(bool(v) for v in freq)

    @property
    def moe_normalizes_topk_probs(self) -> bool:
        """Are the selected experts' probabilities divided by their sum?

        Softmax scores: yes unless `moe_router_pre_softmax` (Mixtral, Qwen3 with
        `norm_topk_prob`); sigmoid scores: `moe_router_norm_topk_prob`, default yes as in
        Megatron-Core (DeepSeek-V3). HF's `norm_topk_prob=False` with softmax is
        `moe_router_pre_softmax=True`."""
        if self.moe_router_score_function == "softmax":
            return not self.moe_router_pre_softmax
        return self.moe_router_norm_topk_prob is not False


@dataclass
class MLATransformerConfig(TransformerConfig):
    """Configuration of DeepSeek-V2/V3 multi-latent attention (MLA), Megatron-Core's names.

    `q_lora_rank=None` projects queries directly (no query compression). Rotary embedding
    covers only the `qk_pos_emb_head_dim` part of each head; `rope_type="yarn"` applies
    YaRN frequency interpolation and, through `mscale`/`mscale_all_dim`, the softmax-scale
    correction DeepSeek-V3 uses.
    """

    q_lora_rank: int | None = 512
    kv_lora_rank: int = 512
    qk_head_dim: int = 128
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 128
    normalization: Normalization = "RMSNorm"
    rope_type: MLARopeType = "yarn"
    rotary_scaling_factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    cache_mla_latents: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.q_lora_rank is not None:
            _require_int("q_lora_rank", self.q_lora_rank, minimum=1)
        _require_int("kv_lora_rank", self.kv_lora_rank, minimum=1)
        _require_int("qk_head_dim", self.qk_head_dim, minimum=1)
        _require_int("qk_pos_emb_head_dim", self.qk_pos_emb_head_dim, minimum=1)
        if self.qk_pos_emb_head_dim % 2 != 0:
            raise _fail("qk_pos_emb_head_dim", self.qk_pos_emb_head_dim,
                        "must be even (the rotary part of each head rotates in pairs)")
        _require_int("v_head_dim", self.v_head_dim, minimum=1)
        if self.rope_type not in ("rope", "yarn"):
            raise _fail("rope_type", self.rope_type, "must be 'rope' or 'yarn'")
        _require_float("rotary_scaling_factor", self.rotary_scaling_factor, low=1.0)
        _require_int("original_max_position_embeddings", self.original_max_position_embeddings,
                     minimum=1)
        _require_float("beta_fast", self.beta_fast, low=0.0, low_inclusive=False)
        _require_float("beta_slow", self.beta_slow, low=0.0, low_inclusive=False)
        if self.beta_fast <= self.beta_slow:
            raise _fail("beta_fast", self.beta_fast,
                        f"must be greater than beta_slow={self.beta_slow}")
        _require_float("mscale", self.mscale, low=0.0)
        _require_float("mscale_all_dim", self.mscale_all_dim, low=0.0)
        _require_bool("cache_mla_latents", self.cache_mla_latents)
        if self.num_query_groups != self.num_attention_heads:
            raise _fail("num_query_groups", self.num_query_groups,
                        "multi-latent attention has one key/value head per query head; leave "
                        "num_query_groups unset or equal to num_attention_heads")

    @property
    def multi_latent_attention(self) -> bool:
        """Always True: these layers use multi-latent attention."""
        return True

    @property
    def attention_head_dims(self) -> tuple[int, int]:
        """(query/key width: no-position + rotary part, value width) of one head."""
        return self.q_head_dim, self.v_head_dim

    @property
    def attention_matmul_params(self) -> int:
        """Query (direct, or down + up through `q_lora_rank`), key/value latent down
        projection (with the shared rotary key), its up projection, and the output."""
        hidden, heads = self.hidden_size, self.num_attention_heads
        query = (hidden * heads * self.q_head_dim if self.q_lora_rank is None
                 else self.q_lora_rank * (hidden + heads * self.q_head_dim))
        kv_down = hidden * (self.kv_lora_rank + self.qk_pos_emb_head_dim)
        kv_up = self.kv_lora_rank * heads * (self.qk_head_dim + self.v_head_dim)
        return query + kv_down + kv_up + heads * self.v_head_dim * hidden

    @property
    def q_head_dim(self) -> int:
        """Query/key head size: the no-position part plus the rotary part."""
        return self.qk_head_dim + self.qk_pos_emb_head_dim
