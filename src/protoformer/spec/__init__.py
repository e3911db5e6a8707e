"""The typed-spec core: Builder protocol conformance, Submodules records, module helpers."""

from protoformer.spec.check import SpecError, check_builder, describe_builder
from protoformer.spec.module import apply_module, not_none
from protoformer.spec.submodules import Submodules, validate_submodules

__all__ = [
    "SpecError",
    "Submodules",
    "apply_module",
    "check_builder",
    "describe_builder",
    "not_none",
    "validate_submodules",
]
