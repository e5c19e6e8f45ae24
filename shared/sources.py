"""What every modality's dataset adapters share: sample keys, and an iterator over a
source's files that survives a bad one.

A source (a folder of photos, scans, texts) yields Samples lazily. One bad file must
not end it: `SourceSamples.__next__` raises that file's BadInput once and the next
call goes on with the next file, so the shard writer (pipelines/shards.py) records
the file as rejected and asks for more, where a generator would have ended.
"""
from __future__ import annotations

import hashlib
import re
from typing import Callable, Iterable, Iterator

from .errors import BadInput


def name_bytes(text: str) -> bytes:
    """The exact bytes of a name, whatever they are. A file name that is not valid UTF-8 reaches
    Python as a str with its undecodable bytes as lone surrogates (os.fsdecode, tarfile), which
    plain `.encode()` refuses; surrogateescape gives the original bytes back, surrogatepass
    any other lone surrogate. Valid text gives its UTF-8, as `.encode()` does."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


PRINTABLE_ASCII = re.compile(r"[ -~]*")


def sample_key(text: str, default: str = "sample") -> str:
    """A shard key from a name: no '.' (WebDataset splits member names there) and no '/'.

    ASCII punctuation becomes '_' (readable; "a.b" and "a_b" meet, which a source that can
    hold both de-duplicates, as the text adapter does). A name with anything else (letters
    beyond ASCII, bytes that are not UTF-8, control characters) also gets a digest of its
    exact bytes: "café" and "cafè", or b"caf\xe9" and b"caf\xe8", would otherwise be one key."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or default
    if not PRINTABLE_ASCII.fullmatch(text):
        key += "-" + hashlib.blake2b(name_bytes(text), digest_size=6).hexdigest()
    return key


class SourceSamples:
    """The samples of a source's units (files, lines), made lazily by `expand(unit)`, which
    returns an iterable of samples and of BadInput objects (a bad tile or line of a file),
    or raises BadInput (a bad file). `next` raises each BadInput once and the following
    call goes on. `classes` names the labels (index -> name) where the source has them."""

    def __init__(self, units: Iterable, expand: Callable[[object], Iterable], classes: Iterable[str] = ()):
        self.units, self.expand, self.classes = iter(units), expand, list(classes)
        self.pending: Iterator = iter(())

    def __iter__(self) -> "SourceSamples":
        return self

    def __next__(self) -> dict:
        while True:
            try:
                item = next(self.pending)
            except StopIteration:
                self.pending = iter(self.expand(next(self.units)))  # next(units)'s StopIteration ends the source
                continue
            except BadInput:  # raised inside the unit's generator: that unit is done
                self.pending = iter(())
                raise
            if isinstance(item, BadInput):
                raise item
            return item
