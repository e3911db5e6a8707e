"""The models `train_step.py` and `decode.py` compare, built at one `--shape` with the same
weights: protoformer's Llama-style `GPTModel` on the fused backend (optionally with its
layers compiled by `protoformer.models.compile_layers`) and Hugging Face `LlamaForCausalLM`
peers (sdpa; each decoder layer `.compile()`d; Liger kernels applied).

`DEVICE` is where they are built (the scripts set it from `--device`; cpu only smoke-tests).
"""

from __future__ import annotations

import argparse
import gc

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from protoformer import TransformerConfig
from protoformer.backends.fused import FusedSpecProvider, fused_config
from protoformer.interop.hf import to_hf
from protoformer.models import GPTModel, compile_layers
from protoformer.recipes import gpt_layer_spec

DEVICE = torch.device("cuda")  # `--device cpu` (tiny shapes) only smoke-tests this script

# name -> (vocab, layers, hidden, heads, groups, ffn, rope base)
SHAPES: dict[str, tuple[int, int, int, int, int, int, float]] = {
    "llama3.2-1b": (128256, 16, 2048, 32, 8, 8192, 500000.0),  # untied output layer here
    "tinyllama": (32000, 22, 2048, 32, 4, 5632, 10000.0),
    "llama3-8b-layers": (128256, 4, 4096, 32, 8, 14336, 500000.0),  # 4 of 32 layers
}


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()



def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """`--shape` and per-field overrides (`--layers`, `--hidden`, ...) read by `llama_1b_config`."""
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3.2-1b")
    for name in ("vocab", "layers", "hidden", "heads", "groups", "ffn"):
        parser.add_argument(f"--{name}", type=int, default=None,
                            help=f"override the --shape's {name}")


def llama_1b_config(args: argparse.Namespace) -> TransformerConfig:
    """The `--shape` (default Llama-3.2-1B) as a bf16 Llama config; sets `args.vocab`."""
    vocab, layers, hidden, heads, groups, ffn, base = SHAPES[args.shape]
    args.vocab = args.vocab or vocab
    return TransformerConfig(
        num_layers=args.layers or layers, hidden_size=args.hidden or hidden,
        num_attention_heads=args.heads or heads, num_query_groups=args.groups or groups,
        ffn_hidden_size=args.ffn or ffn, normalization="RMSNorm", layernorm_epsilon=1e-5,
        add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
        attention_dropout=0.0, hidden_dropout=0.0, rotary_base=base,
        params_dtype=torch.bfloat16, bf16=True,
    )


def build_protoformer(config: TransformerConfig, vocab: int, max_len: int,
                      kernels: tuple[str, ...] = ("cudnn", "flash", "efficient")) -> GPTModel:
    backend = FusedSpecProvider(attention_kernels=kernels)  # type: ignore[arg-type]
    fast = fused_config(config)
    with DEVICE:
        model = GPTModel(fast, gpt_layer_spec(backend, fast), vocab, max_len)
    return model


def compile_protoformer(model: GPTModel) -> int:
    """Regional compilation (`compile_layers`): the layers compiled, 0 where it cannot work.

    Static shapes: each `--batch` compiles its own graph, as a run at a fixed batch would."""
    return compile_layers(model, dynamic=False)


def build_hf(config: TransformerConfig, vocab: int, max_len: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        hidden_size=config.hidden_size, intermediate_size=config.ffn_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.query_groups, head_dim=config.head_dim, vocab_size=vocab,
        max_position_embeddings=max_len, rms_norm_eps=config.layernorm_epsilon,
        rope_theta=config.rotary_base, tie_word_embeddings=False, attention_bias=False,
        mlp_bias=False, hidden_act="silu", attention_dropout=0.0,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,  # random weights: no stop token
    )
    with DEVICE:
        model: nn.Module = LlamaForCausalLM._from_config(
            hf_config, attn_implementation="sdpa", dtype=torch.bfloat16)
    return model


def copy_weights(ours: GPTModel, hf: nn.Module) -> str:
    load_hf_state(hf, {k: v.detach().clone() for k, v in to_hf(ours).items()})
    return "protoformer.interop.hf.to_hf"


def load_hf_state(hf: nn.Module, state: dict[str, Tensor]) -> None:
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise RuntimeError(f"weight copy incomplete: missing {missing}, unexpected {unexpected}")


@torch.no_grad()
def logits_agreement(ours: nn.Module, hf: nn.Module, ids: Tensor) -> float:
    a = ours(ids).float()
    b = hf(input_ids=ids).logits.float()
    return float((a - b).norm() / b.norm())



def make_hf_peer(model: nn.Module, kind: str) -> nn.Module:
    """`hf-sdpa` as built, `hf-compiled` (each decoder layer `.compile()`d) or `hf-liger`
    (`apply_liger_kernel_to_llama`: RoPE, RMSNorm, SwiGLU, fused linear cross-entropy)."""
    if kind == "hf-compiled":
        for layer in model.model.layers:
            layer.compile()
    elif kind == "hf-liger":
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True, model=model)
    elif kind != "hf-sdpa":
        raise ValueError(f"unknown Hugging Face peer {kind!r}")
    return model
