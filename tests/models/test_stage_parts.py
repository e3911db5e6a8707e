"""A pipeline rank builds only its own parts of a model, with the one-process weights.

The parts a rank holds are written out from Megatron-Core's layout (stage `i` on rank
`i % pp`; the embedding on the first stage, the final norm and output layer on the last, a
copy of a tied embedding there too). The weights are compared with a whole model built on one
process with the same seed (exact equality: the same draws), and a spawned process checks
that building one stage of a wide model never allocates the rest.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from protoformer.models.stage_parts import StageParts
from tests.distributed.tp_testkit import build_gpt, gpt_config

# 4 layers over pp=2 x 2 virtual stages: stages [0], [1], [2], [3] on ranks 0, 1, 0, 1.
RANK_PARTS = [StageParts(frozenset({0, 2}), pre_process=True, post_process=False),
              StageParts(frozenset({1, 3}), pre_process=False, post_process=True)]


def _expected_names(rank: int, *, tied: bool, learned: bool) -> set[str]:
    layer_params = ("input_layernorm.weight", "input_layernorm.bias",
                    "self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias",
                    "self_attention.linear_proj.weight", "self_attention.linear_proj.bias",
                    "pre_mlp_layernorm.weight", "pre_mlp_layernorm.bias",
                    "mlp.linear_fc1.weight", "mlp.linear_fc1.bias",
                    "mlp.linear_fc2.weight", "mlp.linear_fc2.bias")
    layers = (0, 2) if rank == 0 else (1, 3)
    names = {f"decoder.layers.{i}.{p}" for i in layers for p in layer_params}
    if rank == 0:
        names |= {"embedding.weight"} | ({"position_embeddings.weight"} if learned else set())
    else:
        names |= {"decoder.final_layernorm.weight", "decoder.final_layernorm.bias"}
        names |= {"embedding.weight"} if tied else {"output_layer.weight"}
    return names


@pytest.mark.parametrize(("tied", "position"), [(False, "rope"), (True, "learned_absolute")])
def test_each_rank_builds_only_its_parts_with_the_one_process_weights(
        tied: bool, position: str) -> None:
    config = gpt_config(num_layers=4)
    torch.manual_seed(0)
    whole = dict(build_gpt(config, None, tied=tied, position=position).named_parameters())
    for rank, parts in enumerate(RANK_PARTS):
        torch.manual_seed(0)
        model = build_gpt(config, None, tied=tied, position=position, parts=parts)
        params = dict(model.named_parameters())
        assert set(params) == set(whole), "the stage build keeps every name (the rest on meta)"
        built = {name for name, param in params.items() if not param.is_meta}
        assert built == _expected_names(rank, tied=tied, learned=position != "rope"), rank
        for name in built:
            assert torch.equal(params[name], whole[name]), f"rank {rank}: {name} differs"


def test_two_models_built_in_a_row_differ_and_a_seed_repeats_them() -> None:
    torch.manual_seed(0)
    first, second = build_gpt(gpt_config(), None), build_gpt(gpt_config(), None)
    torch.manual_seed(0)
    again = build_gpt(gpt_config(), None)
    assert not torch.equal(first.embedding.weight, second.embedding.weight)
    assert torch.equal(first.embedding.weight, again.embedding.weight)
    layer0 = dict(first.named_parameters())["decoder.layers.0.mlp.linear_fc1.weight"]
    layer1 = dict(first.named_parameters())["decoder.layers.1.mlp.linear_fc1.weight"]
    assert not torch.equal(layer0, layer1), "each layer draws from its own stream"


# Builds pipeline rank 1 of 4 (layers 2 and 3 of 8) of a wide float32 model: about 670 MiB
# whole (8 layers of 50 MiB, two 128 MiB vocabulary matrices), 100 MiB for the stage.
_BUILD_ONE_STAGE = textwrap.dedent("""
    import json, resource, sys, torch
    from protoformer import TransformerConfig
    from protoformer.backends import get_backend
    from protoformer.models import GPTModel
    from protoformer.models.stage_parts import StageParts
    from protoformer.recipes import gpt_layer_spec

    def peak_bytes():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB

    config = TransformerConfig(num_layers=8, hidden_size=1024, num_attention_heads=8,
                               ffn_hidden_size=4096, add_bias_linear=False)
    spec = gpt_layer_spec(get_backend("local"), config)
    small = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2)
    GPTModel(small, gpt_layer_spec(get_backend("local"), small), 16, 8)  # warm the imports
    before = peak_bytes()
    parts = StageParts(frozenset({2, 3}), pre_process=False, post_process=False)
    model = GPTModel(config, spec, 32768, 64, parts=parts)
    built = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"growth": peak_bytes() - before, "built": built, "whole": whole}))
""")


def test_building_one_pipeline_stage_never_allocates_the_whole_model() -> None:
    result = subprocess.run([sys.executable, "-c", _BUILD_ONE_STAGE], capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    sizes = json.loads(result.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    assert sizes["whole"] > 600 * mib and 95 * mib < sizes["built"] < 110 * mib, sizes
    # The stage's own weights (plus allocator slack), far below the whole model's bytes.
    assert sizes["growth"] < sizes["built"] + 100 * mib, sizes
