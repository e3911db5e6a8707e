"""Review finding: `override` promises SpecError for any bad value, but a deeply nested JSON
value escaped as RecursionError (from the JSON parser, or from the checks after it)."""

from __future__ import annotations

import pytest

from protoformer.backends import get_backend
from protoformer.recipes import get_preset
from protoformer.spec import SpecError, Submodules, override


def _spec() -> Submodules:
    preset = get_preset("tiny")
    spec = preset.layer_spec(get_backend("local"), preset.config_factory())
    assert isinstance(spec, Submodules)
    return spec


@pytest.mark.parametrize("assignment", [
    "self_attention.submodules.core_attention=" + '{"a":' * 100_000 + "1" + "}" * 100_000,
    "self_attention.attn_mask_type=" + "[" * 100_000 + "]" * 100_000,
])
def test_a_deeply_nested_override_value_is_a_spec_error(assignment: str) -> None:
    with pytest.raises(SpecError, match="nested too deeply"):
        override(_spec(), assignment)


def test_a_moderately_nested_value_is_a_spec_error_on_every_python() -> None:
    # 900 levels: Python 3.11's JSON parser runs out of recursion ("nested too deeply"), 3.12's
    # parses it and the value is then refused as no attn_mask_type; a SpecError either way.
    with pytest.raises(SpecError, match=r"override 'self_attention\.attn_mask_type="):
        override(_spec(), "self_attention.attn_mask_type=" + "[" * 900 + "]" * 900)
