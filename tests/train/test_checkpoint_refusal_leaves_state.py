"""Review finding: `load_checkpoint` promises to leave model and optimizer unchanged when it
refuses a checkpoint, but an optimizer whose parameter groups differ (checked by torch only when
loading) was refused after the weights had already been loaded into the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from protoformer.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))


def test_a_refused_optimizer_leaves_the_model_unchanged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _model()
    optimizer = torch.optim.AdamW([{"params": [model[0].weight]}, {"params": [model[1].weight]}])
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    step_dir = save_checkpoint(tmp_path, 1, model, optimizer, {})

    other = _model()  # same parameter shapes, but one parameter group instead of two
    before = {name: tensor.clone() for name, tensor in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="parameter groups"):
        load_checkpoint(step_dir, other, torch.optim.AdamW(other.parameters()))
    assert all(torch.equal(before[name], tensor) for name, tensor in other.state_dict().items())


def test_a_fitting_optimizer_still_loads_with_the_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    step_dir = save_checkpoint(tmp_path, 1, model, optimizer, {})

    other = _model()
    other_optimizer = torch.optim.AdamW(other.parameters())
    load_checkpoint(step_dir, other, other_optimizer)
    assert all(torch.equal(model.state_dict()[name], tensor)
               for name, tensor in other.state_dict().items())
    saved, loaded = optimizer.state_dict()["state"], other_optimizer.state_dict()["state"]
    assert all(torch.equal(saved[i]["exp_avg"], loaded[i]["exp_avg"]) for i in saved)
