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

The masker reads its generator's seed (`initial_seed()`) and draws nothing from it: a
graph's mask is a function of that seed, which the data stream sets per sample and epoch.
Two calls with one generator give the same mask; seed a generator per sample for others.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from polymae.shared.masking import Masker, counter_uniforms
from polymae.shared.registry import MASKERS
from polymae.shared.tokens import AS_ITSELF, AS_MASK_TOKEN, Mask, Tokens, hidden_count


class Drawn(NamedTuple):
    """A group's masks on its nodes concatenated (per node, in graph order)."""
    sizes: np.ndarray        # nodes per graph
    real: np.ndarray         # real nodes per graph
    graph: np.ndarray        # each node's graph
    first: np.ndarray        # each node's graph's first node
    hidden: np.ndarray
    substitute: np.ndarray
    ids_shuffle: np.ndarray  # within its graph
    ids_restore: np.ndarray
    identity: bool           # no padding anywhere: every graph's order is the identity


@MASKERS.register("graphmae")
class GraphMAEMasker(Masker):
    modalities = ("graph",)
    encoder_reads_hidden = True

    def __init__(self, ratio: float = 0.5, replace_rate: float = 0.05):
        super().__init__(ratio)
        if not 0.0 <= replace_rate <= 1.0:
            raise ValueError(f"replace_rate must lie in [0, 1], got {replace_rate}")
        self.replace_rate = replace_rate

    def __call__(self, tokens: Tokens, generator: torch.Generator, num_hidden: int | None = None) -> Mask:
        return self.many([tokens], [generator], None if num_hidden is None else [num_hidden])[0]

    def many(self, tokens: list[Tokens], generators: list[torch.Generator],
             num_hidden: list[int] | None = None) -> list[Mask]:
        drawn = self.draw(tokens, generators, num_hidden)
        split = drawn.sizes.tolist()
        hidden, substitute, ids_shuffle = (torch.from_numpy(part).split(split)
                                           for part in (drawn.hidden, drawn.substitute, drawn.ids_shuffle))
        # without padding every graph's order is the identity, its own inverse: one tensor for both
        ids_restore = ids_shuffle if drawn.identity else torch.from_numpy(drawn.ids_restore).split(split)
        return [Mask(hidden=h, ids_shuffle=order, ids_restore=restore, num_visible=r, substitute=sub)
                for h, order, restore, sub, r in zip(hidden, ids_shuffle, ids_restore, substitute, drawn.real.tolist())]

    def stacked(self, tokens: list[Tokens], generators: list[torch.Generator],
                num_hidden: list[int] | None = None) -> Mask:
        """The batch's masks as `collate` stacks them, written straight into [B, N_max] arrays: no
        mask per graph to make and copy again (a third of the batching time of small molecules)."""
        drawn = self.draw(tokens, generators, num_hidden)
        b, width = len(tokens), int(drawn.sizes.max(initial=0))
        row, column = drawn.graph, np.arange(len(drawn.graph)) - drawn.first
        hidden = np.zeros((b, width), dtype=bool)
        substitute = np.full((b, width), AS_ITSELF, dtype=np.int64)
        ids_shuffle = np.tile(np.arange(width), (b, 1))  # padding last, at its own index
        hidden[row, column], substitute[row, column], ids_shuffle[row, column] = (drawn.hidden, drawn.substitute,
                                                                                 drawn.ids_shuffle)
        ids_restore = ids_shuffle.copy()
        ids_restore[row, column] = drawn.ids_restore
        real = drawn.real.tolist()
        keep_valid = None if len(set(real)) < 2 else torch.arange(max(real))[None, :] < torch.tensor(real)[:, None]
        return Mask(hidden=torch.from_numpy(hidden), ids_shuffle=torch.from_numpy(ids_shuffle),
                    ids_restore=torch.from_numpy(ids_restore), num_visible=max(real, default=0),
                    keep_valid=keep_valid, substitute=torch.from_numpy(substitute))

    def draw(self, tokens: list[Tokens], generators: list[torch.Generator], num_hidden: list[int] | None) -> "Drawn":
        """The group's graphs masked at once, on their nodes concatenated: a molecule is tens of
        nodes, where one graph at a time each op's fixed cost was the whole cost (73 us a molecule,
        against 58 us for all of PyG's batching; benchmarks/graph_step.py). Each graph's mask is
        still a function of its own generator's seed only: the same alone as in any group.

        Per node, two uniform numbers from its graph's seed and its index (`counter_uniforms`: the
        masker reads its record generator's seed and draws nothing from it): its hiding score,
        and which node's features it takes if it is replaced. A graph's `hidden_count`
        highest-scoring real nodes are hidden;
        in score order they are also a uniformly random order of them, and the first
        `replace_rate` share of that order is replaced."""
        sizes = np.array([t.values.shape[0] for t in tokens], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        total = int(sizes.sum())
        graph = np.repeat(np.arange(len(tokens)), sizes)  # each node's graph, and its graph's first node
        first = starts[graph]
        node = np.arange(total)
        seeds = np.array([g.initial_seed() for g in generators], dtype=np.uint64)[graph]
        local = (node - first).astype(np.uint64)
        scores, picks = counter_uniforms(seeds, 2 * local), counter_uniforms(seeds, 2 * local + np.uint64(1))
        valid = np.concatenate([t.valid.numpy() if t.valid is not None else np.ones(t.num_tokens, dtype=bool)
                                for t in tokens]) if any(t.valid is not None for t in tokens) else None
        real = sizes if valid is None else np.bincount(graph[valid], minlength=len(tokens))
        hide = hidden_count(real, self.ratio) if num_hidden is None else np.asarray(num_hidden, dtype=np.int64)
        for i in np.flatnonzero((hide < 0) | (hide > real)):
            raise ValueError(f"cannot hide {hide[i]} of {real[i]} nodes")
        # every real node is an encoder input, in its own order, then the padding
        inputs = node if valid is None else np.lexsort((~valid, graph))
        rank_of_input = np.empty(total, dtype=np.int64)
        rank_of_input[inputs] = node - first
        if valid is not None:
            scores = np.where(valid, scores, np.inf)  # padding last: never hidden
        rank = np.empty(total, dtype=np.int64)
        rank[np.lexsort((scores, graph))] = node - first  # a stable sort per graph: ties by node order
        lowest_hidden = (real - hide)[graph]
        hidden = (rank >= lowest_hidden) & (rank < real[graph])
        replaced = hidden & (rank < lowest_hidden + (self.replace_rate * hide).astype(np.int64)[graph])
        substitute = np.full(total, AS_ITSELF, dtype=np.int64)
        substitute[hidden] = AS_MASK_TOKEN
        # a replaced node takes a uniformly drawn real node's features: the k-th encoder input
        k = np.minimum((picks[replaced] * real[graph[replaced]]).astype(np.int64), real[graph[replaced]] - 1)
        substitute[replaced] = inputs[first[replaced] + k] - first[replaced]
        return Drawn(sizes, real, graph, first, hidden, substitute, inputs - first, rank_of_input, valid is None)

    def __repr__(self) -> str:
        return f"GraphMAEMasker(ratio={self.ratio}, replace_rate={self.replace_rate})"
