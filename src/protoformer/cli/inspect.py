"""`protoformer inspect PRESET`: the spec tree, parameter counts and FLOPs, built on meta.

The model is built on PyTorch's meta device: every parameter has a shape and no storage, so
even the 70B preset is inspected in about a second without allocating its weights.
"""

from __future__ import annotations

import argparse
import difflib
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from protoformer.backends import get_backend
from protoformer.cli.spec_args import add_spec_arguments, layer_spec_from_args
from protoformer.cli.spec_tree import SlotEntry, walk_spec
from protoformer.flops import (
    encoder_decoder_flops_per_token,
    flops_per_token,
    inactive_expert_params,
)
from protoformer.memory import ParallelLayout, estimate_layout_memory
from protoformer.models import GPTModel
from protoformer.recipes import get_preset, list_presets
from protoformer.recipes.t5_presets import get_t5_preset, list_t5_presets
from protoformer.spec import diff, spec_equal
from protoformer.spec.layers import layer_groups, range_label
from protoformer.transformer.block import LayerSpecs, per_layer_specs
from protoformer.transformer.layer import TransformerLayerSubmodules

__all__ = ["LayerGroup", "PresetReport", "add_parser", "inspect_preset", "inspect_t5_preset", "run"]

DEFAULT_FLOPS_SEQ_LEN = 4096


class _Subparsers(Protocol):
    def add_parser(self, name: str, *, help: str, description: str) -> argparse.ArgumentParser: ...


def add_parser(commands: _Subparsers) -> None:
    parser = commands.add_parser(
        "inspect", help="show a preset's spec tree, parameter counts and FLOPs per token",
        description="Show a preset's layer spec (each slot and the builder filling it), its "
                    "parameter counts and training FLOPs per token. The model is built on the "
                    f"meta device, so nothing is allocated. Presets: {', '.join(list_presets())}; "
                    f"encoder-decoder: {', '.join(list_t5_presets())}.")
    parser.add_argument("preset", help="preset name")
    parser.add_argument("--backend", default="local", help="backend (default local)")
    parser.add_argument("--seq-len", "--seq", type=int, default=None,
                        help=f"sequence length for the FLOPs count and the memory estimate "
                             f"(default: min({DEFAULT_FLOPS_SEQ_LEN}, the preset's maximum))")
    fit = parser.add_argument_group(
        "will it fit", "per-GPU training memory for a layout (any of these flags turns it on): "
        "parameters, gradients, AdamW state and activations of the most loaded pipeline stage")
    fit.add_argument("--tp", type=int, help="tensor-parallel size (default 1)")
    fit.add_argument("--pp", type=int, help="pipeline-parallel size (default 1)")
    fit.add_argument("--fsdp", type=int, metavar="D",
                     help="FSDP2 over D data-parallel ranks (parameters, gradients and optimizer "
                          "state sharded D ways)")
    fit.add_argument("--micro-batch-size", type=int, help="sequences per micro-batch (default 1)")
    fit.add_argument("--sequence-parallel", action="store_true",
                     help="with --tp: norms on sequence slices (their activations / tp)")
    fit.add_argument("--recompute", choices=("none", "full"), default=None,
                     help="activation recomputation (default none)")
    add_spec_arguments(parser)
    parser.set_defaults(handler=run)


@dataclass(frozen=True)
class LayerGroup:
    """Neighbouring layers built from equal specs: layers `first..last` use `kinds[kind]`."""

    first: int
    last: int
    kind: int  # index into PresetReport.kinds
    differs_at: list[str]  # slot paths where this kind differs from the first kind


@dataclass
class PresetReport:
    """What `inspect` shows, and the meta-device model it was measured on."""

    name: str
    description: str
    spec_class: str
    slots: list[SlotEntry]  # the first (or only) layer spec's slots
    module_params: list[tuple[str, int, int]]  # (child name, parameters counted here, shared)
    total_params: int
    seq_len: int
    flops_per_token: int  # an encoder-decoder preset: per target token
    model: nn.Module
    build_seconds: float
    flops_per_source_token: int | None = None  # an encoder-decoder preset only
    active_params: int | None = None  # MoE: the parameters one token uses (routed top-k)
    # Per-layer specs: the distinct specs' slots (kinds[0] is `slots`) and the layer groups;
    # empty when every layer has the same spec.
    kinds: list[list[SlotEntry]] = field(default_factory=list[list[SlotEntry]])
    layer_groups: list[LayerGroup] = field(default_factory=list[LayerGroup])


def _layer_kinds(specs: list[TransformerLayerSubmodules]
                 ) -> tuple[list[TransformerLayerSubmodules], list[LayerGroup]]:
    """The distinct specs among `specs` (first seen first) and the runs of equal neighbours."""
    kinds: list[TransformerLayerSubmodules] = []
    groups: list[LayerGroup] = []
    for first, last in layer_groups(specs, spec_equal):
        kind = next((i for i, known in enumerate(kinds) if spec_equal(known, specs[first])), None)
        if kind is None:
            kinds.append(specs[first])
            kind = len(kinds) - 1
        differs_at = [d.path for d in diff(kinds[0], kinds[kind])]
        groups.append(LayerGroup(first, last, kind, differs_at))
    return kinds, groups


def _param_counts(model: nn.Module) -> tuple[list[tuple[str, int, int]], int]:
    seen: set[int] = set()
    rows: list[tuple[str, int, int]] = []
    for name, child in model.named_children():
        own = shared = 0
        for param in child.parameters():
            if id(param) in seen:
                shared += param.numel()
            else:
                seen.add(id(param))
                own += param.numel()
        rows.append((name, own, shared))
    direct = [p for p in model.parameters(recurse=False) if id(p) not in seen]
    if direct:
        rows.append(("(model)", sum(p.numel() for p in direct), 0))
    total = sum(p.numel() for p in model.parameters())  # each shared parameter once
    return rows, total


def _flops_length(seq_len: int | None, max_sequence_length: int) -> int:
    """The sequence length FLOPs are counted at: `--seq-len`, else min(4096, the preset's)."""
    length = min(DEFAULT_FLOPS_SEQ_LEN, max_sequence_length) if seq_len is None else seq_len
    if length < 1:
        raise ValueError(f"--seq-len {length}: must be >= 1")
    return length


def inspect_preset(name: str, backend_name: str = "local", *, seq_len: int | None = None,
                   layer_spec: LayerSpecs | None = None) -> PresetReport:
    """Build `name` on the meta device and collect its spec tree, parameters and FLOPs.

    `layer_spec` replaces the preset's recipe (from `--spec FILE` and `--set` overrides). With
    per-layer specs the report groups equal neighbouring layers and shows each distinct spec.
    """
    preset = get_preset(name)
    backend = get_backend(backend_name)
    config = preset.config_factory()
    spec = layer_spec if layer_spec is not None else preset.layer_spec(backend, config)
    length = _flops_length(seq_len, preset.max_sequence_length)
    started = time.perf_counter()
    model = preset.build_model(backend, device=torch.device("meta"), layer_spec=spec)
    build_seconds = time.perf_counter() - started
    rows, total = _param_counts(model)
    kinds, groups = _layer_kinds(per_layer_specs(spec, config.num_layers))
    if len(groups) == 1:
        groups = []
    return PresetReport(
        name=preset.name, description=preset.description, spec_class=type(kinds[0]).__name__,
        slots=list(walk_spec(kinds[0])), module_params=rows, total_params=total, seq_len=length,
        flops_per_token=flops_per_token(config, preset.vocab_size, length), model=model,
        build_seconds=build_seconds, kinds=[list(walk_spec(k)) for k in kinds] if groups else [],
        layer_groups=groups,
        active_params=total - inactive_expert_params(config) if config.num_moe_experts else None)


def inspect_t5_preset(name: str, backend_name: str = "local", *,
                      seq_len: int | None = None) -> PresetReport:
    """`inspect_preset` for an encoder-decoder preset: both layer specs (`encoder.` and
    `decoder.` slot paths), parameters, and FLOPs per source and per target token."""
    preset = get_t5_preset(name)
    backend = get_backend(backend_name)
    config, encoder_config = preset.configs()
    length = _flops_length(seq_len, preset.max_sequence_length)
    encoder_spec, decoder_spec = preset.layer_specs(backend)
    slots = [*walk_spec(encoder_spec, "encoder"), *walk_spec(decoder_spec, "decoder")]
    started = time.perf_counter()
    model = preset.build_model(backend, device=torch.device("meta"),
                               layer_specs=(encoder_spec, decoder_spec))
    build_seconds = time.perf_counter() - started
    rows, total = _param_counts(model)
    per_source, per_target = encoder_decoder_flops_per_token(
        config, encoder_config, preset.vocab_size, length, length)
    return PresetReport(
        name=preset.name, description=preset.description, spec_class="TransformerLayerSubmodules",
        slots=slots, module_params=rows, total_params=total, seq_len=length,
        flops_per_token=per_target, model=model, build_seconds=build_seconds,
        flops_per_source_token=per_source)


_PARAMETER_SCALES = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))
_FLOP_SCALES = ((1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1e3, "KFLOP"))


def _human(count: float, scales: tuple[tuple[float, str], ...]) -> str:
    for scale, suffix in scales:
        if count >= scale:
            return f"{count / scale:.2f} {suffix}"
    return f"{count:.0f}"


def _slot_lines(slots: list[SlotEntry]) -> list[str]:
    width = max((len(entry.path) for entry in slots), default=0)
    lines: list[str] = []
    for entry in slots:
        origin = f"  [{entry.origin}]" if entry.origin else ""
        lines.append(f"  {entry.path:<{width}}  {entry.label}{origin}")
    return lines


def _layer_group_lines(report: PresetReport) -> list[str]:
    """The layer groups ("layers 0-2 ... kind 1"), then each distinct spec's slots."""
    groups = report.layer_groups
    num_layers = groups[-1].last + 1
    lines = [f"layer specs ({report.spec_class}): {len(report.kinds)} kinds over {num_layers} "
             "layers, equal neighbouring layers grouped:"]
    labels = [f"layers {range_label(g.first, g.last)}" if g.last > g.first
              else f"layer {g.first}" for g in groups]
    width = max(len(label) for label in labels)
    for label, group in zip(labels, groups, strict=True):
        count = group.last - group.first + 1
        note = ""
        if group.differs_at:
            shown = ", ".join(group.differs_at[:3])
            more = f" (+{len(group.differs_at) - 3} more)" if len(group.differs_at) > 3 else ""
            note = f"  (differs from kind 1 at {shown}{more})"
        lines.append(f"  {label:<{width}}  {count:>4} x kind {group.kind + 1}{note}")
    first_kind = {(e.path, e.label, e.origin) for e in report.kinds[0]}
    for index, slots in enumerate(report.kinds):
        used = [g for g in groups if g.kind == index]
        where = ("layer " if len(used) == 1 and used[0].first == used[0].last else "layers ") + \
            ", ".join(range_label(g.first, g.last) for g in used)
        if index == 0:
            lines += ["", f"kind 1 ({where}), each slot and its builder:", *_slot_lines(slots)]
        else:
            changed = [e for e in slots if (e.path, e.label, e.origin) not in first_kind]
            lines += ["", f"kind {index + 1} ({where}), the slots that differ from kind 1:",
                      *_slot_lines(changed)]
    return lines


def format_report(report: PresetReport) -> list[str]:
    """The report as the lines `protoformer inspect` prints."""
    lines = [f"{report.name}: {report.description}", ""]
    if report.layer_groups:
        lines += _layer_group_lines(report)
    else:
        kind = "layer spec" if report.flops_per_source_token is None else "layer specs"
        lines += [f"{kind} ({report.spec_class}), each slot and its builder:",
                  *_slot_lines(report.slots)]
    lines += ["", "parameters (built on the meta device, nothing allocated):"]
    name_width = max((len(name) for name, _, _ in report.module_params), default=0)
    for name, own, shared in report.module_params:
        note = f"  (+{shared:,} shared with an earlier module)" if shared else ""
        lines.append(f"  {name:<{name_width}}  {own:>16,}{note}")
    lines.append(f"  {'total':<{name_width}}  {report.total_params:>16,}  "
                 f"({_human(report.total_params, _PARAMETER_SCALES)})")
    if report.active_params is not None:
        lines.append(f"  {'active':<{name_width}}  {report.active_params:>16,}  "
                     f"({_human(report.active_params, _PARAMETER_SCALES)}; per token: the "
                     "routed top-k experts, not all of them)")
    if report.flops_per_source_token is None:
        lines += ["", f"training FLOPs per token at sequence length {report.seq_len:,}: "
                      f"{report.flops_per_token:,} ({_human(report.flops_per_token, _FLOP_SCALES)})"]
    else:
        source = report.flops_per_source_token
        lines += ["", f"training FLOPs at source and target length {report.seq_len:,}: per "
                      f"source token {source:,} ({_human(source, _FLOP_SCALES)}), per target "
                      f"token {report.flops_per_token:,} "
                      f"({_human(report.flops_per_token, _FLOP_SCALES)})"]
    lines.append(f"(built in {report.build_seconds:.2f} s)")
    return lines


def _unknown_preset(name: str) -> ValueError:
    """The known presets of both kinds, and the closest names to a misspelt one."""
    known = [*list_presets(), *list_t5_presets()]
    close = difflib.get_close_matches(name, known, n=2)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return ValueError(f"unknown preset {name!r}; {hint}decoder-only presets: "
                      f"{', '.join(list_presets())}; encoder-decoder presets: "
                      f"{', '.join(list_t5_presets())}")


def run(args: argparse.Namespace) -> int:
    if str(args.preset) not in (*list_presets(), *list_t5_presets()):
        raise _unknown_preset(str(args.preset))
    if str(args.preset) in list_t5_presets():
        if args.spec is not None or args.overrides:
            raise ValueError(f"--spec and --set apply to the decoder-only presets; "
                             f"{args.preset} is an encoder-decoder preset")
        for line in format_report(inspect_t5_preset(str(args.preset), str(args.backend),
                                                    seq_len=args.seq_len)):
            print(line)
        return 0
    preset = get_preset(str(args.preset))
    spec = layer_spec_from_args(args, preset, get_backend(str(args.backend)))
    report = inspect_preset(str(args.preset), str(args.backend), seq_len=args.seq_len,
                            layer_spec=spec)
    for line in format_report(report):
        print(line)
    fit = (args.tp, args.pp, args.fsdp, args.micro_batch_size, args.recompute)
    if any(value is not None for value in fit) or args.sequence_parallel:
        for line in _fit_lines(args, report, preset.vocab_size):
            print(line)
    return 0


def _fit_lines(args: argparse.Namespace, report: PresetReport, vocab_size: int) -> list[str]:
    """The "will it fit" section: `estimate_layout_memory` for the flags' layout."""
    model = report.model
    assert isinstance(model, GPTModel)
    pp = int(args.pp or 1)
    layout = ParallelLayout(tp=int(args.tp or 1), pp=pp, dp=int(args.fsdp or 1),
                            fsdp=args.fsdp is not None,
                            micro_batch_size=int(args.micro_batch_size or 1),
                            seq_len=report.seq_len, sequence_parallel=bool(args.sequence_parallel),
                            recompute=str(args.recompute or "none"), num_microbatches=pp)
    memory = estimate_layout_memory(model, model.config, vocab_size, layout)
    where = f"pipeline stage {memory.stage} of {pp} (the most loaded)" if pp > 1 else "one stage"
    dp = f"FSDP over {layout.dp}" if layout.fsdp else "DDP / one replica"
    return ["", f"memory per GPU, training: tp={layout.tp} x pp={pp} x {dp}, micro-batch "
                f"{layout.micro_batch_size} x seq {layout.seq_len}, bf16 activations, "
                f"recompute {layout.recompute}; {where}, {memory.parameters:,} parameters:",
            *memory.lines()]
