"""The text modality: UTF-8 records -> sub-word ids (Hugging Face tokenizers) -> masked LM.

decode    the record's `txt` bytes -> text (adapters.decode_text: not-UTF-8, binary and
          empty records are BadInput, skipped and counted)
tokenize  text -> windows of at most `max_tokens` sub-words with the tokenizer's special
          tokens; a document longer than one window is read one window per epoch (a
          random one when training, the first when evaluating), as an image is read one
          random crop per epoch; documents under `min_tokens` sub-words are BadInput
          `too_short`. Tokens: `ids` [N], coords = position [N, 1], fields `word_ids`
          (-1 on special tokens) and `special`; the batch pads to its longest text.
tokenizer `modality_options.tokenizer`: a tokenizer.json, a vocab.txt or a folder with one;
          None: one trained on the train shards the first time they are used
          (`prepare`), saved as <shards>/tokenizer.json and reused by every later run
render    rows of the original text, the text with hidden sub-words as [MASK] boxes, and
          the reconstruction with predicted sub-words filled in, in red
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw

from polymae.shared.errors import BadInput, ConfigError
from polymae.shared.masking import build_masker
from polymae.shared.model import DecoderConfig, ModelConfig
from polymae.shared.modality import Modality
from polymae.shared.registry import MASKERS, MODALITIES
from polymae.shared.tokens import Tokens

from . import adapters
from . import objectives as _objectives  # noqa: F401  (registers next_token and starbucks)
from .masking import SubwordMasker
from .model import TextInputAdapter
from .tokenizer import KINDS, TextTokenizer, load_tokenizer, train_tokenizer

# tokenizers' own threads would oversubscribe the data workers; and its fork warning is noise here
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class TextOptions:
    tokenizer: str | None = None       # tokenizer.json / vocab.txt / folder; None: trained on the shards
    tokenizer_kind: str = "wordpiece"  # a trained tokenizer: wordpiece (BERT) or bpe (byte-level)
    vocab_size: int = 8000             # a trained tokenizer's vocabulary
    max_tokens: int = 128              # sub-words per window, special tokens included
    max_positions: int | None = None   # rows of a learned position table (None: max_tokens; BERT: 512)
    min_tokens: int = 4                # shorter documents are skipped and counted (too_short)
    train_texts: int = 50_000          # at most this many records train a tokenizer
    # reading sources (`polymae shard text SOURCE`)
    unit: str | None = None            # document | paragraph | line (None: the source's default)
    text_field: str | None = None      # .jsonl: the text's field ("text")
    label_field: str | None = None     # .jsonl: the label's field
    encoding_errors: str = "strict"    # strict: non-UTF-8 files are rejected; replace: U+FFFD

    def __post_init__(self):
        if self.tokenizer_kind not in KINDS:
            raise ConfigError(f"modality_options.tokenizer_kind must be one of {', '.join(KINDS)}; "
                              f"got {self.tokenizer_kind!r}")
        if self.max_tokens < 3 or not 1 <= self.min_tokens <= self.max_tokens:
            raise ConfigError(f"modality_options: need 1 <= min_tokens ({self.min_tokens}) <= max_tokens "
                              f"({self.max_tokens}), max_tokens >= 3")
        if self.max_positions is not None and self.max_positions < self.max_tokens:
            raise ConfigError(f"modality_options.max_positions ({self.max_positions}) must be at least max_tokens "
                              f"({self.max_tokens})")
        if self.vocab_size < 100:
            raise ConfigError(f"modality_options.vocab_size must be >= 100, got {self.vocab_size}")


@MODALITIES.register("text")
class TextModality(Modality):
    name = "text"
    payload_keys = ("txt", "text", "caption.txt")
    Options = TextOptions
    default_masker = "bert"
    decoded_cacheable = True  # a decoded record is a str
    default_objective = {"mlm": {"term": "cross_entropy", "weight": 1.0}}
    default_decoder = "vocab"

    def __init__(self, options: dict | None = None, **kwargs):
        super().__init__(options, **kwargs)
        self._tokenizer: TextTokenizer | None = None
        self.position_tables: dict[int, torch.Tensor] = {}
        if self.options.tokenizer is not None:
            self._tokenizer = load_tokenizer(self.options.tokenizer)

    # -- the tokenizer ----------------------------------------------------
    @property
    def tokenizer(self) -> TextTokenizer:
        if self._tokenizer is None:
            raise ConfigError("the text stream has no tokenizer yet: set modality_options.tokenizer to a "
                              "tokenizer.json (or folder), or train one on the shards (the first pretrain run "
                              "on them does, into <shards>/tokenizer.json)")
        return self._tokenizer

    def prepare(self, shard_folder: Path, records: Callable[[], Iterator[dict]]) -> None:
        """Train the tokenizer on the train shards' texts once, saved beside them; later runs load it."""
        if self._tokenizer is not None:
            return
        path = Path(shard_folder) / TOKENIZER_FILE
        settings_path = path.with_name("tokenizer-settings.json")
        wanted = {"kind": self.options.tokenizer_kind, "vocab_size": self.options.vocab_size}
        if not path.is_file():
            texts = self.training_texts(records())
            trained = train_tokenizer(texts, self.options.tokenizer_kind, self.options.vocab_size)
            trained.save(path.parent)
            settings_path.write_text(json.dumps(wanted))
            print(f"trained a {self.options.tokenizer_kind} tokenizer of {trained.vocab_size} sub-words on the "
                  f"train shards: {path}")
        elif settings_path.is_file() and json.loads(settings_path.read_text()) != wanted:
            raise ConfigError(f"{path} was trained with {settings_path.read_text()}, the recipe asks for "
                              f"{json.dumps(wanted)}: delete it to train a new one, or set "
                              "modality_options.tokenizer_kind / vocab_size to match")
        self._tokenizer = load_tokenizer(path)

    def training_texts(self, records: Iterator[dict]) -> Iterator[str]:
        for count, sample in enumerate(records):
            if count >= self.options.train_texts:
                return
            try:
                yield self.decode(sample)
            except BadInput:
                continue  # the stream counts bad records; the tokenizer just does without them

    # -- adapters ---------------------------------------------------------
    def sources(self):
        return dict(adapters.BUILTIN_SOURCES)

    def read_source(self, source, **kwargs):
        o = self.options
        wanted = {"unit": o.unit, "text_field": o.text_field, "label_field": o.label_field,
                  "encoding_errors": o.encoding_errors if o.encoding_errors != "strict" else None}
        allowed = adapters.reader_options(source)
        return adapters.read_source(source, **{k: v for k, v in wanted.items() if v is not None and k in allowed})

    def decode(self, sample) -> str:
        key, data = self.payload(sample)
        return adapters.decode_text(data, f"{sample.get('__key__', '?')}.{key}", self.options.encoding_errors)

    # -- tokenizer --------------------------------------------------------
    def tokenize(self, payload: str, generator: torch.Generator, train: bool = True) -> Tokens:
        return self.document_tokens(self.tokenizer.encode(payload, add_special_tokens=False), generator, train)

    def tokenize_many(self, payloads: list[str], generators: list[torch.Generator],
                      train: bool = True) -> list[Tokens | BadInput]:
        """`tokenize` of each payload (the same Tokens from the same generators), with one
        tokenizer call for all of them (`encode_batch`: the tokenizer's code stays in cache
        from text to text, 10-20% off its time when each text is interleaved with the rest
        of the pipeline); a payload that `tokenize` would reject gives its BadInput instead."""
        out: list[Tokens | BadInput] = []
        for encoded, generator in zip(self.tokenizer.encode_many(payloads), generators):
            try:
                out.append(self.document_tokens(encoded, generator, train))
            except BadInput as error:
                out.append(error)
        return out

    def document_tokens(self, encoded, generator: torch.Generator, train: bool) -> Tokens:
        """A document's (ids, word_ids) without special tokens -> the Tokens of one window."""
        o, t = self.options, self.tokenizer
        ids, word_ids = encoded
        if len(ids) <= o.max_tokens - t.num_special_tokens:  # one window holds it all (most texts)
            if len(ids) < o.min_tokens:
                raise BadInput("text", f"has fewer than min_tokens={o.min_tokens} sub-words", "too_short")
            return self.window_tokens(ids, word_ids)
        windows, _ = t.encode_windows("", o.max_tokens, o.min_tokens, encoded=encoded)
        if not windows:
            raise BadInput("text", f"has fewer than min_tokens={o.min_tokens} sub-words", "too_short")
        pick = int(torch.randint(0, len(windows), (1,), generator=generator)) if train and len(windows) > 1 else 0
        return self.window_tokens(*windows[pick], specials_added=True)

    def window_tokens(self, ids: list[int], word_ids: list[int | None], specials_added: bool = False) -> Tokens:
        """Tokens of one window: ids, positions, word ids (-1 on special tokens) and `special`,
        built through numpy (one array per list: torch.tensor of a Python list costs several
        times more) with the tokenizer's prefix and suffix added unless `specials_added`."""
        t = self.tokenizer
        before, after = (0, 0) if specials_added else (len(t.prefix), len(t.suffix))
        n = before + len(ids) + after
        ids_array, words = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        ids_array[before:n - after] = ids
        if None in word_ids:  # special tokens inside the window (added ones, or its own prefix)
            word_ids = [-1 if w is None else w for w in word_ids]
        words[before:n - after] = word_ids
        if not specials_added:
            ids_array[:before], ids_array[n - after:] = t.prefix, t.suffix
            words[:before], words[n - after:] = -1, -1
        return Tokens(ids=torch.from_numpy(ids_array), coords=self.positions(n),
                      fields={"word_ids": torch.from_numpy(words), "special": torch.from_numpy(words < 0)})

    def positions(self, n: int) -> torch.Tensor:
        """float [n, 1]: 0 .. n-1, one tensor per length, shared by every window of that length
        (nothing writes into a sample's coords: batching copies them)."""
        made = self.position_tables.get(n)
        if made is None:
            made = self.position_tables[n] = torch.arange(n, dtype=torch.float32).view(n, 1)
        return made

    def untokenize(self, tokens: Tokens) -> list[str]:
        ids = tokens.ids if tokens.ids.dim() == 2 else tokens.ids[None]
        valid = tokens.valid if tokens.valid is not None else torch.ones_like(ids, dtype=torch.bool)
        return [self.tokenizer.decode(row[keep].tolist()) for row, keep in zip(ids, valid.view_as(ids))]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def d_in(self) -> int:
        return 0  # discrete: the input adapter embeds ids, not values

    @property
    def num_coords(self) -> int:
        return 1

    @property
    def coord_extents(self):
        return (self.options.max_positions or self.options.max_tokens,)

    # -- masking and model ----------------------------------------------------
    def masker(self, name, ratio, options):
        """The sub-word maskers get the tokenizer's mask id and vocabulary."""
        name = name or self.default_masker
        if isinstance(MASKERS.get(name), type) and issubclass(MASKERS.get(name), SubwordMasker):
            t = self.tokenizer
            if t.mask_id is None:
                raise ConfigError(f"{t.source}: the tokenizer has no mask token ([MASK] or <mask>), which the "
                                  f"{name} masker needs")
            specials = [i for i in (t.pad_id, t.unk_id, t.cls_id, t.sep_id, t.mask_id) if i is not None]
            options = {"mask_id": t.mask_id, "vocab_size": t.vocab_size,
                       "first_regular_id": max(specials) + 1 if max(specials) < 1000 else 0, **options}
        return build_masker(name, ratio, **options)

    def input_adapter(self, width: int, config: ModelConfig) -> TextInputAdapter:
        """Embedding + position, normalised for post-norm encoders (BERT's embedding LayerNorm)."""
        return TextInputAdapter(self.vocab_size, width, self.coord_extents[0], config.position,
                                config.layer_norm_eps, embedding_norm=not config.norm_first, kernels=config.kernels)

    def import_weights(self, model, folder, stream: str) -> bool:
        """`model.init_from` a local BERT folder (BertForMaskedLM, or a BertModel such as MiniLM:
        the encoder only); False when the folder holds another kind of model."""
        from . import hf_interop

        if hf_interop.folder_model_type(folder) != "bert":
            return False
        hf_interop.load_hf_weights(model, folder, stream)
        return True

    def export_weights(self, model, folder, encoder_only: bool, **_):
        from . import hf_interop

        stream = model.streams[0]
        return hf_interop.save_hf_folder(model, folder, stream, encoder_only), \
            "BertModel" if encoder_only else "BertForMaskedLM"

    def decoder(self, decoder: DecoderConfig, encoder_width: int, config: ModelConfig):
        kind = decoder.kind or self.default_decoder
        if kind == "transformer":
            raise ConfigError("a text stream is read by an mlm or vocab head on the encoder (its hidden sub-words "
                              "enter the encoder as [MASK]); decoder.kind=transformer needs hidden tokens dropped")
        return super().decoder(decoder, encoder_width, config)

    # -- pictures -----------------------------------------------------------
    def render(self, tokens: Tokens, hidden: torch.Tensor, pred: torch.Tensor, rows: int = 8) -> Image.Image:
        """Per text: the original, the masked input (hidden sub-words as [____]) and the
        reconstruction (predicted sub-words in red where hidden), wrapped to the picture's width."""
        if pred.dim() == 2:  # a head that predicted at the hidden sub-words only (training): place them
            dense = tokens.ids.clone()
            targets = hidden & (tokens.valid if tokens.valid is not None else torch.ones_like(hidden))
            dense[targets] = pred.argmax(-1)
            guess = dense[:rows]
        else:
            guess = pred[:rows].argmax(-1)
        rows = min(rows, tokens.ids.shape[0])
        width, line_height, margin = 760, 14, 6
        lines: list[list[tuple[str, tuple[int, int, int]]]] = []
        for row in range(rows):
            valid = tokens.valid[row] if tokens.valid is not None else torch.ones_like(tokens.ids[row], dtype=torch.bool)
            ids, shown, predicted = tokens.ids[row][valid], hidden[row][valid], guess[row][valid]
            lines += self.wrap("original", [(self.piece(i), BLACK) for i in ids.tolist()], width)
            lines += self.wrap("masked", [("[____]", GREY) if h else (self.piece(i), BLACK)
                                          for i, h in zip(ids.tolist(), shown.tolist())], width)
            lines += self.wrap("predicted", [(self.piece(p), RED if h else BLACK) if h else (self.piece(i), BLACK)
                                             for i, p, h in zip(ids.tolist(), predicted.tolist(), shown.tolist())],
                               width)
            lines.append([])
        picture = Image.new("RGB", (width, margin * 2 + line_height * len(lines)), "white")
        draw = ImageDraw.Draw(picture)
        for n, line in enumerate(lines):
            x = margin
            for text, colour in line:
                draw.text((x, margin + n * line_height), text, fill=colour)
                x += int(draw.textlength(text + " "))
        return picture

    def piece(self, token_id: int) -> str:
        return self.tokenizer.tokenizer.id_to_token(token_id) or f"<{token_id}>"

    @staticmethod
    def wrap(label: str, words: list[tuple[str, tuple[int, int, int]]], width: int, char: int = 6):
        """(text, colour) runs wrapped into lines of about `width` pixels, the first labelled."""
        lines, line, used = [], [(f"{label}:", GREY)], len(label) + 2
        for text, colour in words:
            if used + len(text) + 1 > width // char and len(line) > 1:
                lines.append(line)
                line, used = [("    ", GREY)], 4
            line.append((text, colour))
            used += len(text) + 1
        lines.append(line)
        return lines


BLACK, GREY, RED = (0, 0, 0), (130, 130, 130), (210, 30, 30)
