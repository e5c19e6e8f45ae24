"""Point-MAE's input adapter and the point-group MAE.

PointNetEmbed   a mini-PointNet per group, as Point-MAE's encoder: a shared
                MLP on every point (D -> h/2 -> h), max-pool to a group
                feature, concatenated back onto every point (2h), a second
                shared MLP (2h -> 2h -> width), max-pool again. Point-MAE
                has h = 256; smaller h is much cheaper on a CPU.
PointInputAdapter  PointNetEmbed(values) + position(centres); the position is
                an MLP on the centre's xyz (Point-MAE) or sin-cos, by
                `model.position`.
PointDecoder    the shared transformer decoder; its output adds `points` (the
                prediction viewed as [B, G, k, D] points) and, with
                `occupancy_grid` > 0, `occupancy` logits [B, G, grid^3] from a
                second head on the decoder features.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from polymae.shared.model import DecoderConfig, ModelConfig, TransformerDecoder
from polymae.shared.position import build_position
from polymae.shared.tokens import Tokens


def shared_mlp(sizes: list[int]) -> nn.Sequential:
    """Per-point Linear -> LayerNorm -> GELU layers; the last layer is linear only."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [nn.LayerNorm(b), nn.GELU()]
    return nn.Sequential(*layers)


class PointNetEmbed(nn.Module):
    """[B, M, k*D] group values -> [B, M, width] group embeddings."""

    def __init__(self, point_dim: int, group_size: int, width: int, hidden: int = 256):
        super().__init__()
        self.point_dim, self.group_size = point_dim, group_size
        self.first = shared_mlp([point_dim, hidden // 2, hidden])
        self.second = shared_mlp([2 * hidden, 2 * hidden, width])

    def forward(self, values: Tensor) -> Tensor:
        b, m, _ = values.shape
        points = values.reshape(b, m, self.group_size, self.point_dim)
        x = self.first(points)                                    # [B, M, k, h]
        pooled = x.amax(dim=2, keepdim=True).expand_as(x)
        x = self.second(torch.cat([pooled, x], dim=-1))           # [B, M, k, width]
        return x.amax(dim=2)


class PointInputAdapter(nn.Module):
    def __init__(self, point_dim: int, group_size: int, width: int, position: str = "mlp", hidden: int = 256):
        super().__init__()
        self.grid = None
        self.embed = PointNetEmbed(point_dim, group_size, width, hidden)
        self.position = build_position(position, width, 3)

    def forward(self, tokens: Tokens) -> Tensor:
        return self.embed(tokens.values) + self.position(tokens.coords).to(tokens.values.dtype)


class PointDecoder(TransformerDecoder):
    """The shared transformer decoder; its output adds `points` (the prediction viewed as
    [B, G, k, D] points) and, with `occupancy_grid` > 0, `occupancy` logits [B, G, grid^3]
    from a second head on the decoder features (R-MAE)."""

    def __init__(self, encoder_width: int, point_dim: int, group_size: int, cfg: ModelConfig, dec: DecoderConfig,
                 occupancy_grid: int = 0):
        super().__init__(encoder_width, point_dim * group_size, 3, cfg, dec)
        self.point_dim, self.group_size = point_dim, group_size
        width = self.head.in_features
        self.occupancy_head = nn.Linear(width, occupancy_grid ** 3) if occupancy_grid else None

    def forward(self, latent, prefix, batch, stream, taps):
        features = self.features(latent, prefix, batch, stream)
        pred = self.head(features)
        out = {"pred": pred, "points": pred.reshape(*pred.shape[:2], self.group_size, self.point_dim)}
        if self.occupancy_head is not None:
            out["occupancy"] = self.occupancy_head(features)
        return out
