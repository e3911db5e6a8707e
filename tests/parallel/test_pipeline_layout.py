"""How a model is cut into pipeline stages, and what is refused (no processes needed)."""

from __future__ import annotations

import pytest

from protoformer.parallel.pipeline import (
    check_pipeline_supported,
    rank_stage_indices,
    stage_layer_ranges,
    stage_parts,
)
from protoformer.parallel.pipeline_schedule import check_microbatches, resolve_schedule
from protoformer.recipes import get_preset
from tests.distributed.tp_testkit import build_gpt, gpt_config


def test_layers_are_cut_into_equal_consecutive_ranges_placed_round_robin() -> None:
    # Megatron-Core's layout, written out: 8 layers, pp=2 -> [0-3], [4-7];
    # pp=2 x 2 virtual -> stages [0,1], [2,3], [4,5], [6,7] on ranks 0, 1, 0, 1.
    assert stage_layer_ranges(8, 2) == [range(0, 4), range(4, 8)]
    assert stage_layer_ranges(8, 2, 2) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert rank_stage_indices(0, 2, 2) == [0, 2]
    assert rank_stage_indices(1, 2, 2) == [1, 3]
    assert rank_stage_indices(1, 4) == [1]
    with pytest.raises(ValueError, match=r"6 layers cannot be split evenly into 4 pipeline stages "
                                         r"\(--pp 2 x --virtual-pipeline-model-parallel-size 2\)"):
        stage_layer_ranges(6, 2, 2)


def test_each_rank_builds_the_layers_of_its_stages_and_the_ends_it_holds() -> None:
    # 8 layers, pp=2 x 2 virtual: stages [0,1], [2,3], [4,5], [6,7] on ranks 0, 1, 0, 1; the
    # embedding with stage 0 (rank 0), the output layer with stage 3 (rank 1).
    rank0, rank1 = stage_parts(8, 0, 2, 2), stage_parts(8, 1, 2, 2)
    assert (rank0.layers, rank0.pre_process, rank0.post_process) == ({0, 1, 4, 5}, True, False)
    assert (rank1.layers, rank1.pre_process, rank1.post_process) == ({2, 3, 6, 7}, False, True)
    middle = stage_parts(8, 1, 4)  # pp=4: rank 1 holds layers 2, 3 and neither end
    assert (middle.layers, middle.pre_process, middle.post_process) == ({2, 3}, False, False)
    # vocabulary-sized matrices: the embedding, the output layer; tied: a copy on the last
    assert [rank0.embedding_tables(tied=t) for t in (False, True)] == [1, 1]
    assert [rank1.embedding_tables(tied=t) for t in (False, True)] == [1, 1]
    assert [middle.embedding_tables(tied=t) for t in (False, True)] == [0, 0]
    assert stage_parts(4, 0, 1).embedding_tables(tied=False) == 2


def test_schedule_flags_resolve_as_megatron_and_torchtitan_users_expect() -> None:
    assert resolve_schedule(None, None) == ("1F1B", 1)
    assert resolve_schedule(None, 3) == ("Interleaved1F1B", 3)  # virtual stages -> interleaved
    assert resolve_schedule("Interleaved1F1B", None) == ("Interleaved1F1B", 2)
    with pytest.raises(ValueError, match="needs --pp-schedule Interleaved1F1B"):
        resolve_schedule("1F1B", 2)


def test_too_few_micro_batches_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"at least 4 micro-batches per step, got 2.*"
                                         r"lower --micro-batch-size"):
        check_microbatches(2, 4, "1F1B")
    check_microbatches(4, 4, "1F1B")
    with pytest.raises(ValueError, match=r"micro-batch count \(5\) to be a multiple of 2"):
        check_microbatches(5, 2, "Interleaved1F1B")
    check_microbatches(3, 4, "Interleaved1F1B")  # one round of 3


def test_models_the_pipeline_cannot_split_are_refused() -> None:
    check_pipeline_supported(build_gpt(gpt_config(num_layers=4), None), 2, 2)
    check_pipeline_supported(build_gpt(gpt_config(), None, tied=True), 2)  # a copy on the last
    # Per-layer specs (a dense first layer, then MoE layers) split as they are.
    check_pipeline_supported(get_preset("tiny-moe").build_model(), 2)
    with pytest.raises(ValueError, match="cannot be split evenly"):
        check_pipeline_supported(build_gpt(gpt_config(num_layers=3), None), 2)
