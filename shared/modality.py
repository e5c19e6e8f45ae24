"""What a modality plugs in: the `Modality` base class.

A modality turns its stream of a Sample (a dict from a shard: `__key__`,
payload bytes by extension, `cls`) into Tokens and back, names its default
masker, objective and decoder, and builds its stream's input adapter and
decoder for the shared model. Its `sources` are the dataset adapters
`polymae shard` can read. Subclasses live in their own package, found
through the `polymae.modalities` entry-point group (pyproject.toml), and
register under their name.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from torch import nn

from .config import build
from .errors import BadInput, ConfigError
from .masking import Masker, build_masker
from .model import CrossAttentionDecoder, DecoderConfig, InputAdapter, MLPHead, ModelConfig, TransformerDecoder
from .tokens import Tokens


def label_of(sample: dict) -> int | None:
    raw = sample.get("cls")
    if raw is None:
        return None
    try:
        return int(raw.decode() if isinstance(raw, bytes) else raw)
    except ValueError:
        raise BadInput(sample.get("__key__", "?"), f"label 'cls' is not an integer: {raw!r}", "bad_label") from None


class ShardStatistics:
    """An accumulator `Modality.shard_statistics` gives: `add(sample)` for each record written to
    the train split, then `result()`, a JSON-able dict stored in that split's manifest."""

    def add(self, sample: dict) -> None:
        raise NotImplementedError

    def result(self) -> dict:
        raise NotImplementedError


class Modality:
    name: str = ""
    payload_keys: tuple[str, ...] = ()   # sample keys holding this modality's payload, in order of preference
    Options: type = object               # dataclass of tokenizer/augmentation options
    default_masker: str = "random"
    default_objective: dict = {"pixel": {"weight": 1.0, "norm_pix": True}}
    default_decoder: str = "transformer"

    def __init__(self, options: dict | None = None, payload_keys: tuple[str, ...] | None = None,
                 where: str = "modality_options"):
        self.options = build(self.Options, options or {}, where)
        if payload_keys:  # a stream that reads other files of the record than the modality's usual ones
            self.payload_keys = tuple(payload_keys)

    # -- adapters ---------------------------------------------------------
    def sources(self) -> dict[str, str]:
        """Built-in source names -> one-line description (for `polymae shard` and `info`)."""
        return {}

    def read_source(self, source: str, **kwargs) -> Iterator[dict]:
        """Samples from a folder or a built-in source; bad files raise BadInput lazily."""
        raise NotImplementedError

    def payload(self, sample: dict) -> tuple[str, bytes]:
        for key in self.payload_keys:
            if key in sample:
                return key, sample[key]
        raise BadInput(sample.get("__key__", "?"), f"record has none of {self.payload_keys} "
                       f"(it has {sorted(k for k in sample if not k.startswith('__'))})", "missing_payload")

    def decode(self, sample: dict) -> Any:
        raise NotImplementedError

    # tokenizing never writes into what `decode` returned, and decoding reads nothing but the record,
    # so the data stream may keep a record's decoded payloads and tokenize them again in a later
    # epoch (pipelines/record_cache.py); a modality says so only where its tests show it
    decoded_cacheable = False

    def samples_per_record(self, sample: dict) -> int:
        """How many samples the data stream makes of one record per epoch (a long video: several
        clips). Each is the record with `__part__` = (i, count) and its own seed; default 1."""
        return 1

    def shard_statistics(self) -> "ShardStatistics | None":
        """What the modality measures over the train split while `polymae shard` writes it
        (a raster's per-band means and deviations), kept in the train manifest under
        "statistics" for `prepare` to read back; None (the default): nothing."""
        return None

    def prepare(self, shard_folder: Path, records: Callable[[], Iterator[dict]]) -> None:
        """Fit what the modality learns from the data before a model is built (the text
        modality's tokenizer), saved beside the shards so every later run reuses it.
        `records()` iterates the train shards' records. Default: nothing to fit."""

    def with_augmentations(self, options: dict, where: str = "finetune.augment") -> "Modality":
        """This modality with the extra training augmentations a fine-tuning recipe asks for
        (`options`: keys the modality names and checks, drawn per sample from its generator); it
        may be a copy, the original stays as it was. Default: none, so any key is refused."""
        if options:
            raise ConfigError(f"{where}: the {self.name} modality has no fine-tuning augmentations "
                              f"(got {', '.join(map(str, options))})")
        return self

    # -- masking ----------------------------------------------------------
    def masker(self, name: str | None, ratio: float, options: dict) -> Masker:
        """This stream's masker (`name`, default `default_masker`). A modality whose maskers need
        its own facts (a tokenizer's mask id, its vocabulary) passes them here."""
        return build_masker(name or self.default_masker, ratio, **options)

    # -- tokenizer --------------------------------------------------------
    def tokenize(self, payload: Any, generator: torch.Generator, train: bool = True) -> Tokens:
        raise NotImplementedError

    def tokenize_many(self, payloads: list[Any], generators: list[torch.Generator],
                      train: bool = True) -> list[Tokens | BadInput]:
        """`tokenize` of each payload with its record's generator, as the data stream calls it for
        a group of records; a payload that `tokenize` rejects gives its BadInput in its place. A
        modality whose tokenizer is faster on a group overrides it, with the same results."""
        out: list[Tokens | BadInput] = []
        for payload, generator in zip(payloads, generators):
            try:
                out.append(self.tokenize(payload, generator, train))
            except BadInput as error:
                out.append(error)
        return out

    def finish(self, tokens: Tokens) -> Tokens:
        """The tokenizer's last step, run on a whole batch where it is consumed (after the
        move to the accelerator, when there is one) instead of in the data workers.

        A tokenizer may leave `values` in a compact storage dtype (the image modality
        ships uint8 patches: 4x fewer bytes from worker to trainer than float32) and
        convert them here. Everything after the loader sees finished tokens. Default:
        the tokens are finished already."""
        return tokens

    def untokenize(self, tokens: Tokens) -> Any:
        raise NotImplementedError

    @property
    def d_in(self) -> int:
        raise NotImplementedError

    @property
    def num_coords(self) -> int:
        raise NotImplementedError

    @property
    def grid(self) -> tuple[int, ...] | None:
        return None

    @property
    def coord_extents(self) -> tuple[int, ...] | None:
        """How far each coordinate runs, in coords order (the grid, unless coords list its axes otherwise)."""
        return self.grid

    @property
    def vocab_size(self) -> int | None:
        """Discrete streams (`Tokens.ids`): how many ids there are; None for value streams."""
        return None

    @property
    def output_width(self) -> int:
        """What a decoder predicts per token: the value width, or a logit per id."""
        return self.vocab_size or self.d_in

    # -- model --------------------------------------------------------------
    def input_adapter(self, width: int, config: ModelConfig) -> nn.Module:
        """This stream's embedding + position encoding, `adapter(tokens) -> [B, N, width]`."""
        return InputAdapter(self.d_in, width, self.num_coords, config.position, self.coord_extents,
                            kernels=config.kernels, vocab_size=self.vocab_size)

    def decoder(self, decoder: DecoderConfig, encoder_width: int, config: ModelConfig) -> nn.Module:
        """This stream's decoder or head (`decoder.kind`, default `default_decoder`)."""
        kind = decoder.kind or self.default_decoder
        if kind in ("transformer", "cross"):
            decoder_class = TransformerDecoder if kind == "transformer" else CrossAttentionDecoder
            return decoder_class(encoder_width, self.output_width, self.num_coords, config, decoder,
                                 self.coord_extents)
        if kind in ("mlp", "vocab"):
            return MLPHead(encoder_width, self.output_width, config.layer_norm_eps, decoder.layer, config.kernels,
                           targets_only=decoder.rows == "targets")
        raise ConfigError(f"decoder kind {kind!r} is not one of transformer, cross, mlp, vocab")

    def render(self, tokens: Tokens, hidden: torch.Tensor, pred: torch.Tensor, rows: int = 8) -> Image.Image:
        """A picture of rows of original | masked | reconstruction of this stream; `hidden`
        [B, N] is the stream's part of the mask, `pred` its prediction in token-value space."""
        raise NotImplementedError

    def prediction_values(self, pred: torch.Tensor, tokens: Tokens, objective: dict) -> torch.Tensor:
        """A decoder's prediction in token-value space, for pictures (the image modality undoes
        norm_pix); default: as predicted."""
        return pred
