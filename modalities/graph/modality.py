"""The graph modality: graph records -> node tokens with edges -> GraphMAE.

decode    the record's `graph.npz` (adapters.decode_graph: arrays checked, no pickles)
tokenize  nodes are tokens: `values` = node features [N, F]; `edges` [2, E] (local node
          indices; the batch offsets them into its padded layout, b * N_max + i, so a
          GNN and a transformer read the same batch); `edge_fields` "weight" [E] and
          "attr" [E, D] where the record has them; field "readout" (a node-level
          sample's seed nodes, what its feature vector is read from). `coords` are a
          structural position encoding for the transformer encoder (GNNs ignore them):
          random-walk return probabilities diag(P^1..P^k) of P = D^-1 A ("rwse"), or the
          first k non-trivial eigenvectors of the normalised Laplacian ("laplacian", signs
          flipped at random in training, as their sign is arbitrary), or nothing ("none").
model     `model.encoder: gat | gin | gcn` (modalities/graph/model.py: GraphMAE's GNN
          encoder, re-mask and one-layer GNN decoder), or `vit`: the shared transformer over
          node tokens, its position encoding an MLP of those coords, hidden nodes entering
          as its mask token and re-masked before a transformer decoder
objective GraphMAE's scaled cosine error (`cosine`, alpha 2) on the hidden nodes
render    each graph laid out by networkx, hidden nodes ringed, coloured by the cosine
          similarity of their reconstructed to their true features
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw

from polymae.shared.errors import BadInput, ConfigError
from polymae.shared.model import DecoderConfig, InputAdapter, ModelConfig, TransformerDecoder
from polymae.shared.modality import Modality
from polymae.shared.registry import MODALITIES
from polymae.shared.tokens import Tokens

from . import adapters
from . import masking as _masking  # noqa: F401  (registers "graphmae")
from . import model as _model  # noqa: F401  (registers the gat, gin and gcn encoders)

STRUCTURES = ("rwse", "laplacian", "none")


@dataclass
class GraphOptions:
    features: int | None = None        # node feature width; None: read from the first train record
    edge_features: int | None = None   # edge_attr width; None: read alike (0: the records have none)
    structure: str = "rwse"            # coords for the transformer encoder: rwse | laplacian | none
    structure_dims: int = 8
    require_edges: bool = False        # graphs of isolated nodes only are BadInput no_edges
    # reading sources (`polymae shard graph SOURCE`)
    level: str | None = None           # graph | node (None: the source's default)
    hops: int = 1                      # node level: the k of the k-hop subgraph around a seed
    max_nodes: int = 64                # node level: at most this many nodes per subgraph
    label_field: str | None = None     # .sdf: the property holding the label

    def __post_init__(self):
        if self.structure not in STRUCTURES:
            raise ConfigError(f"modality_options.structure must be one of {', '.join(STRUCTURES)}; "
                              f"got {self.structure!r}")
        if self.structure_dims < 1 or self.hops < 0 or self.max_nodes < 1:
            raise ConfigError("modality_options: structure_dims and max_nodes must be >= 1, hops >= 0")


@MODALITIES.register("graph")
class GraphModality(Modality):
    name = "graph"
    payload_keys = (adapters.PAYLOAD,)
    Options = GraphOptions
    default_masker = "graphmae"
    default_objective = {"sce": {"term": "cosine", "alpha": 2.0}}
    default_decoder = "transformer"

    def __init__(self, options: dict | None = None, **kwargs):
        super().__init__(options, **kwargs)
        self._features, self._edge_features = self.options.features, self.options.edge_features

    # -- adapters ---------------------------------------------------------
    def sources(self):
        return dict(adapters.BUILTIN_SOURCES)

    def read_source(self, source, **kwargs):
        o = self.options
        return adapters.read_source(source, level=o.level, hops=o.hops, max_nodes=o.max_nodes,
                                    label_field=o.label_field)

    def decode(self, sample) -> dict[str, torch.Tensor]:
        key, data = self.payload(sample)
        return adapters.decode_graph(data, f"{sample.get('__key__', '?')}.{key}", self.options.require_edges)

    def prepare(self, shard_folder: Path, records: Callable[[], Iterator[dict]]) -> None:
        """Read the node (and edge) feature widths off the first good train record."""
        if self._features is not None and self._edge_features is not None:
            return
        for sample in records():
            try:
                graph = self.decode(sample)
            except BadInput:
                continue
            self._features = self._features or graph["x"].shape[1]
            if self._edge_features is None:
                self._edge_features = graph["edge_attr"].shape[1] if "edge_attr" in graph else 0
            return

    # -- tokenizer --------------------------------------------------------
    def tokenize(self, payload: dict[str, torch.Tensor], generator: torch.Generator, train: bool = True) -> Tokens:
        x, edges = payload["x"].float(), payload["edge_index"].long()
        if self._features is not None and x.shape[1] != self._features:
            raise BadInput("graph", f"has {x.shape[1]} node features, the model reads {self._features}",
                           "bad_features")
        edge_fields = {}
        if "edge_weight" in payload:
            edge_fields["weight"] = payload["edge_weight"].float()
        if "edge_attr" in payload:
            edge_fields["attr"] = payload["edge_attr"].float()
        fields = {"readout": payload["readout"].bool()} if "readout" in payload else {}
        return Tokens(values=x, coords=self.structure(x.shape[0], edges, generator, train), edges=edges,
                      edge_fields=edge_fields, fields=fields)

    def structure(self, n: int, edges: torch.Tensor, generator: torch.Generator, train: bool) -> torch.Tensor:
        """[N, structure_dims] structural coords (see the module docstring)."""
        k = self.options.structure_dims
        if self.options.structure == "none":
            return torch.zeros(n, 1)
        if self.options.structure == "rwse":
            return random_walk_coords(n, edges, k)
        adjacency = torch.zeros(n, n)
        if edges.numel():
            adjacency[edges[0], edges[1]] = 1.0
            adjacency = torch.maximum(adjacency, adjacency.T)
        degree = adjacency.sum(1)
        scale = degree.clamp_min(1).rsqrt()
        laplacian = torch.eye(n) - scale[:, None] * adjacency * scale[None, :]
        _, vectors = torch.linalg.eigh(laplacian.double())
        vectors = vectors[:, 1:k + 1].float()  # the first is the trivial one
        if train:
            vectors = vectors * (torch.randint(0, 2, (vectors.shape[1],), generator=generator) * 2 - 1)
        return torch.nn.functional.pad(vectors, (0, k - vectors.shape[1]))

    @property
    def d_in(self) -> int:
        if self._features is None:
            raise ConfigError("the graph stream does not know its node feature width yet: set "
                              "modality_options.features, or train on a local shard folder (it is read off the "
                              "first record)")
        return self._features

    @property
    def edge_dim(self) -> int:
        return self._edge_features or 0

    @property
    def num_coords(self) -> int:
        return 1 if self.options.structure == "none" else self.options.structure_dims

    # -- the shared transformer path ----------------------------------------
    def input_adapter(self, width: int, config: ModelConfig) -> InputAdapter:
        """Node features embedded, plus an MLP of the structural coords (a sin-cos table of a
        return probability would mean nothing); hidden nodes enter as its mask token."""
        return InputAdapter(self.d_in, width, self.num_coords, "mlp", kernels=config.kernels, mask_token=True)

    def decoder(self, decoder: DecoderConfig, encoder_width: int, config: ModelConfig):
        kind = decoder.kind or self.default_decoder
        if kind != "transformer":
            return super().decoder(decoder, encoder_width, config)
        return TransformerDecoder(encoder_width, self.d_in, self.num_coords, config, decoder, position="mlp",
                                  remask=True)

    # -- pictures -----------------------------------------------------------
    def render(self, tokens: Tokens, hidden: torch.Tensor, pred: torch.Tensor, rows: int = 8) -> Image.Image:
        """Up to `rows` graphs side by side (4 per row): networkx's spring layout, visible
        nodes grey, hidden nodes ringed in black and filled by the cosine similarity of their
        reconstruction to their true features (red -1 .. yellow 0 .. green 1)."""
        import networkx as nx

        count = min(rows, tokens.values.shape[0])
        size, per_row, legend = 220, 4, 30
        columns = min(count, per_row)
        picture = Image.new("RGB", (size * columns, size * -(-count // per_row) + legend), "white")
        draw = ImageDraw.Draw(picture)
        n_max = tokens.values.shape[1]
        offsets = torch.arange(tokens.values.shape[0]) * n_max  # the batch's edges index its padded layout
        cosine = torch.nn.functional.cosine_similarity(pred.float(), tokens.values.float(), dim=-1)
        for row in range(count):
            real = int(tokens.valid[row].sum()) if tokens.valid is not None else n_max
            local = tokens.edges - offsets[row] if tokens.edges is not None else torch.zeros(2, 0, dtype=torch.long)
            own = ((local >= 0) & (local < real)).all(0)
            g = nx.Graph()
            g.add_nodes_from(range(real))
            g.add_edges_from(local[:, own].T.tolist())
            layout = nx.spring_layout(g, seed=0)
            left, top = (row % per_row) * size, (row // per_row) * size
            place = {n: (left + 15 + (p[0] + 1) / 2 * (size - 30), top + 15 + (p[1] + 1) / 2 * (size - 30))
                     for n, p in layout.items()}
            for u, v in g.edges:
                draw.line([place[u], place[v]], fill=(190, 190, 190), width=1)
            readout = tokens.fields.get("readout")
            for n in range(real):
                x, y = place[n]
                r = 6 if readout is not None and bool(readout[row, n]) else 4
                if bool(hidden[row, n]):
                    draw.ellipse([x - r - 2, y - r - 2, x + r + 2, y + r + 2], fill=(0, 0, 0))
                    draw.ellipse([x - r, y - r, x + r, y + r], fill=similarity_colour(float(cosine[row, n])))
                else:
                    draw.ellipse([x - r, y - r, x + r, y + r], fill=(150, 150, 150))
            hidden_real = hidden[row, :real]
            mean = float(cosine[row, :real][hidden_real].mean()) if bool(hidden_real.any()) else float("nan")
            draw.text((left + 4, top + 2), f"{real} nodes, {int(hidden_real.sum())} hidden, cos {mean:.2f}",
                      fill=(0, 0, 0))
        bottom = picture.height - legend + 8
        draw.text((4, bottom), "grey: visible   ringed: hidden, filled by cos(reconstruction, truth): "
                  "red -1, yellow 0, green 1   large: the sample's seed node", fill=(0, 0, 0))
        return picture


def random_walk_coords(n: int, edges: torch.Tensor, k: int) -> torch.Tensor:
    """[n, k] float32 random-walk return probabilities diag(P^1..P^k), P = D^-1 A of the
    symmetrised adjacency. In numpy: a sample's graph is tiny (tens of nodes) and torch hands
    each matmul to MKL's thread pool, which costs far more than the product (a 24x24 one: 115 us
    on 2 busy cores, 4.5 us on one thread; numpy's OpenBLAS runs it in the calling thread), so
    tokenizing the solubility molecules took 13x longer (benchmarks/graph_step.py). The same
    float32 maths (no k-th product that nothing reads); a value may differ from torch's in its last bit."""
    adjacency = np.zeros((n, n), dtype=np.float32)
    if edges.numel():
        index = edges.numpy()
        adjacency[index[0], index[1]] = 1.0
        adjacency = np.maximum(adjacency, adjacency.T)
    walk = adjacency / np.maximum(adjacency.sum(1), 1)[:, None]
    out, power = np.empty((n, k), dtype=np.float32), walk
    for step in range(k):
        out[:, step] = power.diagonal()
        if step + 1 < k:
            power = power @ walk
    return torch.from_numpy(out)


def similarity_colour(cosine: float) -> tuple[int, int, int]:
    c = max(-1.0, min(1.0, cosine))
    if c < 0:
        return 220, int(220 * (1 + c)), 40
    return int(220 * (1 - c)), 200, 40
