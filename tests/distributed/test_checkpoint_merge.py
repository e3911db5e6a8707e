"""A tensor-parallel checkpoint loads into one process: the shards merge back exactly.

Each case builds a single-process reference model, gives a model split over 2 or 4 gloo ranks
the reference's weights through the test kit's independent layout mapping
(`tp_testkit.load_reference_weights`), saves a sharded checkpoint from the ranks, then loads it
into a fresh single-process model in the test process and compares every tensor exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from protoformer import TransformerConfig
from protoformer.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from protoformer.train.checkpoint_dist import save_distributed_checkpoint
from tests.distributed import tp_testkit as kit

pytestmark = pytest.mark.skipif(kit.BACKEND != "gloo", reason="CPU checkpoint files (gloo)")

CASES = {
    # name: (tensor-parallel size, config overrides, tied embeddings)
    "gqa-gated-tied": (2, {"num_query_groups": 2, "gated_linear_unit": True,
                           "add_bias_linear": True, "add_qkv_bias": True}, True),
    "kv-heads-replicated": (4, {"num_query_groups": 2, "gated_linear_unit": True}, False),
    "mqa": (2, {"num_query_groups": 1}, False),
    "mla": (2, {"mla": True}, False),
}


def _config(overrides: dict[str, object]) -> TransformerConfig:
    overrides = dict(overrides)
    if overrides.pop("mla", False):
        return kit.mla_config(**overrides)
    return kit.gpt_config(**overrides)


def _reference(case: str) -> torch.nn.Module:
    _, overrides, tied = CASES[case]
    torch.manual_seed(7)
    return kit.build_gpt(_config(overrides), None, tied=tied)


def _save_split(rank: int, world_size: int, case: str, run_dir: str) -> None:
    from protoformer.parallel import ProcessGroups

    _, overrides, tied = CASES[case]
    config = _config(overrides)
    pg = ProcessGroups(tp=kit.world_tp_group(world_size))
    model = kit.build_gpt(config, pg, tied=tied)
    kit.load_reference_weights(model, _reference(case), config, rank, world_size)
    optimizer = torch.optim.AdamW(model.parameters())
    save_distributed_checkpoint(run_dir, 3, model, optimizer, {"preset": "test"}, pg=pg,
                                rng_state=None)


@pytest.mark.slow  # spawns 2 or 4 processes (gloo)
@pytest.mark.parametrize("case", list(CASES))
def test_a_sharded_checkpoint_merges_into_the_single_process_model(case: str,
                                                                   tmp_path: Path) -> None:
    tp = CASES[case][0]
    kit.run(_save_split, tp, case, str(tmp_path))
    step_dir = latest_checkpoint(tmp_path)
    assert step_dir is not None
    assert len(list(step_dir.glob("model.tp*-of-*.safetensors"))) == tp
    reference = _reference(case)
    torch.manual_seed(123)  # different initial weights: everything must come from the files
    fresh = kit.build_gpt(_config(CASES[case][1]), None, tied=CASES[case][2])
    load_checkpoint(step_dir, fresh)
    loaded, expected = fresh.state_dict(), reference.state_dict()
    assert set(loaded) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    ids = torch.randint(0, kit.VOCAB, (2, kit.SEQ))
    torch.testing.assert_close(fresh(ids), reference(ids))
    # Resuming (with the optimizer) on one process still needs the same split.
    with pytest.raises(CheckpointError, match=f"over {tp} ranks.*--tp {tp}"):
        load_checkpoint(step_dir, fresh, torch.optim.AdamW(fresh.parameters()))


@pytest.mark.slow  # spawns 2 processes (gloo)
def test_shards_of_another_model_are_refused_before_loading(tmp_path: Path) -> None:
    kit.run(_save_split, 2, "mqa", str(tmp_path))
    step_dir = latest_checkpoint(tmp_path)
    assert step_dir is not None
    other = kit.build_gpt(kit.gpt_config(num_query_groups=1, ffn_hidden_size=48), None)
    before = {name: tensor.clone() for name, tensor in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"linear_fc1\.weight has shape"):
        load_checkpoint(step_dir, other)
    assert all(torch.equal(other.state_dict()[name], t) for name, t in before.items())


# ------------------------------------------------------------------ the layouts, without processes


@pytest.mark.parametrize(("heads", "groups", "tp", "gated", "mla"), [
    (4, 4, 2, False, False), (4, 2, 2, True, False), (8, 2, 4, True, False),
    (8, 1, 4, False, False), (8, 2, 8, True, False), (4, 4, 4, True, True),
])
def test_merging_undoes_the_documented_split(heads: int, groups: int, tp: int, gated: bool,
                                             mla: bool) -> None:
    """Every parameter split by the test kit's independent layout mapping merges back exactly."""
    from protoformer.train.checkpoint_merge import merge_shards

    overrides: dict[str, object] = {"num_attention_heads": heads, "gated_linear_unit": gated,
                                    "hidden_size": 4 * heads, "ffn_hidden_size": 8 * tp}
    config = kit.mla_config(**overrides) if mla else kit.gpt_config(num_query_groups=groups,
                                                                   add_qkv_bias=True, **overrides)
    torch.manual_seed(0)
    model = kit.build_gpt(config, None)
    for name, param in model.named_parameters():
        shards = [kit.expected_shard(name, param.detach(), param, config, rank, tp)
                  for rank in range(tp)]
        assert torch.equal(merge_shards(name, shards, param, config), param.detach()), name
