"""A GPT model split over tensor-parallel ranks equals the single-process model with the same
weights: gathered logits, the vocabulary-parallel loss, and every gradient (each rank's shard
against the matching slice of the single-process gradient).

Each rank builds the single-process reference itself (same weights everywhere), builds its
split model, copies its shard of the reference's weights in, and runs both on the same batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from protoformer import TransformerConfig
from protoformer.parallel import ProcessGroups
from protoformer.parallel.grads import (
    compute_deferred_weight_grads,
    finalize_model_grads,
    grad_norm,
)
from tests.distributed.tp_testkit import (
    BATCH,
    SEQ,
    VOCAB,
    build_gpt,
    close,
    compare_params_and_grads,
    device,
    gpt_config,
    load_reference_weights,
    mla_config,
    run,
    single_process_twin,
    world_tp_group,
)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")

# (name, config factory arguments, tied embeddings, position embedding type)
CASES: dict[str, tuple[str, dict[str, object], bool, str]] = {
    "self_attention": ("gpt", {"add_bias_linear": True}, False, "rope"),
    "swiglu_gqa_one_group_qk_norm_tied": (
        "gpt", {"num_query_groups": 1, "gated_linear_unit": True, "normalization": "RMSNorm",
                "qk_layernorm": True, "add_bias_linear": False,
                "activation_func": torch.nn.functional.silu}, True, "rope"),
    "gqa_two_groups_learned_positions": (
        "gpt", {"num_query_groups": 2, "add_qkv_bias": True}, False, "learned_absolute"),
    "mla": ("mla", {}, False, "rope"),
    "mla_direct_query": ("mla", {"q_lora_rank": None}, True, "rope"),
}


def make_config(kind: str, overrides: dict[str, object], **extra: object) -> TransformerConfig:
    factory = mla_config if kind == "mla" else gpt_config
    return factory(**overrides, **extra)


def check_case(rank: int, world_size: int, case: str, sequence_parallel: bool,
               delay_wgrad: bool) -> None:
    kind, overrides, tied, position = CASES[case]
    pg = ProcessGroups(tp=world_tp_group(world_size))
    config = make_config(kind, overrides, sequence_parallel=sequence_parallel,
                         delay_wgrad_compute=delay_wgrad)
    what = f"{case} (tp={world_size}, sp={sequence_parallel}, delay_wgrad={delay_wgrad})"

    torch.manual_seed(0)
    reference = build_gpt(single_process_twin(config), None, tied=tied, position=position)
    model = build_gpt(config, pg, tied=tied, position=position)
    load_reference_weights(model, reference, config, rank, world_size)

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator).to(device())
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator).to(device())
    weights = torch.rand(BATCH, SEQ, generator=generator).to(device())  # a non-uniform loss

    with torch.no_grad():
        close(model(ids), reference(ids), f"{what}: gathered logits")

    ref_loss = reference(ids, labels)  # [b, s]
    loss = model(ids, labels)
    close(loss, ref_loss, f"{what}: per-token loss")
    (ref_loss * weights).sum().backward()
    (loss * weights).sum().backward()
    if delay_wgrad:
        assert compute_deferred_weight_grads(model) > 0
    finalize_model_grads(model, pg)
    compare_params_and_grads(model, reference, config, rank, world_size, what=what)
    close(grad_norm(model.parameters(), pg), grad_norm(reference.parameters()),
          f"{what}: global grad norm")


def check_cases(rank: int, world_size: int, cases: list[tuple[str, bool, bool]]) -> None:
    for case, sequence_parallel, delay_wgrad in cases:
        check_case(rank, world_size, case, sequence_parallel, delay_wgrad)


@pytest.mark.parametrize("case", sorted(CASES))
def test_tensor_parallel_gpt_equals_single_process(case: str) -> None:
    run(check_cases, 2, [(case, False, False)])


@pytest.mark.parametrize("case", sorted(CASES))
def test_sequence_parallel_gpt_equals_single_process(case: str) -> None:
    run(check_cases, 2, [(case, True, False)])


def test_deferred_weight_gradients_under_tensor_and_sequence_parallelism() -> None:
    run(check_cases, 2, [("swiglu_gqa_one_group_qk_norm_tied", True, True), ("mla", True, True)])


@pytest.mark.slow  # four processes
def test_four_way_tensor_parallel_with_replicated_kv_heads_and_sequence_parallelism() -> None:
    run(check_cases, 4, [("gqa_two_groups_learned_positions", True, False),
                         ("swiglu_gqa_one_group_qk_norm_tied", False, False)], timeout_s=240)
