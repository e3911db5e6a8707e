"""Transformer layers: norms, rotary embedding, attention, MLA, MLP, layer and block."""
