"""Dropout draws the same mask across tensor-parallel ranks where the activations are
replicated, and different masks where each rank holds different data (its attention heads; its
slice of the sequence under sequence parallelism); activation recomputation replays them.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from protoformer.backends import get_backend
from protoformer.parallel import ProcessGroups
from protoformer.parallel.grads import finalize_model_grads
from protoformer.parallel.random import model_parallel_manual_seed
from protoformer.recipes import gpt_layer_spec
from protoformer.transformer.core_attention import DotProductAttention, SDPAttention
from protoformer.transformer.enums import AttnMaskType
from protoformer.transformer.layer import TransformerLayer
from tests.distributed.tp_testkit import (
    BATCH,
    SEQ,
    VOCAB,
    build_gpt,
    close,
    device,
    gpt_config,
    run,
    world_tp_group,
)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")


def gather(tensor: Tensor, group: dist.ProcessGroup) -> list[Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


def rng_state_tensor() -> Tensor:
    return torch.get_rng_state().to(device())


def check_attention_dropout(rank: int, world_size: int) -> None:
    group = world_tp_group(world_size)
    config = gpt_config(attention_dropout=0.5)
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(SEQ, BATCH, 2, 4, generator=generator).to(device())
                         for _ in range(3))  # the same inputs on every rank
    for core_class in (DotProductAttention, SDPAttention):
        for pg, should_differ in ((ProcessGroups(tp=group), True), (ProcessGroups(), False)):
            model_parallel_manual_seed(11, pg.tp_rank)
            core = core_class(config, 1, AttnMaskType.causal, pg=pg).train()
            out = core(query, key, value, None)  # [s, b, np * hn]
            outs = gather(out, group)
            what = f"{core_class.__name__}, tp={pg.tp_size}"
            assert not torch.equal(outs[0], outs[0] * 0), what  # dropout left something
            if should_differ:  # each rank's heads get their own mask
                assert not torch.equal(outs[0], outs[1]), f"{what}: masks equal across ranks"
            else:
                assert torch.equal(outs[0], outs[1]), f"{what}: masks differ across ranks"
            states = gather(rng_state_tensor(), group)
            assert torch.equal(states[0], states[1]), f"{what}: default RNG out of step"


def test_attention_dropout_differs_across_tensor_parallel_ranks() -> None:
    run(check_attention_dropout, 2)


def residual_only_layer(sequence_parallel: bool, pg: ProcessGroups) -> TransformerLayer:
    """A layer whose branches output exactly their (all-ones) biases: out = x + drop(1) + drop(1)."""
    config = gpt_config(hidden_dropout=0.5, sequence_parallel=sequence_parallel)
    with torch.device(device()):
        layer = TransformerLayer(config, gpt_layer_spec(get_backend("local"), config), pg=pg)
    with torch.no_grad():
        for module in (layer.self_attention.linear_proj, layer.mlp.linear_fc2):
            for name, param in module.named_parameters():
                param.fill_(1.0 if name == "bias" else 0.0)
    return layer.train()


def check_hidden_dropout(rank: int, world_size: int) -> None:
    group = world_tp_group(world_size)
    pg = ProcessGroups(tp=group)
    for sequence_parallel in (False, True):
        model_parallel_manual_seed(5, rank)
        layer = residual_only_layer(sequence_parallel, pg)
        x = torch.zeros(SEQ // world_size if sequence_parallel else SEQ, BATCH, 16,
                        device=device())  # the same on every rank
        out = layer(x)  # drop(1) + drop(1): values in {0, 2, 4}
        outs = gather(out, group)
        assert set(outs[0].unique().tolist()) <= {0.0, 2.0, 4.0}
        if sequence_parallel:  # different slices of the sequence, different masks
            assert not torch.equal(outs[0], outs[1]), "sequence-parallel masks equal across ranks"
        else:  # the replicated residual stream must stay identical on every rank
            assert torch.equal(outs[0], outs[1]), "replicated hidden dropout masks differ"
        states = gather(rng_state_tensor(), group)
        assert torch.equal(states[0], states[1]), "default RNG out of step across ranks"


def test_hidden_dropout_same_on_replicated_and_different_on_sequence_shards() -> None:
    run(check_hidden_dropout, 2)


def check_replicated_stream_in_a_model(rank: int, world_size: int) -> None:
    group = world_tp_group(world_size)
    pg = ProcessGroups(tp=group)
    model_parallel_manual_seed(3, rank)
    model = build_gpt(gpt_config(hidden_dropout=0.3, attention_dropout=0.3), pg).train()
    captured: list[Tensor] = []
    for layer in model.decoder.layers:
        layer.register_forward_hook(lambda _m, _i, output: captured.append(output.detach()))
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    model(ids.to(device()), ids.to(device())).mean().backward()
    assert len(captured) == 2
    for index, hidden in enumerate(captured):
        copies = gather(hidden, group)
        assert torch.equal(copies[0], copies[1]), f"layer {index + 1}: residual stream diverged"


def test_dropout_keeps_the_replicated_residual_stream_identical_across_ranks() -> None:
    run(check_replicated_stream_in_a_model, 2)


def check_recompute_replays_dropout(rank: int, world_size: int) -> None:
    pg = ProcessGroups(tp=world_tp_group(world_size))
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device())
    grads: list[dict[str, Tensor]] = []
    for granularity in (None, "full"):
        model_parallel_manual_seed(9, rank)
        config = gpt_config(hidden_dropout=0.3, attention_dropout=0.3, sequence_parallel=True,
                            recompute_granularity=granularity)
        model = build_gpt(config, pg).train()
        model(ids, ids).mean().backward()
        finalize_model_grads(model, pg)
        grads.append({name: param.grad.clone() for name, param in model.named_parameters()
                      if param.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        close(grads[1][name], grads[0][name], f"recomputed grad of {name}")


def test_full_recompute_replays_the_tensor_parallel_dropout_masks() -> None:
    run(check_recompute_replays_dropout, 2)
