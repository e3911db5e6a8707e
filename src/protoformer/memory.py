"""Will a model fit? A memory estimate from the config, compared with the device's free memory.

Building a model allocates every parameter; a config that asks for more than the machine has
(a 70B preset on a laptop, a corrupt config.json) would otherwise allocate until the
operating system kills the process, or fail deep inside torch with a traceback. The estimate
is made from the sizes alone, before anything is allocated:

    parameters = layers * (attention + MLP weights) + vocab * hidden (+ the output layer
                 when not tied) + learned position table, split over tensor-parallel ranks
    bytes      = parameters * bytes per element of `params_dtype`
    training   + gradients (same size) + AdamW's two float32 moments (8 bytes per parameter)

Free memory is `torch.cuda.mem_get_info` on a GPU and `MemAvailable` of /proc/meminfo on the
CPU (psutil's `available` where /proc is absent; no check where neither can be read). The
meta device allocates nothing and is never checked. `PROTOFORMER_SKIP_MEMORY_CHECK=1` turns
the check off (for a machine whose swap the user means to use).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from protoformer.config import TransformerConfig

__all__ = ["LayoutMemory", "MemoryEstimate", "ModelTooLargeError", "ParallelLayout",
           "activation_bytes_per_layer", "available_bytes", "check_fits",
           "estimate_layout_memory", "estimate_model_memory"]

SKIP_ENV = "PROTOFORMER_SKIP_MEMORY_CHECK"
_ADAM_BYTES_PER_PARAMETER = 8  # exp_avg and exp_avg_sq, float32


class ModelTooLargeError(ValueError):
    """The model a config describes does not fit in the device's free memory."""


@dataclass(frozen=True)
class MemoryEstimate:
    """What a model needs on one device (one tensor-parallel rank), in parameters and bytes."""

    parameters: int
    bytes: int
    training: bool

    def describe(self) -> str:
        """E.g. "70.6 B parameters, 1.13 TB with gradients and AdamW state"."""
        what = " with gradients and AdamW state" if self.training else ""
        return f"{_count(self.parameters)} parameters, {_bytes(self.bytes)}{what}"


def estimate_model_memory(config: TransformerConfig, vocab_size: int, *,
                          tied_embeddings: bool = False, max_sequence_length: int = 0,
                          learned_positions: bool = False, tp_size: int = 1,
                          training: bool = False, num_layers: int | None = None,
                          embedding_tables: int | None = None) -> MemoryEstimate:
    """The parameters and bytes a decoder-only model of `config` needs on one rank.

    `num_layers` (default `config.num_layers`) and `embedding_tables` (the vocabulary-sized
    matrices: default 1 tied, 2 untied) count what the rank builds, e.g. one pipeline stage.
    Norm weights and biases (a few vectors per layer) are left out; the estimate is within a
    few percent for every preset.
    """
    linears = 3 if config.gated_linear_unit else 2
    per_layer = config.attention_matmul_params + linears * config.hidden_size * config.ffn_size
    embedding = vocab_size * config.hidden_size
    layers = config.num_layers if num_layers is None else num_layers
    tables = (1 if tied_embeddings else 2) if embedding_tables is None else embedding_tables
    parameters = layers * per_layer + embedding * tables
    if learned_positions:
        parameters += max_sequence_length * config.hidden_size
    parameters = -(-parameters // max(tp_size, 1))
    element = torch.empty((), dtype=config.params_dtype, device="meta").element_size()
    per_parameter = 2 * element + _ADAM_BYTES_PER_PARAMETER if training else element
    return MemoryEstimate(parameters, parameters * per_parameter, training)


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` in bytes, or None when it cannot be told (or is not checked)."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    meminfo = Path("/proc/meminfo")
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        psutil = importlib.import_module("psutil")
    except ImportError:
        return None
    available: int = psutil.virtual_memory().available
    return available


def check_fits(estimate: MemoryEstimate, device: torch.device | str | None, *, what: str,
               hint: str = "") -> None:
    """`ModelTooLargeError` (one line: the estimate, the free memory, a way out) unless it fits."""
    placement = torch.device(device) if device is not None else torch.get_default_device()
    if placement.type == "meta" or os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return
    free = available_bytes(placement)
    if free is None or estimate.bytes <= free:
        return
    way_out = hint or "use a smaller model, more tensor-parallel ranks or a larger device"
    raise ModelTooLargeError(
        f"{what} needs about {estimate.describe()}, but {placement} has {_bytes(free)} free; "
        f"{way_out} (set {SKIP_ENV}=1 to try anyway)")


def _count(value: int) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return str(value)


def _bytes(value: int) -> str:
    for scale, unit in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value} bytes"


# --- "will it fit": per-GPU memory of a training layout ------------------------------------


@dataclass(frozen=True)
class ParallelLayout:
    """A training layout: tensor / pipeline / data-parallel sizes, micro-batch, sequence."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    """Data-parallel size (FSDP's shard count when `fsdp`, else DDP replicas)."""
    fsdp: bool = False
    micro_batch_size: int = 1
    seq_len: int = 2048
    sequence_parallel: bool = False
    recompute: str = "none"
    """"none" (every layer keeps its activations) or "full" (each layer keeps its input only
    and recomputes the rest in backward)."""
    num_microbatches: int = 1
    """Micro-batches per step and pipeline: 1F1B keeps min(pp - stage, this) in flight."""
    compute_bytes: int = 2
    """Bytes per element of the activations autocast computes in (bf16 on GPU)."""
    composite_rms_norm: bool = False
    """torch's `rms_norm` without a fused kernel (the CPU's): it also saves the normalized
    float32 input for the weight's gradient. CUDA's fused kernel saves the input and 1/rms."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "micro_batch_size", "seq_len", "num_microbatches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an integer >= 1")
        if self.recompute not in ("none", "full"):
            raise ValueError(f"recompute={self.recompute!r}: use none or full")


@dataclass(frozen=True)
class LayoutMemory:
    """Bytes one GPU of the most loaded pipeline stage needs to train (see `estimate_layout_memory`)."""

    stage: int
    parameters: int  # held on this GPU (its tensor-parallel slice, its FSDP shard)
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int  # AdamW exp_avg + exp_avg_sq (the parameters' dtype)
    gathered_bytes: int  # FSDP: all-gathered parameters and unsharded gradients in flight
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return (self.parameter_bytes + self.gradient_bytes + self.optimizer_bytes
                + self.gathered_bytes + self.activation_bytes)

    def lines(self) -> list[str]:
        """The report `protoformer inspect --tp/--pp/--fsdp` prints."""
        rows = [("parameters", self.parameter_bytes), ("gradients", self.gradient_bytes),
                ("optimizer state (AdamW m, v)", self.optimizer_bytes)]
        if self.gathered_bytes:
            rows.append(("FSDP gathered parameters / gradients", self.gathered_bytes))
        rows += [("activations", self.activation_bytes), ("total", self.total_bytes)]
        return [f"  {name:<38} {_bytes(value):>12}" for name, value in rows]


def activation_bytes_per_layer(config: TransformerConfig, layout: ParallelLayout) -> int:
    """Activation bytes one transformer layer keeps for backward, for one micro-batch.

    Korthikanti et al. (2022)'s count, redone for what our local layers save under bf16
    autocast with float32 parameters (checked tensor by tensor with `saved_tensors_hooks`, see
    benchmarks/memory_fit.py). Fused attention saves no s x s scores or dropout masks (their
    `5as/h` term goes); the residual stream is float32. Per token (T = s b), t = tp, c = 2:
      each of the two norms: its float32 input (4h), with `layout.composite_rms_norm` also
        the normalized float32 input the weight multiplies (4h), and the bf16 copy autocast
        feeds the next linear (c h); 1/rms (4 bytes) is left out
      attention: the fused qkv output (c (h + 2 g d) / t; the value is a view of it and keeps
        it whole), query and key after RoPE (c (h + g d) / t), the core output, also the
        output projection's input (c h / t), the softmax log-sum-exp (4 n / t)
      MLP: fc1's output (c 2F / t gated, c F / t otherwise), the activation's output (c F / t)
        and, gated, the product fed to fc2 (c F / t)
    RoPE's cos/sin tables (16 d s bytes, no batch) are left out. Sequence parallelism divides
    the norm terms by t. Full recompute keeps only the layer input (4h, / t with SP)."""
    tokens = layout.micro_batch_size * layout.seq_len
    t, hidden, c = layout.tp, config.hidden_size, layout.compute_bytes
    norm_share = t if layout.sequence_parallel else 1
    if layout.recompute == "full":
        return tokens * 4 * hidden // norm_share
    norms = 2 * _norm_bytes_per_token(config, layout) // norm_share
    kv = config.query_groups * config.head_dim
    attention = (c * (hidden + 2 * kv) + c * (hidden + kv) + c * hidden
                 + 4 * config.num_attention_heads) // t
    ffn = config.ffn_size
    mlp = (c * 2 * ffn + 2 * c * ffn) // t if config.gated_linear_unit else 2 * c * ffn // t
    return tokens * (norms + attention + mlp)


def _norm_bytes_per_token(config: TransformerConfig, layout: ParallelLayout) -> int:
    """One norm and the bf16 input of the linear after it: float32 input (4h), the
    normalized float32 input when torch's rms_norm is composite (4h, see
    `ParallelLayout.composite_rms_norm`), the bf16 copy (c h)."""
    normalized = 4 if layout.composite_rms_norm and config.normalization == "RMSNorm" else 0
    return (4 + normalized + layout.compute_bytes) * config.hidden_size


def _stage_of(name: str, layers_per_stage: int, pp: int) -> int:
    """The pipeline stage holding parameter `name` (Megatron-Core's split: embedding first,
    final norm and output layer last, layers in equal consecutive ranges)."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
        return int(parts[2]) // layers_per_stage
    if parts[0] in ("embedding", "position_embeddings"):
        return 0
    return pp - 1


def estimate_layout_memory(model: nn.Module, config: TransformerConfig, vocab_size: int,
                           layout: ParallelLayout) -> LayoutMemory:
    """Per-GPU training memory of `model` (built on one process, e.g. on the meta device) in
    `layout`, for the pipeline stage that needs the most.

    Parameters: each parameter's `ParallelMetadata` says whether it is split over the
    tensor-parallel ranks (numel / tp) or replicated; FSDP divides by `dp`. Gradients take
    the parameters' size and dtype (no separate float32 main copy: bf16 autocast keeps
    float32 parameters as the main weights), AdamW two moments in the parameters' dtype. FSDP
    adds the gathered (bf16) parameters of the root module and of two layers (the one running
    and the one prefetched) and one layer's unsharded float32 gradients. Activations:
    `activation_bytes_per_layer` x layers of the stage x micro-batches in flight (1F1B: pp -
    stage), plus the last stage's final norm and float32 logits of one micro-batch (vocab / tp).
    With tied embeddings and `pp > 1` the last stage also holds a copy of the embedding.
    """
    from protoformer.parallel.parameters import parallel_metadata  # (parallel imports models)

    if config.num_layers % layout.pp != 0:
        raise ValueError(f"--pp {layout.pp} must divide the {config.num_layers} layers")
    per_stage = config.num_layers // layout.pp
    stage_params = [0] * layout.pp
    stage_bytes = [0] * layout.pp
    layer_params = 0  # one layer's tensor-parallel-local parameters
    root_params = 0  # FSDP's root unit: embedding, final norm, output layer
    seen: set[int] = set()
    # Tied embeddings over several stages: the last stage holds a copy of the embedding.
    tied_copy = layout.pp > 1 and getattr(model, "share_embeddings_and_output_weights",
                                          False) is True
    for name, param in model.named_parameters(remove_duplicate=False):
        local = param.numel()
        if parallel_metadata(param).partition_dim is not None:
            local = -(-local // layout.tp)
        stage = _stage_of(name, per_stage, layout.pp)
        if id(param) in seen and stage == 0:
            continue  # tied: held once on a single stage
        seen.add(id(param))
        stage_params[stage] += local
        stage_bytes[stage] += local * param.element_size()
        if name == "embedding.weight" and tied_copy:  # the last stage's copy of it
            stage_params[-1] += local
            stage_bytes[-1] += local * param.element_size()
        if name.startswith("decoder.layers.0."):
            layer_params += local
        elif not name.startswith("decoder.layers."):
            root_params += local
    shards = layout.dp if layout.fsdp else 1
    per_layer = activation_bytes_per_layer(config, layout)
    tokens = layout.micro_batch_size * layout.seq_len
    best: LayoutMemory | None = None
    for stage in range(layout.pp):
        in_flight = min(layout.pp - stage, layout.num_microbatches)
        activations = per_stage * in_flight * per_layer
        if layout.recompute == "full":
            activations += activation_bytes_per_layer(
                config, ParallelLayout(tp=layout.tp, micro_batch_size=layout.micro_batch_size,
                                       seq_len=layout.seq_len,
                                       sequence_parallel=layout.sequence_parallel,
                                       compute_bytes=layout.compute_bytes,
                                       composite_rms_norm=layout.composite_rms_norm))
        if stage == layout.pp - 1:
            # The final norm (as a layer's), and the float32 logits the cross-entropy saves
            # (the output layer's bf16 logits are not kept).
            norm_share = layout.tp if layout.sequence_parallel else 1
            activations += tokens * (_norm_bytes_per_token(config, layout) // norm_share
                                     + 4 * vocab_size // layout.tp)
        gathered = 0
        if layout.fsdp and layout.dp > 1:
            gathered = layout.compute_bytes * (root_params + 2 * layer_params) + 4 * layer_params
        params = -(-stage_params[stage] // shards)
        param_bytes = -(-stage_bytes[stage] // shards)
        estimate = LayoutMemory(stage=stage, parameters=params, parameter_bytes=param_bytes,
                                gradient_bytes=param_bytes, optimizer_bytes=2 * param_bytes,
                                gathered_bytes=gathered, activation_bytes=activations)
        if best is None or estimate.total_bytes > best.total_bytes:
            best = estimate
    assert best is not None
    return best
