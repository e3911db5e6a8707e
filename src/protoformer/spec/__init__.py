"""The typed-spec core: Builder protocol conformance, Submodules records, module helpers."""

from protoformer.spec.check import SpecError, check_builder, describe_builder
from protoformer.spec.files import dumps_spec, load_spec, loads_spec, save_spec
from protoformer.spec.module import apply_module, not_none
from protoformer.spec.names import DEFAULT_ALLOW
from protoformer.spec.overrides import (
    SpecDifference,
    apply_overrides,
    diff,
    override,
    spec_equal,
)
from protoformer.spec.serialize import from_dict, to_dict
from protoformer.spec.submodules import Submodules, validate_submodules

__all__ = [
    "DEFAULT_ALLOW",
    "SpecDifference",
    "SpecError",
    "Submodules",
    "apply_module",
    "apply_overrides",
    "check_builder",
    "describe_builder",
    "diff",
    "dumps_spec",
    "from_dict",
    "load_spec",
    "loads_spec",
    "not_none",
    "override",
    "save_spec",
    "spec_equal",
    "to_dict",
    "validate_submodules",
]
