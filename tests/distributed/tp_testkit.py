"""Helpers for multi-process equality tests: backend/device from the environment, tiny GPT
models, and an independent mapping from single-process tensors to each rank's shard.

Environment (all optional; the defaults run on CPU with gloo):
- PROTOFORMER_TEST_DIST_BACKEND: "gloo" (default) or "nccl" (rank r on CUDA device r).
- PROTOFORMER_TEST_ATOL / PROTOFORMER_TEST_RTOL: comparison tolerances (default 1e-5).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from protoformer import MLATransformerConfig, TransformerConfig
from protoformer.backends import get_backend
from protoformer.models import GPTModel
from protoformer.models.stage_parts import StageParts
from protoformer.parallel import ProcessGroups
from protoformer.parallel.grads import clip_grad_norm_
from protoformer.parallel.groups import ProcessGroup
from protoformer.parallel.parameters import parallel_metadata
from protoformer.recipes import gpt_layer_spec, mla_layer_spec
from tests.parallel.dist_utils import run_distributed

BACKEND = os.environ.get("PROTOFORMER_TEST_DIST_BACKEND", "gloo")
ATOL = float(os.environ.get("PROTOFORMER_TEST_ATOL", "1e-5"))
RTOL = float(os.environ.get("PROTOFORMER_TEST_RTOL", "1e-5"))
VOCAB = 64
SEQ = 8
BATCH = 2


def run(fn: Callable[..., object], world_size: int, *args: object, timeout_s: float = 150) -> None:
    """`run_distributed` on the configured backend; skips when the machine lacks the GPUs."""
    if BACKEND == "nccl":
        if not torch.cuda.is_available() or torch.cuda.device_count() < world_size:
            pytest.skip(f"nccl with {world_size} ranks needs {world_size} CUDA devices")
    run_distributed(fn, world_size, *args, timeout_s=timeout_s, backend=BACKEND)


def device() -> torch.device:
    """This rank's device: its CUDA device under nccl, else the CPU."""
    if BACKEND == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def world_tp_group(world_size: int) -> ProcessGroup:
    group = dist.new_group(list(range(world_size)))
    assert isinstance(group, ProcessGroup)
    return group


def close(actual: Tensor | None, expected: Tensor | None, what: str) -> None:
    assert actual is not None, f"{what}: missing (None)"
    assert expected is not None, f"{what}: reference missing (None)"
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL,
                               msg=lambda m: f"{what}: {m}")


# -- training against the single-process reference -------------------------------------------

GLOBAL_BATCH = 4
MAX_NORM = 0.5  # small enough that clipping acts on every step


def optimizer_for(model: nn.Module) -> torch.optim.AdamW:
    # Adam divides by sqrt(v) + eps: an element whose gradient is near zero turns float32
    # rounding differences (a different summation order across ranks) into update
    # differences up to lr. A larger eps bounds that amplification to about lr / eps.
    return torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-4, weight_decay=0.1)


def token_batch(step: int) -> Tensor:
    """Step `step`'s global batch, the same on every rank: `[GLOBAL_BATCH, SEQ + 1]` token ids
    (inputs `[:, :-1]`, labels `[:, 1:]`)."""
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=generator).to(device())


def reference_step(reference: nn.Module, optimizer: torch.optim.Optimizer,
                   rows: Tensor) -> tuple[Tensor, Tensor]:
    """One plain training step of `reference` on `rows` (mean loss, gradients clipped to
    `MAX_NORM`): (loss, gradient norm before clipping)."""
    optimizer.zero_grad(set_to_none=True)
    loss = reference(rows[:, :-1], rows[:, 1:]).mean()
    loss.backward()
    norm = clip_grad_norm_(reference.parameters(), MAX_NORM)
    optimizer.step()
    return loss.detach(), norm


def full_tensor(tensor: Tensor) -> Tensor:
    """A DTensor gathered whole; a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


# -- models ----------------------------------------------------------------------------------


def gpt_config(**overrides: object) -> TransformerConfig:
    base: dict[str, object] = {
        "num_layers": 2, "hidden_size": 16, "num_attention_heads": 4, "ffn_hidden_size": 32,
        "attention_dropout": 0.0, "hidden_dropout": 0.0, "init_method_std": 0.2,
    }
    base.update(overrides)
    return TransformerConfig(**base)  # type: ignore[arg-type]


def mla_config(**overrides: object) -> MLATransformerConfig:
    base: dict[str, object] = {
        "num_layers": 2, "hidden_size": 16, "num_attention_heads": 4, "ffn_hidden_size": 32,
        "attention_dropout": 0.0, "hidden_dropout": 0.0, "init_method_std": 0.2,
        "q_lora_rank": 12, "kv_lora_rank": 8, "qk_head_dim": 4, "qk_pos_emb_head_dim": 4,
        "v_head_dim": 6, "rope_type": "rope", "add_bias_linear": False,
    }
    base.update(overrides)
    return MLATransformerConfig(**base)  # type: ignore[arg-type]


def build_gpt(config: TransformerConfig, pg: ProcessGroups | None, *, tied: bool = False,
              position: str = "rope", parts: StageParts | None = None) -> GPTModel:
    recipe = mla_layer_spec if isinstance(config, MLATransformerConfig) else gpt_layer_spec
    spec = recipe(get_backend("local"), config)
    with torch.device(device()):
        return GPTModel(config, spec, VOCAB, 32, pg=pg, share_embeddings_and_output_weights=tied,
                        position_embedding_type=position,  # type: ignore[arg-type]
                        parts=parts)


def single_process_twin(config: TransformerConfig) -> TransformerConfig:
    """The same model on one process: no sequence parallelism, no deferred weight gradients."""
    return replace(config, sequence_parallel=False, delay_wgrad_compute=False)


# -- the reference's slice for each rank -----------------------------------------------------


def expected_shard(name: str, full: Tensor, local: Tensor, config: TransformerConfig,
                   rank: int, tp: int) -> Tensor:
    """This rank's part of a single-process tensor `full` (a parameter or its gradient).

    Written from the layouts the docstrings specify, not from the code under test: split
    parameters are chunked along `partition_dim`; the gated `linear_fc1` holds its gate rows
    then its up rows; the fused `linear_qkv` holds whole query groups, and when
    `num_query_groups < tp` the query heads of its rank plus a copy of their group's key and
    value heads.
    """
    dim = parallel_metadata(local).partition_dim
    if dim is None or tp == 1:
        return full
    leaf = name.rsplit(".", 2)[-2]  # the owning module's attribute name
    if leaf == "linear_fc1" and config.gated_linear_unit:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    groups = config.query_groups
    if leaf == "linear_qkv" and groups < tp:
        heads, hn = config.num_attention_heads, config.head_dim
        per_group = heads // groups
        layout = full.reshape(groups, per_group + 2, hn, *full.shape[1:])  # [ng, np/ng + 2, hn, ...]
        heads_per_rank = heads // tp
        group = rank * heads_per_rank // per_group
        first = rank * heads_per_rank - group * per_group  # this rank's first head within the group
        query = layout[group, first:first + heads_per_rank]  # [np/tp, hn, ...]
        key_value = layout[group, per_group:]  # [2, hn, ...]
        return torch.cat([query, key_value], dim=0).reshape(-1, *full.shape[1:])
    return full.chunk(tp, dim=dim)[rank]


def load_reference_weights(model: nn.Module, reference: nn.Module, config: TransformerConfig,
                           rank: int, tp: int) -> None:
    """Give `model` (split over `tp` ranks) the single-process `reference`'s weights."""
    full = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(expected_shard(name, full[name], param, config, rank, tp))


def compare_params_and_grads(model: nn.Module, reference: nn.Module, config: TransformerConfig,
                             rank: int, tp: int, *, what: str, grads: bool = True) -> None:
    full = dict(reference.named_parameters())
    names = [name for name, _ in model.named_parameters()]
    assert names == list(full), f"{what}: parameter names differ: {names} vs {list(full)}"
    for name, param in model.named_parameters():
        ref = full[name]
        close(param.detach(), expected_shard(name, ref.detach(), param, config, rank, tp),
              f"{what}: weight {name}")
        if grads:
            ref_grad = None if ref.grad is None else expected_shard(name, ref.grad, param, config,
                                                                    rank, tp)
            close(param.grad, ref_grad, f"{what}: grad of {name}")
