"""Bad input and bad numbers, on real data (scikit-learn's digits, scikit-image's photos
encoded with PIL):

1. every image adapter rejects bad input with a `BadInput` naming the file or record
   and a `.kind`; `polymae shard` over a folder with bad files among good ones
   finishes, prints each rejected file with its reason and lists it in the manifest;
2. property-based: random bytes, truncations and byte flips of real JPEG/PNG bytes and
   of a real tar shard raise nothing but `BadInput` (or decode), and never hang;
3. in `pretrain`, bad records, a truncated shard and a missing shard are skipped and
   counted per kind, and a low `trainer.max_bad_fraction` stops the run naming the counts;
4. the trainer's NaN/inf guard: one non-finite batch skips its step (logged with the
   step number, no trace left in the weights), `max_nonfinite` in a row stop the run
   and leave the last good checkpoint as it was.
"""
from __future__ import annotations

import io
import json
import re
import struct
import subprocess
import sys
import tarfile
import zlib
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from polymae.modalities.image import ImageModality
from polymae.modalities.image.adapters import decode_image, decode_jpeg_rgb, encode_png, read_source
from polymae.pipelines.pretrain import pretrain
from polymae.pipelines.runs import build_parts, split_shards
from polymae.pipelines.shards import resolve_shards, write_shards
from polymae.pipelines.stream import Loader, ShardStream, read_shard
from polymae.shared.checkpoint import checkpoint_dirs, load_weights
from polymae.shared.config import load_config
from polymae.shared.errors import BadInput, ConfigError
from polymae.shared.sources import time_budget
from polymae.shared.trainer import Trainer, TrainingError

skimage_data = pytest.importorskip("skimage.data")

CLI = [sys.executable, "-m", "polymae.pipelines.cli"]
SMALL_MODEL = ["model.depth=2", "model.width=64", "model.heads=2", "model.decoder_depth=1",
               "model.decoder_width=32", "model.decoder_heads=2"]
FAST = [*SMALL_MODEL, "data.source=null", "probe.enabled=false", "trainer.precision=fp32", "trainer.device=cpu",
        "trainer.max_minutes=null", "trainer.warmup_steps=2", "data.batch_size=32"]
FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def encode(array: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """64x64 crops of scikit-image photos: RGB and grey."""
    return {"astronaut": skimage_data.astronaut()[100:164, 200:264], "coffee": skimage_data.coffee()[:64, :64],
            "chelsea": skimage_data.chelsea()[50:114, 100:164], "camera": skimage_data.camera()[:64, :64]}


@pytest.fixture(scope="module")
def real_bytes(photos) -> dict[str, bytes]:
    return {"jpeg": encode(photos["astronaut"], "JPEG", quality=90), "png": encode(photos["astronaut"], "PNG")}


@pytest.fixture(scope="module")
def digit_samples() -> list[dict]:
    return list(read_source("digits"))


# == 1. every adapter rejects bad input, naming it ======================================================


@pytest.mark.parametrize("case, channels, kind", [
    ("truncated_jpeg", 3, "corrupt_image"),
    ("truncated_png", 3, "corrupt_image"),
    ("garbage", 3, "corrupt_image"),
    ("zero_bytes", 1, "empty_image"),
    ("zero_width_png", 1, "corrupt_image"),
    ("two_channels", 2, "wrong_channels"),
    ("four_channels", 4, "wrong_channels"),
])
def test_decode_image_rejects_bad_bytes_naming_the_file(real_bytes, case, channels, kind):
    jpeg, png = real_bytes["jpeg"], real_bytes["png"]

    def chunk(name: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + name + body + struct.pack(">I", zlib.crc32(name + body))

    # a well-formed PNG (valid CRCs) whose header says 0 x 5 pixels
    zero_width = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 5, 8, 0, 0, 0, 0))
                  + chunk(b"IDAT", zlib.compress(b"\x00" * 5)) + chunk(b"IEND", b""))
    data = {"truncated_jpeg": jpeg[: len(jpeg) // 2], "truncated_png": png[: len(png) // 2],
            "garbage": b"this is not an image, only text " * 10, "zero_bytes": b"",
            "zero_width_png": zero_width, "two_channels": png, "four_channels": png}[case]
    source = f"photos/shard-000003.tar:{case}.img"
    with pytest.raises(BadInput) as caught:
        decode_image(data, source, channels)
    error = caught.value
    assert error.kind == kind and error.source == source
    assert str(error).startswith(f"{source}: ") and len(error.problem) > 10
    assert "object at 0x" not in str(error)  # no memory address in a reason (manifests stay reproducible)


def test_pil_cannot_make_a_zero_size_image_file():
    """PIL refuses to write a 0-pixel image in any format, so a zero-size image can only come from
    hand-made bytes (the zero-width PNG above): PIL rejects those at identify, so they are
    `corrupt_image`; decode_image's own zero-size check ("empty_image") is a backstop."""
    for fmt in ("PNG", "JPEG", "BMP", "TIFF"):
        with pytest.raises(ValueError, match="empty image"):
            Image.new("L", (0, 5)).save(io.BytesIO(), format=fmt)


def test_image_modality_rejects_records_naming_them(digit_samples):
    digit = digit_samples[0]  # 8x8
    big_patches = ImageModality({"image_size": [16, 16], "patch_size": 16, "channels": 1})
    with pytest.raises(BadInput) as caught:
        big_patches.decode(digit)
    assert caught.value.kind == "too_small"
    assert "digit00000.image.png" in str(caught.value) and "8x8" in str(caught.value)
    assert "16px patch" in str(caught.value)

    with pytest.raises(BadInput) as caught:
        big_patches.decode({"__key__": "no_image_here", "cls": b"4"})
    assert caught.value.kind == "missing_payload" and "no_image_here" in str(caught.value)
    with pytest.raises(ConfigError, match="channels must be 1 or 3"):  # a wrong channel request in a config
        ImageModality({"channels": 2})


def test_missing_or_imageless_folder_is_rejected_up_front(tmp_path):
    missing = tmp_path / "no_such_folder"
    with pytest.raises(BadInput) as caught:
        read_source(str(missing))  # raised by the call, not on the first next()
    assert caught.value.kind == "missing_source" and str(missing) in str(caught.value)
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(BadInput) as caught:
        read_source(str(tmp_path))
    assert caught.value.kind == "missing_source" and "holds no" in str(caught.value)


def test_shard_cli_rejects_bad_files_in_a_folder_and_lists_them(tmp_path, photos):
    folder = tmp_path / "photos"
    folder.mkdir()
    good = {"astronaut.png": encode(photos["astronaut"], "PNG"), "coffee.jpg": encode(photos["coffee"], "JPEG"),
            "chelsea.jpg": encode(photos["chelsea"], "JPEG"), "camera.png": encode(photos["camera"], "PNG")}
    chelsea_jpeg, astronaut_png = good["chelsea.jpg"], good["astronaut.png"]
    bad = {"truncated.jpg": (chelsea_jpeg[: len(chelsea_jpeg) // 2], "corrupt_image"),
           "truncated.png": (astronaut_png[: len(astronaut_png) // 2], "corrupt_image"),
           "garbage.jpg": (b"GIF? no. PNG? no. just bytes " * 30, "corrupt_image"),
           "empty.png": (b"", "empty_image"),
           "tiny.png": (encode(photos["coffee"][:8, :8], "PNG"), "too_small")}  # 8x8 < one 16px patch
    for name, data in {**good, **{name: data for name, (data, _) in bad.items()}}.items():
        (folder / name).write_bytes(data)
    (folder / "dangling.png").symlink_to(tmp_path / "deleted.png")  # a file that cannot be read
    expected = {str(folder / name): kind for name, (_, kind) in bad.items()}
    expected[str(folder / "dangling.png")] = "unreadable_file"

    out = tmp_path / "shards"
    result = subprocess.run([*CLI, "shard", "image", str(folder), str(out)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    manifest = json.loads((out / "train-manifest.json").read_text())
    inputs = len(good) + len(expected)
    assert manifest["inputs"] == inputs
    assert manifest["total"] == inputs - len(manifest["rejected"]) == len(good)
    rejected = {entry["source"]: entry for entry in manifest["rejected"]}
    assert {source: entry["kind"] for source, entry in rejected.items()} == expected
    assert f"train: {len(good)} records in 1 shards, {len(expected)} rejected" in result.stdout
    for source, entry in rejected.items():
        assert entry["reason"] and f"rejected {source}: {entry['reason']}" in result.stdout
    assert rejected[str(folder / "dangling.png")]["key"] is None  # never read, so never keyed
    assert rejected[str(folder / "truncated.jpg")]["key"] == "truncated"


# == 2. property-based: bad bytes raise BadInput or decode, and never hang =============================


@FUZZ
@given(data=st.binary(max_size=4096), channels=st.sampled_from([1, 3]))
@example(data=b"\x89PNG\r\n\x1a\n", channels=3).via("a bare PNG signature")
@example(data=b"\xff\xd8\xff\xe0", channels=1).via("a bare JPEG start")
def test_random_bytes_decode_or_raise_bad_input(data, channels):
    with time_budget(20):  # a hang on bad input fails the test instead of stalling it
        try:
            image = decode_image(data, "fuzz.bin", channels)
        except BadInput as error:
            assert error.source == "fuzz.bin" and error.kind in ("corrupt_image", "empty_image")
            return
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == channels


def test_a_jpeg_with_an_altered_quantisation_table_decodes_alike_on_both_paths(real_bytes):
    """The fuzz test below compares pixels only where the direct path reads the bytes; this file it
    reads for certain: a changed quantisation table gives other, but well-formed, pixels."""
    original = real_bytes["jpeg"]
    table = original.index(b"\xff\xdb") + 5  # DQT marker, length (2 bytes), precision/id (1 byte)
    data = bytearray(original)
    data[table + 10] = (data[table + 10] + 7) % 256
    fast = decode_jpeg_rgb(bytes(data))
    assert fast is not None and not np.array_equal(fast, decode_jpeg_rgb(original))
    with Image.open(io.BytesIO(bytes(data))) as image:
        assert np.array_equal(fast, np.asarray(image.convert("RGB")))


@FUZZ
@given(cut=st.floats(0.0, 1.0),
       flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6))
def test_damaged_jpegs_the_fast_decoder_reads_give_pils_pixels(real_bytes, cut, flips):
    """Where libjpeg-turbo's direct path reads damaged JPEG bytes at all, PIL reads them to the same
    pixels: the decoder that runs never changes what a file decodes to (a one-off run over 20,000
    mutated JPEGs found no difference; whatever the direct path declines goes to PIL)."""
    original = real_bytes["jpeg"]
    data = bytearray(original[: max(4, int(cut * len(original)))])
    for where, value in flips:
        data[int(where * len(data))] = value
    with time_budget(20):  # a hang on bad input fails the test instead of stalling it
        fast = decode_jpeg_rgb(bytes(data))
        if fast is None:
            return
        with Image.open(io.BytesIO(bytes(data))) as image:
            expected = np.asarray(image.convert("RGB"))
    assert np.array_equal(fast, expected)


@FUZZ
@given(fmt=st.sampled_from(["jpeg", "png"]), cut=st.floats(0.0, 1.0),
       flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), max_size=6),
       channels=st.sampled_from([1, 3]))
def test_truncated_and_flipped_images_decode_or_raise_bad_input(real_bytes, fmt, cut, flips, channels):
    original = real_bytes[fmt]
    data = bytearray(original[: int(cut * len(original))])
    for where, value in flips:
        if data:
            data[int(where * len(data))] = value
    with time_budget(20):  # a hang on bad input fails the test instead of stalling it
        try:
            image = decode_image(bytes(data), f"astronaut.{fmt}", channels)
        except BadInput as error:
            assert error.source == f"astronaut.{fmt}" and error.kind in ("corrupt_image", "empty_image")
            return
    assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == channels
    if not flips:  # only a cut: the header is intact, so a decoded image has the original size
        assert image.shape[1:] == (64, 64)


@pytest.fixture(scope="module")
def small_shard(tmp_path_factory, digit_samples) -> tuple[Path, list[dict]]:
    """A real 8-record tar shard of digits, and its records as read_shard gives them."""
    folder = tmp_path_factory.mktemp("fuzz-shard")
    write_shards(digit_samples[:8], folder)
    path = folder / "train-000000.tar"
    records = list(read_shard(str(path)))
    assert len(records) == 8
    return path, records


def member_offsets(path: Path) -> list[int]:
    with tarfile.open(path) as tar:
        return [member.offset for member in tar.getmembers()]


def read_damaged(path: Path, data: bytes) -> tuple[list[dict], BadInput | None]:
    damaged = path.with_name("damaged.tar")
    damaged.write_bytes(data)
    records, error = [], None
    with time_budget(20):  # a hang on bad input fails the test instead of stalling it
        try:
            for record in read_shard(str(damaged)):
                records.append(record)
        except BadInput as caught:
            error = caught
    if error is not None:
        assert error.kind == "bad_shard" and error.source == str(damaged)
    for record in records:
        assert isinstance(record["__key__"], str)
        assert all(isinstance(value, bytes) for name, value in record.items() if not name.startswith("__"))
    return [{k: v for k, v in r.items() if k != "__url__"} for r in records], error


@FUZZ
@given(cut=st.integers(0, 2 ** 31))
def test_truncated_shard_yields_a_prefix_then_bad_input(small_shard, cut):
    """A cut shard gives the records before the damage, exactly, then BadInput; it reads
    through without error only when nothing was lost (the cut fell in the end padding)."""
    path, originals = small_shard
    data = path.read_bytes()
    records, error = read_damaged(path, data[: cut % (len(data) + 1)])
    originals = [{k: v for k, v in r.items() if k != "__url__"} for r in originals]
    assert records == originals[: len(records)]
    if error is None:
        assert records == originals


@FUZZ
@given(flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(0, 255)), min_size=1,
                      max_size=8),
       cut=st.one_of(st.none(), st.floats(0.0, 1.0)))
def test_flipped_shard_bytes_raise_only_bad_input(small_shard, flips, cut):
    path, _ = small_shard
    data = bytearray(path.read_bytes())
    for where, value in flips:
        data[int(where * len(data))] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    read_damaged(path, bytes(data))


@pytest.mark.parametrize("magic", [b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd"],
                         ids=["gzip", "bzip2", "xz", "zstd"])
def test_a_compression_magic_in_place_of_the_first_header_is_bad_input(small_shard, magic):
    """The reader opens shards with "r|*", which sniffs for compression: a damaged first header
    that looks like a gzip/bzip2/xz/zstd stream must still end as BadInput."""
    path, _ = small_shard
    data = path.read_bytes()
    records, error = read_damaged(path, magic + data[len(magic):])
    assert records == [] and error is not None


@FUZZ
@given(data=st.binary(max_size=3000))
@example(data=b"").via("an empty file")
def test_random_bytes_as_a_shard_raise_only_bad_input(small_shard, data):
    path, _ = small_shard
    records, error = read_damaged(path, data)
    if len(data) < 512:  # not even one tar block: never a quiet empty shard
        assert error is not None and records == []


# == 3. a training run skips and counts bad records per kind ===========================================

PLANTED = {"corrupt_image": 3, "missing_payload": 1, "too_small": 1, "bad_label": 1, "bad_shard": 2,
           "missing_shard": 1}


@pytest.fixture(scope="module")
def planted_shards(tmp_path_factory, digit_samples, photos) -> Path:
    """train-000000..4: 900 digits with 6 bad records planted among them; train-000005 and 6: 100
    more digits each, cut inside a member and cut exactly at a member header (which a plain tar
    reader takes for a quiet end of archive); train-000007: in the brace pattern, not on disk."""
    folder = tmp_path_factory.mktemp("planted")
    astronaut_jpeg = encode(photos["astronaut"], "JPEG", quality=90)
    chelsea_jpeg = encode(photos["chelsea"], "JPEG", quality=90)
    one_pixel = encode_png(np.array([[200]], dtype=np.uint8))
    bad = [{"__key__": "astronaut_cut", "image.jpg": astronaut_jpeg[: len(astronaut_jpeg) // 3], "cls": b"1"},
           {"__key__": "chelsea_cut", "image.jpg": chelsea_jpeg[: len(chelsea_jpeg) // 2], "cls": b"2"},
           {"__key__": "garbage", "image.jpg": b"\xff\xd8 not really a JPEG " * 40, "cls": b"3"},
           {"__key__": "no_payload", "cls": b"4"},
           {"__key__": "one_pixel", "image.png": one_pixel, "cls": b"5"},
           {"__key__": "bad_label", "image.png": digit_samples[0]["image.png"], "cls": b"seven"}]
    good = digit_samples[:900]
    samples = good[:50] + bad[:2] + good[50:400] + bad[2:4] + good[400:750] + bad[4:] + good[750:]
    manifest = write_shards(samples, folder, max_count=200)  # no validation: the bad records go in
    assert manifest["total"] == 906 and len(manifest["shards"]) == 5
    for i, (start, cut) in enumerate([(900, 0.5), (1000, None)]):
        write_shards(digit_samples[start:start + 100], folder, prefix=f"extra{i}")
        path = folder / f"extra{i}-000000.tar"
        cut_at = int(cut * path.stat().st_size) + 700 if cut else member_offsets(path)[101]
        assert cut_at % 512 == (188 if cut else 0)
        (folder / f"train-00000{5 + i}.tar").write_bytes(path.read_bytes()[:cut_at])
    return folder


def planted_counts(folder: Path) -> Counter:
    """PLANTED, and the records the two cut shards lost, counted from the count their `__shard__`
    header states (they are read as URLs, which no manifest lists): 100 less what still arrives."""
    counts = Counter(PLANTED)
    for i in (5, 6):
        arrived = []
        with pytest.raises(BadInput):
            arrived.extend(read_shard(str(folder / f"train-00000{i}.tar")))
        counts[f"missing_records:file://{folder}/train-00000{i}.tar"] = 100 - len(arrived)
    return counts


def planted_config(folder: Path, out_dir: Path, *overrides: str):
    # a file:// brace pattern: resolved as URLs, so train-000007 (absent) reaches the stream
    pattern = f"file://{folder}/train-{{000000..000007}}.tar"
    return load_config(None, [f"data.shards={pattern}", f"out_dir={out_dir}", *FAST, "data.num_workers=2",
                              "trainer.ckpt_every=1000", "trainer.log_every=5", *overrides])


def test_pretrain_skips_and_counts_bad_records_per_kind(planted_shards, tmp_path, capsys):
    folder = planted_shards
    config = planted_config(folder, tmp_path, "trainer.max_bad_fraction=0.5")
    # One epoch, read the way pretrain reads it, to know how many steps it holds (the trainer
    # goes on into the next epoch, which would count every bad record again).
    parts = build_parts(config)
    shards, _ = split_shards(config, parts.modalities)
    assert len(shards) == 8 and shards[-1] == f"file://{folder}/train-000007.tar"
    assert not (folder / "train-000007.tar").exists()
    stream = ShardStream(shards, parts.streams, batch_size=32, train=True,
                         shuffle_buffer=config.data.shuffle_buffer, seed=config.data.seed)
    epoch = [(len(batch), Counter(batch.skipped)) for batch in Loader(stream, num_workers=2)]
    expected = planted_counts(folder)
    assert sum((skipped for _, skipped in epoch), Counter()) == expected
    assert epoch[-1][0] > 0, "the epoch ends in a skip report; the run would stop before it"
    steps = sum(1 for size, _ in epoch if size)
    good_records = sum(size for size, _ in epoch)
    assert 950 < good_records < 1100  # the records before each cut arrive

    config = planted_config(folder, tmp_path, "trainer.max_bad_fraction=0.5", f"trainer.max_steps={steps}")
    summary = pretrain(config)
    assert summary["steps"] == steps
    assert summary["skipped"] == expected
    assert summary["records_seen"] == good_records
    on_disk = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    assert on_disk["skipped"] == expected
    lost = [f"file://{folder}/train-00000{i}.tar: {expected[f'missing_records:file://{folder}/train-00000{i}.tar']}"
            for i in (5, 6)]
    report = ", ".join(f"{kind}={count}" for kind, count in sorted(PLANTED.items()))
    report = report.replace("missing_shard=1", f"missing_records={sum(expected.values()) - sum(PLANTED.values())} "
                            f"[{', '.join(lost)}], missing_shard=1")
    assert f"skipped {sum(expected.values())} bad records: {report}" in capsys.readouterr().out


def test_pretrain_stops_when_bad_records_pass_max_bad_fraction(planted_shards, tmp_path):
    folder = planted_shards
    config = planted_config(folder, tmp_path, "trainer.max_bad_fraction=0.001", "trainer.max_steps=1000")
    with pytest.raises(TrainingError) as caught:
        pretrain(config)
    message = str(caught.value)
    found = re.search(r"(\d+) of (\d+) records were bad \(([^)]*)\), more than trainer.max_bad_fraction=0.001",
                      message)
    assert found, message
    bad, total = int(found[1]), int(found[2])
    counts = {kind: int(count) for kind, count in re.findall(r"(\w+)=(\d+)", found[3])}
    assert 200 <= total and 1 <= bad == sum(counts.values()) and bad / total > 0.001
    most = Counter(PLANTED, missing_records=200)  # the two cut shards' records (a few arrive)
    assert all(0 < count <= most[kind] for kind, count in counts.items()), counts


def test_a_missing_local_shard_in_a_brace_pattern_fails_before_training(planted_shards, tmp_path):
    """Local paths are checked when the shard list is resolved: a typo fails fast, naming the
    shard; only URLs (file://, pipe:, http) reach the stream and are counted as missing_shard."""
    folder = planted_shards
    config = load_config(None, [f"data.shards={folder}/train-{{000000..000007}}.tar", f"out_dir={tmp_path}",
                                *FAST])
    with pytest.raises(ValueError, match=r"train-000007\.tar does not exist"):
        pretrain(config)


# == 4. the NaN/inf guard ==============================================================================


@pytest.fixture(scope="module")
def clean_batches(tmp_path_factory, digit_samples) -> tuple[Path, list]:
    """(folder, 8 batches of 32 real digits), streamed from a shard in-process."""
    folder = tmp_path_factory.mktemp("clean")
    write_shards(digit_samples[:256], folder)
    config = load_config(None, [f"data.shards={folder}", f"out_dir={folder}", *FAST])
    parts = build_parts(config)
    stream = ShardStream(resolve_shards(folder), parts.streams, batch_size=32, train=True,
                         shuffle_buffer=64, seed=0)
    batches = list(Loader(stream, num_workers=0))
    assert [len(batch) for batch in batches] == [32] * 8
    return folder, batches


def poisoned(batch, value: float):
    values = batch.tokens.values.clone()
    values[0, 3, 1] = value  # one pixel of one sample
    (name,) = batch.streams
    return replace(batch, streams={name: replace(batch.tokens, values=values)})


def guard_trainer(folder: Path, run_dir: Path, *overrides: str) -> tuple[Trainer, list[str]]:
    config = load_config(None, [f"data.shards={folder}", f"out_dir={run_dir}", *FAST, "trainer.log_every=1",
                                "trainer.max_nonfinite=3", *overrides])
    parts = build_parts(config)  # seeded by trainer.seed: every call starts from the same weights
    logged: list[str] = []
    return Trainer(parts.module, config.trainer, run_dir, log=logged.append), logged


def test_a_non_finite_batch_skips_its_step_and_training_goes_on(clean_batches, tmp_path):
    folder, good = clean_batches
    plan = [good[0], good[1], poisoned(good[2], float("nan")), good[2], good[3],
            poisoned(good[4], float("inf")), good[4], good[5]]
    trainer, logged = guard_trainer(folder, tmp_path / "poisoned", "trainer.max_steps=6", "trainer.ckpt_every=1000")
    summary = trainer.fit(lambda epoch, start: iter(plan))
    assert summary["steps"] == 6 and summary["nonfinite_steps"] == [2, 4]
    skips = [line for line in logged if "non-finite loss" in line]
    assert len(skips) == 2
    assert skips[0].startswith("step 2: non-finite loss") and "step skipped (1 in a row)" in skips[0]
    assert skips[1].startswith("step 4: non-finite loss") and "(1 in a row)" in skips[1]  # the count was reset
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert np.isfinite(summary["final_loss"])

    # The same run without the poisoned batches ends on the very same weights: a skipped step
    # leaves no gradient, optimizer moment or schedule step behind.
    clean, _ = guard_trainer(folder, tmp_path / "clean", "trainer.max_steps=6", "trainer.ckpt_every=1000")
    clean.fit(lambda epoch, start: iter(good[:6]))
    for (name, a), b in zip(trainer.model.state_dict().items(), clean.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_max_nonfinite_in_a_row_stop_the_run_and_keep_the_last_checkpoint(clean_batches, tmp_path):
    folder, good = clean_batches
    run_dir = tmp_path / "run"
    trainer, logged = guard_trainer(folder, run_dir, "trainer.max_steps=50", "trainer.ckpt_every=2")
    before: dict[str, bytes] = {}

    def batches(epoch, start):
        yield from good[:2]  # steps 1, 2; the checkpoint of step 2 is written before the next batch is asked for
        for path in sorted((run_dir / "checkpoints").rglob("*")):
            if path.is_file():
                before[str(path.relative_to(run_dir))] = path.read_bytes()
        yield from (poisoned(batch, float("nan")) for batch in good[2:])

    with pytest.raises(TrainingError) as caught:
        trainer.fit(batches)
    message = str(caught.value)
    assert "3 non-finite losses in a row (steps [2, 2, 2])" in message
    assert str(run_dir / "checkpoints" / "step-000002") in message
    assert [line[:7] for line in logged if "non-finite" in line] == ["step 2:"] * 3
    assert trainer.step == 2 and set(before) == {f"checkpoints/step-000002/{name}" for name in
                                                 ("model.safetensors", "state.pt", "config.yaml", "checksums.json")}

    # on disk: the step-2 checkpoint, byte for byte, and nothing else (no temporary, no later step)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002"]
    after = {str(p.relative_to(run_dir)): p.read_bytes() for p in (run_dir / "checkpoints").rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in checkpoint_dirs(run_dir)] == ["step-000002"]
    fresh, _ = guard_trainer(folder, tmp_path / "fresh")
    load_weights(run_dir / "checkpoints" / "step-000002", fresh.model)
    for (name, saved), live in zip(fresh.model.state_dict().items(), trainer.model.state_dict().values()):
        assert torch.isfinite(saved).all() and torch.equal(saved, live), name  # the NaNs never reached the weights


@pytest.mark.parametrize("case", ["undecodable", "rejected_by_the_recipe"])
def test_a_stream_with_no_usable_record_stops_with_one_line_instead_of_spinning(tmp_path, digit_samples, case):
    """Every record skipped (bytes no decoder reads; real 8x8 digits a 224px recipe rejects): each epoch
    is only a skip report, so the run used to loop forever; it stops after one epoch, with the counts."""
    if case == "undecodable":
        samples = [{"__key__": f"garbage{i}", "image.jpg": b"\xff\xd8 not really a JPEG " * 40, "cls": b"1"}
                   for i in range(40)]
        size = ["modality_options.image_size=[8,8]", "modality_options.patch_size=2"]
    else:
        samples = digit_samples[:40]
        size = ["modality_options.image_size=[224,224]", "modality_options.patch_size=16"]  # 8x8 digits: too small
    write_shards(samples, tmp_path / "shards")
    result = subprocess.run([*CLI, "pretrain", f"data.shards={tmp_path / 'shards'}", f"out_dir={tmp_path / 'runs'}",
                             *FAST, "data.num_workers=1", "trainer.max_steps=50", *size],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("polymae pretrain: error:")]
    assert len(error) == 1 and "no record of the data could be used" in error[0], result.stderr[-2000:]
    assert "0 usable records and 40 bad ones" in error[0]
