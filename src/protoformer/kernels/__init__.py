"""Fast paths for GPUs: Triton kernels and wrappers around optional kernel libraries.

Every public function here computes the same thing as the plain-PyTorch reference it
replaces and runs everywhere: on a CUDA tensor it uses a fused kernel when one is available
(Triton for rotary embedding; liger-kernel, the optional extra `protoformer[liger]`, for
RMSNorm, SwiGLU and the fused linear + cross-entropy), and otherwise a plain-PyTorch
computation of the same function, so a CPU run exercises the same wiring.

The optional dependencies are imported lazily, inside functions, and probed once
(`kernels.probe`): importing this package needs only torch.
"""

from protoformer.kernels.linear_cross_entropy import fused_linear_cross_entropy
from protoformer.kernels.norm import fused_rms_norm
from protoformer.kernels.probe import liger_available, triton_available
from protoformer.kernels.rope import fused_apply_rotary_pos_emb
from protoformer.kernels.swiglu import fused_swiglu

__all__ = [
    "fused_apply_rotary_pos_emb",
    "fused_linear_cross_entropy",
    "fused_rms_norm",
    "fused_swiglu",
    "liger_available",
    "triton_available",
]
