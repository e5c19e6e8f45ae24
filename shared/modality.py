"""What a modality plugs in: the `Modality` base class.

A modality turns a Sample (a dict from a shard: `__key__`, payload bytes by
extension, `cls`) into Tokens and back, names its default masker and
objective, and builds the model's input adapter. Its `sources` are the
dataset adapters `polymae shard` can read. Subclasses live in
`polymae.modalities.<name>` and register under their name.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from PIL import Image

from .config import build
from .errors import BadInput
from .model import MaskedAutoencoder, ModelConfig
from .tokens import Mask, Tokens


def label_of(sample: dict) -> int | None:
    raw = sample.get("cls")
    if raw is None:
        return None
    try:
        return int(raw.decode() if isinstance(raw, bytes) else raw)
    except ValueError:
        raise BadInput(sample.get("__key__", "?"), f"label 'cls' is not an integer: {raw!r}", "bad_label") from None


class Modality:
    name: str = ""
    payload_keys: tuple[str, ...] = ()   # sample keys holding this modality's payload, in order of preference
    Options: type = object               # dataclass of tokenizer/augmentation options
    default_masker: str = "random"
    default_objective: dict = {"pixel": {"weight": 1.0, "norm_pix": True}}

    def __init__(self, options: dict | None = None):
        self.options = build(self.Options, options or {}, "modality_options")

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

    # -- tokenizer --------------------------------------------------------
    def tokenize(self, payload: Any, generator: torch.Generator, train: bool = True) -> Tokens:
        raise NotImplementedError

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

    # -- model --------------------------------------------------------------
    def build_model(self, config: ModelConfig) -> MaskedAutoencoder:
        return MaskedAutoencoder(self.d_in, self.num_coords, config, grid=self.coord_extents)

    def render(self, tokens: Tokens, mask: Mask, pred: torch.Tensor, rows: int = 8) -> Image.Image:
        """A picture of rows of original | masked | reconstruction; `pred` is in token-value space."""
        raise NotImplementedError
