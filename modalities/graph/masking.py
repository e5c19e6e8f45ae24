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

    def __call__(self, tokens: Tokens, generator: torch.Generator, num_hidden: int | None = None) -> Mask:
        n, real = tokens.num_tokens, tokens.num_real
        if num_hidden is None:
            num_hidden = hidden_count(real, self.ratio)
        if not 0 <= num_hidden <= real:
            raise ValueError(f"cannot hide {num_hidden} of {real} nodes")
        # One draw of 2 numbers per node, then numpy: a molecule is tens of nodes, where each torch op's fixed
        # cost was the whole cost (benchmarks/graph_step.py). Per node: its hiding score, and which node's
        # features it takes if it is replaced. The hidden nodes, in score order, are also a uniformly random
        # order of them: its first `replace_rate` share is replaced.
        draws = torch.rand(2, n, generator=generator, dtype=torch.float64).numpy()
        scores, valid = draws[0], None if tokens.valid is None else tokens.valid.numpy()
        if valid is not None:
            scores = np.where(valid, scores, np.inf)  # padding last: never hidden
        hidden = np.argsort(scores, kind="stable")[real - num_hidden:real]
        chosen = np.zeros(n, dtype=bool)
        chosen[hidden] = True
        # every real node is an encoder input, in its own order, then the padding
        inputs = np.arange(n) if valid is None or valid.all() else np.concatenate(
            [np.flatnonzero(valid), np.flatnonzero(~valid)])
        restore = inputs if valid is None or valid.all() else np.argsort(inputs)
        num_replaced = int(self.replace_rate * num_hidden)
        substitute = np.full(n, AS_ITSELF, dtype=np.int64)
        substitute[hidden[num_replaced:]] = AS_MASK_TOKEN
        replaced = hidden[:num_replaced]  # another node's features, uniform over the real nodes
        real_nodes = inputs[:real]
        substitute[replaced] = real_nodes[np.minimum((draws[1, replaced] * real).astype(np.int64), real - 1)]
        return Mask(hidden=torch.from_numpy(chosen), ids_shuffle=torch.from_numpy(inputs),
                    ids_restore=torch.from_numpy(restore), num_visible=real, substitute=torch.from_numpy(substitute))

    def __repr__(self) -> str:
        return f"GraphMAEMasker(ratio={self.ratio}, replace_rate={self.replace_rate})"
