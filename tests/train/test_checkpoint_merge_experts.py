"""A per-rank (safetensors) checkpoint saved under expert parallelism with one MLP per expert
(`SequentialMLP`) merges into the single-process model: EP rank r's `local_experts.{i}` is
expert `r * E_local + i` (Megatron-Core's contiguous blocks). The EP files are written out
here by hand from a single-process model, so the expected placement does not come from the
code under test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from protoformer.train.checkpoint_files import CheckpointError, shard_file_names, write_safetensors
from protoformer.train.checkpoint_merge import load_merged_weights
from tests.distributed.test_dcp_expert_parallel import EXPERTS, build, moe_config

EP = 2
_EXPERT = re.compile(r"local_experts\.(\d+)\.")


def _write_ep_files(reference: torch.nn.Module, directory: Path) -> None:
    per_rank = EXPERTS // EP
    for ep_rank in range(EP):
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in reference.state_dict().items():
            found = _EXPERT.search(name)
            if found is None:
                tensors[name] = tensor.clone()
                continue
            expert = int(found.group(1))
            if expert // per_rank == ep_rank:
                local = f"local_experts.{expert - ep_rank * per_rank}."
                tensors[name[:found.start()] + local + name[found.end():]] = tensor.clone()
        model_file, _ = shard_file_names(0, 1, ep_rank, EP)
        write_safetensors(directory / model_file, tensors, {})


def test_per_expert_mlps_of_each_ep_rank_take_their_global_indices(tmp_path: Path) -> None:
    torch.manual_seed(3)
    reference = build(moe_config(), None, grouped=False)
    assert any(_EXPERT.search(name) for name in reference.state_dict())
    _write_ep_files(reference, tmp_path)
    torch.manual_seed(4)
    merged = build(moe_config(), None, grouped=False)
    load_merged_weights(tmp_path, {}, merged, tp_size=1, ep_size=EP, verify=False)
    expected = reference.state_dict()
    for name, tensor in merged.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_an_expert_file_of_another_model_is_refused_before_loading(tmp_path: Path) -> None:
    torch.manual_seed(3)
    reference = build(moe_config(), None, grouped=False)
    _write_ep_files(reference, tmp_path)
    model_file, _ = shard_file_names(0, 1, 1, EP)
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / model_file))
    tensors = {name.replace("local_experts.1.", "local_experts.7."): value
               for name, value in tensors.items()}
    write_safetensors(tmp_path / model_file, tensors, {})
    merged = build(moe_config(), None, grouped=False)
    before = {name: tensor.clone() for name, tensor in merged.state_dict().items()}
    with pytest.raises(CheckpointError):
        load_merged_weights(tmp_path, {}, merged, tp_size=1, ep_size=EP, verify=False)
    assert all(torch.equal(t, before[n]) for n, t in merged.state_dict().items())


def test_an_expert_under_an_unknown_module_is_one_checkpoint_error(tmp_path: Path) -> None:
    torch.manual_seed(3)
    reference = build(moe_config(), None, grouped=False)
    _write_ep_files(reference, tmp_path)
    model_file, _ = shard_file_names(0, 1, 1, EP)
    write_safetensors(tmp_path / model_file,
                      {"decoder.nowhere.local_experts.0.weight": torch.zeros(2)}, {})
    with pytest.raises(CheckpointError, match="is not an expert of this model"):
        load_merged_weights(tmp_path, {}, build(moe_config(), None, grouped=False),
                            tp_size=1, ep_size=EP, verify=False)
