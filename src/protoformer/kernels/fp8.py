"""FP8 training matmuls through torchao's float8 recipes (`config.fp8`).

`fp8_linear(x, weight, bias, recipe)` computes `F.linear(x, weight, bias)` with the matmuls of
the forward pass and both gradients in float8 (e4m3 for inputs and weights, e5m2 for output
gradients), dynamically scaled as torchao's recipe of that name does:

- `"tensorwise"`: one scale per tensor, cuBLAS's float8 matmul;
- `"rowwise"`: one scale per row (per column for the right-hand side), more accurate.

The weights, gradients and optimizer state stay in the parameters' dtype; only the matmul
operands are cast, inside the autograd function torchao's `Float8Linear` runs (the same one
torchtitan's float8 training uses). It applies on CUDA GPUs with float8 matmuls (compute
capability >= 8.9: Ada, Hopper) when torchao (`pip install protoformer[fp8]`) imports, and
when both sizes of the weight are multiples of 16 (torchao's requirement); anywhere else
the plain `F.linear` runs. The probe imports torchao once, only when CUDA is present, so CPU
runs never import it. Compiling the layers (`torch.compile`) fuses the scaling and casting
kernels; eager float8 pays for them separately.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from protoformer.config import Fp8Recipe

__all__ = ["fp8_linear", "fp8_training_available"]


class _Float8Matmul(Protocol):
    @staticmethod
    def apply(input_hp: Tensor, weight_hp_t: Tensor, linear_mm_config: object,
              config: object, /) -> Tensor: ...


@functools.cache
def fp8_training_available() -> bool:
    """True on a CUDA GPU with float8 matmuls (sm >= 8.9) where torchao's float8 training imports."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        return False
    try:
        module = importlib.import_module("torchao.float8.float8_linear")
    except ImportError:
        return False
    except Exception as error:  # a broken install (version mismatch with torch)
        warnings.warn(f"torchao is installed but failed to import ({error!r}); config.fp8 "
                      "falls back to the compute dtype", RuntimeWarning, stacklevel=2)
        return False
    return hasattr(module, "matmul_with_hp_or_float8_args") and hasattr(module, "Float8Linear")


@functools.cache
def _recipe(recipe: Fp8Recipe) -> tuple[_Float8Matmul, object, object]:
    """(torchao's float8 matmul function, its matmul config, the recipe's config), built once."""
    float8_linear = importlib.import_module("torchao.float8.float8_linear")
    float8_config = importlib.import_module("torchao.float8.config")
    config = float8_config.Float8LinearConfig.from_recipe_name(recipe)
    # A Float8Linear on the meta device derives the matmul settings from the recipe exactly
    # as torchao's own module swap would; only its two config objects are kept.
    shell = float8_linear.Float8Linear.from_float(
        torch.nn.Linear(16, 16, bias=False, device="meta"), config=config)
    function = cast("_Float8Matmul", float8_linear.matmul_with_hp_or_float8_args)
    return function, shell.linear_mm_config, shell.config


def fp8_linear(x: Tensor, weight: Tensor, bias: Tensor | None, recipe: Fp8Recipe) -> Tensor:
    """`x @ weight.T + bias` (`[..., in]` -> `[..., out]`) with float8 matmuls where they apply."""
    out_features, in_features = weight.shape
    if not (x.is_cuda and in_features % 16 == 0 and out_features % 16 == 0
            and fp8_training_available()):
        return F.linear(x, weight, bias)
    if torch.is_autocast_enabled():  # torchao's Float8Linear does the same
        x = x.to(torch.get_autocast_dtype("cuda"))
    function, mm_config, config = _recipe(recipe)
    output = function.apply(x, weight.t(), mm_config, config)  # [..., out]
    if bias is not None:
        output = output + bias.to(output.dtype)
    return output
