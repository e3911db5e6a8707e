"""Process groups for tensor, data, expert and pipeline parallelism, passed down explicitly.

`None` stands for "this process alone": the default `ProcessGroups()` needs no
`torch.distributed` initialisation, so single-device users never touch process groups.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.distributed_c10d import Store

__all__ = ["ProcessGroup", "ProcessGroups", "group_rank", "group_size", "single_process_group"]

# An in-memory store for a world of one process (torch's stubs do not export the class).
_hash_store = cast("Callable[[], Store]", vars(dist)["HashStore"])


def single_process_group(device: torch.device) -> ProcessGroup:
    """The world group of this process alone, joined here (in-memory store; NCCL on CUDA, else
    gloo) if no process group exists yet: for engines that need a group even on one process
    (FSDP2's mesh, pipeline stages). A ValueError if the world has other processes."""
    if not dist.is_initialized():
        if device.type == "cuda":  # NCCL, bound to the device (barrier then needs no guess)
            # torch's stubs type `index` as int; a bare torch.device("cuda") has None.
            bare = device.index is None  # pyright: ignore[reportUnnecessaryComparison]
            index = torch.cuda.current_device() if bare else device.index
            dist.init_process_group("nccl", store=_hash_store(), rank=0, world_size=1,  # pyright: ignore[reportUnknownMemberType]  # torch leaves `pg_options` unannotated
                                    device_id=torch.device("cuda", index))
        else:
            dist.init_process_group("gloo", store=_hash_store(), rank=0, world_size=1)  # pyright: ignore[reportUnknownMemberType]  # torch leaves `pg_options` unannotated
    if dist.get_world_size() != 1:
        raise ValueError("this process is one of several: build the groups with "
                         "ProcessGroups.from_torchrun(...)")
    world = dist.group.WORLD
    assert isinstance(world, ProcessGroup)
    return world


def group_size(group: ProcessGroup | None) -> int:
    """Number of ranks in `group`; 1 for None (a single process)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    """This process's rank in `group`; 0 for None (a single process)."""
    return 0 if group is None else dist.get_rank(group)


@dataclass(frozen=True)
class ProcessGroups:
    """The groups a model is split over: tensor-parallel (`tp`) and data-parallel (`dp`), and
    for mixture-of-experts layers expert-parallel (`ep`: the ranks that split the experts and
    exchange tokens) and expert-data-parallel (`expt_dp`: the ranks holding the same experts,
    over which expert gradients are averaged). Without expert parallelism `ep` is None and
    `expt_dp` is None too (the experts are data-parallel over `dp` like everything else).
    Under pipeline parallelism `pp` holds the ranks that hold the successive stages of the
    same model replica (same tensor- and data-parallel rank); None without it. `embd` (the
    embedding group, Megatron-Core's name) holds the first and the last rank of that pipeline,
    which sum the gradients of a tied embedding's two copies; None on the other pipeline ranks
    and without pipeline parallelism over several ranks."""

    tp: ProcessGroup | None = None
    dp: ProcessGroup | None = None
    ep: ProcessGroup | None = None
    expt_dp: ProcessGroup | None = None
    pp: ProcessGroup | None = None
    embd: ProcessGroup | None = None

    @property
    def pp_size(self) -> int:
        return group_size(self.pp)

    @property
    def pp_rank(self) -> int:
        return group_rank(self.pp)

    @property
    def ep_size(self) -> int:
        return group_size(self.ep)

    @property
    def ep_rank(self) -> int:
        return group_rank(self.ep)

    @property
    def expt_dp_size(self) -> int:
        return group_size(self.expt_dp)

    @property
    def tp_size(self) -> int:
        return group_size(self.tp)

    @property
    def tp_rank(self) -> int:
        return group_rank(self.tp)

    @property
    def dp_size(self) -> int:
        return group_size(self.dp)

    @property
    def dp_rank(self) -> int:
        return group_rank(self.dp)

    @classmethod
    def from_torchrun(cls, *, tp: int = 1, ep: int = 1, pp: int = 1,
                      pipeline: bool = False) -> ProcessGroups:
        """Build TP, DP (and with `ep > 1` EP and expert-DP, with `pp > 1` PP) groups from an
        initialised `torch.distributed` world.

        Ranks are laid out tensor-parallel-first (ranks 0..tp-1 form the first TP group), as
        Megatron-Core does, so a TP group stays within one node. Expert parallelism splits the
        data-parallel dimension (`dp = world / tp`, divisible by `ep`): rank
        `t + tp * (e + ep * d)` is TP rank `t`, EP rank `e` and expert-DP rank `d`; each
        EP group holds all experts once, each expert-DP group `dp / ep` copies of the same
        experts.

        Pipeline parallelism is the outermost dimension (Megatron-Core's order tp-cp-ep-dp-pp):
        with `dp = world / (tp * pp)`, rank `t + tp * (d + dp * p)` is TP rank `t`, DP rank
        `d` and pipeline stage rank `p`; a PP group is the `pp` ranks with the same `t` and
        `d` (built with `pp > 1`, or with `pipeline=True` also for `pp == 1`: a group of one
        per rank, for a pipeline schedule whose stages all live on each rank). Expert
        parallelism is not combined with pipelines (ValueError).
        Every rank must call this.
        """
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ProcessGroups.from_torchrun needs torch.distributed initialised; launch with "
                "`torchrun` and call torch.distributed.init_process_group() first")
        world = dist.get_world_size()
        rank = dist.get_rank()
        if tp < 1 or world % tp != 0:
            raise ValueError(f"tp={tp} must be >= 1 and divide the world size {world} "
                             f"(WORLD_SIZE={os.environ.get('WORLD_SIZE')})")
        if pp > 1 or pipeline:
            return cls._with_pipeline(rank, world, tp=tp, ep=ep, pp=pp)
        tp_group: ProcessGroup | None = None
        dp_group: ProcessGroup | None = None
        # Every rank creates every group (new_group is collective), keeping its own.
        for start in range(0, world, tp):
            ranks = list(range(start, start + tp))
            group = _new_group(ranks, member=rank in ranks)
            if group is not None:
                tp_group = group
        for offset in range(tp):
            ranks = list(range(offset, world, tp))
            group = _new_group(ranks, member=rank in ranks)
            if group is not None:
                dp_group = group
        if ep == 1:
            return cls(tp=tp_group, dp=dp_group)
        dp = world // tp
        if ep < 1 or dp % ep != 0:
            raise ValueError(f"ep={ep} must be >= 1 and divide the data-parallel size {dp} "
                             f"(world size {world} / tp {tp}); expert parallelism splits the "
                             "data-parallel ranks")
        ep_group, expt_dp_group = _expert_groups(rank, tp=tp, ep=ep, expt_dp=dp // ep)
        return cls(tp=tp_group, dp=dp_group, ep=ep_group, expt_dp=expt_dp_group)


    @classmethod
    def _with_pipeline(cls, rank: int, world: int, *, tp: int, ep: int,
                       pp: int) -> ProcessGroups:
        """TP, DP and PP groups in the layout `rank = t + tp * (d + dp * p)`."""
        if ep != 1:
            raise ValueError(f"pp={pp} cannot be combined with ep={ep}: expert parallelism "
                             "inside pipeline stages is not supported")
        if world % (tp * pp) != 0:
            raise ValueError(f"tp={tp} x pp={pp} must divide the world size {world} "
                             f"(WORLD_SIZE={os.environ.get('WORLD_SIZE')})")
        dp = world // (tp * pp)
        found: dict[str, ProcessGroup | None] = {"tp": None, "dp": None, "pp": None,
                                                 "embd": None}

        def create(kind: str, ranks: list[int]) -> None:
            group = _new_group(ranks, member=rank in ranks)
            if group is not None:
                found[kind] = group

        for p in range(pp):
            for d in range(dp):
                create("tp", [t + tp * (d + dp * p) for t in range(tp)])
        for p in range(pp):
            for t in range(tp):
                create("dp", [t + tp * (d + dp * p) for d in range(dp)])
        for d in range(dp):
            for t in range(tp):
                create("pp", [t + tp * (d + dp * p) for p in range(pp)])
        if pp > 2:  # with two stages the embedding group is the pipeline group
            for d in range(dp):
                for t in range(tp):
                    create("embd", [t + tp * (d + dp * p) for p in (0, pp - 1)])
        elif pp == 2:
            found["embd"] = found["pp"]
        return cls(tp=found["tp"], dp=found["dp"], pp=found["pp"], embd=found["embd"])


def _expert_groups(rank: int, *, tp: int, ep: int,
                   expt_dp: int) -> tuple[ProcessGroup | None, ProcessGroup | None]:
    """This rank's EP and expert-DP groups in the layout `rank = t + tp * (e + ep * d)`."""
    ep_group: ProcessGroup | None = None
    expt_dp_group: ProcessGroup | None = None
    for d in range(expt_dp):
        for t in range(tp):
            ranks = [t + tp * (e + ep * d) for e in range(ep)]
            group = _new_group(ranks, member=rank in ranks)
            if group is not None:
                ep_group = group
    for e in range(ep):
        for t in range(tp):
            ranks = [t + tp * (e + ep * d) for d in range(expt_dp)]
            group = _new_group(ranks, member=rank in ranks)
            if group is not None:
                expt_dp_group = group
    return ep_group, expt_dp_group


def _new_group(ranks: list[int], *, member: bool) -> ProcessGroup | None:
    """Create the group on every rank (a collective call); return it only to its members."""
    group = dist.new_group(ranks)  # pyright: ignore[reportUnknownMemberType]  # torch leaves parameters unannotated
    if not member:
        return None  # torch hands non-members a sentinel, not a group
    if not isinstance(group, ProcessGroup):
        raise RuntimeError(f"torch.distributed.new_group({ranks}) returned {group!r}, not a ProcessGroup")
    return group
