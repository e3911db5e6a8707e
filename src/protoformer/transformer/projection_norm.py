"""`ProjectionRMSNorm`: a query/key norm over the whole projection (all heads at once), as
OLMoE normalizes `q_proj(x)` and `k_proj(x)` before splitting them into heads.

The per-head norm (`config.qk_layernorm`, Qwen3) normalizes each head's `hn` features; this
one normalizes the `n * hn` features of all heads together, with one scale per feature. It
fills a `q_layernorm`/`k_layernorm` slot like any `LayerNormBuilder`:

    q_layernorm=functools.partial(ProjectionRMSNorm, num_heads=config.num_attention_heads)
    k_layernorm=functools.partial(ProjectionRMSNorm, num_heads=config.num_query_groups)

The statistics span every head, so the heads must be on one rank (no tensor parallelism).
"""

from __future__ import annotations

from torch import Tensor

from protoformer.config import TransformerConfig
from protoformer.transformer.norm import RMSNorm

__all__ = ["ProjectionRMSNorm"]


class ProjectionRMSNorm(RMSNorm):
    """RMSNorm over the `num_heads * head_dim` features of a query or key projection.

    Built with the head size (`hidden_size` = `hn`, as the attention builds its q/k norms);
    `weight [num_heads * hn]`. `forward`: `[..., num_heads, hn]` -> the same shape.
    """

    def __init__(self, hidden_size: int, *, config: TransformerConfig, eps: float = 1e-6,
                 num_heads: int) -> None:
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:  # pyright: ignore[reportUnnecessaryIsInstance]  # user input
            raise ValueError(f"ProjectionRMSNorm(num_heads={num_heads!r}): num_heads must be an "
                             "int >= 1 (the heads of the projection it normalizes)")
        super().__init__(num_heads * hidden_size, config=config, eps=eps)
        self.num_heads = num_heads
        self.head_dim = hidden_size

    def forward(self, x: Tensor) -> Tensor:
        """`[..., num_heads, hn]` -> the same shape and dtype."""
        if x.dim() < 2 or tuple(x.shape[-2:]) != (self.num_heads, self.head_dim):
            raise ValueError(
                f"ProjectionRMSNorm normalizes {self.num_heads} heads of {self.head_dim} together "
                f"but got a tensor of shape {tuple(x.shape)}; it needs every head of the "
                "projection on this rank (tensor parallelism is not supported)")
        flat = x.flatten(-2)  # [..., n * hn]
        return super().forward(flat).view(x.shape)

    def extra_repr(self) -> str:
        return f"{self.num_heads} x {self.head_dim}, eps={self.eps}"
