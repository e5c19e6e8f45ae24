"""Point-MAE's input adapter and the point-group MAE.

PointNetEmbed   a mini-PointNet per group, as Point-MAE's encoder: a shared
                MLP on every point (D -> h/2 -> h), max-pool to a group
                feature, concatenated back onto every point (2h), a second
                shared MLP (2h -> 2h -> width), max-pool again. Point-MAE
                has h = 256; smaller h is much cheaper on a CPU.
PointInputAdapter  PointNetEmbed(values) + position(centres); the position is
                an MLP on the centre's xyz (Point-MAE) or sin-cos, by
                `model.position`.
PointMAE        the shared MaskedAutoencoder with this adapter; its output
                adds `points` (the prediction viewed as [B, G, k, D] points)
                and, with `occupancy_grid` > 0, `occupancy` logits
                [B, G, grid^3] from a second head on the decoder features.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from polymae.shared.model import MaskedAutoencoder, ModelConfig, gather_tokens
from polymae.shared.position import build_position
from polymae.shared.tokens import Mask


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
        self.embed = PointNetEmbed(point_dim, group_size, width, hidden)
        self.position = build_position(position, width, 3)

    def forward(self, values: Tensor, coords: Tensor) -> Tensor:
        return self.embed(values) + self.position(coords).to(values.dtype)


class PointMAE(MaskedAutoencoder):
    def __init__(self, point_dim: int, group_size: int, config: ModelConfig = ModelConfig(),
                 occupancy_grid: int = 0, embed_hidden: int = 256):
        cfg = config.resolved()
        adapter = PointInputAdapter(point_dim, group_size, cfg.width, cfg.position, embed_hidden)
        super().__init__(point_dim * group_size, 3, config, input_adapter=adapter)
        self.point_dim, self.group_size, self.occupancy_grid = point_dim, group_size, occupancy_grid
        self.occupancy_head = nn.Linear(cfg.decoder_width, occupancy_grid ** 3) if occupancy_grid else None
        if self.occupancy_head is not None:
            self._init_weights(self.occupancy_head)

    def forward(self, values: Tensor, coords: Tensor, mask: Mask, valid: Tensor | None = None) -> dict[str, Tensor]:
        ids_keep = mask.ids_keep
        visible_valid = None if valid is None else torch.gather(valid, 1, ids_keep)
        latent = self.encode(gather_tokens(values, ids_keep), gather_tokens(coords, ids_keep), visible_valid)
        features = self.decode_features(latent, mask, coords, valid)
        pred = self.head(features)
        out = {"pred": pred, "latent": latent,
               "points": pred.reshape(*pred.shape[:2], self.group_size, self.point_dim)}
        if self.occupancy_head is not None:
            out["occupancy"] = self.occupancy_head(features)
        return out
