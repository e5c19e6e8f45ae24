"""VideoMAE's reconstruction target, exactly as VideoMAE (and Hugging Face's VideoMAEForPreTraining)
compute it: each tubelet normalised per colour channel over its t*p*p pixels, in [0, 1] pixel
units (`norm_pix`), or the [0, 1] pixels themselves.

The shared `pixel` term normalises a token over all its values (channels together); this
term is for runs that must match VideoMAE to the last digit (tests/test_video.py compares
the loss with Hugging Face's). The tokens hold mean/std-normalised values, so the [0, 1]
pixels are recovered with the modality's mean and std (the term's `mean`, `std`).
"""
from __future__ import annotations

import torch

from polymae.shared.objectives import Objective, weighted_mean
from polymae.shared.registry import OBJECTIVES

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def videomae_targets(values: torch.Tensor, norm_pix: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     channels: int = 3) -> torch.Tensor:
    """Normalised token values [..., N, t*p*p*C] -> VideoMAE's targets of the same shape."""
    shape = values.shape
    pixels = values.float().reshape(*shape[:-1], -1, channels)          # [..., N, t*p*p, C]
    pixels = pixels * torch.tensor(std, device=values.device) + torch.tensor(mean, device=values.device)
    if norm_pix:
        pixels = (pixels - pixels.mean(dim=-2, keepdim=True)) / (
            pixels.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    return pixels.reshape(shape)


@OBJECTIVES.register("videomae_pixel")
class VideoMAEPixelLoss(Objective):
    """Mean squared error at the stream's targets (hidden, and decoded when the mask names a
    decode subset) against VideoMAE's per-channel normalised tubelets."""

    def __init__(self, stream: str, norm_pix: bool = True, mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD):
        super().__init__(stream)
        self.norm_pix, self.mean, self.std = norm_pix, tuple(mean), tuple(std)

    def forward(self, outputs, batch):
        target = videomae_targets(batch.streams[self.stream].values, self.norm_pix, self.mean, self.std)
        per_token = (outputs.pred(self.stream).float() - target).pow(2).mean(dim=-1)
        return weighted_mean(per_token, batch.target_weights(self.stream))
