"""GraphMAE's node masking ("GraphMAE: Self-Supervised Masked Graph Autoencoders").

A fraction `ratio` of a graph's real nodes is hidden, exactly `hidden_count(N, ratio)`
of them, chosen uniformly. Unlike MAE, the encoder reads every node: a GNN needs the
hidden nodes in the graph for messages to pass through them, so their features are
corrupted instead of dropped (`encoder_reads_hidden`). Of the hidden nodes,
`int(replace_rate * hidden)` take the features of another node of the same graph,
drawn uniformly from all its nodes (GraphMAE's "random-substitution" share, which keeps
the encoder from learning that an all-mask-token input marks a target); the others
enter as the learnable mask token (Mask.substitute: AS_MASK_TOKEN, or the index of the
node whose features they take). Every hidden node is a reconstruction target.
"""
from __future__ import annotations

import numpy as np
import torch

from polymae.shared.masking import Masker
from polymae.shared.registry import MASKERS
from polymae.shared.tokens import AS_ITSELF, AS_MASK_TOKEN, Mask, Tokens, hidden_count


@MASKERS.register("graphmae")
class GraphMAEMasker(Masker):
    encoder_reads_hidden = True

    def __init__(self, ratio: float = 0.5, replace_rate: float = 0.05):
        super().__init__(ratio)
        if not 0.0 <= replace_rate <= 1.0:
            raise ValueError(f"replace_rate must lie in [0, 1], got {replace_rate}")
        self.replace_rate = replace_rate

    def scores(self, tokens, generator):
        return torch.rand(tokens.num_tokens, generator=generator)

    def __call__(self, tokens: Tokens, generator: torch.Generator, num_hidden: int | None = None) -> Mask:
        real = tokens.num_real
        if num_hidden is None:
            num_hidden = hidden_count(real, self.ratio)
        if tokens.valid is not None:
            mask = Mask.from_scores(self.scores(tokens, generator), num_hidden, tokens.valid, encoder_reads_hidden=True)
            chosen = mask.hidden.numpy()
        else:  # what from_scores gives here, in numpy: a sample's graph is tens of nodes, where each torch op's
            # overhead was the cost (masking a solubility molecule: 285 -> 64 us, benchmarks/graph_step.py)
            n = tokens.num_tokens
            order = np.argsort(self.scores(tokens, generator).numpy(), kind="stable")  # as torch's stable argsort
            chosen = np.zeros(n, dtype=bool)
            chosen[order[real - num_hidden:real]] = True
            inputs = torch.arange(n)  # every node an encoder input, in its order
            mask = Mask(hidden=torch.from_numpy(chosen), ids_shuffle=inputs, ids_restore=inputs, num_visible=real)
        hidden = np.flatnonzero(chosen)[torch.randperm(int(chosen.sum()), generator=generator).numpy()]
        num_replaced = int(self.replace_rate * len(hidden))
        substitute = np.full(tokens.num_tokens, AS_ITSELF, dtype=np.int64)
        substitute[hidden[num_replaced:]] = AS_MASK_TOKEN
        if num_replaced:  # another node's features; real nodes come first in a sample's own layout
            substitute[hidden[:num_replaced]] = torch.randint(0, real, (num_replaced,), generator=generator).numpy()
        mask.substitute = torch.from_numpy(substitute)
        return mask

    def __repr__(self) -> str:
        return f"GraphMAEMasker(ratio={self.ratio}, replace_rate={self.replace_rate})"
