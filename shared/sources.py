"""What every modality's dataset adapters share: sample keys, and an iterator over a
source's files that survives a bad one.

A source (a folder of photos, scans, texts) yields Samples lazily. One bad file must
not end it: `SourceSamples.__next__` raises that file's BadInput once and the next
call goes on with the next file, so the shard writer (pipelines/shards.py) records
the file as rejected and asks for more, where a generator would have ended.
"""
from __future__ import annotations

import contextlib
import hashlib
import re
import signal
import threading
from typing import Callable, Iterable, Iterator

from .errors import BadInput, failed

DEFAULT_RECORD_SECONDS = 60.0  # what reading one input may take in `polymae shard` (time_budget)


class RecordTooSlow(BaseException):
    """Raised into a reader that has spent its input's time budget (`time_budget`). Not an Exception:
    a reader's own `except Exception` (a decoding library's wrapper) must not take it for bad bytes."""


@contextlib.contextmanager
def time_budget(seconds: float | None):
    """Raise RecordTooSlow inside the code of this block once it has run `seconds` (None or 0: no
    limit). The last guard against a reader that a damaged file sends round a loop its checks did
    not foresee: a SIGALRM timer, so only in the main thread, and native code is interrupted only
    when it hands back to Python."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise RecordTooSlow(f"reading it took longer than its time budget of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def unit_name(unit) -> str:
    """How an input unit is named in messages: a (path, key) pair by its path."""
    return str(unit[0] if isinstance(unit, tuple) and unit else unit)


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
        self.unit = None

    def __iter__(self) -> "SourceSamples":
        return self

    def __next__(self) -> dict:
        while True:
            try:
                item = next(self.pending)
            except StopIteration:
                self.unit = next(self.units)  # its StopIteration ends the source
                try:
                    self.pending = iter(self.expand(self.unit))
                except (Exception, RecordTooSlow) as error:  # noqa: BLE001  (BadInput, or a reader's own)
                    raise self.rejected(error) from None
                continue
            except (Exception, RecordTooSlow) as error:  # noqa: BLE001  inside the unit's generator: it is done
                self.pending = iter(())
                raise self.rejected(error) from None
            if isinstance(item, BadInput):
                raise item
            return item

    def rejected(self, error: BaseException) -> BadInput:
        """A unit's error as the BadInput that names it: its own, a budget spent, or a reader's exception
        (a string-typed array where numbers belong), which would otherwise end the whole source."""
        if isinstance(error, BadInput):
            return error
        if isinstance(error, RecordTooSlow):
            return BadInput(unit_name(self.unit), str(error), "too_slow")
        return failed(unit_name(self.unit), "reading it failed", error, "unreadable_input")
