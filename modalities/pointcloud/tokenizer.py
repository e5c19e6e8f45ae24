"""Point clouds -> point-group tokens and back (Point-MAE's tokenizer), batched in torch.

    points [N, D] (xyz + D-3 features)
      -> farthest point sampling: G well-spread centres
      -> k nearest neighbours of each centre: G groups of k points
      -> xyz relative to the group's centre (divided by `group_scale`), features as they are
    values [G, k*D]  (point-major: x, y, z, f1, ... of the nearest point first)
    coords [G, 3]    the centres, what the position encoding reads

`untokenize` puts each group back at its centre, giving [G*k, D] points.
Every function takes a leading batch dimension, and runs wherever its
tensors live (CPU or GPU); `tokenize_points` is the one-sample wrapper the
data workers call.
"""
from __future__ import annotations

import torch
from torch import Tensor

from polymae.shared.tokens import Tokens


def farthest_point_sample(xyz: Tensor, count: int, start: Tensor | None = None) -> Tensor:
    """[B, N, 3] -> indices [B, count]: each next centre is the point farthest from those
    chosen (squared Euclidean). `start` [B] picks the first centre (default: point 0).
    When count > N the choice repeats points once every point is taken."""
    b, n, _ = xyz.shape
    xyz = xyz.float()
    chosen = torch.empty(b, count, dtype=torch.long, device=xyz.device)
    nearest = torch.full((b, n), float("inf"), device=xyz.device)
    current = start.to(xyz.device).long() if start is not None else torch.zeros(b, dtype=torch.long,
                                                                                   device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    for i in range(count):
        chosen[:, i] = current
        d = (xyz - xyz[rows, current].unsqueeze(1)).pow(2).sum(-1)
        nearest = torch.minimum(nearest, d)
        current = nearest.argmax(-1)
    return chosen


def knn(query: Tensor, xyz: Tensor, k: int) -> Tensor:
    """Indices [B, G, k] of the k points of `xyz` [B, N, 3] nearest each `query` [B, G, 3], nearest first."""
    if k > xyz.shape[1]:
        raise ValueError(f"cannot take {k} neighbours from {xyz.shape[1]} points")
    d = (query.float().unsqueeze(2) - xyz.float().unsqueeze(1)).pow(2).sum(-1)  # [B, G, N]
    return d.topk(k, dim=-1, largest=False, sorted=True).indices


def gather_points(points: Tensor, index: Tensor) -> Tensor:
    """points [B, N, D], index [B, ...] -> [B, ..., D]."""
    b, d = points.shape[0], points.shape[-1]
    flat = index.reshape(b, -1)
    out = torch.gather(points, 1, flat.unsqueeze(-1).expand(-1, -1, d))
    return out.reshape(*index.shape, d)


def group(points: Tensor, num_groups: int, group_size: int, group_scale: float = 1.0,
          start: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """points [B, N, D] -> (groups [B, G, k, D] with xyz relative to the centre / group_scale,
    centres [B, G, 3])."""
    xyz = points[..., :3]
    centres = gather_points(xyz, farthest_point_sample(xyz, num_groups, start))
    groups = gather_points(points, knn(centres, xyz, group_size))
    relative = (groups[..., :3] - centres.unsqueeze(2)) / group_scale
    return torch.cat([relative, groups[..., 3:]], dim=-1), centres


def tokenize_points(points: Tensor, num_groups: int, group_size: int, group_scale: float = 1.0,
                    start: int = 0) -> Tokens:
    """One cloud [N, D] -> Tokens(values [G, k*D], coords [G, 3])."""
    groups, centres = group(points.unsqueeze(0), num_groups, group_size, group_scale,
                            torch.tensor([start], device=points.device))
    g, k, d = groups.shape[1:]
    return Tokens(values=groups[0].reshape(g, k * d), coords=centres[0])


def untokenize_points(values: Tensor, coords: Tensor, group_size: int, group_scale: float = 1.0) -> Tensor:
    """values [..., G, k*D], coords [..., G, 3] -> points [..., G*k, D] (groups back at their centres)."""
    *lead, g, width = values.shape
    d = width // group_size
    groups = values.reshape(*lead, g, group_size, d)
    xyz = groups[..., :3] * group_scale + coords.unsqueeze(-2)
    return torch.cat([xyz, groups[..., 3:]], dim=-1).reshape(*lead, g * group_size, d)
