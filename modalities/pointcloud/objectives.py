"""Loss terms for point groups, in pure torch, registered in the shared OBJECTIVES.

chamfer    Point-MAE's target: Chamfer distance between the predicted and the
           true points of every hidden group (xyz relative to the group centre,
           in token-value units), averaged over hidden groups. `squared=True`
           is Chamfer-L2 (mean squared nearest-neighbour distance, both ways,
           summed); False sums mean Euclidean distances (Chamfer-L1 x 2).
           `feature_weight` > 0 adds the squared error of predicted per-point
           features (colour, intensity, normals) against the features of the
           nearest true point.
occupancy  R-MAE's range-aware target: for every hidden group, which cells of a
           g x g x g voxel grid over the group's own extent hold a true point,
           predicted as logits by the model's occupancy head (binary cross
           entropy). A group far from the sensor has few, spread points and a
           near one many; its occupancy grid is the same size either way, so
           the term weighs near and far structure alike where point regression
           follows the point density. Needs `modality_options.occupancy_grid`.

The model's output carries `points` [B, G, k, D] (the prediction as points)
so the terms know the group size and point width; a plain `pred` is read as
xyz-only points (`point_dim` = 3). Terms score the stream's target groups
(`Batch.target_weights`: hidden, decoded and real), gathered so each row's
come first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from polymae.shared.errors import ConfigError
from polymae.shared.objectives import Objective, weighted_mean
from polymae.shared.registry import OBJECTIVES


def chamfer_distance(a: Tensor, b: Tensor, squared: bool = True) -> Tensor:
    """a [..., k, 3], b [..., m, 3] -> [...]: mean over a of the distance to b's nearest
    point plus mean over b of the distance to a's nearest (squared when `squared`)."""
    d = (a.unsqueeze(-2) - b.unsqueeze(-3)).pow(2).sum(-1)  # [..., k, m]
    if not squared:
        d = d.clamp_min(1e-12).sqrt()
    return d.min(-1).values.mean(-1) + d.min(-2).values.mean(-1)


def as_points(out: dict, values: Tensor, point_dim: int = 3) -> tuple[Tensor, Tensor]:
    """(predicted, true) points [B, G, k, D] in float32 from a stream's decoder output and values."""
    values = values.float()
    b, g, width = values.shape
    if "points" in out:
        pred = out["points"].float()
        k, d = pred.shape[-2:]
    else:
        if width % point_dim:
            raise ConfigError(f"objective.chamfer.point_dim={point_dim} does not divide the token width {width}")
        d, k = point_dim, width // point_dim
        pred = out["pred"].float().reshape(b, g, k, d)
    return pred, values.reshape(b, g, k, d)


def target_groups(x: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """[B, G, ...] -> [B, H, ...] at the stream's target groups (hidden, decoded, real), with
    their weights [B, H]: H is the most any row has; rows with fewer carry weight 0 on the rest."""
    count = int(weights.sum(1).max()) if weights.numel() else 0
    order = torch.argsort(-weights, dim=1, stable=True)[:, :count]  # a row's targets first, in group order
    picked = torch.gather(x, 1, order.view(*order.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))
    return picked, torch.gather(weights, 1, order)


@OBJECTIVES.register("chamfer")
class ChamferLoss(Objective):
    def __init__(self, stream: str, squared: bool = True, feature_weight: float = 0.0, point_dim: int = 3):
        super().__init__(stream)
        self.squared, self.feature_weight, self.point_dim = squared, feature_weight, point_dim

    def forward(self, outputs, batch):
        pred, true = as_points(outputs.streams[self.stream], batch.streams[self.stream].values, self.point_dim)
        weights = batch.target_weights(self.stream)
        pred, _ = target_groups(pred, weights)
        true, weights = target_groups(true, weights)
        loss = weighted_mean(chamfer_distance(pred[..., :3], true[..., :3], self.squared), weights)
        if self.feature_weight and pred.shape[-1] > 3:
            d = (pred[..., :3].unsqueeze(-2) - true[..., :3].unsqueeze(-3)).pow(2).sum(-1)
            nearest = d.argmin(-1)  # [B, H, k]: the true point nearest each predicted point
            target = torch.gather(true[..., 3:], 2, nearest.unsqueeze(-1).expand(-1, -1, -1, true.shape[-1] - 3))
            feature_error = (pred[..., 3:] - target).pow(2).mean((-1, -2))
            loss = loss + self.feature_weight * weighted_mean(feature_error, weights)
        return loss


def occupancy_target(xyz: Tensor, grid: int) -> Tensor:
    """Group points [..., k, 3] (relative to the centre) -> occupancy [..., grid**3] in {0, 1}
    over the cube [-e, e]^3, e = the group's largest absolute coordinate."""
    extent = xyz.abs().amax(dim=(-1, -2), keepdim=True).clamp_min(1e-6)
    cell = ((xyz / extent + 1) / 2 * grid).floor().long().clamp_(0, grid - 1)
    index = (cell[..., 0] * grid + cell[..., 1]) * grid + cell[..., 2]  # [..., k]
    target = torch.zeros(*xyz.shape[:-2], grid ** 3, device=xyz.device)
    return target.scatter_(-1, index, 1.0)


@OBJECTIVES.register("occupancy")
class OccupancyLoss(Objective):
    def __init__(self, stream: str, pos_weight: float | None = None):
        super().__init__(stream)
        self.pos_weight = pos_weight

    def forward(self, outputs, batch):
        out = outputs.streams[self.stream]
        if "occupancy" not in out:
            raise ConfigError("objective.occupancy needs the model's occupancy head: set "
                              "modality_options.occupancy_grid (e.g. 4) for a point-cloud modality")
        logits = out["occupancy"].float()
        grid = round(logits.shape[-1] ** (1 / 3))
        _, true = as_points(out, batch.streams[self.stream].values)
        weights = batch.target_weights(self.stream)
        logits, _ = target_groups(logits, weights)
        true, weights = target_groups(true, weights)
        target = occupancy_target(true[..., :3], grid)
        weight = None if self.pos_weight is None else torch.tensor(self.pos_weight, device=logits.device)
        per_group = F.binary_cross_entropy_with_logits(logits, target, reduction="none", pos_weight=weight).mean(-1)
        return weighted_mean(per_group, weights)
