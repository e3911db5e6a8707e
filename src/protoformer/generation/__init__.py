"""Text generation: KV-cache decoding, batched prompts, and a CUDA-graph decode step.

- `generate` continues one prompt (sampling, streaming, stop tokens);
- `generate_batch` continues several prompts of different lengths together;
- `generate_seq2seq` is the encoder-decoder (T5) counterpart of `generate`;
- `GraphDecoder` / `greedy_generate`: batched greedy decoding whose step is the model's
  static-shape forward, captured once as a CUDA graph and replayed for every token.
"""

from protoformer.generation.generate import generate, generate_batch, generate_seq2seq
from protoformer.generation.graph_decoder import GraphDecoder, greedy_generate, pad_prompts
from protoformer.generation.sampling import sample_next_token

__all__ = [
    "GraphDecoder",
    "generate",
    "generate_batch",
    "generate_seq2seq",
    "greedy_generate",
    "pad_prompts",
    "sample_next_token",
]
