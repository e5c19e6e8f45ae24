"""The WebDataset pipeline on real data: scikit-learn's 1,797 digits written as
shards and read back through DataLoader workers, with corrupt JPEGs, records
without a payload, truncated and missing shards planted among good ones."""
from __future__ import annotations

import io
import itertools
import json
import shutil
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from polymae.modalities.image import ImageModality
from polymae.pipelines.shards import resolve_shards, shard_source, write_shards
from polymae.pipelines.stream import Loader, ShardStream, StreamPosition, StreamSpec, read_shard
from polymae.pipelines.transport import BatchRing, BlockView, Packed
from polymae.shared.errors import BadInput, TrainingError
from polymae.shared.masking import build_masker
from polymae.shared.tokens import Batch, collate

NUM_DIGITS = 1797
MAX_COUNT = 400  # 1,797 digits -> shards of 400, 400, 400, 400 and 197 records


@pytest.fixture(scope="module")
def modality() -> ImageModality:
    return ImageModality({"image_size": [8, 8], "patch_size": 2, "channels": 1, "crop_scale": [0.6, 1.0],
                          "hflip": False})


@pytest.fixture(scope="module")
def masker():
    return build_masker("random", 0.75)


def one_stream(modality, masker) -> list[StreamSpec]:
    """The stream list of single-image records: one stream, named image."""
    return [StreamSpec("image", modality, masker)]


@pytest.fixture(scope="module")
def digits(tmp_path_factory, modality) -> tuple[Path, dict]:
    """(folder, train manifest) of the digits, sharded without a val split."""
    out = tmp_path_factory.mktemp("digits")
    manifests = shard_source(modality, "digits", out, max_count=MAX_COUNT)
    assert list(manifests) == ["train"]
    return out, manifests["train"]


@pytest.fixture(scope="module")
def all_keys(modality) -> list[str]:
    return [sample["__key__"] for sample in modality.read_source("digits")]


@pytest.fixture(scope="module")
def bad_samples() -> list[dict]:
    """A JPEG cut in half, garbage bytes named image.jpg, and a record with no image."""
    skimage_data = pytest.importorskip("skimage.data")
    buffer = io.BytesIO()
    Image.fromarray(skimage_data.astronaut()).save(buffer, format="JPEG", quality=90)
    jpeg = buffer.getvalue()
    return [{"__key__": "astronaut_truncated", "__source__": "astronaut.jpg", "image.jpg": jpeg[: len(jpeg) // 2],
             "cls": b"1"},
            {"__key__": "garbage", "image.jpg": b"this is not a JPEG file " * 20, "cls": b"2"},
            {"__key__": "no_payload", "cls": b"3"}]


def tar_keys(path: str | Path) -> list[str]:
    """Record keys in a shard, as plain `tar tf` lists its members (less the `__shard__` header)."""
    names = subprocess.run(["tar", "tf", str(path)], check=True, capture_output=True, text=True).stdout.split()
    return list(dict.fromkeys(name.split(".", 1)[0] for name in names if not name.startswith("__")))


def read_epoch(stream: ShardStream, num_workers: int) -> dict:
    """One pass of a loader: keys in delivery order, per-key tokens and masks, skip counts."""
    keys, values, hidden, skipped, empty_batches = [], {}, {}, Counter(), 0
    for batch in Loader(stream, num_workers):
        skipped.update(batch.skipped)
        if len(batch) == 0:
            empty_batches += 1
            continue
        # workers ship uint8 pixels packed with the mask in one shared block; the loader hands over
        # normalised floats and masks whose ids_restore still inverts ids_shuffle
        assert batch.tokens.values.dtype == torch.float32
        positions = torch.arange(batch.mask.hidden.shape[1]).expand_as(batch.mask.ids_shuffle)
        assert torch.equal(batch.mask.ids_shuffle.gather(1, batch.mask.ids_restore), positions)
        assert batch.labels is not None and len(batch.labels) == len(batch)
        keys += batch.keys
        for i, key in enumerate(batch.keys):
            values[key], hidden[key] = batch.tokens.values[i], batch.mask.hidden[i]
    return {"keys": keys, "values": values, "hidden": hidden, "skipped": skipped, "empty_batches": empty_batches}


# -- writing ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs the tar command")
def test_shards_are_plain_tars_matching_the_manifest(digits):
    out, manifest = digits
    counts = [shard["count"] for shard in manifest["shards"]]
    assert counts == [400, 400, 400, 400, 197]
    assert manifest["total"] == NUM_DIGITS == manifest["inputs"] - len(manifest["rejected"])
    assert manifest["rejected"] == [] and manifest["modality"] == "image"
    assert json.loads((out / "train-manifest.json").read_text()) == manifest
    for shard in manifest["shards"]:
        path = out / shard["name"]
        assert len(tar_keys(path)) == shard["count"]
        assert path.stat().st_size == shard["bytes"]
        with tarfile.open(path) as tar:  # self-describing: the first member states the record count
            first = tar.next()
            assert first.name == "__shard__"
            assert json.loads(tar.extractfile(first).read()) == {"records": shard["count"]}
    assert sorted(p.name for p in out.iterdir()) == sorted([s["name"] for s in manifest["shards"]]
                                                           + ["train-manifest.json"])  # no temporary files left


def test_validation_rejects_corrupt_samples_with_reasons(tmp_path, modality, bad_samples):
    good = list(itertools.islice(modality.read_source("digits"), 50))
    samples = good[:10] + bad_samples[:1] + good[10:30] + bad_samples[1:] + good[30:]
    manifest = write_shards(samples, tmp_path, max_count=20, validate=modality.decode, modality="image")
    rejected = {entry["key"]: entry for entry in manifest["rejected"]}
    assert set(rejected) == {"astronaut_truncated", "garbage", "no_payload"}
    assert rejected["astronaut_truncated"]["source"] == "astronaut.jpg"
    assert rejected["astronaut_truncated"]["kind"] == "corrupt_image"
    assert "cannot decode image" in rejected["astronaut_truncated"]["reason"]
    assert rejected["no_payload"]["kind"] == "missing_payload"
    assert manifest["total"] == len(samples) - len(manifest["rejected"]) == 50
    assert [shard["count"] for shard in manifest["shards"]] == [20, 20, 10]


def test_errors_raised_by_the_source_are_recorded_and_writing_goes_on(tmp_path, modality):
    class SourceWithUnreadableFile:
        """An iterator whose third file cannot be read, as a folder with a bad permission would be."""

        def __init__(self):
            self.samples, self.calls = iter(itertools.islice(modality.read_source("digits"), 10)), 0

        def __iter__(self):
            return self

        def __next__(self):
            self.calls += 1
            if self.calls == 3:
                raise BadInput("photos/cat.png", "permission denied", "unreadable_file")
            return next(self.samples)

    manifest = write_shards(SourceWithUnreadableFile(), tmp_path, validate=modality.decode)
    assert manifest["rejected"] == [{"key": None, "source": "photos/cat.png", "kind": "unreadable_file",
                                     "reason": "permission denied"}]
    assert manifest["total"] == 10 == manifest["inputs"] - 1


def test_shard_source_splits_deterministically(digits_shards, tmp_path, modality):
    train = json.loads((digits_shards / "train-manifest.json").read_text())
    val = json.loads((digits_shards / "val-manifest.json").read_text())
    assert train["total"] + val["total"] == NUM_DIGITS
    assert 0.15 < val["total"] / NUM_DIGITS < 0.25
    train_keys = {key for path in resolve_shards(digits_shards, prefix="train") for key in tar_keys(path)}
    val_keys = {key for path in resolve_shards(digits_shards, prefix="val") for key in tar_keys(path)}
    assert not train_keys & val_keys and len(train_keys | val_keys) == NUM_DIGITS
    again = shard_source(modality, "digits", tmp_path, val_fraction=0.2, seed=0, max_count=500)
    assert again["val"]["shards"] == val["shards"]  # same split, byte-identical sizes
    assert (tmp_path / "val-000000.tar").read_bytes() == (digits_shards / "val-000000.tar").read_bytes()


# -- reading -----------------------------------------------------------------------------------------------


def test_an_epoch_delivers_every_key_once_and_is_deterministic(digits, modality, masker, all_keys):
    out, _ = digits
    shards = resolve_shards(out)
    evaluation = read_epoch(ShardStream(shards, one_stream(modality, masker), batch_size=64, train=False),
                            num_workers=2)
    assert sorted(evaluation["keys"]) == sorted(all_keys) and len(evaluation["keys"]) == NUM_DIGITS
    assert evaluation["skipped"] == Counter() and evaluation["empty_batches"] == 0

    stream = ShardStream(shards, one_stream(modality, masker), batch_size=64, train=True, shuffle_buffer=300, seed=7)
    first = read_epoch(stream, num_workers=2)
    assert sorted(first["keys"]) == sorted(all_keys)
    assert read_epoch(stream, num_workers=2)["keys"] == first["keys"]  # same epoch: same order

    in_process = read_epoch(stream, num_workers=0)  # another worker split, so another order ...
    assert in_process["keys"] != first["keys"]
    for key in all_keys[::97]:  # ... but each sample's augmentation and mask are the same
        assert torch.equal(in_process["values"][key], first["values"][key])
        assert torch.equal(in_process["hidden"][key], first["hidden"][key])

    stream.set_epoch(1)
    second = read_epoch(stream, num_workers=2)
    assert second["keys"] != first["keys"] and sorted(second["keys"]) == sorted(all_keys)
    assert any(not torch.equal(second["hidden"][key], first["hidden"][key]) for key in all_keys[:20])


def test_one_loader_with_persistent_workers_follows_set_epoch(digits, modality, masker, all_keys):
    """Workers live from one epoch to the next and read the epoch the main process sets."""
    stream = ShardStream(resolve_shards(digits[0]), one_stream(modality, masker), batch_size=64, train=True,
                         shuffle_buffer=300, seed=7)
    loader = Loader(stream, num_workers=2)
    epochs = []
    for epoch in (0, 1, 0):
        stream.set_epoch(epoch)
        epochs.append([key for batch in loader for key in batch.keys])
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1]) == sorted(all_keys)
    assert epochs[2] == epochs[0]  # epoch 0 again: the same order, from the same workers
    stream.set_epoch(1)
    assert read_epoch(stream, num_workers=2)["keys"] == epochs[1]  # as a fresh loader sees epoch 1
    stream.set_epoch(0)
    partial = iter(loader)
    next(partial)  # a pass left early ...
    assert [key for batch in loader for key in batch.keys] == epochs[0]  # ... the next pass starts afresh


def test_bad_records_are_skipped_counted_and_good_ones_all_arrive(tmp_path, modality, masker, bad_samples):
    good = list(modality.read_source("digits"))
    samples = good[:100] + bad_samples[:1] + good[100:700] + bad_samples[1:2] + good[700:1500] + bad_samples[2:] \
        + good[1500:]
    manifest = write_shards(samples, tmp_path, max_count=MAX_COUNT)  # no validation: the bad ones are written
    assert manifest["total"] == NUM_DIGITS + 3
    stream = ShardStream(resolve_shards(tmp_path), one_stream(modality, masker), batch_size=64, train=True,
                         shuffle_buffer=200)
    epoch = read_epoch(stream, num_workers=2)
    assert sorted(epoch["keys"]) == sorted(sample["__key__"] for sample in good)
    assert epoch["skipped"] == Counter({"corrupt_image": 2, "missing_payload": 1})


def test_a_worker_with_only_bad_records_still_reports_them(tmp_path, modality, masker, bad_samples):
    write_shards(itertools.islice(modality.read_source("digits"), 30), tmp_path, prefix="good")
    write_shards(bad_samples, tmp_path, prefix="bad")
    shards = resolve_shards(tmp_path, prefix="good") + resolve_shards(tmp_path, prefix="bad")
    epoch = read_epoch(ShardStream(shards, one_stream(modality, masker), batch_size=8, train=False), num_workers=2)
    assert len(epoch["keys"]) == 30
    assert epoch["empty_batches"] == 1  # the second worker's skip report
    assert epoch["skipped"] == Counter({"corrupt_image": 2, "missing_payload": 1})


def member_offsets(path: Path) -> list[int]:
    with tarfile.open(path) as tar:
        return [member.offset for member in tar.getmembers()]


def test_truncated_and_missing_shards_are_counted_and_the_rest_arrive(digits, tmp_path, modality, masker):
    out, manifest = digits
    shards = [tmp_path / shard["name"] for shard in manifest["shards"]]
    for shard in manifest["shards"]:  # copied without their manifest: their own headers say what they hold
        shutil.copy(out / shard["name"], tmp_path)
    intact_keys = [key for path in shards[::2] for key in tar_keys(path)]
    cut_in_half, cut_at_a_header = shards[1], shards[3]
    data = cut_in_half.read_bytes()
    cut_in_half.write_bytes(data[: len(data) // 2])
    header = member_offsets(cut_at_a_header)[101]  # a tar reader would take this for a quiet end of archive
    cut_at_a_header.write_bytes(cut_at_a_header.read_bytes()[:header])
    missing = tmp_path / "train-000099.tar"
    all_shards = [str(path) for path in shards] + [str(missing)]

    epoch = read_epoch(ShardStream(all_shards, one_stream(modality, masker), batch_size=64, train=True), num_workers=2)
    arrived = set(epoch["keys"])
    lost = {f"missing_records:{path}": MAX_COUNT - sum(key in arrived for key in tar_keys(out / path.name))
            for path in (cut_in_half, cut_at_a_header)}
    assert all(0 < count < MAX_COUNT for count in lost.values()), lost
    assert epoch["skipped"] == Counter({"bad_shard": 2, "missing_shard": 1, **lost})
    assert len(epoch["keys"]) == len(set(epoch["keys"]))
    assert set(intact_keys) <= set(epoch["keys"])
    assert len(intact_keys) < len(epoch["keys"]) < NUM_DIGITS  # records before the damage still arrive


def test_readers_sharing_a_shard_read_every_record_once(tmp_path, modality, masker, all_keys):
    """Fewer shards than readers (ranks x workers): reader j of k keeps the records whose index is
    j modulo k. Before: "1 shards cannot feed 2 ranks" (and a second worker of one rank read nothing)."""
    one = tmp_path / "one"
    write_shards(modality.read_source("digits"), one, max_count=NUM_DIGITS)  # the built-in digits: one shard
    two = tmp_path / "two"
    write_shards(modality.read_source("digits"), two, max_count=1500)  # 1,500 and 297 records
    for folder, world_size, workers in [(one, 2, 2), (one, 3, 2), (one, 1, 2), (two, 2, 2), (two, 3, 1)]:
        stream = ShardStream(resolve_shards(folder), one_stream(modality, masker), batch_size=64)
        skipped, per_reader = Counter(), []
        for rank, worker in itertools.product(range(world_size), range(workers)):
            records = stream.records(StreamPosition(rank, world_size, worker, workers), skipped)
            per_reader.append([record["__key__"] for record in records])
        keys = [key for reader in per_reader for key in reader]
        assert sorted(keys) == sorted(all_keys), (folder.name, world_size, workers)  # each once, none lost
        assert skipped == Counter()  # an intact shard read in parts is no missing record
        if folder == one:  # one shard shared k ways: the readers' shares differ by one record at most
            sizes = [len(reader) for reader in per_reader]
            assert max(sizes) - min(sizes) <= 1, sizes

    shard = resolve_shards(one)[0]  # the parts, in order, interleave back into the shard's records
    parts = [[r["__key__"] for r in read_shard(shard, (j, 3))] for j in range(3)]
    assert [key for row in itertools.zip_longest(*parts) for key in row if key] == tar_keys(shard)

    # the whole pipeline: 2 workers of one process share the one shard and deliver each digit once
    epoch = read_epoch(ShardStream(resolve_shards(one), one_stream(modality, masker), batch_size=64), num_workers=2)
    assert sorted(epoch["keys"]) == sorted(all_keys) and epoch["skipped"] == Counter()


def test_records_a_shard_alone_loses_at_a_record_boundary_are_counted_from_its_header(tmp_path, modality, masker):
    """The fuzz run's gap: a shard no manifest lists, its tail zeroed (a clean end of archive to a tar
    reader) or cut exactly at a record boundary, lost its records without a count. Each shard's
    `__shard__` header now states its count. A tar with no header stays readable."""
    write_shards(itertools.islice(modality.read_source("digits"), 40), tmp_path / "written", max_count=40)
    original = tmp_path / "written" / "train-000000.tar"
    keys = tar_keys(original)
    with tarfile.open(original) as tar:
        members = tar.getmembers()
    starts = {}  # each record's first member's offset
    for member in members:
        starts.setdefault(member.name.split(".", 1)[0], member.offset)
    damaged = tmp_path / "alone" / "train-000000.tar"  # no manifest beside it
    damaged.parent.mkdir()
    stream = ShardStream([str(damaged)], one_stream(modality, masker), batch_size=8)
    data = original.read_bytes()
    for index in range(1, len(keys), 3):
        boundary = starts[keys[index]]
        # zeroed, the tar ends cleanly after record index - 1; cut, the reader cannot tell that record whole
        for how, bytes_, arrive in [("zeroed", data[:boundary] + bytes(len(data) - boundary), index),
                                    ("cut", data[:boundary], index - 1)]:
            damaged.write_bytes(bytes_)
            for readers in (1, 2):
                skipped = Counter()
                got = [r["__key__"] for j in range(readers)
                       for r in stream.shard_records(str(damaged), skipped, part=(j, readers))]
                assert sorted(got) == sorted(keys[:arrive]), (how, index)
                assert skipped == Counter({"bad_shard": 1, f"missing_records:{damaged}": len(keys) - arrive}), \
                    (how, index, readers)
                stream.missing_counted.clear()

    header_offset = members[0].offset_data  # a count that is no longer a number: damage, and every record arrives
    damaged.write_bytes(data[:header_offset + 12] + b"x" + data[header_offset + 13:])
    skipped = Counter()
    assert len(list(stream.shard_records(str(damaged), skipped))) == len(keys) and skipped == {"bad_shard": 1}

    # a tar written before the header (or by another tool): read in full, nothing to count against
    with tarfile.open(original) as tar, tarfile.open(damaged, "w") as old:
        for member in tar:
            if member.name != "__shard__":
                old.addfile(member, tar.extractfile(member))
    skipped = Counter()
    assert [r["__key__"] for r in stream.shard_records(str(damaged), skipped)] == keys and skipped == Counter()


def test_resampled_stream_is_endless_and_drops_unreadable_shards(digits, modality, masker, tmp_path):
    out, _ = digits
    shards = resolve_shards(out) + [str(tmp_path / "gone.tar")]
    stream = ShardStream(shards, one_stream(modality, masker), batch_size=32, resampled=True, shuffle_buffer=100)
    batches = list(itertools.islice(Loader(stream, num_workers=2), 80))  # 2,560 samples > one pass
    assert all(len(batch) == 32 for batch in batches if len(batch))
    assert sum(batch.skipped.get("missing_shard", 0) for batch in batches) <= 2  # once per worker at most
    assert len({key for batch in batches for key in batch.keys}) > NUM_DIGITS // 2
    with pytest.raises(TrainingError, match=r"no record of the data could be used: drawing each of the 1 shards"):
        next(iter(ShardStream([str(tmp_path / "gone.tar")], one_stream(modality, masker), batch_size=4,
                              resampled=True)))


# -- finding shards -----------------------------------------------------------------------------------------


def test_resolve_shards(digits, tmp_path, digits_shards):
    out, manifest = digits
    names = [str(out / shard["name"]) for shard in manifest["shards"]]
    assert resolve_shards(out) == names
    assert resolve_shards(f"{out}/train-{{000000..000004}}.tar") == names
    assert resolve_shards(f"{out}/train-*.tar") == names
    assert resolve_shards([names[0], f"{out}/train-00000[12].tar"]) == names[:3]
    assert resolve_shards("pipe:curl -s https://example.org/train-{0..2}.tar") == [
        f"pipe:curl -s https://example.org/train-{i}.tar" for i in range(3)]
    assert resolve_shards(digits_shards, prefix="val") == [str(digits_shards / "val-000000.tar")]
    with pytest.raises(ValueError, match="several splits"):
        resolve_shards(digits_shards)
    with pytest.raises(ValueError, match=f"folder {tmp_path} holds no"):
        resolve_shards(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        resolve_shards(f"{out}/train-{{000000..000009}}.tar")


def test_a_workers_batches_cross_in_a_reused_shared_block_of_uint8_pixels(digits, modality, masker):
    """A worker stacks each batch into a block of its shared-memory ring, pixels still uint8; only
    a slot's first batch carries the block, later ones a description of their tensors in it.
    The Loader's finish turns the pixels into the same floats an in-process read gives."""
    stream = ShardStream(resolve_shards(digits[0]), one_stream(modality, masker), batch_size=64, train=False)
    loader = Loader(stream, num_workers=1)
    messages = []
    for message in loader.loader:  # as they arrive, then unpacked and released as the Loader does
        messages.append(message)
        loader.ring.release(*loader.ring.unpack(message))
    assert len(messages) == -(-NUM_DIGITS // 64)
    assert all(isinstance(m, Packed) for m in messages)
    first = messages[0]
    assert first.block is not None and first.block.is_shared()
    notes = [first.batch.tokens.values, first.batch.tokens.coords, first.batch.mask.hidden,
             first.batch.mask.ids_shuffle, first.batch.mask.ids_restore, first.batch.labels]
    assert all(isinstance(n, BlockView) for n in notes) and first.batch.tokens.values.dtype == torch.uint8
    # a pass reads more batches than a worker has slots, and every block crossed once
    blocks = [(m.slot, m.generation) for m in messages if m.block is not None]
    assert len(blocks) == len(set(blocks)) <= loader.ring.slots < len(messages)

    in_process = list(Loader(stream, num_workers=0))
    kept = list(loader)  # all held at once: what a slot held before it was reused is intact
    assert [b.keys for b in kept] == [b.keys for b in in_process]
    for ours, theirs in zip(kept, in_process):
        assert ours.tokens.values.dtype == torch.float32 and torch.equal(ours.tokens.values, theirs.tokens.values)
        assert torch.equal(ours.mask.ids_restore, theirs.mask.ids_restore)
        assert torch.equal(ours.labels, theirs.labels) and torch.equal(ours.tokens.coords, theirs.tokens.coords)
    assert not any(t.is_shared() for t in (kept[0].tokens.values, kept[0].mask.hidden, kept[0].labels))


def test_spawned_workers_deliver_what_forked_ones_do(digits, modality):
    """Spawned workers (macOS's default, and CUDA runs') receive the stream pickled, ColorMAE
    masker and shared-memory ring included, and deliver the same batches."""
    stream = ShardStream(resolve_shards(digits[0]), one_stream(modality, build_masker("green", 0.75)), batch_size=256,
                         train=True, shuffle_buffer=300, seed=3)
    forked = {key: (b.tokens.values[i], b.mask.hidden[i]) for b in Loader(stream, num_workers=2)
              for i, key in enumerate(b.keys)}
    spawned = list(Loader(stream, num_workers=2, start_method="spawn"))
    assert sorted(key for b in spawned for key in b.keys) == sorted(forked)
    for batch in spawned:
        for i, key in enumerate(batch.keys):
            assert torch.equal(batch.tokens.values[i], forked[key][0])
            assert torch.equal(batch.mask.hidden[i], forked[key][1])


class RawPixels(ImageModality):
    """An image modality whose tokens need no finishing: the uint8 values reach the caller as they crossed."""

    def finish(self, tokens):
        return tokens


def test_batches_that_need_no_finishing_are_copied_out_before_their_slot_is_reused(digits, masker):
    raw = RawPixels({"image_size": [8, 8], "patch_size": 2, "channels": 1, "hflip": False})
    stream = ShardStream(resolve_shards(digits[0]), one_stream(raw, masker), batch_size=32, train=True,
                         shuffle_buffer=100)
    kept = list(Loader(stream, num_workers=2))  # ~57 batches through 2 workers x 6 slots, all held
    in_process = {key: (b.tokens.values[i], b.mask.hidden[i]) for b in Loader(stream, num_workers=0)
                  for i, key in enumerate(b.keys)}
    assert sum(map(len, kept)) == NUM_DIGITS
    for batch in kept:
        assert batch.tokens.values.dtype == torch.uint8
        for i, key in enumerate(batch.keys):
            assert torch.equal(batch.tokens.values[i], in_process[key][0])
            assert torch.equal(batch.mask.hidden[i], in_process[key][1])


def test_a_ring_slot_is_written_only_when_free_and_grows_for_a_bigger_batch(modality, masker):
    """The ring's own rules, in one process: a busy slot is never handed out (a one-off segment
    is); a slot that must grow gets a new block, sent again; a new pass frees and resends all."""
    samples = list(modality.read_source("digits"))[:6]
    items = []
    for sample in samples:
        generator = torch.Generator().manual_seed(0)
        tokens = modality.tokenize(modality.decode(sample), generator, train=False)
        items.append(({"image": tokens}, {"image": masker(tokens, generator)}, None, sample["__key__"]))
    ring = BatchRing(num_workers=1, slots=2)
    writer = ring.writer(0)
    writer.new_pass()
    packed = [writer.pack(collate(items[:2], allocate=writer.allocate)) for _ in range(2)]
    assert [(p.slot, p.block is not None) for p in packed] == [(0, True), (1, True)]
    one_off = writer.pack(collate(items[:2], allocate=writer.allocate))  # both slots busy
    assert isinstance(one_off, Batch) and one_off.tokens.values.is_shared()

    batch, where = ring.unpack(packed[0])
    assert torch.equal(batch.tokens.values, collate(items[:2]).tokens.values)
    released = ring.release(batch, where)  # slot 0 free again, the batch copied out of it
    assert torch.equal(released.tokens.values, collate(items[:2]).tokens.values)
    again = writer.pack(collate(items[:2], allocate=writer.allocate))
    assert (again.slot, again.generation, again.block) == (0, 1, None)  # reused as mapped
    ring.release(*ring.unpack(again))
    bigger = writer.pack(collate(items, allocate=writer.allocate))
    assert (bigger.slot, bigger.generation) == (0, 2) and bigger.block is not None
    assert torch.equal(ring.unpack(bigger)[0].mask.ids_restore, collate(items).mask.ids_restore)
    writer.new_pass()
    assert writer.pack(collate(items[:2], allocate=writer.allocate)).block is not None
