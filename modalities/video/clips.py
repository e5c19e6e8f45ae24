"""Which frames a clip reads: `num_frames` at `frame_stride` (or at a target fps) from a
record's frame range, the start drawn per epoch.

A record's k clips per epoch (`clips_per_video`) come from k equal parts of the possible
starts (TSN's segment sampling): clip i starts at random within part i when training
(`sampling: random`), or at the centre of part i (`sampling: uniform`, and always when
evaluating). So a long video is read as k short clips spread over its whole length, each
decoded on its own, never the whole video at once.
"""
from __future__ import annotations

import torch


def clip_step(fps: float, frame_stride: int, target_fps: float | None) -> float:
    """Frames of the video between two frames of a clip."""
    if target_fps is None or fps <= 0:
        return float(frame_stride)
    return max(fps / target_fps, 1e-6)


def clip_indices(segment: tuple[int, int], num_frames: int, step: float, part: int, parts: int,
                 random_start: bool, generator: torch.Generator) -> tuple[list[int], bool]:
    """(frame indices of the clip, whether it ran past the segment's end). Indices past
    the end repeat the segment's last frame (the caller decides whether to keep such a
    clip: `short_video: pad`, or to skip it)."""
    start, stop = segment
    span = (num_frames - 1) * step + 1            # frames the clip covers
    room = max(stop - start - span, 0.0)          # how far its first frame can move
    width = room / parts
    offset = width * (part + (float(torch.rand((), generator=generator)) if random_start else 0.5))
    first = start + min(offset, room)
    indices = [int(first + i * step) for i in range(num_frames)]
    short = indices[-1] >= stop
    return [min(i, stop - 1) for i in indices], short
