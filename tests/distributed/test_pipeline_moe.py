"""Mixture-of-experts models under pipeline parallelism (gloo, 2 processes) train exactly like
one process: per-layer specs (a dense first layer, then MoE layers) split across the stages,
and every router's auxiliary losses reach the backward on the stage that holds it.

The reference is written here, not taken from the training loop: one process runs the
micro-batches in turn, each backward of `(loss_i + aux_i) / m` with `aux_i` the sum of the
routers' load-balancing and z-losses of that micro-batch (`GPTModel.moe_aux_losses.total()`),
clips, steps AdamW and moves the aux-loss-free expert biases. The pipelined ranks run
`pipeline_train_step` (the loop's step) with 1F1B, and Interleaved1F1B with every layer
recomputed in the backward (reference too). Loss, the reported
aux loss, the clipped gradient norm, every gradient (routers included), the weights and the
expert biases after each of 2 AdamW steps must match at 1e-5. The coefficients are large
enough that leaving out the aux losses' gradient moves the router gradients far past that.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import Tensor

from protoformer import TransformerConfig
from protoformer.backends import get_backend
from protoformer.models import GPTModel
from protoformer.parallel import ProcessGroups
from protoformer.parallel.data_parallel import ReplicatedDataParallel
from protoformer.parallel.grads import clip_grad_norm_
from protoformer.parallel.pipeline_schedule import PipelineParallel
from protoformer.recipes.moe import gpt_moe_layer_specs
from protoformer.train.step import pipeline_train_step
from protoformer.transformer.moe import MoELayer
from tests.distributed.tp_testkit import SEQ, VOCAB, close, device, gpt_config, run

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")

GLOBAL_BATCH = 4  # 4 micro-batches of one sequence
STEPS = 2
MAX_NORM = 0.5
# Layers of each rank for 4 layers over pp=2 (Megatron-Core: stage i on rank i % pp).
EXPECTED_LAYERS = {("1F1B", 1): {0: {0, 1}, 1: {2, 3}},
                   ("Interleaved1F1B", 2): {0: {0, 2}, 1: {1, 3}}}


def moe_config(recompute: bool) -> TransformerConfig:
    # Layer 0 dense, layers 1-3 MoE (4 experts, top-2, a shared expert), sigmoid scores with
    # DeepSeek-V3's expert bias, a load-balancing loss and a z-loss; optionally every layer
    # recomputed in the backward (the routers run again there).
    return gpt_config(num_layers=4, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=8,
                      moe_layer_freq=[0, 1, 1, 1], moe_shared_expert_intermediate_size=8,
                      gated_linear_unit=True, moe_router_score_function="sigmoid",
                      moe_router_enable_expert_bias=True, moe_router_bias_update_rate=1e-2,
                      moe_aux_loss_coeff=0.5, moe_z_loss_coeff=0.05,
                      recompute_granularity="full" if recompute else None)


def build(config: TransformerConfig, pg: ProcessGroups | None) -> GPTModel:
    with torch.device(device()):
        return GPTModel(config, gpt_moe_layer_specs(get_backend("local"), config), VOCAB, 32,
                        pg=pg)


def optimizer_for(parameters: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameters, lr=1e-3, eps=1e-4, weight_decay=0.1)


def batch(step: int) -> Tensor:
    generator = torch.Generator().manual_seed(200 + step)
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=generator).to(device())


def reference_step(reference: GPTModel, optimizer: torch.optim.Optimizer,
                   rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One process, micro-batch by micro-batch: (mean loss, mean aux loss, grad norm)."""
    optimizer.zero_grad(set_to_none=True)
    chunks = rows.chunk(GLOBAL_BATCH)
    losses, auxes = [], []
    for chunk in chunks:
        loss = reference(chunk[:, :-1], chunk[:, 1:], loss_reduction="mean")
        aux = reference.moe_aux_losses.total()
        assert aux is not None and float(aux) > 0
        ((loss + aux) / len(chunks)).backward()
        losses.append(loss.detach())
        auxes.append(aux.detach())
    norm = clip_grad_norm_(reference.parameters(), MAX_NORM)
    optimizer.step()
    reference.update_expert_bias()
    return torch.stack(losses).mean(), torch.stack(auxes).mean(), norm


def check_moe_pipeline(rank: int, world_size: int, schedule: str, virtual: int,
                       recompute: bool) -> None:
    pg = ProcessGroups.from_torchrun(tp=1, pp=2)
    what = f"MoE PP=2 {schedule}{' (full recompute)' if recompute else ''}"
    config = moe_config(recompute)
    torch.manual_seed(0)
    reference = build(config, None)
    model = build(config, pg)
    model.load_state_dict(reference.state_dict())
    pipeline = PipelineParallel(model, pg, device(), microbatches=GLOBAL_BATCH,
                                schedule=schedule, virtual=virtual)
    module = pipeline.module
    layers = {int(name.split(".")[2]) for name, _ in module.named_parameters()
              if name.startswith("decoder.layers.")}
    assert layers == EXPECTED_LAYERS[schedule, virtual][rank], f"{what}: layers {layers}"
    kinds = {index: isinstance(reference.decoder.layers[index].mlp, MoELayer)  # type: ignore[union-attr]
             for index in layers}
    assert kinds[min(layers)] == (min(layers) != 0), f"{what}: layer 0 must be dense: {kinds}"
    routers = [name for name, _ in module.named_parameters() if name.endswith("router.weight")]
    assert len(routers) == sum(kinds.values()) >= 1, f"{what}: routers {routers}"
    data_parallel = ReplicatedDataParallel(module, pg, device(), wrap=False)
    parameters = list(module.parameters())
    ref_optimizer = optimizer_for(list(reference.parameters()))
    optimizer = optimizer_for(parameters)
    expected = dict(reference.named_parameters())
    expected_buffers = dict(reference.named_buffers())
    for step in range(STEPS):
        rows = batch(step)
        ref_loss, ref_aux, ref_norm = reference_step(reference, ref_optimizer, rows)
        output = pipeline_train_step(pipeline, data_parallel, optimizer, rows,
                                     parameters=parameters, grad_clip=MAX_NORM, pg=pg,
                                     device=device())
        close(output.loss, ref_loss, f"{what}: loss at step {step}")
        close(output.aux_loss, ref_aux, f"{what}: aux loss at step {step}")
        close(output.grad_norm, ref_norm, f"{what}: grad norm at step {step}")
        assert float(ref_norm) > MAX_NORM, f"{what}: clipping never acted"
        for name, param in module.named_parameters():
            full = expected[name]
            close(param.grad, full.grad, f"{what}, step {step}: grad of {name}")
            close(param.detach(), full.detach(), f"{what}, step {step}: {name}")
        biases = [name for name, _ in module.named_buffers() if name.endswith("expert_bias")]
        assert len(biases) == len(routers)
        for name, buffer in module.named_buffers():
            close(buffer, expected_buffers[name], f"{what}, step {step}: buffer {name}")
        assert any(float(buffer.abs().max()) > 0 for name, buffer in module.named_buffers()
                   if name in biases), f"{what}: the expert biases never moved"
    rows = batch(STEPS)
    with torch.no_grad():
        reference.eval()
        ref_loss = reference(rows[:, :-1], rows[:, 1:]).mean()
    close(pipeline.evaluate(rows, device()), ref_loss, f"{what}: evaluation loss")


@pytest.mark.parametrize(("schedule", "virtual", "recompute"),
                         [("1F1B", 1, False), ("Interleaved1F1B", 2, True)])
def test_moe_pipeline_trains_like_one_process(schedule: str, virtual: int,
                                              recompute: bool) -> None:
    run(check_moe_pipeline, 2, schedule, virtual, recompute)
