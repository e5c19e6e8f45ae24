"""GraphMAE's model on the shared protocol: a GNN encoder, re-mask, a one-layer GNN decoder.

    node features, hidden nodes corrupted (Mask.substitute: the learnable mask token in
      feature space, or another node's features: modalities/graph/masking.py)
      -> GNN encoder (`model.encoder`: gat | gin | gcn; `depth` layers of width `width`)
      -> a bias-free Linear (GraphMAE's encoder_to_decoder), hidden nodes' codes set to
         zero again (the re-mask: the decoder must rebuild them from their neighbours)
      -> one GNN layer (`encoder_options.decoder`, default the encoder's kind) -> [N, F]

The batch's nodes are padded per sample ([B, N_max]) and its edges index that padded
layout (shared/tokens.py). A GNN runs on the real nodes only, compacted in sample
order, with the edges renumbered: exactly the node layout of a torch_geometric Batch,
so batch norm statistics and messages never see padding. Results are scattered back to
[B, N_max, .] for the loss terms (padding rows zero, never targets).

GraphMAE's defaults: node tasks use GAT (4 heads, PReLU, feature dropout 0.2,
attention dropout 0.1; the decoder one GAT layer with one head); graph tasks use GIN
(each layer an MLP with batch norm, then batch norm and PReLU). The molecules' bond
features enter GIN through GINEConv; scalar edge weights through GCN.
`features(batch)` pools the clean encoder over each sample's readout nodes (a
node-level sample's seed) or over all its nodes (`encoder_options.pool`: mean, max, sum).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from polymae.shared.config import build as build_options
from polymae.shared.errors import ConfigError
from polymae.shared.model import ModelConfig, Outputs
from polymae.shared.registry import ENCODERS
from polymae.shared.tokens import AS_MASK_TOKEN, Batch, Tokens

KINDS = ("gat", "gin", "gcn")
POOLS = ("mean", "max", "sum")


@dataclass
class GNNOptions:
    """`model.encoder_options` of the gat, gin and gcn encoders."""
    decoder: str | None = None      # the one-layer decoder's kind (None: the encoder's)
    dropout: float = 0.2            # feature dropout before each layer (GraphMAE's in_drop)
    attention_dropout: float = 0.1  # GAT
    negative_slope: float = 0.2     # GAT's LeakyReLU
    norm: str | None = None         # batch | layer | None after each encoder layer (GIN: batch)
    residual: bool = False
    pool: str = "mean"              # graph readout for probing: mean | max | sum
    edge_features: bool = True      # read edge_attr (GIN: GINEConv) and edge weights (GCN) where present

    def __post_init__(self):
        if self.decoder is not None and self.decoder not in KINDS:
            raise ConfigError(f"model.encoder_options.decoder must be one of {', '.join(KINDS)}; got {self.decoder!r}")
        if self.pool not in POOLS:
            raise ConfigError(f"model.encoder_options.pool must be one of {', '.join(POOLS)}; got {self.pool!r}")
        if self.norm not in (None, "batch", "layer"):
            raise ConfigError(f"model.encoder_options.norm must be batch, layer or null; got {self.norm!r}")


def conv_layer(kind: str, d_in: int, d_out: int, heads: int, options: GNNOptions, edge_dim: int) -> nn.Module:
    """One message-passing layer of torch_geometric.nn; `d_out` is its whole output width."""
    from torch_geometric import nn as gnn

    if kind == "gat":
        if d_out % heads:
            raise ConfigError(f"a GAT layer of width {d_out} does not split into {heads} heads")
        return gnn.GATConv(d_in, d_out // heads, heads=heads, dropout=options.attention_dropout,
                           negative_slope=options.negative_slope)
    if kind == "gin":
        mlp = nn.Sequential(nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out), nn.PReLU(), nn.Linear(d_out, d_out))
        if edge_dim:
            return gnn.GINEConv(mlp, edge_dim=edge_dim)
        return gnn.GINConv(mlp)
    return gnn.GCNConv(d_in, d_out)


class GraphMaskedAutoencoder(nn.Module):
    """GraphMAE (see the module docstring) on one graph stream."""

    def __init__(self, kind: str, d_in: int, edge_dim: int, config: ModelConfig, options: GNNOptions, stream: str,
                 taps: tuple[int, ...] = ()):
        super().__init__()
        self.config = cfg = config.resolved()
        self.kind, self.options, self.stream = kind, options, stream
        self.edge_dim = edge_dim if options.edge_features else 0
        self.taps = tuple(taps)
        norm = options.norm or ("batch" if kind == "gin" else None)
        self.mask_token = nn.Parameter(torch.zeros(1, d_in))  # in feature space, as GraphMAE's enc_mask_token
        self.dropout = nn.Dropout(options.dropout)
        widths = [d_in] + [cfg.width] * cfg.depth
        self.layers = nn.ModuleList(conv_layer(kind, a, b, cfg.heads, options, self.edge_dim)
                                    for a, b in zip(widths, widths[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(cfg.width) if norm == "batch" else
                                   nn.LayerNorm(cfg.width) if norm == "layer" else nn.Identity()
                                   for _ in self.layers)
        self.activations = nn.ModuleList(nn.PReLU() for _ in self.layers)
        self.encoder_to_decoder = nn.Linear(cfg.width, cfg.width, bias=False)
        self.decoder_kind = options.decoder or kind
        self.decoder = conv_layer(self.decoder_kind, cfg.width, d_in, 1, options, self.edge_dim)
        nn.init.normal_(self.mask_token, std=0.02)

    num_prefix = 0

    @property
    def streams(self) -> list[str]:
        return [self.stream]

    # -- the padded batch <-> PyG's node layout ------------------------------------
    @staticmethod
    def compact(tokens: Tokens) -> tuple[Tensor | None, Tensor, Tensor]:
        """(the real nodes' rows in the flattened [B * N_max] layout or None when all are real,
        the edges renumbered onto the real nodes, each real node's sample index)."""
        b, n = tokens.values.shape[:2]
        device = tokens.values.device
        edges = tokens.edges if tokens.edges is not None else torch.zeros(2, 0, dtype=torch.long, device=device)
        if tokens.valid is None:
            return None, edges, torch.arange(b, device=device).repeat_interleave(n)
        real = tokens.valid.reshape(-1)
        rows = real.nonzero().flatten()
        renumber = torch.cumsum(real, 0) - 1
        return rows, renumber[edges], torch.arange(b, device=device).repeat_interleave(tokens.valid.sum(1))

    def conv(self, kind: str, layer: nn.Module, x: Tensor, edges: Tensor, weight: Tensor | None,
             attr: Tensor | None) -> Tensor:
        """One layer's messages, with the edge features its kind reads (GINE: edge_attr; GCN: weights)."""
        if kind == "gin" and attr is not None and self.edge_dim:
            return layer(x, edges, attr)
        if kind == "gcn" and weight is not None and self.options.edge_features:
            return layer(x, edges, weight)
        return layer(x, edges)

    def run_encoder(self, x: Tensor, edges: Tensor, weight: Tensor | None, attr: Tensor | None
                    ) -> tuple[Tensor, dict[int, Tensor]]:
        taps = {}
        for depth, (layer, norm, act) in enumerate(zip(self.layers, self.norms, self.activations), start=1):
            h = act(norm(self.conv(self.kind, layer, self.dropout(x), edges, weight, attr)))
            x = h + x if self.options.residual and h.shape == x.shape else h
            if depth in self.taps:
                taps[depth] = x
        return x, taps

    @staticmethod
    def pad_back(x: Tensor, rows: Tensor | None, b: int, n: int) -> Tensor:
        if rows is None:
            return x.view(b, n, -1)
        out = x.new_zeros(b * n, x.shape[-1])
        return out.index_copy_(0, rows, x).view(b, n, -1)

    def corrupted_inputs(self, batch: Batch) -> Tensor:
        """[B, N, F] node features as the encoder reads them under the mask (GraphMAE's masking)."""
        tokens = batch.streams[self.stream]
        x = tokens.values.float()
        substitute = batch.mask.substitute
        if substitute is None:
            return x
        substitute = substitute[:, batch.layout[self.stream]]
        replaced = substitute >= 0
        if bool(replaced.any()):
            source = torch.where(replaced, substitute, torch.arange(x.shape[1], device=x.device))
            x = torch.gather(x, 1, source.unsqueeze(-1).expand_as(x))
        return torch.where((substitute == AS_MASK_TOKEN).unsqueeze(-1), self.mask_token.to(x.dtype), x)

    # -- the model protocol -----------------------------------------------------------
    def forward(self, batch: Batch) -> Outputs:
        tokens = batch.streams[self.stream]
        b, n, _ = tokens.values.shape
        rows, edges, _ = self.compact(tokens)
        weight, attr = tokens.edge_fields.get("weight"), tokens.edge_fields.get("attr")
        x = self.corrupted_inputs(batch).reshape(b * n, -1)
        x = x if rows is None else x[rows]
        codes, taps = self.run_encoder(x, edges, weight, attr)
        hidden = batch.mask.hidden[:, batch.layout[self.stream]].reshape(-1)
        hidden = hidden if rows is None else hidden[rows]
        rep = self.encoder_to_decoder(codes).masked_fill(hidden.unsqueeze(-1), 0.0)  # the re-mask
        pred = self.conv(self.decoder_kind, self.decoder, rep, edges, weight, attr)
        return Outputs({self.stream: {"pred": self.pad_back(pred, rows, b, n)}}, self.pad_back(codes, rows, b, n),
                       {depth: self.pad_back(t, rows, b, n) for depth, t in taps.items()})

    def node_embeddings(self, batch: Batch) -> Tensor:
        """[B, N, width] codes of every node with nothing hidden (padding rows zero)."""
        tokens = batch.streams[self.stream]
        b, n, _ = tokens.values.shape
        rows, edges, _ = self.compact(tokens)
        x = tokens.values.float().reshape(b * n, -1)
        codes, _ = self.run_encoder(x if rows is None else x[rows], edges, tokens.edge_fields.get("weight"),
                                    tokens.edge_fields.get("attr"))
        return self.pad_back(codes, rows, b, n)

    def features(self, batch: Batch) -> Tensor:
        """One vector per sample: its readout nodes' mean code, else its nodes pooled."""
        tokens = batch.streams[self.stream]
        codes = self.node_embeddings(batch)
        real = tokens.valid if tokens.valid is not None else torch.ones(codes.shape[:2], dtype=torch.bool,
                                                                         device=codes.device)
        if "readout" in tokens.fields:
            real = real & tokens.fields["readout"].bool()
        weights = real.unsqueeze(-1).to(codes.dtype)
        pool = "mean" if "readout" in tokens.fields else self.options.pool
        if pool == "max":
            return codes.masked_fill(~real.unsqueeze(-1), -torch.inf).amax(1)
        total = (codes * weights).sum(1)
        return total if pool == "sum" else total / weights.sum(1).clamp_min(1)


def build_graph_mae(kind: str):
    def builder(modalities: dict, decoders: dict, config: ModelConfig, taps: tuple[int, ...] = ()):
        if len(modalities) != 1 or next(iter(modalities.values())).name != "graph":
            raise ConfigError(f"model.encoder={kind} encodes one graph stream; this recipe's streams are "
                              f"{ {name: m.name for name, m in modalities.items()} }")
        (stream, modality), = modalities.items()
        depth = config.resolved().depth
        if any(not 1 <= layer <= depth for layer in taps):
            raise ConfigError(f"a head or objective reads encoder layers {taps}; the {kind} encoder has 1..{depth}")
        options = build_options(GNNOptions, config.encoder_options, "model.encoder_options")
        return GraphMaskedAutoencoder(kind, modality.d_in, modality.edge_dim, config, options, stream, taps)
    builder.__doc__ = f"`model.encoder: {kind}`: GraphMAE with a {kind.upper()} encoder on one graph stream."
    return builder


for _kind in KINDS:
    ENCODERS.register(_kind, build_graph_mae(_kind))
