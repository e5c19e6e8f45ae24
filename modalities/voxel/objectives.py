"""NeRF-MAE's radiance-field reconstruction term, registered as "radiance".

Per hidden patch, per voxel: the density error, plus the colour error weighted
by how much the voxel shows. NeRF-MAE weights colour by the true opacity
alpha = 1 - exp(-density * step): the colour of empty space is never seen in
a rendering, so getting it wrong costs nothing, while a dense voxel's colour
counts fully. Terms average over the voxels of hidden patches (padding excluded):

    loss = mean_hidden [ colour_weight * alpha * mean_c (c_pred - c)^2
                         + density_weight * (sigma_pred - sigma)^2 ]

`alpha`: "opacity" (1 - exp(-sigma * step), NeRF-MAE), "density" (sigma over
the sample's largest sigma) or "none" (plain per-channel MSE). With one
channel (a density-only grid) only the density term remains.
"""
from __future__ import annotations

import torch
from torch import Tensor

from polymae.shared.objectives import Objective, weighted_mean
from polymae.shared.registry import OBJECTIVES

ALPHAS = ("opacity", "density", "none")


def voxel_alpha(sigma: Tensor, kind: str, step: float) -> Tensor:
    """sigma [B, N, V] (true densities) -> colour weights in [0, 1]."""
    sigma = sigma.clamp_min(0)
    if kind == "opacity":
        return 1 - torch.exp(-sigma * step)
    if kind == "density":
        peak = sigma.flatten(1).amax(dim=1).clamp_min(1e-12)
        return sigma / peak.view(-1, *([1] * (sigma.dim() - 1)))
    if kind == "none":
        return torch.ones_like(sigma)
    raise ValueError(f"radiance alpha must be one of {', '.join(ALPHAS)}; got {kind!r}")


def radiance_terms(pred: Tensor, target: Tensor, channels: int, density_channel: int = -1, alpha: str = "opacity",
                   step: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-token (colour, density) squared errors [B, N], each averaged over the patch's voxels."""
    if target.shape[-1] % channels:
        raise ValueError(f"radiance objective: token width {target.shape[-1]} is not a multiple of "
                         f"channels={channels}; set objective.radiance.channels to the grid's channel count")
    density_channel = density_channel % channels
    pred = pred.reshape(*pred.shape[:-1], -1, channels)
    target = target.reshape(*target.shape[:-1], -1, channels)
    sigma = target[..., density_channel]
    density_error = (pred[..., density_channel] - sigma).pow(2)
    colour = [c for c in range(channels) if c != density_channel]
    if colour:
        weight = voxel_alpha(sigma, alpha, step)
        colour_error = (pred[..., colour] - target[..., colour]).pow(2).mean(dim=-1) * weight
    else:
        colour_error = torch.zeros_like(density_error)
    return colour_error.mean(dim=-1), density_error.mean(dim=-1)


@OBJECTIVES.register("radiance")
class RadianceLoss(Objective):
    def __init__(self, stream: str, channels: int = 4, density_channel: int = -1, alpha: str = "opacity",
                 step: float = 1.0, colour_weight: float = 1.0, density_weight: float = 1.0):
        super().__init__(stream)
        if alpha not in ALPHAS:
            raise ValueError(f"radiance alpha must be one of {', '.join(ALPHAS)}; got {alpha!r}")
        self.channels, self.density_channel, self.alpha, self.step = channels, density_channel, alpha, step
        self.colour_weight, self.density_weight = colour_weight, density_weight

    def forward(self, outputs, batch):
        colour, density = radiance_terms(outputs.pred(self.stream).float(),
                                         batch.streams[self.stream].values.float(), self.channels,
                                         self.density_channel, self.alpha, self.step)
        per_token = self.colour_weight * colour + self.density_weight * density
        return weighted_mean(per_token, batch.target_weights(self.stream))
