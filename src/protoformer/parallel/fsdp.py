"""FSDP2 (`torch.distributed.fsdp.fully_shard`) over the data-parallel group, under our TP.

`FullyShardedDataParallel` shards every parameter (this tensor-parallel rank's slice of it)
along dim 0 over `pg.dp` (ZeRO-3: parameters, gradients and optimizer state are 1 / dp per
rank): each transformer layer is one FSDP unit (all-gathered before its forward and
backward, freed after them unless `reshard_after_forward=False`), the embedding, final norm
and output layer the root unit. Gradients are reduce-scattered (averaged) over `pg.dp`
during backward.

Tensor parallelism stays ours: the model is built already split over `pg.tp` (plain tensors,
not DTensors), and FSDP sees only this rank's slices on a one-dimensional mesh of the
data-parallel group, so each tensor-parallel rank shards its own slice over its own
data-parallel peers (2-D: TP inside, FSDP across). The `ParallelMetadata` records are kept by
parameter name across `fully_shard` (which replaces the parameters with DTensors), so
`finalize_model_grads` and the global gradient norm keep working on the local shards.

Mixed precision: `mixed_precision_policy("bf16")` computes in bf16 parameters and reduces
gradients in float32 (the sharded parameters and the optimizer stay float32). Activation
recomputation (`config.recompute_granularity`) runs inside each layer, as without FSDP.

Not supported (a ValueError says so): deferred weight gradients (`delay_wgrad_compute`, whose
gradients arrive after FSDP's reduce-scatter) and key/value heads replicated over
tensor-parallel ranks (`num_query_groups < tp`, whose gradient hooks sit on the unsharded
parameters).
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from protoformer.config import TransformerConfig
from protoformer.models import GPTModel
from protoformer.parallel.grads import finalize_model_grads
from protoformer.parallel.groups import ProcessGroups, single_process_group
from protoformer.parallel.parameters import named_parallel_metadata, restore_parallel_metadata
from protoformer.parallel.pipeline import StageSplit

__all__ = ["FullyShardedDataParallel", "FullyShardedStages", "data_parallel_mesh",
           "mixed_precision_policy"]


def mixed_precision_policy(compute: str) -> MixedPrecisionPolicy:
    """`bf16`: bf16 parameters in forward/backward, float32 gradient reduction; `fp32`: none."""
    if compute == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if compute == "fp32":
        return MixedPrecisionPolicy()
    raise ValueError(f"FSDP compute precision {compute!r}: use bf16 or fp32")


def data_parallel_mesh(pg: ProcessGroups, device: torch.device) -> DeviceMesh:
    """A one-dimensional device mesh of the data-parallel group (this process alone when there
    is none: a world of one process, joined here if no process group exists yet)."""
    group = pg.dp if pg.dp is not None else single_process_group(device)
    return DeviceMesh.from_group(group, device.type, mesh_dim_names=("dp_shard",))


def _check_supported(config: TransformerConfig, pg: ProcessGroups) -> None:
    if pg.ep_size > 1:
        raise ValueError("--fsdp cannot be combined with expert parallelism yet (the experts' "
                         "data-parallel group differs from the dense one); use DDP with --ep")
    if config.delay_wgrad_compute:
        raise ValueError("--fsdp cannot be combined with delay_wgrad_compute: deferred weight "
                         "gradients arrive after FSDP's reduce-scatter; turn one of them off")
    if pg.tp_size > 1 and config.query_groups < pg.tp_size:
        raise ValueError(f"--fsdp with --tp {pg.tp_size} needs at least {pg.tp_size} key/value "
                         f"groups (the model has {config.query_groups}: key/value heads "
                         "replicated over tensor-parallel ranks are not supported with FSDP); "
                         "lower --tp or use DDP")


def _shard_units(root: nn.Module, layers: Iterable[nn.Module], mesh: DeviceMesh,
                 policy: MixedPrecisionPolicy, reshard_after_forward: bool) -> None:
    """`fully_shard` each of `layers`, then `root` (the rest of its parameters)."""
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy,
                    reshard_after_forward=reshard_after_forward)
    # The root keeps its parameters (embedding, final norm, output layer) after forward:
    # backward needs them first, at once.
    fully_shard(root, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


class FullyShardedDataParallel:
    """`fully_shard` per transformer layer and at the root, over `pg.dp` (a `DataParallel`)."""

    def __init__(self, model: GPTModel, pg: ProcessGroups, device: torch.device, *,
                 mp_policy: MixedPrecisionPolicy | None = None,
                 reshard_after_forward: bool = True) -> None:
        _check_supported(model.config, pg)
        self._model = model
        self._pg = pg
        records = named_parallel_metadata(model)
        policy = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
        _shard_units(model, model.decoder.layers, data_parallel_mesh(pg, device), policy,
                     reshard_after_forward)
        restore_parallel_metadata(model, records)

    @property
    def name(self) -> str:
        return "FSDP2"

    @property
    def module(self) -> nn.Module:
        return self._model

    @contextlib.contextmanager
    def accumulating(self) -> Generator[None, None, None]:
        root = self._model
        assert isinstance(root, FSDPModule)
        root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            root.set_requires_gradient_sync(True)

    def finish_grads(self) -> None:
        # FSDP averaged over the data-parallel group in backward; what is left is the
        # tensor-parallel sum of partial gradients, on the local shards.
        finalize_model_grads(self._model, self._pg, reduce_data_parallel=False)


class FullyShardedStages:
    """FSDP2 over `pg.dp` for a pipeline rank's stages (a `DataParallel`): each layer one unit,
    each stage's embedding / final norm / output layer its root unit, as torchtitan shards
    pipeline stages. The pipeline schedule drives the units (no gradient sync before a
    stage's last backward, then the reduce-scatter), so `accumulating` does nothing."""

    def __init__(self, split: StageSplit, pg: ProcessGroups, device: torch.device, *,
                 mp_policy: MixedPrecisionPolicy | None = None,
                 reshard_after_forward: bool = True) -> None:
        _check_supported(split.module.config, pg)
        self._module = split.module
        self._pg = pg
        records = named_parallel_metadata(split.module)
        mesh = data_parallel_mesh(pg, device)
        policy = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
        for stage in split.stages:
            _shard_units(stage, stage.decoder.layers.values(), mesh, policy, reshard_after_forward)
        restore_parallel_metadata(split.module, records)

    @property
    def name(self) -> str:
        return "FSDP2"

    @property
    def module(self) -> nn.Module:
        return self._module

    @contextlib.contextmanager
    def accumulating(self) -> Generator[None, None, None]:
        yield

    def finish_grads(self) -> None:
        finalize_model_grads(self._module, self._pg, reduce_data_parallel=False)
