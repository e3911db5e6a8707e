"""Which parts of a `GPTModel` a process builds: a pipeline rank builds only its own stages.

Megatron-Core's `pre_process` / `post_process` flags plus the layers of the rank's stages.
The parts left out are built on the meta device (shapes and names only: no memory, no
initialisation), so a model too large for one device can be built one stage per rank. Each
part is initialised from its own random stream (`protoformer.initialization.fork_init_rng`),
so the parts a rank builds hold exactly the weights the whole model built on one process with
the same seed holds.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StageParts"]


@dataclass(frozen=True)
class StageParts:
    """The parts of a model to allocate and initialise; the others stay on the meta device."""

    layers: frozenset[int]
    """0-based global indices of the decoder layers to build."""
    pre_process: bool
    """Build the input side: the token (and learned position) embedding."""
    post_process: bool
    """Build the output side: the final norm and the output layer (with tied embeddings, a copy
    of the token embedding the output layer reads)."""

    def builds_embedding(self, *, tied: bool) -> bool:
        """Whether the token embedding is built: on the first stage, and with `tied` output
        and input embeddings on the last stage too (the output layer's weight)."""
        return self.pre_process or (tied and self.post_process)

    def embedding_tables(self, *, tied: bool) -> int:
        """How many vocabulary-sized matrices these parts hold (the embedding, the output
        layer's weight)."""
        return int(self.builds_embedding(tied=tied)) + int(self.post_process and not tied)
